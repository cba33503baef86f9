"""Pipelines with random weights at a chosen size, ours and the reference's sharing the very same tensors, built
straight on the device (nothing is downloaded or written but a tiny model folder's config files).

"14b" is the published shape: the 14B transformer, UMT5-XXL (11.4 GB in bf16) and the Wan 2.1 VAE; "toy" is the
built-in tiny model, for a CPU. Random weights time the same as trained ones: every kernel sees the real shapes.
"""

from __future__ import annotations

import json
import math
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from ..model.config import HeliosConfig
from ..model.transformer import HeliosTransformer3DModel
from ..model.weights import param_dtype
from ..pipeline.folder import ModelFolder, read_folder
from ..pipeline.generate import HeliosPipeline
from ..pipeline.text import TextEncoder
from ..pipeline.tiny import TINY_UMT5, build_tiny_model
from ..pipeline.vae import VideoVAE
from .common import reference_module

SIZES = ("toy", "14b")
UMT5_XXL = {**TINY_UMT5, "vocab_size": 256384, "d_model": 4096, "d_kv": 64, "num_heads": 64, "num_layers": 24,
            "d_ff": 10240}


@dataclass
class Built:
    ours: HeliosPipeline
    reference: object  # diffusers' HeliosPyramidPipeline over the same modules (None if not asked for)
    config: HeliosConfig
    folder: Path  # the tiny folder the configs came from (tokenizer, scheduler, model_index)


def build(size: str, device: torch.device, dtype: torch.dtype, with_reference: bool = True) -> Built:
    if size not in SIZES:
        raise ValueError(f"--size must be one of {', '.join(SIZES)}, got {size!r}")
    folder = build_tiny_model(Path(tempfile.mkdtemp(prefix="helios-bench-")) / "distilled", variant="distilled")
    if device.type == "cpu":  # the reference's fp32 Cholesky of the gamma = 1/3 block covariance fails on a CPU
        path = folder / "scheduler" / "scheduler_config.json"
        path.write_text(json.dumps({**json.loads(path.read_text()), "gamma": 0.25}))
    model = read_folder(folder)
    if size == "toy":
        ours = HeliosPipeline.from_pretrained(folder, torch_dtype=dtype, device=device)
    else:
        ours = HeliosPipeline(_transformer(HeliosConfig(), device, dtype), _vae(device), _text_encoder(model, device,
                              dtype), model.variant, None, model)
    reference = _reference(ours, folder) if with_reference else None
    return Built(ours, reference, ours.transformer.config, folder)


def _transformer(cfg: HeliosConfig, device, dtype) -> HeliosTransformer3DModel:
    """The transformer in the dtypes from_pretrained gives (some modules stay fp32), initialised on the device."""
    with torch.device("meta"):
        model = HeliosTransformer3DModel(cfg)
    state = {name: _random(name, tuple(p.shape), param_dtype(name, dtype), device)
             for name, p in model.state_dict().items()}
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def _random(name: str, shape: tuple, dtype, device) -> torch.Tensor:
    """Weights that keep activations of unit size through 40 blocks: 1/sqrt(fan-in) matrices, unit norms."""
    t = torch.empty(shape, dtype=dtype, device=device)
    if name.endswith("bias"):
        return t.zero_()
    if "norm" in name and len(shape) == 1:
        return t.fill_(1.0)
    fan_in = math.prod(shape[1:]) if len(shape) > 1 else shape[0]
    return t.normal_(0.0, 1.0 / math.sqrt(fan_in))


def _text_encoder(model: ModelFolder, device, dtype) -> TextEncoder:
    from transformers import AutoTokenizer, UMT5Config, UMT5EncoderModel

    with torch.device("meta"):
        encoder = UMT5EncoderModel(UMT5Config(**UMT5_XXL))
    state = {name: _random(name, tuple(p.shape), dtype, device) for name, p in encoder.state_dict().items()}
    encoder.load_state_dict(state, strict=False, assign=True)  # the tied embedding is one tensor under two names
    encoder.tie_weights()
    return TextEncoder(encoder, AutoTokenizer.from_pretrained(model.component("tokenizer")))


def _vae(device) -> VideoVAE:
    from diffusers import AutoencoderKLWan

    with torch.device(device):
        return VideoVAE(AutoencoderKLWan())  # its defaults are the Wan 2.1 VAE of the published repos


def _reference(ours: HeliosPipeline, folder: Path):
    """diffusers' pipeline over our modules: its transformer holds our transformer's tensors (assign=True)."""
    diffusers = reference_module()
    cfg = ours.transformer.config
    with torch.device("meta"):
        transformer = diffusers.HeliosTransformer3DModel(**cfg.to_dict())
    transformer.load_state_dict(ours.transformer.state_dict(), strict=True, assign=True)
    # Buffers outside the state dict (the rotary tables) are made by __init__: take them from a one-block copy.
    with torch.device(ours.device):
        small = dict(diffusers.HeliosTransformer3DModel(**{**cfg.to_dict(), "num_layers": 1}).named_buffers())
    for name, buffer in list(transformer.named_buffers()):
        if buffer.is_meta:
            module, _, leaf = name.rpartition(".")
            transformer.get_submodule(module).register_buffer(leaf, small[name], persistent=False)
    scheduler = diffusers.HeliosDMDScheduler.from_pretrained(folder / "scheduler")
    pipe = diffusers.HeliosPyramidPipeline(tokenizer=ours.text_encoder.tokenizer, text_encoder=ours.text_encoder.model,
                                           vae=ours.vae.vae, scheduler=scheduler, transformer=transformer.eval(),
                                           is_distilled=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe
