"""Helios: autoregressive long-video diffusion with a multi-term memory, in plain PyTorch.

The names below are imported on first use, so that `import helios.video_io` or the `helios` command's argument
checks do not pay for importing torch, transformers and diffusers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING

_EXPORTS = {
    "Chunk": ".generate",
    "GenerationPlan": ".plan",
    "HeliosConfig": ".config",
    "HeliosPipeline": ".generate",
    "HeliosTransformer3DModel": ".model",
    "SamplingOptions": ".options",
    "Steering": ".steering",
    "TransformerOutput": ".model",
    "Video": ".generate",
    "make_plan": ".plan",
}

if TYPE_CHECKING:
    from .config import HeliosConfig
    from .generate import Chunk, HeliosPipeline, Video
    from .model import HeliosTransformer3DModel, TransformerOutput
    from .options import SamplingOptions
    from .plan import GenerationPlan, make_plan
    from .steering import Steering

__all__ = sorted(_EXPORTS)
__version__ = "0.1.0"


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'helios' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name], __name__), name)
