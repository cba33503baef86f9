"""`helios generate --resume STATE`: the saved run's settings stand in for the arguments left out.

Every state the command saves carries, beside the pipeline's settings (prompt schedule, options with the seed,
negative prompt; the transformer's quantization and LoRA adapters, files and scales), the command's own
(`command_settings`): the model, the output file, the video encoding, the dtype, the device, the offload mode, CFG
parallelism and the conditioning file. So `--resume STATE` alone continues a run (a low-memory one keeps its offload,
a quantized one with adapters gets them again). Arguments given anyway must agree with the state; those that do not
are named in one error, before anything is loaded. The device, the offload and CFG parallelism may change (they are
where and how the run goes on, not what it makes). Under torchrun every process resolves the arguments from the
state (rank 0 saved it); the saved --cfg-parallel holds when the launch has an even number of processes. Without
--resume, the arguments left out get their defaults here.
"""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

from ..scale.launch import world_size

# The command's defaults for the arguments whose parser default is None (None = not given, see resolve_arguments).
DEFAULTS = {"output": Path("output.mp4"), "fps": Fraction(24), "crf": 18, "lossless": False, "dtype": "auto",
            "device": "auto", "cfg_parallel": False}
# SamplingOptions field -> the argument that sets it.
OPTION_ARGUMENTS = {
    "height": "height", "width": "width", "num_frames": "num_frames", "num_inference_steps": "steps",
    "pyramid_num_inference_steps_list": "pyramid_steps", "guidance_scale": "guidance",
    "is_amplify_first_chunk": "amplify_first_chunk", "is_skip_first_chunk": "skip_first_chunk",
    "interpolation_steps": "interpolation_steps", "seed": "seed",
}


def resolve_arguments(args):
    """Fill in the arguments left out: from the --resume state (returned, loaded), else the defaults (None)."""
    state = None
    if args.resume is not None:
        state = _load(args.resume)
        _take_saved(args, state)
    missing = ["--model"] if args.model is None else []
    if state is None and args.prompt is None and args.prompt_schedule is None:
        missing.append("--prompt or --prompt-schedule")
    if missing:
        why = ("; the state was saved from Python, without the command's settings" if state is not None
               else " (or --resume STATE, to continue a saved run)")
        raise ValueError(f"{' and '.join(missing)} required{why}")
    for name, value in DEFAULTS.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    return state


def given_options(args) -> dict:
    """The SamplingOptions fields the arguments set."""
    given = {field: getattr(args, name) for field, name in OPTION_ARGUMENTS.items()}
    if given["pyramid_num_inference_steps_list"] is not None:
        given["pyramid_num_inference_steps_list"] = tuple(given["pyramid_num_inference_steps_list"])
    return {field: value for field, value in given.items() if value is not None}


def command_settings(args, dtype) -> dict:
    """What the command saves with each state, beside the pipeline's settings (JSON values)."""
    return {"model": _model_name(args.model), "output": str(Path(args.output).absolute()), "fps": str(args.fps),
            "crf": args.crf, "lossless": bool(args.lossless), "dtype": str(dtype).removeprefix("torch."),
            "device": args.device, "offload": args.offload, "text_encoder_device": args.text_encoder_device,
            "cfg_parallel": bool(args.cfg_parallel), "image": _absolute(args.image), "video": _absolute(args.video)}


def _load(path: Path):
    from ..pipeline.state import GenerationState

    if not path.is_file():
        raise FileNotFoundError(f"--resume {path}: no such file")
    try:
        return GenerationState.load(path)
    except ValueError as err:
        raise ValueError(f"--resume {err}") from None


