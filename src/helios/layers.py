"""Building blocks of the Helios transformer: pure functions first, then the small modules.

Compared with Wan 2.1 the layers differ in three ways: the modulation is per *segment* of tokens (history tokens
are modulated with t=0, current tokens with the real timestep), cross-attention may see only the current tokens,
and self-attention may amplify the keys of history tokens. Precision follows the reference exactly: LayerNorms,
modulation, residual adds and the rotary tables run in fp32 ("fp32 islands"), matmuls in the model dtype.
"""

from __future__ import annotations

import contextlib
import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel

Span = slice  # a contiguous run of tokens sharing one timestep: history tokens, then current tokens


# ---------------------------------------------------------------------------------------------------------------------
# Pure functions


def timestep_sinusoid(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """[B] timesteps -> [B, dim] fp32 features ordered [cos | sin] (diffusers' flip_sin_to_cos=True, shift 0)."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    angles = t.float()[:, None] * freqs[None, :]
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def rope_frequencies(rope_dim: tuple[int, int, int], theta: float, device=None) -> list[torch.Tensor]:
    """Per-axis (t, y, x) inverse frequencies 1/theta^(2j/d), fp32."""
    return [1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float32, device=device) / d) for d in rope_dim]


def rope_grid(
    frame_indices: torch.Tensor, height: int, width: int, rope_dim: tuple[int, int, int], theta: float
) -> torch.Tensor:
    """Rotary table of a token grid: [B, T] frame indices -> [B, 2*half, T, height, width] fp32, half = head_dim/2.

    Channels are [cos_t, cos_y, cos_x, sin_t, sin_y, sin_x], one value per rotated pair (the reference stores each
    twice, repeat_interleaved, which holds no extra information). Channel-first so that the mid/long memory can
    average-pool it like a video. A pure function of its values, so callers may cache it by value.
    """
    device = frame_indices.device
    b, t = frame_indices.shape
    positions = (
        frame_indices.float()[:, :, None, None].expand(b, t, height, width),
        torch.arange(height, dtype=torch.float32, device=device)[None, None, :, None].expand(b, t, height, width),
        torch.arange(width, dtype=torch.float32, device=device)[None, None, None, :].expand(b, t, height, width),
    )
    # fp32 even under autocast: bf16 cannot hold integer positions past 256.
    with torch.autocast(device_type=device.type, enabled=False):
        angles = [
            torch.einsum("d,bthw->bdthw", freqs, pos)
            for freqs, pos in zip(rope_frequencies(rope_dim, theta, device), positions)
        ]
    angles = torch.cat(angles, dim=1)
    return torch.cat([angles.cos(), angles.sin()], dim=1)


def pad_replicate(x: torch.Tensor, multiple: tuple[int, int, int]) -> torch.Tensor:
    """Replicate-pad the last three dims of [B, C, T, H, W] at their ends up to multiples of `multiple`."""
    pads = []
    for size, m in zip(reversed(x.shape[-3:]), reversed(multiple)):
        pads += [0, (m - size % m) % m]
    return F.pad(x, pads, mode="replicate") if any(pads) else x


def pool_rope(grid: torch.Tensor, factor: int) -> torch.Tensor:
    """Average cos and sin (not angles) over factor^3 cells, as the reference does for the compressed memory."""
    if factor == 1:
        return grid
    cell = (factor, factor, factor)
    return F.avg_pool3d(pad_replicate(grid, cell), cell, stride=cell)


def grid_to_tokens(grid: torch.Tensor) -> torch.Tensor:
    """[B, C, T, H, W] -> [B, T*H*W, C] in raster order (t, y, x)."""
    return grid.flatten(2).transpose(1, 2)


def apply_rope(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, L, heads, head_dim] by freqs [B, L, 1, head_dim/2].

    freqs is complex64, cos + i*sin per pair, so the rotation (x0 c - x1 s, x0 s + x1 c) is one complex multiply
    (5x faster in eager than the real-valued form on CPU). It runs in fp32 (fp32 tables x model-dtype x) and is
    cast once, like the reference.
    """
    pairs = torch.view_as_complex(x.float().unflatten(-1, (-1, 2)))
    return torch.view_as_real(pairs * freqs).flatten(-2).to(x.dtype)


@functools.lru_cache(maxsize=16)
def rope_table(terms: tuple, rope_dim: tuple[int, int, int], theta: float, device: str) -> torch.Tensor:
    """The complex rotary table [B, L, 1, head_dim/2] of a whole token sequence, cached.

    terms: one (frame indices as a tuple of B tuples, height, width, pool factor) per part of the sequence, in order.
    The key is made of values, never of tensor identities, so equal layouts (every step of a chunk) share one table.
    """
    with torch.inference_mode(False), torch.no_grad():  # a plain tensor, usable inside and outside inference mode
        tables = []
        for indices, height, width, factor in terms:
            frames = torch.tensor(indices, dtype=torch.float32, device=device)
            tables.append(grid_to_tokens(pool_rope(rope_grid(frames, height, width, rope_dim, theta), factor)))
        return rope_to_complex(torch.cat(tables, dim=1))


def rope_to_complex(grid_tokens: torch.Tensor) -> torch.Tensor:
    """[B, L, head_dim] token table of [cos | sin] values -> complex64 [B, L, 1, head_dim/2] for apply_rope."""
    cos, sin = grid_tokens.chunk(2, dim=-1)
    return torch.complex(cos.contiguous(), sin.contiguous()).unsqueeze(2)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim with fp32 statistics, in three passes (torch's CPU composite takes six)."""
    xf = x.float()
    mean_square = torch.linalg.vector_norm(xf, dim=-1, keepdim=True).square() / x.shape[-1]
    return (xf * torch.rsqrt(mean_square + eps) * weight.float()).to(x.dtype)


@functools.cache
def _onednn_linear():
    """oneDNN's fused linear (the kernel torch's own compiled CPU graphs call), or None if this torch has none."""
    if not torch.backends.mkldnn.is_available():
        return None
    return getattr(torch.ops.mkldnn, "_linear_pointwise", None)


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, gelu: bool = False) -> torch.Tensor:
    """`x @ weight.T + bias`, then tanh-GELU if `gelu`.

    On CPU, in eager inference, this calls oneDNN's matmul instead of torch's default MKL sgemm: on CPUs where MKL
    does not run its AVX-512 kernels (AMD) oneDNN is faster, 17 % over the transformer's matmuls (docs/benchmarks.md),
    with the same products and sums in another blocking order (fp32 results agree to rounding). In fp32 the GELU is
    fused into the matmul's epilogue, which saves a pass over the FFN's widest tensor; in bf16 it is not, so that the
    GELU still sees the bf16-rounded product, as in the reference. With autograd on (the oneDNN op has no backward),
    under torch.compile (Inductor picks its own CPU kernels) and on other devices, it is plain F.linear.
    """
    eligible = (
        not torch.compiler.is_compiling()  # checked first: the compiler must not trace the checks below
        and not torch.is_grad_enabled()
        and x.device.type == "cpu"
        and x.dtype in (torch.float32, torch.bfloat16)
        and weight.dtype == x.dtype
        and (bias is None or bias.dtype == x.dtype)
    )
    fast = _onednn_linear() if eligible else None
    fused = fast is not None and gelu and x.dtype == torch.float32
    if fast is not None:
        y = fast(x, weight, bias, "gelu" if fused else "none", [], "tanh" if fused else "")
    else:
        y = F.linear(x, weight, bias)
    return gelu_tanh(y) if gelu and not fused else y


# scaled_dot_product_attention kernels to prefer per device type, fastest first; torch falls through to the next
# when one can't take the inputs (dtype, head dim). On Hopper, cuDNN's fused attention leads for bf16.
SDPA_BACKENDS = {
    "cuda": [SDPBackend.CUDNN_ATTENTION, SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH],
    "cpu": [SDPBackend.FLASH_ATTENTION, SDPBackend.MATH],
}


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """Full bidirectional attention. q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H*D].

    The single place attention is computed, so that backends and parallelism are chosen here.
    """
    backends = SDPA_BACKENDS.get(q.device.type)
    with sdpa_kernel(backends, set_priority=True) if backends else contextlib.nullcontext():
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2).flatten(2)


