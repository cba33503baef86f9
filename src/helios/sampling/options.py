"""What to generate and how: SamplingOptions, and the model variant (its sampler and defaults).

The three published models differ only in how they sample (docs/design.md §4.8):
  base       HeliosPipeline: UniPC, 50 steps at full resolution, CFG 5
  mid        HeliosPyramidPipeline, is_cfg_zero_star: 3-stage pyramid of UniPC, [20, 20, 20], CFG-Zero* 5
  distilled  HeliosPyramidPipeline, is_distilled: 3-stage pyramid of DMD steps, [2, 2, 2], no CFG
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # a name only: the `helios` command checks its flags with this module before importing torch
    from .schedule import SchedulerConfig

# Every random draw comes from torch.Generator().manual_seed(seed), which takes exactly these seeds (negative ones
# are mapped onto the unsigned range); a seed outside would fail later, in torch's words.
SEED_RANGE = (-(2**63), 2**64)
# A day of video at the models' 24 fps. Any bound on a request is arbitrary, but without one a typo (99999999999999)
# runs for centuries; a day is 62,836 chunks, hours of a GPU at the published model's speed, and far within what the
# file format holds (frame times are 64-bit integers in the MP4 fragments).
MAX_FRAMES = 24 * 60 * 60 * 24

# Settings of the official inference scripts per variant (docs/design.md §4.8); anything left None in SamplingOptions.
_SIZE = dict(height=384, width=640)
VARIANT_DEFAULTS = {
    "base": dict(_SIZE, num_frames=99, num_inference_steps=50, guidance_scale=5.0),
    "mid": dict(_SIZE, num_frames=99, pyramid_num_inference_steps_list=(20, 20, 20), guidance_scale=5.0),
    "distilled": dict(
        _SIZE, num_frames=240, pyramid_num_inference_steps_list=(2, 2, 2), guidance_scale=1.0,
        is_amplify_first_chunk=True,
    ),
}

# The negative prompt of the official inference script and docs (docs/design.md §6.3); the pipelines themselves
# default to "".
DEFAULT_NEGATIVE_PROMPT = (
    "Bright tones, overexposed, static, blurred details, subtitles, style, works, paintings, images, static, overall "
    "gray, worst quality, low quality, JPEG compression residue, ugly, incomplete, extra fingers, poorly drawn hands, "
    "poorly drawn faces, deformed, disfigured, misshapen limbs, fused fingers, still picture, messy background, three "
    "legs, many people in the background, walking backwards"
)


@dataclass(frozen=True)
class Variant:
    """How a model samples (read from a model folder by folder.read_variant)."""

    name: str  # "base" | "mid" | "distilled"
    scheduler: SchedulerConfig
    is_cfg_zero_star: bool = False
    is_distilled: bool = False

    @property
    def is_pyramid(self) -> bool:
        return self.name != "base"


@dataclass(frozen=True)
class SamplingOptions:
    """Generation settings, named as the reference's arguments. None means "the model variant's default"."""

    height: int | None = None  # 384 for the published models
    width: int | None = None  # 640
    num_frames: int | None = None
    num_inference_steps: int | None = None  # base
    guidance_scale: float | None = None
    pyramid_num_inference_steps_list: tuple[int, ...] | None = None  # mid, distilled: steps per stage
    is_amplify_first_chunk: bool | None = None  # distilled: twice the steps for chunk 0
    is_skip_first_chunk: bool = False  # take the anchor from chunk 1 instead of chunk 0
    keep_first_frame: bool = True
    use_zero_init: bool = True  # CFG-Zero*: zero velocity for the first zero_steps + 1 steps of stage 0
    zero_steps: int = 1
    max_sequence_length: int = 512
    add_noise_to_image_latents: bool = True
    image_noise_sigma_min: float = 0.111
    image_noise_sigma_max: float = 0.135
    add_noise_to_video_latents: bool = True
    video_noise_sigma_min: float = 0.111
    video_noise_sigma_max: float = 0.135
    num_latent_frames_per_chunk: int = 9
    history_sizes: tuple[int, int, int] = (16, 2, 1)
    interpolation_steps: int = 3  # chunks over which a new prompt of a schedule is blended in
    seed: int | None = None  # None: a random seed, reported in the result

    def __post_init__(self):
        # What no model can make sense of fails here, when the options are written; the rest in check().
        lo, hi = SEED_RANGE
        if self.seed is not None and not (_is_int(self.seed) and lo <= self.seed < hi):
            raise ValueError(f"seed must be an integer in [-2**63, 2**64) (torch.Generator's seeds), got {self.seed!r}")
        g = self.guidance_scale
        if g is not None and not (isinstance(g, numbers.Real) and not isinstance(g, bool) and math.isfinite(g) and g >= 0):
            raise ValueError(f"guidance_scale must be a finite number >= 0 (1 = no guidance), got {g!r}")

    def resolve(self, variant: Variant, defaults: dict | None = None) -> SamplingOptions:
        """Fill the None fields with `defaults` (the variant's, VARIANT_DEFAULTS, unless given) and check everything
        before any heavy work."""
        defaults = dict(VARIANT_DEFAULTS[variant.name] if defaults is None else defaults)
        if not variant.is_pyramid:
            defaults.update(pyramid_num_inference_steps_list=(), is_amplify_first_chunk=False)
        else:
            defaults.setdefault("num_inference_steps", 0)
            defaults.setdefault("is_amplify_first_chunk", False)
        filled = {k: v for k, v in defaults.items() if getattr(self, k) is None}
        if variant.is_distilled and (self.guidance_scale or 0) > 1.0:
            # The reference says so in a warning but then runs CFG anyway; we do what it says.
            warnings.warn(f"guidance_scale={self.guidance_scale} is ignored: the distilled model samples without CFG")
            filled["guidance_scale"] = 1.0
        opts = dataclasses.replace(self, **filled)
        opts = dataclasses.replace(opts, pyramid_num_inference_steps_list=tuple(opts.pyramid_num_inference_steps_list),
                                   history_sizes=tuple(opts.history_sizes))
        opts.check(variant)
        return opts

    def check(self, variant: Variant) -> None:
        _positive("num_frames", self.num_frames, "frames of video to generate")
        if self.num_frames > MAX_FRAMES:
            raise ValueError(f"num_frames must be at most {MAX_FRAMES} (a day of video at 24 fps), got {self.num_frames}")
        _positive("num_latent_frames_per_chunk", self.num_latent_frames_per_chunk, "latent frames per chunk")
        _positive("max_sequence_length", self.max_sequence_length, "text tokens")
        _positive("interpolation_steps", self.interpolation_steps, "chunks")
        multiple = 16
        if variant.is_pyramid:
            # Each pyramid stage halves the latent; stage 0 must still split into 2x2 patches: 8 * 2 * 2^(S-1).
            multiple = 16 * 2 ** (variant.scheduler.stages - 1)
            steps = self.pyramid_num_inference_steps_list
            if len(steps) != variant.scheduler.stages or any(int(n) < 1 for n in steps):
                raise ValueError(
                    f"pyramid_num_inference_steps_list must hold {variant.scheduler.stages} positive step counts "
                    f"(one per stage of the {variant.name} model), got {list(steps)}"
                )
        else:
            _positive("num_inference_steps", self.num_inference_steps, "denoising steps")
        for name in ("height", "width"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < multiple or value % multiple:
                raise ValueError(f"{name} must be a positive multiple of {multiple} for the {variant.name} model, got {value}")
        for kind in ("image", "video"):
            lo, hi = getattr(self, f"{kind}_noise_sigma_min"), getattr(self, f"{kind}_noise_sigma_max")
            if not 0 <= lo <= hi <= 1:
                raise ValueError(f"{kind}_noise_sigma_min/max must satisfy 0 <= min <= max <= 1, got {lo}, {hi}")

    @property
    def window_frames(self) -> int:
        """Pixel frames per chunk: (9 - 1) * 4 + 1 = 33."""
        return (self.num_latent_frames_per_chunk - 1) * 4 + 1


def _is_int(value) -> bool:
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _positive(name: str, value, what: str) -> None:
    if not _is_int(value) or value < 1:
        raise ValueError(f"{name} must be a positive integer ({what}), got {value!r}")

