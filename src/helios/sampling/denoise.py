"""Denoising one chunk: the schedule of each stage, guidance, and the step loop, one code path for all variants.

Base is a single full-resolution stage. Mid and Distilled start from noise downsampled to 1/4 resolution and
run one stage per resolution, upsampling with block noise in between (docs/design.md §4.3-4.6).
"""

from __future__ import annotations

import time
from typing import Callable

import torch

from .options import SamplingOptions, Variant
from .schedule import (
    Schedule,
    cfg_combine,
    cfg_zero_star,
    downsample_noise,
    sampler_step,
    to_device_async,
    upsample_renoise,
    zero_init_applies,
)

# velocity(x, timestep [B], text) -> model output v [B, C, T, h, w]
Velocity = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# pair(model, x, t, text, negative_text) -> (v_cond, v_uncond): the two passes of classifier-free guidance
GuidancePair = Callable[[Velocity, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                        tuple[torch.Tensor, torch.Tensor]]


def serial_pair(model: Velocity, x, t, text, negative_text) -> tuple[torch.Tensor, torch.Tensor]:
    """Both guidance passes, one after the other, here (parallel.CfgParallel runs them on two groups of processes)."""
    return model(x, t, text), model(x, t, negative_text)


class Cancelled(Exception):
    """Raised inside a chunk when the caller asked to stop; the stream ends without a partial chunk."""


def guided_velocity(model: Velocity, text, negative_text, variant: Variant, opts: SamplingOptions,
                    pair: GuidancePair | None = None):
    """Wrap the model with the variant's guidance. Returns velocity(x, t, stage, step).

    `pair` computes the conditional and unconditional velocities (default: serial_pair)."""
    scale, pair = opts.guidance_scale, pair or serial_pair
    if scale <= 1.0 or negative_text is None:  # the reference's do_classifier_free_guidance
        return lambda x, t, stage, step: model(x, t, text)

    def velocity(x, t, stage, step):
        v_cond, v_uncond = pair(model, x, t, text, negative_text)
        if variant.is_cfg_zero_star:
            zero = zero_init_applies(stage, step, opts.zero_steps, opts.use_zero_init)
            return cfg_zero_star(v_cond, v_uncond, scale, zero_init=zero)
        return cfg_combine(v_cond, v_uncond, scale)

    return velocity


def denoise_chunk(
    velocity,
    noise: torch.Tensor,
    schedules: list[Schedule],
    variant: Variant,
    generator: torch.Generator,
    model_dtype: torch.dtype,
    on_step: Callable[[], bool] | None = None,
) -> torch.Tensor:
    """Run every stage's steps from fp32 noise [B, C, T, h, w]; returns the chunk's clean latents.

    on_step() is called after every step; returning True cancels (raises Cancelled).
    """
    cfg, batch = variant.scheduler, noise.shape[0]
    x = downsample_noise(noise, len(schedules)) if variant.is_pyramid else noise
    for stage, schedule in enumerate(schedules):
        if stage > 0:
            x = upsample_renoise(x, cfg, stage, generator, model_dtype)
        start_point, state = x, None  # DMD re-noises towards the stage's start point
        timesteps = model_timesteps(schedule, variant, x.device)
        for i in range(len(schedule)):
            v = velocity(x.to(model_dtype), timesteps[i].expand(batch), stage, i)
            x, state = sampler_step(cfg, x, v, schedule, i, state, start_point)
            if on_step is not None and on_step():
                raise Cancelled()
    return x


def model_timesteps(schedule: Schedule, variant: Variant, device) -> torch.Tensor:
    """The transformer's timestep input for each step of a stage, [N], on `device`, moved once per stage: a host
    timestep given to a model on a GPU would be copied there (a blocking copy, so a sync) at every step.
    The pyramid pipeline feeds the transformer truncated integer timesteps, Base the float values."""
    timesteps = schedule.timesteps.to(torch.int64) if variant.is_pyramid else schedule.timesteps
    return to_device_async(timesteps, device)


def step_overhead(noise: torch.Tensor, schedules: list[Schedule], variant: Variant, model_dtype: torch.dtype,
                  opts: SamplingOptions | None = None, text: torch.Tensor | None = None, seed: int = 0) -> float:
    """Seconds per denoising step spent outside the transformer: denoise_chunk over `schedules` (a chunk's, e.g.
    plan.stage_schedules(k)) with the model replaced by a function returning a cached tensor per shape, so what
    is timed is the solver, guidance (with `opts`, whose guidance_scale > 1 runs both passes), casts, stage
    transitions and the host work of the loop. Waits for the device before and after (a benchmark can call it)."""
    if not schedules or any(len(s) == 0 for s in schedules):
        raise ValueError("schedules: give at least one stage with at least one step")
    cached: dict[tuple, torch.Tensor] = {}

    def model(x, t, context):
        key = tuple(x.shape)
        if key not in cached:  # a fixed, plausible velocity; its values do not matter for the time
            cached[key] = torch.full_like(x, 0.01, dtype=model_dtype)
        return cached[key]

    text = torch.zeros(1, 1, 1, device=noise.device) if text is None else text
    velocity = (guided_velocity(model, text, text, variant, opts) if opts is not None
                else lambda x, t, stage, step: model(x, t, text))
    generator = torch.Generator("cpu").manual_seed(seed)
    _wait(noise.device)
    start = time.perf_counter()
    denoise_chunk(velocity, noise, schedules, variant, generator, model_dtype)
    _wait(noise.device)
    return (time.perf_counter() - start) / sum(len(s) for s in schedules)


def _wait(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
