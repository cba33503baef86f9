"""Weight-only int8 / fp8 quantization of the transformer's blocks, through torchao.

What is quantized: the Linear layers inside the blocks (attention projections and the FFN), which hold 98% of the
14B model's parameters. What stays as loaded: patch embeddings, the condition embedder, norms, modulation tables and
the output head, which are small and sit where precision matters most (the first and last maps, the timestep path).
Weight-only: activations stay in the model dtype; each weight row is stored as int8 or float8 (e4m3) with one scale
per output channel and dequantized in the matmul, so the parameter bytes of the blocks halve against bf16.

`quantize(model, scheme)` works on a loaded model; `from_pretrained(..., quantize=scheme)` hands `quantize_block` to
weights.load_transformer, which reads the blocks one at a time and quantizes each as soon as it is read, so that
loading never holds the bf16 model and the quantized one at the same time.
torchao is the `quantize` extra: `pip install "helios[quantize]"`.
"""

from __future__ import annotations

import ctypes
import functools
import logging
from contextlib import contextmanager

import torch
from torch import nn

from ..model.layers import Linear
from .lora import lora_adapters

SCHEMES = ("int8", "fp8")


def check_scheme(scheme: str, device) -> str:
    """The scheme, checked before any weight is read: a known name, torchao installed, and (fp8) runnable here."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantize={scheme!r}: unknown quantization, choose one of {', '.join(SCHEMES)}")
    _torchao()
    if scheme == "fp8":
        _probe(scheme, torch.device(device))
    return scheme


def quantize(model: nn.Module, scheme: str) -> nn.Module:
    """Quantize the Linear layers of every block of a loaded HeliosTransformer3DModel in place; returns it."""
    check_scheme(scheme, model.device)
    if is_quantized(model):
        raise ValueError(f"quantize={scheme!r}: the model is quantized already")
    if getattr(model, "block_stream", None) is not None:  # its blocks are read from the checkpoint at every call
        raise ValueError(f"quantize={scheme!r}: this transformer streams its blocks (offload='blocks'); quantize "
                         f"them while loading: from_pretrained(..., offload='blocks', quantize={scheme!r})")
    if lora_adapters(model):  # their layers stand in for the Linears; quantize first, then load the adapters
        raise ValueError(f"quantize={scheme!r}: unload the LoRA adapters first (load them after quantizing)")
    for block in model.blocks:
        quantize_block(block, scheme)
    return model


def quantize_block(block: nn.Module, scheme: str) -> None:
    """Replace the weights of the block's Linear layers by torchao's weight-only quantized tensors."""
    quantize_, _ = _torchao()
    for layer in [m for m in block.modules() if isinstance(m, Linear)]:
        quantize_(layer, _config(scheme))  # one layer at a time: its temporaries are freed before the next
        _release_freed_memory()


def quantization(model: nn.Module) -> str | None:
    """The scheme the model's blocks are quantized with ("int8", "fp8"), or None; streamed blocks included."""
    stream = getattr(model, "block_stream", None)
    for module in (model,) if stream is None else (model, stream.template):
        for p in module.parameters():
            data = getattr(p, "qdata", None) if _is_subclass(p) else None
            if data is not None:
                return "int8" if data.dtype == torch.int8 else "fp8"
    return None


def is_quantized(model: nn.Module) -> bool:
    return quantization(model) is not None


def parameter_bytes(module: nn.Module) -> int:
    """Bytes the parameters and buffers occupy, counting the int8/fp8 data and scales inside quantized tensors."""
    tensors = list(module.parameters()) + list(module.buffers())
    return sum(_tensor_bytes(t) for t in tensors)


def _tensor_bytes(t: torch.Tensor) -> int:
    if not _is_subclass(t):
        return t.numel() * t.element_size()
    names, _ = t.__tensor_flatten__()  # torchao's tensors name their inner tensors: qdata, scale, ...
    return sum(_tensor_bytes(getattr(t, name)) for name in names)


def _is_subclass(t: torch.Tensor) -> bool:
    return type(t) not in (torch.Tensor, nn.Parameter)


# ---------------------------------------------------------------------------------------------------------------------
# Memory


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None (another C library, another OS)."""
    try:
        return ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):
        return None


def _release_freed_memory() -> None:
    """Hand the memory freed by quantizing a layer back to the OS. torchao works in full-size temporaries of each
    weight; once freed, glibc keeps them in its heap (its mmap threshold rises with the first large free), and the
    resident memory of a quantized load would grow by about twice the bf16 size of each block (measured)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


# ---------------------------------------------------------------------------------------------------------------------
# torchao


@functools.cache
def _torchao():
    """(quantize_, configs by scheme), imported on first use: torchao is an optional dependency."""
    try:
        with _quiet("torchao", "torch.utils._pytree"):
            from torchao.quantization import Float8WeightOnlyConfig, Int8WeightOnlyConfig, quantize_
    except ImportError as err:
        raise ImportError('quantization needs torchao: pip install "helios[quantize]" (or torchao)') from err
    return quantize_, {"int8": Int8WeightOnlyConfig, "fp8": Float8WeightOnlyConfig}


def _config(scheme: str):
    return _torchao()[1][scheme]()


@contextmanager
def _quiet(*loggers: str):
    """torchao's import logs warnings about optional native kernels it does not need for weight-only configs
    (mxfp8, CUTLASS) and about deprecated torch.compile registrations; none concerns the user."""
    saved = [(logging.getLogger(name), logging.getLogger(name).level) for name in loggers]
    for logger, _ in saved:
        logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for logger, level in saved:
            logger.setLevel(level)


@functools.cache
def _probe(scheme: str, device: torch.device) -> None:
    """Quantize and run one small Linear on `device`: whether float8 runs depends on the device, torch and torchao
    (the weight's float8 dtype, the matmul kernels), which no flag reports. Raises naming the device."""
    try:
        layer = nn.Sequential(Linear(64, 64)).to(device)
        quantize_block(layer, scheme)
        with torch.inference_mode():
            out = layer(torch.ones(2, 64, device=device))
        ok = bool(torch.isfinite(out).all())
    except (RuntimeError, NotImplementedError, TypeError, AssertionError) as err:
        raise ValueError(f"quantize={scheme!r}: float8 weight-only matmuls do not run on {_device_name(device)} "
                         f"with torch {torch.__version__}: {err}") from err
    if not ok:
        raise ValueError(f"quantize={scheme!r}: float8 weight-only matmuls give non-finite values on "
                         f"{_device_name(device)} with torch {torch.__version__}")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)})"
    return str(device)
