"""Helios: autoregressive long-video diffusion with a multi-term memory, in plain PyTorch."""

from .config import HeliosConfig
from .generate import Chunk, HeliosPipeline, Video
from .model import HeliosTransformer3DModel, TransformerOutput
from .options import SamplingOptions

__all__ = ["Chunk", "HeliosConfig", "HeliosPipeline", "HeliosTransformer3DModel", "SamplingOptions", "TransformerOutput", "Video"]
__version__ = "0.1.0"
