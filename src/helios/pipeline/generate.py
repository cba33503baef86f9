"""Long-video generation: the autoregressive chunk loop as a generator, and the pipeline that owns the models.

T2V, I2V and V2V are one loop; they differ only in the initial memory (docs/design.md §2.4). Every random draw comes
from one CPU torch.Generator seeded with `SamplingOptions.seed`, in the reference's order, so a run equals the
reference's with `generator=torch.Generator().manual_seed(seed)`.
"""

from __future__ import annotations

import dataclasses
import random
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator

import torch

from ..model.transformer import HeliosTransformer3DModel
from ..sampling.denoise import Cancelled, denoise_chunk, guided_velocity
from ..sampling.history import History
from ..sampling.options import VARIANT_DEFAULTS, SamplingOptions, Variant
from ..sampling.plan import GenerationPlan, make_plan
from ..sampling.schedule import to_device_async
from ..scale import lora
from ..scale.offload import Resident, plan_loading
from ..scale.quantize import quantization
from .folder import ModelFolder, open_model_folder
from .media import load_image, load_video
from .overlap import overlapped, resolve_overlap
from .state import GenerationState, differences, run_settings
from .steering import PromptTrack, Steering
from .text import TextEncoder
from .vae import VideoVAE

PHASES = ("text", "image", "video", "denoise", "decode")


@dataclass(frozen=True)
class StepInfo:
    """What a run is doing, given to the on_step callback: after every denoising step ("denoise"), and as each
    other phase that takes time starts: "text" (encoding the prompts), "image" / "video" (encoding the I2V / V2V
    conditioning), "decode" (the VAE turns chunk `chunk`'s latents into frames)."""

    chunk: int  # the chunk being made (the first chunk of the run before it starts)
    num_chunks: int
    step: int  # steps done in this chunk
    steps: int  # steps of this chunk (all stages); 0 before the chunk starts
    phase: str = "denoise"  # one of PHASES


@dataclass
class Chunk:
    index: int
    frames: torch.Tensor  # float32 [F, H, W, 3] in [0, 1]; F = 33, fewer for the trimmed last chunk
    latents: torch.Tensor  # [1, 16, 9, h, w] fp32
    num_chunks: int
    timings: dict[str, float]  # denoise_s, decode_s
    state: GenerationState  # save it to resume after this chunk
    prompt: dict  # the prompt this chunk moved to, its weight, and the steering change it came from (steering.py)


@dataclass
class _Denoised:
    """A chunk between its denoise and its decode (overlap.py hands it from one thread to the other)."""

    index: int
    latents: torch.Tensor  # [1, 16, 9, h, w] fp32
    state: GenerationState
    prompt: dict
    steps: int  # of this chunk, all stages
    denoise_s: float


@dataclass
class Video:
    frames: torch.Tensor  # float32 [F, H, W, 3] in [0, 1]
    latents: torch.Tensor  # [1, 16, T, h, w] all generated latents
    seed: int


@dataclass
class _Run:
    """One generation's fixed inputs: the plan, texts, the memory and the generator."""

    plan: GenerationPlan
    track: PromptTrack  # each chunk's text: the schedule's, then the steering's
    steering: Steering | None
    negative: torch.Tensor | None
    history: History
    generator: torch.Generator
    seed: int
    first_chunk: int
    settings: dict  # state.run_settings: saved with every state


