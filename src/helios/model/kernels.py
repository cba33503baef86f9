"""The compute kernels of the transformer: linear, attention, norms and the per-span fp32 elementwise ops.

The model's layers call these functions and nothing else for their heavy math, so that each can be made faster, or
replaced, in one place: the layers read as the paper's math, and the speed tricks live here.

- `linear` runs CPU inference matmuls through oneDNN when a probe shows that oneDNN runs that dtype on this machine
  (below AVX-512 it has no bf16 inner product at all, so bf16 then takes torch's default path). `HELIOS_FAST_LINEAR=0`
  switches the fast path off.
- `attention` is torch's scaled_dot_product_attention with the preferred kernels per device.
- The per-span ops write each span of tokens straight into one output buffer when autograd is off.

Replacing a kernel from outside (context parallelism swaps attention, quantization and LoRA swap linear layers) is
done on the modules that call them (`layers.Attention.attention`, the `layers.Linear` modules), not here.
"""

from __future__ import annotations

import contextlib
import functools
import os

import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

Span = slice  # a contiguous run of tokens sharing one timestep: history tokens, then current tokens

# scaled_dot_product_attention kernels to prefer per device type, fastest first; torch falls through to the next
# when one can't take the inputs (dtype, head dim). On Hopper, cuDNN's fused attention leads for bf16.
SDPA_BACKENDS = {
    "cuda": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "cpu": [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH],
}
FAST_LINEAR_ENV = "HELIOS_FAST_LINEAR"  # "0" turns the oneDNN linear off


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {None: None, "gelu_tanh": gelu_tanh}


# ---------------------------------------------------------------------------------------------------------------------
# Linear


@functools.cache
def onednn_linear(dtype: torch.dtype):
    """oneDNN's fused CPU linear (the kernel torch's compiled CPU graphs call) if it runs `dtype` here, else None.

    Decided once per dtype by trying it, with and without the fused GELU, on a small input: whether oneDNN has a
    kernel depends on the CPU (bf16 needs AVX-512) and on ONEDNN_MAX_CPU_ISA, which no torch flag reports.
    """
    if os.environ.get(FAST_LINEAR_ENV, "1") == "0" or not torch.backends.mkldnn.is_available():
        return None
    op = getattr(torch.ops.mkldnn, "_linear_pointwise", None)
    if op is None:
        return None
    with torch.inference_mode():
        x, w, b = torch.ones(3, 8, dtype=dtype), torch.ones(4, 8, dtype=dtype), torch.zeros(4, dtype=dtype)
        try:
            plain = op(x, w, b, "none", [], "")
            fused = op(x, w, b, "gelu", [], "tanh") if dtype == torch.float32 else plain
        except RuntimeError:  # "could not create a primitive descriptor ...": no kernel for this dtype on this CPU
            return None
    expected = F.linear(x, w, b)
    if not (torch.equal(plain, expected) and torch.allclose(fused.float(), gelu_tanh(expected).float())):
        return None
    return op


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
           activation: str | None = None) -> torch.Tensor:
    """`activation(x @ weight.T + bias)`; activation is None or "gelu_tanh".

    On CPU, in eager inference, this calls oneDNN's matmul instead of torch's default sgemm where the probe allows:
    on CPUs where MKL does not run its AVX-512 kernels (AMD) oneDNN is faster (docs/benchmarks.md), with the same
    products and sums in another blocking order (fp32 results agree to rounding). In fp32 the GELU is fused into the
    matmul's epilogue, which saves a pass over the FFN's widest tensor; in bf16 it is not, so that the GELU sees the
    bf16-rounded product, as in the reference. With autograd on (the oneDNN op has no backward), under
    torch.compile (Inductor picks its own CPU kernels), for weights that are not plain tensors (quantized) and on
    other devices, it is F.linear.
    """
    act = ACTIVATIONS[activation]
    fast = _fast_linear(x, weight, bias)
    fused = fast is not None and act is not None and x.dtype == torch.float32
    if fast is not None:
        y = fast(x, weight, bias, "gelu" if fused else "none", [], "tanh" if fused else "")
    else:
        y = F.linear(x, weight, bias)
    return act(y) if act is not None and not fused else y


