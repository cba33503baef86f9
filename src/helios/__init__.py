"""Helios: autoregressive long-video diffusion with a multi-term memory, in plain PyTorch."""

from .config import HeliosConfig
from .model import HeliosTransformer3DModel, TransformerOutput

__all__ = ["HeliosConfig", "HeliosTransformer3DModel", "TransformerOutput"]
__version__ = "0.1.0"
