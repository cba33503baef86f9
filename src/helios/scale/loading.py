"""Loading a transformer with the scale features chosen up front: its blocks streamed (offload="blocks") and/or
quantized while they are read. What `HeliosTransformer3DModel.from_pretrained(offload=, quantize=)` runs."""

from __future__ import annotations

import functools

import torch

from ..model.hub import resolve_directory
from ..model.weights import load_transformer
from .offload import TRANSFORMER_MODES, check_offload
from .quantize import check_scheme, quantize_block
from .stream_blocks import load_streamed


def load_scaled(model_class, path_or_repo_id, subfolder=None, torch_dtype=None, device="cpu", offload=None,
                quantize=None):
    """`model_class` from a checkpoint: resident, or with offload="blocks" its blocks left in the checkpoint to be
    streamed when called (stream_blocks.py); with quantize ("int8" | "fp8" | "fp8-compute"), each block is quantized as soon as it
    is read (quantize.py), and with offload="blocks" the quantized blocks are what streams."""
    check_offload(offload, TRANSFORMER_MODES, "HeliosTransformer3DModel.from_pretrained")
    prepare_block = None
    if quantize is not None:
        check_scheme(quantize, device)  # a bad name or an fp8-less device fails before any file is read
        prepare_block = functools.partial(quantize_block, scheme=quantize)
    directory = resolve_directory(path_or_repo_id, subfolder)
    if offload == "blocks":
        return load_streamed(model_class, directory, torch_dtype or torch.float32, device, prepare_block=prepare_block)
    return load_transformer(model_class, directory, torch_dtype or torch.float32, device, prepare_block=prepare_block)