def _fast_linear(x, weight, bias):
    eligible = (
        not torch.compiler.is_compiling()  # checked first: the compiler must not trace the checks below
        and not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and _plain(weight, x.dtype)
        and (bias is None or _plain(bias, x.dtype))
    )
    return onednn_linear(x.dtype) if eligible else None


def _plain(t: torch.Tensor, dtype: torch.dtype) -> bool:
    """A dense tensor of `dtype` (not a tensor subclass such as torchao's quantized weights)."""
    return t.dtype == dtype and type(t) in (torch.Tensor, torch.nn.Parameter)


# ---------------------------------------------------------------------------------------------------------------------
# Attention and norms


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full bidirectional attention. q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H*D]."""
    backends = SDPA_BACKENDS.get(q.device.type)
    with sdpa_kernel(backends, set_priority=True) if backends else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim with fp32 statistics, in three passes (torch's CPU composite takes six)."""
    xf = x.float()
    mean_square = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square() / x.shape[-1]
    return (xf * torch.rsqrt(mean_square + eps) * weight.float()).to(x.dtype)


def layer_norm(x: torch.Tensor, eps: float, weight: torch.Tensor | None = None,
               bias: torch.Tensor | None = None) -> torch.Tensor:
    """LayerNorm in fp32 (the reference's FP32LayerNorm), affine when weight and bias are given."""
    weight = None if weight is None else weight.float()
    bias = None if bias is None else bias.float()
    return F.layer_norm(x.float(), x.shape[-1:], weight, bias, eps=eps)


# ---------------------------------------------------------------------------------------------------------------------
# Per-span elementwise ops in fp32


def _per_span(out_dtype, like: torch.Tensor, spans: list[Span], op) -> torch.Tensor:
    """Build a [B, L, D] tensor span by span: op(span, i, out) writes span i. With autograd off, every span is
    written straight into one buffer (no temporary, no concatenation); with autograd on, the spans are concatenated,
    because out= arguments cannot be differentiated."""
    if torch.is_grad_enabled():
        return torch.cat([op(span, i, None).to(out_dtype) for i, span in enumerate(spans)], dim=1)
    out = torch.empty(like.shape, dtype=out_dtype, device=like.device)
    for i, span in enumerate(spans):
        op(span, i, out[:, span])
    return out


def modulate(x: torch.Tensor, spans: list[Span], shift, scale, dtype: torch.dtype) -> torch.Tensor:
    """`x * (1 + scale) + shift` in fp32 with one (shift, scale) pair per span of tokens, cast to `dtype`.

    x: [B, L, D] fp32; shift/scale: one [B or 1, 1, D] fp32 tensor per span. Working per span avoids the
    reference's [B, L, 6, D] fp32 per-token table (1.4 GB per block at 14B, full resolution).
    """
    return _per_span(dtype, x, spans, lambda span, i, out: torch.addcmul(shift[i], x[:, span], 1 + scale[i], out=out))


def gated_residual(h: torch.Tensor, y: torch.Tensor, gate, spans: list[Span]) -> torch.Tensor:
    """`h + y * gate` computed in fp32 per span (gate is fp32, so the sum is), cast back to h's dtype."""
    return _per_span(h.dtype, h, spans, lambda span, i, out: torch.addcmul(h[:, span], y[:, span], gate[i], out=out))


def add_to_tokens(h: torch.Tensor, start: int, y: torch.Tensor) -> torch.Tensor:
    """h with y added to its tokens from `start` on (in the model dtype), in place when autograd is off."""
    if torch.is_grad_enabled():
        return torch.cat([h[:, :start], h[:, start:] + y], dim=1)
    h[:, start:] += y
    return h