def _take_saved(args, state) -> None:
    """Each argument left out takes the saved value; given ones must agree with it."""
    saved, conflicts = state.metadata, []  # metadata is empty for a state saved from Python

    def take(name: str, convert=lambda value: value, same=lambda given, value: given == value) -> None:
        if saved.get(name) is None:
            return
        given, value = getattr(args, name), convert(saved[name])
        if given is None:
            setattr(args, name, value)
        elif not same(given, value):
            conflicts.append((name, given, value))

    take("model", same=lambda given, value: _model_name(given) == value)
    take("output", Path, lambda given, value: Path(given).absolute() == value)
    take("fps", Fraction)
    take("crf")
    take("lossless")
    take("dtype", same=lambda given, value: given in ("auto", value))  # auto: the run's own
    if args.dtype == "auto" and saved.get("dtype"):
        args.dtype = saved["dtype"]
    for name in ("device", "offload", "text_encoder_device"):  # how the run goes on, not what it makes: no conflict
        if getattr(args, name) is None:
            setattr(args, name, saved.get(name))
    if args.cfg_parallel is None and saved.get("cfg_parallel"):  # likewise; and only where it can work (torchrun)
        args.cfg_parallel = world_size() % 2 == 0  # an even number of processes (1 when not under torchrun)
    for kind in ("image", "video"):  # the conditioning is in the saved memory; a path given must be the run's
        if getattr(args, kind) is not None and saved and _absolute(getattr(args, kind)) != saved.get(kind):
            conflicts.append((kind, getattr(args, kind), saved.get(kind)))
    _check_prompts(args, state, conflicts)
    _take_transformer_settings(args, state, conflicts)
    options = state.options  # resolved: a given option must be what the run used (--guidance 5 of a distilled run: 1)
    conflicts += [(OPTION_ARGUMENTS[field], value, getattr(options, field))
                  for field, value in given_options(args).items() if value != getattr(options, field)]
    if conflicts:
        _refuse(args, conflicts)


def _take_transformer_settings(args, state, conflicts: list) -> None:
    """--quantize and --lora: what the run's transformer was made of changes the video, so they are the run's."""
    if args.quantize is None:
        args.quantize = state.quantize
    elif args.quantize != state.quantize:
        conflicts.append(("quantize", args.quantize, state.quantize or "none"))
    if not args.lora:
        args.lora = state.lora
    elif _lora_files(args.lora) != state.lora:
        given = ", ".join(f"{path}:{scale:g}" for path, scale in args.lora)
        saved = ", ".join(f"{Path(path).name}:{scale:g}" for path, scale in state.lora) or "none"
        conflicts.append(("lora", given, saved))


def _lora_files(lora) -> list[tuple[str, float]]:
    """--lora PATH:SCALE arguments as the state names them: the file read, as an absolute path."""
    from ..scale.lora_format import locate

    return [(str(locate(path).absolute()), scale) for path, scale in lora]


def _check_prompts(args, state, conflicts: list) -> None:
    if args.prompt is not None and [(args.prompt, 1)] != state.schedule:
        conflicts.append(("prompt", args.prompt, _describe_schedule(state.schedule)))
    if args.prompt_schedule is not None:
        from ..sampling.prompts import read_schedule

        schedule = read_schedule(args.prompt_schedule, args.chunks_per_prompt, args.schedule_id)
        if schedule != state.schedule:
            conflicts.append(("prompt_schedule", args.prompt_schedule, _describe_schedule(state.schedule)))
    if args.negative_prompt is not None and args.negative_prompt != state.negative_prompt:
        conflicts.append(("negative_prompt", args.negative_prompt, state.negative_prompt))


def _refuse(args, conflicts: list) -> None:
    def show(value) -> str:
        text = {True: "on", False: "off"}.get(value, str(value)) if isinstance(value, bool) else str(value)
        return repr(text[:40] + "...") if len(text) > 40 else text

    def flag(name: str, given) -> str:
        name = name.replace("_", "-")
        return (f"--{name}" if given else f"--no-{name}") if isinstance(given, bool) else f"--{name} {show(given)}"

    listed = "; ".join(f"{flag(name, given)} (the run: {show(saved)})" for name, given, saved in conflicts)
    raise ValueError(f"--resume {args.resume}: these arguments contradict the saved run: {listed}. Leave them out "
                     "to continue it as it was")


def _describe_schedule(schedule) -> str:
    if len(schedule) == 1:
        return schedule[0][0]
    return f"a schedule of {len(schedule)} prompts"


def _model_name(model: str) -> str:
    """A folder as its absolute path (the state may be resumed from elsewhere); a built-in name or repo id as is."""
    path = Path(model).expanduser()
    return str(path.resolve()) if path.exists() else str(model)


def _absolute(path) -> str | None:
    return None if path is None else str(Path(path).absolute())
