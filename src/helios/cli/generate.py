"""`helios generate`: checks first, then the pipeline's stream into a video file, with progress and resume.

The order matters: everything that can be checked cheaply (paths, the model name, the schedule file, sizes, the
conditioning image or video) is checked before the model is loaded, and the pipeline checks the rest when the stream
is created; only then is a file written. After a failure or Ctrl-C the partial file keeps the finished chunks.
"""

from __future__ import annotations

import sys
import warnings
from pathlib import Path

from ..pipeline.folder import check_model_name, noise_notice, open_model
from ..pipeline.video_io import SUFFIXES, VideoSettings, VideoWriter, partial_path, to_uint8
from ..scale.launch import check_launch, leave_together, process_device, process_group, rank, world_size
from .checks import check_flags, check_lora, check_output, device_and_dtype, text_encoder_device
from .common import EXIT_INTERRUPTED, GenerationFailed, check_writable, quiet_libraries
from .progress import Progress, peak_memory
from .resume import command_settings, given_options, resolve_arguments


def generate(args) -> int:
    check_flags(args)
    state = resolve_arguments(args)  # with --resume, the saved run's settings fill in what is left out
    if rank() == 0:  # under torchrun only rank 0 writes (on its own machine)
        check_output(args)
    _check_paths(args)
    check_model_name(args.model)
    from ..sampling.prompts import read_schedule

    if state is not None:
        prompt = state.schedule
    else:
        prompt = (read_schedule(args.prompt_schedule, args.chunks_per_prompt, args.schedule_id)
                  if args.prompt_schedule else args.prompt)
    media = {} if state else _media(args)  # a resumed run finds the conditioning in its saved memory
    quiet_libraries(args.debug)
    if rank() != 0:  # under torchrun, rank 0 speaks for all
        warnings.simplefilter("ignore")
    from ..pipeline.generate import HeliosPipeline  # the heavy imports (transformers, diffusers) after the cheap checks
    from ..sampling.plan import make_plan

    device, dtype = device_and_dtype(args)
    _check_speed_flags(args, device)
    encoder_device = text_encoder_device(args)
    with open_model(args.model) as model:
        # The plan checks the options against the model's config files before any weights are read.
        opts = state.options if state is not None else _options(args)  # resolved: given ones agree with them
        plan = make_plan(prompt, opts, model.variant, model.defaults, patch_size=model.patch_size)
        encoder_device = _choose_offload(args, model, device, plan.opts) or encoder_device
        check_launch(world_size(), model.attention_heads, args.cfg_parallel, plan.opts.guidance_scale)
        device = process_device(device)  # under torchrun: this process's GPU
        with process_group(device, args.dist_timeout) as several:  # under torchrun: one video, all processes
            pipe = _load(HeliosPipeline, model, args, (device, dtype, encoder_device), several)
            if args.compile:
                _precompile(pipe, plan, args)
            if rank() != 0:
                code = _follow(pipe, args, plan, media, state)
            else:
                notice = noise_notice(args.model) if model.builtin and not args.quiet else None
                code = _generate_to_file(pipe, args, plan, media, state, notice)
            if several and code == 0:
                leave_together()
            return code


def _choose_offload(args, model, device, opts):
    """--offload auto (also when not given) and none -> the mode to load with. Auto plans with fit.py for the
    device's free memory (a CPU: no offload) and says the plan in one line; returns the text encoder's device when
    the plan moves it to the CPU. fit.fake_memory's variables stand in for a GPU in tests."""
    chosen, args.offload = args.offload, None if args.offload in (None, "auto", "none") else args.offload
    if chosen not in (None, "auto"):
        return None
    import torch

    from ..model.weights import read_config
    from ..scale import fit

    total = free = fit.fake_memory("DEVICE")
    if total is None:
        if device.type != "cuda":
            return None
        free, total = torch.cuda.mem_get_info(device)
    host = fit.fake_memory("HOST")
    sizes = fit.model_sizes(read_config(model.component("transformer")), opts.height, opts.width)
    plan = fit.plan_for(free, fit.mem_available() if host is None else host, args.quantize, sizes,
                        lora=bool(args.lora))
    args.offload = plan.offload
    if rank() == 0 and not args.quiet:
        print(f"helios: {plan.describe(total)}", file=sys.stderr)
    if plan.text_encoder_device is None or args.text_encoder_device is not None:
        return None
    args.text_encoder_device = plan.text_encoder_device  # saved with the state, as if given
    return torch.device(plan.text_encoder_device)


