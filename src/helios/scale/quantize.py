"""Quantization of the transformer's blocks, through torchao: int8 / fp8 weight-only for memory, fp8 compute for speed.

What is quantized: the Linear layers inside the blocks (attention projections and the FFN), which hold 98% of the
14B model's parameters. What stays as loaded: patch embeddings, the condition embedder, norms, modulation tables and
the output head, which are small and sit where precision matters most (the first and last maps, the timestep path).
Each weight row is stored as int8 or float8 (e4m3) with one scale per output channel, so the parameter bytes of the
blocks halve against bf16. The schemes:
- "int8", "fp8": weight-only, for memory. Activations stay in the model dtype and each weight is dequantized in the
  matmul, which costs time: 1.15x / 1.18x the bf16 time on an H200 (measured). Any device.
- "fp8-compute": for speed. The activations are quantized to float8 too, per row (token), at every call, and the
  matmul runs on fp8 tensor cores (torch._scaled_mm). Needs a CUDA GPU with them, compute capability 8.9+ (L4, RTX
  40xx, H100, H200, B200): refused by name anywhere else, before any weight is read.

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

WEIGHT_ONLY = ("int8", "fp8")  # for memory; they run on any device
SCHEMES = (*WEIGHT_ONLY, "fp8-compute")
FP8_COMPUTE_CAPABILITY = (8, 9)  # Ada and Hopper on: the first GPUs whose tensor cores multiply float8


def check_scheme(scheme: str, device) -> str:
    """The scheme, checked before any weight is read: a known name, torchao installed, and (fp8) runnable here."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantize={scheme!r}: unknown quantization, choose one of {', '.join(SCHEMES)}")
    device = torch.device(device)
    if scheme == "fp8-compute":
        _check_fp8_tensor_cores(device)  # before torchao's import: the refusal needs no optional package
    _torchao()
    if scheme != "int8":
        _probe(scheme, device)
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
    """Replace the weights of the block's Linear layers by torchao's quantized tensors (`scheme`, one of SCHEMES)."""
    quantize_, _ = _torchao()
    for layer in [m for m in block.modules() if isinstance(m, Linear)]:
        quantize_(layer, _config(scheme))  # one layer at a time: its temporaries are freed before the next
        _release_freed_memory()


def quantization(model: nn.Module) -> str | None:
    """The scheme the model's blocks are quantized with (one of SCHEMES), or None; streamed blocks included."""
    stream = getattr(model, "block_stream", None)
    for module in (model,) if stream is None else (model, stream.template):
        for p in module.parameters():
            data = getattr(p, "qdata", None) if _is_subclass(p) else None
            if data is not None:
                return _scheme_of(p)
    return None


def _scheme_of(weight: torch.Tensor) -> str:
    if weight.qdata.dtype == torch.int8:
        return "int8"
    # torchao's float8 weights carry how to quantize the activations: nothing when weight-only.
    return "fp8" if getattr(weight, "act_quant_kwargs", None) is None else "fp8-compute"


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
            from torchao.quantization import (
                Float8DynamicActivationFloat8WeightConfig,
                Float8WeightOnlyConfig,
                Int8WeightOnlyConfig,
                PerRow,
                quantize_,
            )
    except ImportError as err:
        raise ImportError('quantization needs torchao: pip install "helios[quantize]" (or torchao)') from err
    # fp8-compute: one scale per weight row and per activation row (token), so one outlier token does not coarsen the
    # others' steps. set_inductor_config=False: torchao would otherwise change process-wide settings (TF32 fp32
    # matmuls among them, which the fp32 islands must not get) as a side effect of quantizing.
    fp8_compute = functools.partial(Float8DynamicActivationFloat8WeightConfig, granularity=PerRow(),
                                    set_inductor_config=False)
    return quantize_, {"int8": Int8WeightOnlyConfig, "fp8": Float8WeightOnlyConfig, "fp8-compute": fp8_compute}


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
    # fp8-compute in bf16, the dtype its models run in (row-wise scaled float8 matmuls write bf16); 16 rows and
    # columns: float8 matmuls want dimensions that are multiples of 16.
    dtype = torch.bfloat16 if scheme == "fp8-compute" else torch.float32
    try:
        layer = nn.Sequential(Linear(64, 64)).to(device, dtype)
        quantize_block(layer, scheme)
        with torch.inference_mode():
            out = layer(torch.ones(16, 64, device=device, dtype=dtype))
        ok = bool(torch.isfinite(out).all())
    except (RuntimeError, NotImplementedError, TypeError, AssertionError) as err:
        raise ValueError(f"quantize={scheme!r}: {_MATMULS[scheme]} do not run on {_device_name(device)} "
                         f"with torch {torch.__version__}: {err}") from err
    if not ok:
        raise ValueError(f"quantize={scheme!r}: {_MATMULS[scheme]} give non-finite values on "
                         f"{_device_name(device)} with torch {torch.__version__}")


_MATMULS = {"fp8": "float8 weight-only matmuls", "fp8-compute": "float8 x float8 matmuls"}


def _check_fp8_tensor_cores(device: torch.device) -> None:
    """fp8-compute runs only where tensor cores multiply float8: a CUDA GPU of compute capability 8.9+. Elsewhere
    torchao would fail in the middle of loading (or, on a CPU, not have the kernels at all), so refuse it by name."""
    capable = (device.type == "cuda" and torch.cuda.is_available()
               and torch.cuda.get_device_capability(device) >= FP8_COMPUTE_CAPABILITY)
    if not capable:
        raise ValueError("quantize='fp8-compute' needs a CUDA GPU with fp8 tensor cores (compute capability 8.9+, "
                         f"e.g. L4, H100); this device is {_device_name(device)}: use 'fp8' or 'int8' "
                         "(weight-only) to save memory")


def _device_name(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        major, minor = torch.cuda.get_device_capability(device)
        return f"{device} ({torch.cuda.get_device_name(device)}, compute capability {major}.{minor})"
    if device.type == "cuda":
        return f"{device}, but this torch sees no CUDA GPU"
    return str(device)
