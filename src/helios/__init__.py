"""Helios: autoregressive long-video diffusion with a multi-term memory, in plain PyTorch.

The names below are imported on first use, so that `import helios.pipeline.video_io` or the `helios` command's argument
checks do not pay for importing torch, transformers and diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "Chunk": ".pipeline.generate",
    "GenerationPlan": ".sampling.plan",
    "HeliosConfig": ".model.config",
    "HeliosPipeline": ".pipeline.generate",
    "HeliosTransformer3DModel": ".model.transformer",
    "SamplingOptions": ".sampling.options",
    "Steering": ".pipeline.steering",
    "TransformerOutput": ".model.transformer",
    "Video": ".pipeline.generate",
    "make_plan": ".sampling.plan",
}

if TYPE_CHECKING:
    from .model.config import HeliosConfig
    from .model.transformer import HeliosTransformer3DModel, TransformerOutput
    from .pipeline.generate import Chunk, HeliosPipeline, Video
    from .pipeline.steering import Steering
    from .sampling.options import SamplingOptions
    from .sampling.plan import GenerationPlan, make_plan

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"  # as in pyproject.toml; `helios --version` reads the installed metadata


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'helios' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