def _load(pipeline_class, model, args, placement, several: bool):
    """The pipeline on `placement` (device, dtype, text encoder device), quantized and with its LoRA adapters as
    asked, parallelized when the launch has several processes, compiled with --compile."""
    device, dtype, encoder_device = placement
    pipe = pipeline_class.from_pretrained(model, torch_dtype=dtype, device=device, offload=args.offload,
                                          text_encoder_device=encoder_device, quantize=args.quantize)
    for path, scale in args.lora:
        pipe.load_lora_weights(path, scale=scale)
    if several:
        from ..scale.parallel import parallelize_pipeline

        parallelize_pipeline(pipe, cfg_parallel=args.cfg_parallel)
    if args.compile:
        from ..scale.speed import compile_blocks

        compile_blocks(pipe.transformer, mode=args.compile_mode)
    return pipe


def _check_speed_flags(args, device) -> None:
    """--compile-mode and --quantize against the device, before anything is loaded (a quantize scheme that needs an
    fp8 GPU is refused by name here, not by the memory planner or halfway through loading)."""
    args.compile = args.compile or args.compile_mode is not None  # a mode implies --compile
    if args.compile:
        from ..scale.speed import check_mode

        check_mode(args.compile_mode, device)
    if args.quantize is not None:
        from ..scale.quantize import check_scheme

        check_scheme(args.quantize, device)


def _precompile(pipe, plan, args) -> None:
    """Compile the blocks for every stage size of the run now, so that no chunk waits for the compiler."""
    import torch

    from ..sampling.history import History
    from ..scale.speed import precompile

    opts = plan.opts
    memory = History.empty(1, 1, 1, 1, opts.history_sizes, opts.keep_first_frame).terms(torch.float32)
    memory_frames = tuple(memory[f"latents_history_{name}"].shape[2] for name in ("long", "mid", "short"))
    stages = len(plan.stage_schedules(0))
    seconds = precompile(pipe.transformer, plan.latent_size, stages=stages, frames=opts.num_latent_frames_per_chunk,
                         memory_frames=memory_frames, text_len=opts.max_sequence_length)
    if rank() == 0 and not args.quiet:
        print(f"helios: compiled the transformer's blocks for {stages} stage size(s) in {seconds:.1f} s",
              file=sys.stderr)


def _check_paths(args) -> None:
    if args.output.suffix.lower() not in SUFFIXES:
        raise ValueError(f"--output {args.output}: videos are written as MP4, give a name ending in .mp4")
    writes = [("output", args.output), ("state", args.state), ("resume", args.resume)]  # --resume: saved there too
    for flag, path in writes if rank() == 0 else []:  # under torchrun only rank 0 writes (on its own machine)
        if path is not None:
            check_writable(path, f"--{flag}")
    for flag in ("image", "video", "prompt_schedule"):
        path = getattr(args, flag)
        if path is not None and not path.is_file():
            raise FileNotFoundError(f"--{flag.replace('_', '-')} {path}: no such file")
    check_lora(args)
    if args.schedule_id is not None and args.prompt_schedule is None:
        raise ValueError("--schedule-id picks a video from a --prompt-schedule CSV; there is none")
    if args.prompt is not None and not args.prompt.strip():
        raise ValueError("--prompt is empty")


def _options(args):
    """SamplingOptions from the flags; None leaves a field to the model's defaults (the plan fills them in)."""
    from ..sampling.options import SamplingOptions

    return SamplingOptions(**given_options(args))


def _media(args) -> dict:
    """Read the conditioning image / video now, so that a bad file fails before the model loads."""
    from ..pipeline.media import load_image, load_video
    from ..sampling.options import SamplingOptions

    if args.image is not None:
        return {"image": load_image(args.image, name="--image")}
    if args.video is not None:
        return {"video": load_video(args.video, min_frames=SamplingOptions().window_frames, name="--video")}
    return {}


