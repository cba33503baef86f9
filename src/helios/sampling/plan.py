"""The generation plan: what a request asks for, worked out once.

Inputs: a prompt or a prompt schedule, a length (frames, or seconds at a frame rate), the sampling options and the
model's variant and defaults. Out: the resolved options, the number of chunks and of frames, which prompts each
chunk blends, and each chunk's denoising schedules. The pipeline's stream, the `helios` command and the server
all make their plan here, so that none of them re-derives a length, a default or a schedule.

Lengths: video comes in chunks of 33 frames (9 latent frames). The requested frames are rounded up to whole chunks;
a prompt schedule asks for at least its own number of chunks, and sets the length when none is given; past its end
the last prompt goes on. The finished video is trimmed to 4n + 1 frames (the Wan VAE's frame count), so only the
last chunk can lose frames: 240 frames ask for 8 chunks and give 261.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from .options import MAX_FRAMES, VARIANT_DEFAULTS, SamplingOptions, Variant
from .prompts import PromptSchedule, as_schedule, blend_for_chunk, scheduled_chunks
from .schedule import Schedule, base_schedule, calculate_mu, image_seq_len, pyramid_schedules

PATCH_SIZE = (1, 2, 2)  # the published transformer's; a plan for another model passes its own


@dataclass(frozen=True)
class GenerationPlan:
    opts: SamplingOptions  # resolved: no None left, checked against the variant
    variant: Variant
    schedule: PromptSchedule  # [(prompt, n_chunks), ...]; a plain prompt is [(prompt, 1)]
    num_chunks: int
    num_frames: int  # frames of the finished video: 4n + 1
    patch_size: tuple[int, int, int] = PATCH_SIZE

    @property
    def window_frames(self) -> int:
        return self.opts.window_frames

    @property
    def prompts(self) -> list[str]:
        return [p for p, _ in self.schedule]

    @property
    def latent_size(self) -> tuple[int, int]:
        return self.opts.height // 8, self.opts.width // 8

    def frames_in_chunk(self, k: int) -> int:
        """Frames chunk k adds to the video: 33, fewer for a trimmed last chunk."""
        return min(self.window_frames, self.num_frames - self.window_frames * k)

    def frames_before(self, k: int) -> int:
        """Frames of the video made by chunks 0..k-1."""
        return min(self.window_frames * k, self.num_frames)

    def blend(self, k: int) -> tuple[int, int, float]:
        """(a, b, w): chunk k's text is lerp(E_a, E_b, w) of the schedule's prompt embeddings."""
        return blend_for_chunk(self.schedule, k, self.opts.interpolation_steps)

    def stage_schedules(self, k: int) -> list[Schedule]:
        """The denoising schedule of every stage of chunk k (the first chunk may take more steps)."""
        return stage_schedules(self.variant, self.opts, self.latent_size, k == 0, self.patch_size)

    def steps_in_chunk(self, k: int) -> int:
        """Denoising steps of chunk k, all stages (what a progress bar counts)."""
        return sum(len(s) for s in self.stage_schedules(k))

    def total_steps(self, first_chunk: int = 0) -> int:
        """Denoising steps of chunks first_chunk..num_chunks-1: chunk 0 may be amplified, the others are alike."""
        later = self.num_chunks - max(first_chunk, 1)
        return (self.steps_in_chunk(0) if first_chunk == 0 else 0) + max(later, 0) * self.steps_in_chunk(1)


def make_plan(prompt, opts: SamplingOptions, variant: Variant, defaults: dict | None = None, *,
              seconds: float | None = None, fps: float = 24, patch_size=PATCH_SIZE) -> GenerationPlan:
    """The plan of one video. `defaults` fill the options left None (the model's; the variant's if not given).

    `seconds` at `fps` is another way to give the length (not together with opts.num_frames).
    """
    schedule = as_schedule(prompt)
    if isinstance(opts, dict):
        raise ValueError(f"opts must be a SamplingOptions, got a dict: pass SamplingOptions(**{opts!r})")
    if not isinstance(opts, SamplingOptions):
        raise ValueError(f"opts must be a SamplingOptions, got {type(opts).__name__}")
    defaults = dict(VARIANT_DEFAULTS[variant.name] if defaults is None else defaults)
    if seconds is not None:
        if opts.num_frames is not None:
            raise ValueError("give the length as num_frames or as seconds, not both")
        if not (isinstance(seconds, (int, float)) and math.isfinite(seconds) and seconds > 0):
            raise ValueError(f"seconds must be a positive number, got {seconds!r}")
        opts = dataclasses.replace(opts, num_frames=max(1, math.ceil(seconds * fps)))
    scheduled = scheduled_chunks(schedule) if len(schedule) > 1 else 1
    if scheduled * opts.window_frames > MAX_FRAMES:
        raise ValueError(f"the prompt schedule asks for {scheduled} chunks of {opts.window_frames} frames, more than "
                         f"a day of video at 24 fps ({MAX_FRAMES} frames)")
    if opts.num_frames is None and len(schedule) > 1:  # a schedule without a length sets it
        defaults["num_frames"] = scheduled * opts.window_frames
    opts = opts.resolve(variant, defaults)
    chunks = max(-(-opts.num_frames // opts.window_frames), scheduled)
    frames = (opts.window_frames * chunks - 1) // 4 * 4 + 1
    return GenerationPlan(opts, variant, schedule, chunks, frames, tuple(patch_size))


def stage_schedules(variant: Variant, opts: SamplingOptions, latent_hw, first_chunk: bool, patch) -> list[Schedule]:
    """The schedule of every stage for one chunk of [.., frames, h, w] full-resolution latents."""
    frames, (h, w) = opts.num_latent_frames_per_chunk, latent_hw
    cfg = variant.scheduler
    if not variant.is_pyramid:
        mu = calculate_mu(image_seq_len(frames, h, w, patch), cfg)
        return [base_schedule(cfg, opts.num_inference_steps, mu=mu)]
    amplify = bool(opts.is_amplify_first_chunk and first_chunk)
    steps = opts.pyramid_num_inference_steps_list
    return pyramid_schedules(cfg, steps, frames, h, w, amplify=amplify, patch_size=patch)