def layer_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """Non-affine LayerNorm in fp32 (the reference's FP32LayerNorm without weights)."""
    return F.layer_norm(x.float(), x.shape[-1:], eps=eps)


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


# ---------------------------------------------------------------------------------------------------------------------
# Modules. Attribute names are the checkpoint keys.


class Linear(nn.Linear):
    """nn.Linear (same parameters, same keys) computed by linear()."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.weight, self.bias)


class Modulation(NamedTuple):
    """The six per-block modulation vectors of one span of tokens, each [B or 1, 1, D] fp32."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor
    ffn_shift: torch.Tensor
    ffn_scale: torch.Tensor
    ffn_gate: torch.Tensor


class Attention(nn.Module):
    """Multi-head attention with q/k RMSNorm across all heads (statistics over the full inner_dim vector)."""

    def __init__(self, dim: int, heads: int, eps: float, added_kv_proj_dim: int | None = None, history_scale=None):
        super().__init__()
        self.heads = heads
        self.to_q = Linear(dim, dim)
        self.to_k = Linear(dim, dim)
        self.to_v = Linear(dim, dim)
        self.to_out = nn.ModuleList([Linear(dim, dim)])  # key "to_out.0": the reference's [Linear, Dropout]
        self.norm_q = nn.RMSNorm(dim, eps=eps)  # weights only: applied by rms_norm(), see forward
        self.norm_k = nn.RMSNorm(dim, eps=eps)
        if added_kv_proj_dim is not None:
            # Image-conditioning K/V inherited from Wan's config; the reference creates these weights but never uses
            # them in the forward pass. We keep them so such checkpoints load strictly, and likewise ignore them.
            self.add_k_proj = Linear(added_kv_proj_dim, dim)
            self.add_v_proj = Linear(added_kv_proj_dim, dim)
            self.norm_added_k = nn.RMSNorm(dim, eps=eps)
        # Learnt amplification of the history keys (is_amplify_history): "scalar" -> [1], "per_head" -> [heads].
        self.history_key_scale = None if history_scale is None else nn.Parameter(torch.ones(history_scale))
        self.max_history_scale = 10.0

    def forward(self, x, context=None, rope=None, n_hist: int = 0, query_start: int = 0) -> torch.Tensor:
        """x [B, L, D]; context [B, Lc, D] for cross-attention; rope (complex [B, L, 1, head_dim/2]) for self-attention.

        Only tokens from `query_start` on are queried (and returned); all tokens are keys and values. q/k are
        RMS-normalised over all heads jointly, before the split into heads.
        """
        src = x if context is None else context
        q = rms_norm(self.to_q(x[:, query_start:]), self.norm_q.weight, self.norm_q.eps).unflatten(-1, (self.heads, -1))
        k = rms_norm(self.to_k(src), self.norm_k.weight, self.norm_k.eps).unflatten(-1, (self.heads, -1))
        v = self.to_v(src).unflatten(-1, (self.heads, -1))
        if rope is not None:
            q, k = apply_rope(q, rope[:, query_start:]), apply_rope(k, rope)
        if self.history_key_scale is not None and n_hist > 0:
            k = self._amplify_history_keys(k, n_hist)
        return self.to_out[0](attention(q, k, v))

    def _amplify_history_keys(self, k: torch.Tensor, n_hist: int) -> torch.Tensor:
        # s = 1 + sigmoid(p) * (max - 1), per head. Computed in fp32 and cast back to the key dtype: the reference
        # lets the fp32 scale promote the keys and then crashes in bf16 on mixed-dtype attention.
        s = 1.0 + torch.sigmoid(self.history_key_scale.float()) * (self.max_history_scale - 1.0)
        s = s.view(1, 1, -1, 1)
        return torch.cat([(k[:, :n_hist].float() * s).to(k.dtype), k[:, n_hist:]], dim=1)