def _generate_to_file(pipe, args, plan, media: dict, state, notice: str | None) -> int:
    num_chunks, total, opts = plan.num_chunks, plan.num_frames, plan.opts
    first = state.next_chunk if state is not None else 0
    done = plan.frames_before(first)
    progress = Progress("quiet" if args.quiet else "json" if args.json else "bar", num_chunks, total, first, done,
                        plan.total_steps(first))
    if first >= num_chunks and args.output.is_file() and not partial_path(args.output).exists():
        print(f"helios: nothing to resume: {args.resume} is the state after the last chunk of {args.output}",
              file=sys.stderr)
        return 0
    if notice:  # the options are checked by now: this run will generate
        print(f"helios: note: {notice}", file=sys.stderr)
    try:  # encodes the prompts (and the image or video), reporting it: the bar appears
        stream = _stream(pipe, args, plan, media, state, progress.step) if first < num_chunks else iter(())
        writer = _open_writer(args, opts, first if state is not None else None, done)
    except BaseException:
        progress.close()
        raise
    seed = state.seed if state is not None else None
    state_path, saved = args.state or args.resume, state is not None  # saved: a state file to resume from exists
    settings = command_settings(args, pipe.transformer.dtype)
    try:
        for chunk in stream:
            progress.phase("writing")
            writer.write(to_uint8(chunk.frames))
            if state_path is not None:  # after the video: the file never has fewer chunks than the state
                progress.phase("saving state")
                chunk.state.with_metadata(**settings).save(state_path)
                saved = True
            seed = chunk.state.seed
            progress.chunk(chunk.index, chunk.frames.shape[0], writer.partial)
    except BaseException as err:
        return _stopped(err, writer, progress, state_path if saved else None)
    path = writer.finish()
    progress.finish({
        "output": str(path), "frames": writer.frames, "chunks": writer.chunks, "video_fps": float(args.fps),
        "video_seconds": round(float(writer.frames / args.fps), 3), "seconds": round(progress.seconds, 3),
        "fps": round(progress.fps, 3), "peak_memory": peak_memory(pipe.device), "seed": seed,
        "state": None if state_path is None else str(state_path),
    })
    return 0


def _stream(pipe, args, plan, media: dict, state, on_step):
    from ..sampling.options import DEFAULT_NEGATIVE_PROMPT

    if state is not None:  # the run's own (a --negative-prompt given agrees with it)
        negative = state.negative_prompt
    else:
        negative = DEFAULT_NEGATIVE_PROMPT if args.negative_prompt is None else args.negative_prompt
    return pipe.stream(plan, negative_prompt=negative, resume=state, on_step=on_step,
                       overlap_decode=getattr(args, "overlap_decode", None), **media)


def _follow(pipe, args, plan, media: dict, state) -> int:
    """Ranks other than 0 under torchrun: take part in every step, write and print nothing (rank 0 does)."""
    if state is not None and state.next_chunk >= plan.num_chunks:  # nothing left: rank 0 only finishes the file
        return 0
    for _ in _stream(pipe, args, plan, media, state, None):
        pass
    return 0


def _open_writer(args, opts, resume_after: int | None, done: int) -> VideoWriter:
    """A new video, or the partial video of the run being resumed, cut back to the chunks its state has."""
    settings = VideoSettings(opts.width, opts.height, args.fps, args.crf, args.lossless)
    if resume_after is None:
        return VideoWriter.create(args.output, settings)
    writer = VideoWriter.resume(args.output, settings, resume_after)
    if writer.frames != done:
        writer.close()
        raise ValueError(f"{writer.partial} holds {writer.frames} frames in its first {resume_after} chunks, the "
                         f"state expects {done}: it belongs to another run")
    return writer


def _stopped(err: BaseException, writer: VideoWriter, progress: Progress, state_path: Path | None) -> int:
    """Ctrl-C or a failure mid-run: keep the finished chunks (a playable file), say how to go on (state_path: the
    state file written, if one was)."""
    progress.close()
    writer.close()
    kept = (f"the first {writer.frames} frames are in {writer.partial}" if writer.chunks else "no chunk was finished")
    hint = (f"; continue with: helios generate --resume {state_path}" if state_path is not None and writer.chunks
            else "")
    if hint and world_size() > 1:
        hint += " (under torchrun like this run, with any number of processes)"
    if isinstance(err, KeyboardInterrupt):  # Ctrl-C, or SIGTERM (checks.Terminated)
        print(f"helios: interrupted after {writer.chunks} chunks: {kept}{hint}", file=sys.stderr)
        return getattr(err, "exit_code", EXIT_INTERRUPTED)
    if not isinstance(err, Exception):
        raise err
    if isinstance(err, OSError) and err.filename == str(writer.partial):  # a full disk, a quota: the video's file
        raise GenerationFailed(f"cannot write {writer.partial}: {err.strerror or err} ({kept}{hint})") from err
    raise GenerationFailed(f"generation failed after {writer.chunks} chunks ({kept}{hint}): {err}") from err