class HeliosPipeline:
    def __init__(self, transformer: HeliosTransformer3DModel, vae: VideoVAE, text_encoder: TextEncoder, variant: Variant,
                 defaults: dict | None = None, folder: ModelFolder | None = None):
        self.transformer, self.vae, self.text_encoder, self.variant = transformer, vae, text_encoder, variant
        self.defaults = dict(VARIANT_DEFAULTS[variant.name] if defaults is None else defaults)  # for unset options
        self.folder = folder  # where the components were loaded from, if anywhere
        self._holder = None  # keeps a built-in model's temporary folder alive as long as the pipeline
        self.placement = Resident(transformer)  # which component is on the device when (offload.py)
        self.guidance_pair = None  # how the two CFG passes run: None is one after the other (parallel.py sets it)

    @classmethod
    def from_pretrained(cls, model, torch_dtype=None, device=None, vae_dtype=torch.float32, offload=None,
                        text_encoder_device=None, quantize: str | None = None) -> HeliosPipeline:
        """Load a model: a folder laid out like the published repos, a hub repo id, a built-in name
        ("helios-tiny", "helios-tiny-mid", "helios-tiny-base": tiny random weights), or a folder.ModelFolder.

        torch_dtype (transformer and text encoder): default bfloat16 on CUDA, float32 on a CPU (where bf16 matmuls
        are slow or missing). The VAE runs in vae_dtype, float32 as in every official script.

        offload (README "Low memory"): None keeps every component on `device`; "model" keeps them in host memory,
        each on `device` only while it runs; "blocks" also streams the transformer's blocks from the memory-mapped
        checkpoint. text_encoder_device (e.g. "cpu") runs the text encoder there for good.
        quantize: None, "int8" or "fp8" (weight-only, for memory) or "fp8-compute" (fp8 matmuls, for speed on GPUs
        of SM 8.9+): the transformer's block weights, while loading (scale/quantize.py).
        """
        device = check_device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        if text_encoder_device is not None:
            text_encoder_device = check_device(text_encoder_device, name="text_encoder_device")
        where = plan_loading(offload, device, text_encoder_device)  # checked before anything is read
        if quantize is not None:
            from ..scale.quantize import check_scheme

            check_scheme(quantize, device)  # before the hub is asked for anything
        torch_dtype = default_dtype(device) if torch_dtype is None else torch_dtype
        holder, folder = open_model_folder(model)
        try:
            folder.check_weight_files()  # a truncated VAE file is found before minutes of loading the transformer
            transformer = HeliosTransformer3DModel.from_pretrained(
                folder.component("transformer"), torch_dtype=torch_dtype, device=where.transformer,
                offload=where.transformer_offload, quantize=quantize)
            vae = VideoVAE.from_pretrained(folder.component("vae"), dtype=vae_dtype, device=where.vae)
            text_encoder = TextEncoder.from_pretrained(folder.component("text_encoder"), folder.component("tokenizer"),
                                                       dtype=torch_dtype, device=where.text_encoder)
        except BaseException:
            if holder is not None:
                holder.cleanup()
            raise
        pipe = cls(transformer, vae, text_encoder, folder.variant, folder.defaults, folder)
        pipe._holder = holder
        pipe.placement = where.placement(pipe)
        return pipe

    @property
    def device(self) -> torch.device:
        """Where the work runs (with offload, components visit it in turn)."""
        return self.placement.device

    # LoRA adapters on the transformer (lora.py), under the names diffusers' pipelines use.
    def load_lora_weights(self, path_or_repo, adapter_name: str | None = None, scale: float = 1.0,
                          weight_name: str | None = None) -> str:
        """Add a LoRA (a safetensors file, a folder holding one, or a hub repo); returns the adapter's name."""
        return lora.load_lora(self.transformer, path_or_repo, adapter_name, scale, weight_name)

    def set_lora_scale(self, adapter_name: str, scale: float) -> None:
        lora.set_lora_scale(self.transformer, adapter_name, scale)

    def unload_lora_weights(self, adapter_name: str | None = None) -> None:
        """Remove one adapter, or all (the transformer is then exactly as loaded)."""
        lora.unload_lora(self.transformer, adapter_name)

    def generate(self, prompt, opts: SamplingOptions = SamplingOptions(), negative_prompt: str | None = None,
                 image=None, video=None, resume: GenerationState | str | Path | None = None,
                 on_step: Callable[[StepInfo], bool | None] | None = None,
                 overlap_decode: bool | None = None) -> Video:
        """The whole video (the chunks of `stream`, concatenated)."""
        overlap = self._overlap(overlap_decode)
        run = self._prepare(prompt, opts, negative_prompt, image, video, resume, on_step)
        if run.first_chunk >= run.plan.num_chunks:  # stream() yields nothing then; a whole video of nothing is an error
            raise ValueError(f"resume: the saved state is of a finished run (all {run.plan.num_chunks} chunks are done)")
        chunks = list(self._chunks(run, on_step, overlap))
        if not chunks:
            raise Cancelled("generation was cancelled before the first chunk finished")
        return Video(torch.cat([c.frames for c in chunks]), torch.cat([c.latents for c in chunks], dim=2),
                     chunks[0].state.seed)

    def stream(self, prompt, opts: SamplingOptions = SamplingOptions(), negative_prompt: str | None = None,
               image=None, video=None, resume: GenerationState | str | Path | None = None,
               on_step: Callable[[StepInfo], bool | None] | None = None,
               steering: Steering | None = None, overlap_decode: bool | None = None) -> Iterator[Chunk]:
        """Yield each chunk as soon as it is decoded. Stop iterating to cancel between chunks; return True from
        on_step to cancel between denoising steps (the stream then ends without a partial chunk).

        on_step(StepInfo) reports progress: every denoising step, and the start of each other phase (see StepInfo);
        its return value is read at denoising steps only. Inputs are checked, and the prompts and conditioning
        encoded, here, when stream() is called, not when the first chunk is asked for.

        resume: a GenerationState (or its file) to continue from; with prompt=None the run goes on with the state's
        own prompt schedule, options and negative prompt.

        steering: prompt changes while the stream runs (`steering.set(prompt, transition_chunks)`), applied when the
        next chunk starts (steering.py). With overlap_decode the next chunk to start may be one later than the chunk
        after the one last yielded (it may already be denoising).

        overlap_decode (overlap.py): decode chunk k while chunk k + 1 denoises, in a thread of its own; the same
        chunks, in the same order. None: on for a CUDA device without offload (on a CPU it gains nothing).
        Not with offload, which takes the VAE and the transformer on and off the device in turn."""
        overlap = self._overlap(overlap_decode)
        run = self._prepare(prompt, opts, negative_prompt, image, video, resume, on_step, steering)
        return self._chunks(run, on_step, overlap)

    def plan(self, prompt, opts: SamplingOptions = SamplingOptions(), **length) -> GenerationPlan:
        """The plan of a video with this model: lengths, prompts per chunk, resolved options (see plan.make_plan)."""
        return make_plan(prompt, opts, self.variant, self.defaults, patch_size=self.transformer.config.patch_size,
                         **length)

    def _overlap(self, overlap_decode) -> bool:
        return resolve_overlap(overlap_decode, self.device, offload=not isinstance(self.placement, Resident))

    def _chunks(self, run: _Run, on_step, overlap: bool = False) -> Iterator[Chunk]:
        chunks = range(run.first_chunk, run.plan.num_chunks)
        if overlap:
            return overlapped(lambda k, report: self._denoise(run, k, report),
                              lambda done, report: self._decode(run, done, report), chunks, on_step, self.device)
        return self._sequential(run, chunks, on_step)

    def _sequential(self, run: _Run, chunks: range, on_step) -> Iterator[Chunk]:
        for k in chunks:
            try:
                yield self._decode(run, self._denoise(run, k, on_step), on_step)
            except Cancelled:
                return

    # -- preparation: everything is checked before the first model call ----------------------------------------

    def _prepare(self, prompt, opts, negative_prompt, image, video, resume, on_step=None, steering=None) -> _Run:
        if isinstance(resume, (str, Path)):
            resume = GenerationState.load(resume, self.device)
        if prompt is None and resume is not None:  # resuming from the state alone: its settings
            if opts != SamplingOptions() or negative_prompt is not None:
                raise ValueError("resume with prompt=None continues the saved run with its own options and negative "
                                 "prompt; pass the prompt too to give them")
            prompt, opts, negative_prompt = resume.schedule, resume.options, resume.negative_prompt
        if isinstance(prompt, GenerationPlan) and opts != SamplingOptions():
            raise ValueError("opts: a plan carries its own options; pass them to plan(), not with the plan")
        plan = prompt if isinstance(prompt, GenerationPlan) else self.plan(prompt, opts)
        opts, schedule = plan.opts, plan.schedule
        if image is not None and video is not None:
            raise ValueError("pass either image= (image-to-video) or video= (video-to-video), not both")
        mode = "i2v" if image is not None else "v2v" if video is not None else "t2v"
        pixels = None
        if resume is None and mode == "i2v":
            pixels = self.vae.preprocess(load_image(image), opts.height, opts.width)
        elif resume is None and mode == "v2v":
            pixels = self.vae.preprocess(load_video(video, min_frames=opts.window_frames), opts.height, opts.width)
        if opts.seed is not None:
            seed = opts.seed
        else:  # a resumed run continues with its own seed; a new one draws one and reports it
            seed = resume.seed if resume is not None else random.SystemRandom().randrange(2**63)
        # The conditioning image/video is not part of them: a resumed run finds it in the saved memory.
        settings = run_settings(self.variant.name, dataclasses.asdict(dataclasses.replace(opts, seed=seed)), schedule,
                                negative_prompt, quantization(self.transformer), lora.lora_settings(self.transformer))
        if resume is not None and resume.settings != settings:
            raise ValueError("resume: the saved state was made with other settings: "
                             + ", ".join(differences(resume.settings, settings)))
        return self._start(plan, mode, pixels, seed, settings, negative_prompt, resume, on_step, steering)

    def _start(self, plan, mode, pixels, seed, settings, negative_prompt, resume, on_step, steering) -> _Run:
        """Encode the prompts and the conditioning, and set up the generator, the memory and the prompt track."""
        opts = plan.opts
        first = resume.next_chunk if resume is not None else 0
        report = _reporter(on_step, first, plan.num_chunks)
        do_cfg = opts.guidance_scale > 1.0
        report("text")
        texts = self._encode_texts(plan.prompts + ([negative_prompt or ""] if do_cfg else []), opts)
        texts, negative = (texts[:-1], texts[-1:]) if do_cfg else (texts, None)
        generator = torch.Generator("cpu").manual_seed(seed)
        if resume is not None:
            generator.set_state(resume.rng_state)
            # A copy on this pipeline's device: the run appends to its history, and the caller's state stays intact.
            history = resume.history.copy(self.device)
        else:
            if mode != "t2v":
                report("image" if mode == "i2v" else "video")
            history = self._initial_history(opts, pixels, mode, generator)
        track = PromptTrack(plan, texts, lambda text: self._encode_texts([text], opts))
        if resume is not None:
            track.replay(list(resume.prompts))
        if steering is not None and isinstance(self.placement, Resident):
            # Encode a change when it arrives, in the caller's thread. With offload the text encoder would have to
            # visit the device while the transformer runs there, so the stream encodes it at the boundary instead.
            steering.bind(track.encode)
        if steering is None:
            # Nothing encodes text again in this run: the encoder's device memory (11 GB at 14B) goes to the run.
            # A steered run keeps it there, so that a change is encoded as it arrives (offload.Resident.release).
            self.placement.release("text_encoder")
        return _Run(plan, track, steering, negative, history, generator, seed, first, settings)

    @torch.inference_mode()
    def _encode_texts(self, prompts: list[str], opts: SamplingOptions) -> torch.Tensor:
        with self.placement.on_device("text_encoder"):
            texts = self.text_encoder.encode(prompts, opts.max_sequence_length)
        return texts.to(self.device, self.transformer.dtype)

    @torch.inference_mode()
    def _initial_history(self, opts: SamplingOptions, pixels, mode: str, generator: torch.Generator) -> History:
        h, w = opts.height // 8, opts.width // 8
        history = History.empty(1, self.transformer.config.in_channels, h, w, opts.history_sizes,
                                opts.keep_first_frame, device=self.device)
        if mode == "i2v":
            with self.placement.on_device("vae"):
                history.anchor, fake = self._image_latents(pixels, opts, generator)
            history.append(fake)  # the memory's last frame: as if a still clip of the image had been generated
        elif mode == "v2v":
            with self.placement.on_device("vae"):
                history.anchor, latents = self._video_latents(pixels, opts, generator)
            history.append(latents)
        return history

    def _image_latents(self, pixels, opts, generator):
        """I2V (docs/design.md §2.4): the image's latent is the anchor; the last latent of a still clip joins the
        memory."""
        anchor = self.vae.encode(pixels, generator)  # pixels [1, 3, 1, H, W]
        fake = self.vae.encode(pixels.repeat(1, 1, opts.window_frames, 1, 1), generator)[:, :, -1:]
        if opts.add_noise_to_image_latents:
            anchor = _noised(anchor, opts.image_noise_sigma_min, opts.image_noise_sigma_max, 1, generator)
            fake = _noised(fake, opts.video_noise_sigma_min, opts.video_noise_sigma_max, 1, generator)
        return anchor, fake

    def _video_latents(self, pixels, opts, generator):
        """V2V (docs/design.md §2.4): anchor = first frame; the last whole 33-frame windows, encoded one by one, are
        the memory."""
        window = opts.window_frames
        usable = pixels.shape[2] // window * window
        anchor = self.vae.encode(pixels[:, :, :1], generator)
        tail = pixels[:, :, pixels.shape[2] - usable :]
        pieces = [self.vae.encode(tail[:, :, i : i + window], generator) for i in range(0, usable, window)]
        if opts.add_noise_to_video_latents:
            anchor = _noised(anchor, opts.image_noise_sigma_min, opts.image_noise_sigma_max, 1, generator)
            lo, hi = opts.video_noise_sigma_min, opts.video_noise_sigma_max
            pieces = [_noised(p, lo, hi, p.shape[2], generator) for p in pieces]
        return anchor, torch.cat(pieces, dim=2)

    # -- one chunk ---------------------------------------------------------------------------------------------

    @torch.inference_mode()
    def _denoise(self, run: _Run, k: int, on_step) -> _Denoised:
        """Chunk k's latents, and the state after it: everything but the decode."""
        plan, history, model = run.plan, run.history, self.transformer
        opts, start = plan.opts, time.perf_counter()
        text = run.track.text(k, run.steering.take() if run.steering is not None else None)
        noise = torch.randn(1, model.config.in_channels, opts.num_latent_frames_per_chunk, *plan.latent_size,
                            generator=run.generator)
        noise = to_device_async(noise, self.device)
        schedules = plan.stage_schedules(k)
        memory = {**history.terms(model.dtype), **history.indices(opts.num_latent_frames_per_chunk)}

        def transformer(x, t, context):
            return model(x, t, context, **memory, return_dict=False)[0]

        velocity = guided_velocity(transformer, text, run.negative, self.variant, opts, self.guidance_pair)
        total, done = sum(len(s) for s in schedules), iter(range(1, 1 + sum(len(s) for s in schedules)))
        step_hook = None if on_step is None else (lambda: bool(on_step(StepInfo(k, plan.num_chunks, next(done), total))))
        with self.placement.on_device("transformer"):
            latents = denoise_chunk(velocity, noise, schedules, self.variant, run.generator, model.dtype, step_hook)
        latents = latents.float()
        history.add_chunk(latents, k, opts.is_skip_first_chunk)
        records = tuple(run.track.records)
        state = GenerationState(history.copy(), run.generator.get_state(), k + 1, run.seed, run.settings,
                                prompts=records)
        # The one wait of a chunk, after its last step: denoise_s is then the device's time, not the time to queue
        # the kernels, and the latents are complete when another stream decodes them (overlap.py).
        _wait(self.device)
        return _Denoised(k, latents, state, records[-1], total, time.perf_counter() - start)

    @torch.inference_mode()
    def _decode(self, run: _Run, done: _Denoised, on_step) -> Chunk:
        plan, k, start = run.plan, done.index, time.perf_counter()
        if on_step is not None:
            on_step(StepInfo(k, plan.num_chunks, done.steps, done.steps, "decode"))
        with self.placement.on_device("vae"):
            frames = self.vae.postprocess(self.vae.decode(done.latents))[: plan.frames_in_chunk(k)]
        timings = {"denoise_s": done.denoise_s, "decode_s": time.perf_counter() - start}
        return Chunk(k, frames, done.latents, plan.num_chunks, timings, done.state, done.prompt)