class GELUProjection(nn.Module):
    """Linear followed by tanh-approximate GELU (key "net.0.proj")."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return linear(x, self.proj.weight, self.proj.bias, gelu=True)


class FeedForward(nn.Module):
    """Non-gated MLP; keys "net.0.proj" and "net.2" (net.1 is the reference's parameterless dropout)."""

    def __init__(self, dim: int, inner_dim: int):
        super().__init__()
        self.net = nn.ModuleList([GELUProjection(dim, inner_dim), nn.Identity(), Linear(inner_dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.net:
            x = layer(x)
        return x


class MLP(nn.Module):
    """linear_1 -> activation -> linear_2: the time embedder (SiLU) and the text projection (tanh GELU)."""

    def __init__(self, dim_in: int, dim: int, activation):
        super().__init__()
        self.linear_1 = Linear(dim_in, dim)
        self.linear_2 = Linear(dim, dim)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.activation(self.linear_1(x)))


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class ConditionEmbedder(nn.Module):
    """Timestep -> (temb [B, D], six modulation vectors [B, 6, D]); text [B, Lt, text_dim] -> [B, Lt, D]."""

    def __init__(self, dim: int, freq_dim: int, text_dim: int):
        super().__init__()
        self.freq_dim = freq_dim
        self.time_embedder = MLP(freq_dim, dim, F.silu)  # kept in fp32 (see weights.KEEP_FP32)
        self.time_proj = Linear(dim, 6 * dim)
        self.text_embedder = MLP(text_dim, dim, gelu_tanh)

    def embed_time(self, t: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        features = timestep_sinusoid(t, self.freq_dim)
        # fp32 island: the time MLP runs in its own (fp32) dtype; its output is rounded to the model dtype once.
        temb = self.time_embedder(features.to(self.time_embedder.linear_1.weight.dtype)).to(dtype)
        return temb, self.time_proj(F.silu(temb)).unflatten(-1, (6, -1))


class AffineLayerNorm(nn.Module):
    """LayerNorm with weight and bias, always computed in fp32 (its parameters are kept in fp32 when loading)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x.float(), x.shape[-1:], self.weight.float(), self.bias.float(), self.eps)


class TransformerBlock(nn.Module):
    """Self-attention over [history | current], cross-attention to the text, FFN; adaLN modulation per span."""

    def __init__(self, cfg, dim: int):
        super().__init__()
        history_scale = None
        if cfg.is_amplify_history:
            history_scale = 1 if cfg.history_scale_mode == "scalar" else cfg.num_attention_heads
        self.eps = cfg.eps
        self.guidance_cross_attn = cfg.guidance_cross_attn
        self.attn1 = Attention(dim, cfg.num_attention_heads, cfg.eps, history_scale=history_scale)
        self.attn2 = Attention(dim, cfg.num_attention_heads, cfg.eps, added_kv_proj_dim=cfg.added_kv_proj_dim)
        # Affine LayerNorm before cross-attention, in fp32; absent (identity) when cross_attn_norm is False.
        self.norm2 = AffineLayerNorm(dim, cfg.eps) if cfg.cross_attn_norm else None
        self.ffn = FeedForward(dim, cfg.ffn_dim)
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def modulation(self, proj: torch.Tensor) -> Modulation:
        """proj [B, 6, D] (model dtype) -> six fp32 [B, 1, D] vectors: the learnt table plus the timestep part."""
        return Modulation(*(self.scale_shift_table.float() + proj.float()).unsqueeze(2).unbind(1))

    def forward(self, h, text, spans: list[Span], projs: list[torch.Tensor], rope, n_hist: int, last: bool = False):
        """h [B, L, D] = [history | current] tokens; text [B, Lt, D]; one timestep projection per span.

        In the last block only the current tokens are computed after self-attention (their queries, output,
        FFN): the history tokens' outputs would be discarded. Returns [B, L, D], or [B, L - n_hist, D] if last.
        """
        mods = [self.modulation(p) for p in projs]
        x = modulate(layer_norm(h, self.eps), spans, [m.shift for m in mods], [m.scale for m in mods], h.dtype)
        attn = self.attn1(x, rope=rope, n_hist=n_hist, query_start=n_hist if last else 0)
        if last and n_hist:  # keep only the current tokens: one span, the current tokens' modulation
            h, spans, mods, n_hist = h[:, n_hist:], [slice(0, None)], mods[-1:], 0
        h = gated_residual(h, attn, [m.gate for m in mods], spans)

        # Cross-attention, without gate or modulation, as a plain add in the model dtype. With guidance_cross_attn
        # only the current tokens read the text; history tokens pass through unchanged.
        start = n_hist if self.guidance_cross_attn else 0
        cur = h[:, start:]
        x = self.norm2(cur.float()) if self.norm2 is not None else cur.float()
        h = add_to_tokens(h, start, self.attn2(x.to(h.dtype), context=text))

        x = modulate(layer_norm(h, self.eps), spans, [m.ffn_shift for m in mods], [m.ffn_scale for m in mods], h.dtype)
        return gated_residual(h, self.ffn(x), [m.ffn_gate for m in mods], spans)


class OutputNorm(nn.Module):
    """Final adaLN: LayerNorm(h) * (1 + scale) + shift with (shift, scale) = table + temb (shift first)."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, h: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        """h [B, L, D], temb [B, D] -> [B, L, D] in h's dtype."""
        shift, scale = (self.scale_shift_table.float() + temb.float()[:, None, :]).unsqueeze(2).unbind(1)
        return (layer_norm(h, self.eps) * (1 + scale) + shift).to(h.dtype)