DEVICE_TYPES = ("cpu", "cuda")  # where the pipeline runs and is tested


def check_device(device, name: str = "device") -> torch.device:
    """`device` as a torch.device if the pipeline can run there, else a ValueError naming it as `name`."""
    try:
        device = torch.device(device)
    except (RuntimeError, TypeError):  # torch's message lists its 20 device types: not what a user needs
        raise ValueError(f"{name} {device}: not a device; helios runs on {' or '.join(DEVICE_TYPES)}") from None
    if device.type not in DEVICE_TYPES:
        raise ValueError(f"{name} {device}: not supported; helios runs on {' or '.join(DEVICE_TYPES)}")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise ValueError(f"{name} {device}: CUDA is not available on this machine")
        if device.index is not None and device.index >= count:
            raise ValueError(f"{name} {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")
    return device


def default_dtype(device: torch.device) -> torch.dtype:
    """The transformer's and text encoder's dtype when none is asked for: bfloat16 on CUDA, as the official scripts;
    float32 on a CPU, where bfloat16 matmuls are slower (or, without AVX-512, missing from oneDNN)."""
    return torch.bfloat16 if device.type == "cuda" else torch.float32


def _wait(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.current_stream(device).synchronize()


def _reporter(on_step, chunk: int, num_chunks: int) -> Callable[[str], None]:
    """report(phase): tells on_step that a phase before the first chunk's steps starts."""
    if on_step is None:
        return lambda phase: None
    return lambda phase: on_step(StepInfo(chunk, num_chunks, 0, 0, phase))


def _noised(latents, sigma_min, sigma_max, frames, generator):
    """sigma * eps + (1 - sigma) * latents with sigma ~ U[min, max], one per latent frame (the reference's draw order)."""
    sigma = torch.rand(frames, generator=generator) * (sigma_max - sigma_min) + sigma_min
    sigma = sigma.view(1, 1, frames, 1, 1).to(latents.device)
    eps = torch.randn(latents.shape, generator=generator).to(latents.device)
    return sigma * eps + (1 - sigma) * latents
