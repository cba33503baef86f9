"""Building blocks of the Helios transformer: pure functions first, then the small modules.

Compared with Wan 2.1 the layers differ in three ways: the modulation is per *segment* of tokens (history tokens
are modulated with t=0, current tokens with the real timestep), cross-attention may see only the current tokens,
and self-attention may amplify the keys of history tokens. Precision follows the reference exactly: LayerNorms,
modulation, residual adds and the rotary tables run in fp32 ("fp32 islands"), matmuls in the model dtype.

The heavy math (matmuls, attention, norms, the per-span fp32 ops) is in kernels.py; the modules here say what is
computed, not how fast.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from . import kernels
from .kernels import Span, add_to_tokens, gated_residual, gelu_tanh, layer_norm, modulate, rms_norm


@dataclass(frozen=True)
class TokenLayout:
    """Where the tokens of one forward lie: `history` memory tokens [long | mid | short] first, then `current`
    tokens of the chunk being denoised. Built once per forward and handed to every block.

    `split_timestep`: the history tokens are modulated with the embedding of t=0 and the current ones with the real
    timestep (zero_history_timestep), so the modulation works on two spans; otherwise on one.
    """

    history: int
    current: int
    split_timestep: bool = False

    @property
    def spans(self) -> list[Span]:
        if self.split_timestep and self.history:
            return [slice(0, self.history), slice(self.history, None)]
        return [slice(0, None)]

    def current_only(self) -> TokenLayout:
        """The layout after the history tokens are dropped (the last block's output)."""
        return TokenLayout(0, self.current)


class WholeSequence:
    """Where a forward's tokens live: all of them on this device. The model hands its token parts to `split` after
    the patch embeddings and its output to `gather` after the output head. Sequence parallelism (parallel.py) puts a
    placement that keeps one process's share of the tokens in its stead; the model itself never knows."""

    def split(self, parts: list[torch.Tensor], rope: torch.Tensor, split_timestep: bool):
        """parts: [B, L_i, D] tokens in sequence order, the current chunk's last; rope [B, L, 1, head_dim/2] for
        all of them. Returns (h [B, L, D], rope, the TokenLayout of h)."""
        h = torch.cat(parts, dim=1).contiguous()
        current = parts[-1].shape[1]
        return h, rope, TokenLayout(h.shape[1] - current, current, split_timestep=split_timestep)

    def gather(self, out: torch.Tensor) -> torch.Tensor:
        """The output head's result for the current tokens this device holds -> for all current tokens."""
        return out


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


# ---------------------------------------------------------------------------------------------------------------------
# Modules. Attribute names are the checkpoint keys.


class Linear(nn.Linear):
    """nn.Linear (same parameters, same keys) computed by kernels.linear, with an optional fused activation.

    Every matmul of a block goes through one of these, so that quantization and LoRA can replace or wrap them from
    outside the model. It stays an nn.Linear so that tools that look for linear layers (torchao) find it. A module
    that replaces one must apply its `activation` (None or "gelu_tanh") to its output.
    """

    def __init__(self, in_features: int, out_features: int, bias: bool = True, activation: str | None = None):
        super().__init__(in_features, out_features, bias)
        self.activation = activation

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.linear(x, self.weight, self.bias, self.activation)


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
        # (q [B, Lq, H, D], k, v [B, Lk, H, D]) -> [B, Lq, H*D]; replaceable, e.g. by a sequence-parallel version.
        self.attention = kernels.attention

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
        return self.to_out[0](self.attention(q, k, v))

    def _amplify_history_keys(self, k: torch.Tensor, n_hist: int) -> torch.Tensor:
        # s = 1 + sigmoid(p) * (max - 1), per head. Computed in fp32 and cast back to the key dtype: the reference
        # lets the fp32 scale promote the keys and then crashes in bf16 on mixed-dtype attention.
        s = 1.0 + torch.sigmoid(self.history_key_scale.float()) * (self.max_history_scale - 1.0)
        s = s.view(1, 1, -1, 1)
        return torch.cat([(k[:, :n_hist].float() * s).to(k.dtype), k[:, n_hist:]], dim=1)


class GELUProjection(nn.Module):
    """Linear followed by tanh-approximate GELU (key "net.0.proj"); the GELU is the Linear's fused activation."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = Linear(dim_in, dim_out, activation="gelu_tanh")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x)


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
        return layer_norm(x, self.eps, self.weight, self.bias)


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

    def forward(self, h, text, layout: TokenLayout, projs: list[torch.Tensor], rope, last: bool = False):
        """h [B, L, D] = [history | current] tokens; text [B, Lt, D]; one timestep projection per span of `layout`.

        In the last block only the current tokens are computed after self-attention (their queries, output,
        FFN): the history tokens' outputs would be discarded. Returns [B, L, D], or [B, layout.current, D] if last.
        """
        mods, spans, n_hist = [self.modulation(p) for p in projs], layout.spans, layout.history
        x = modulate(layer_norm(h, self.eps), spans, [m.shift for m in mods], [m.scale for m in mods], h.dtype)
        attn = self.attn1(x, rope=rope, n_hist=n_hist, query_start=n_hist if last else 0)
        if last and n_hist:  # keep only the current tokens: one span, the current tokens' modulation
            h, mods, layout = h[:, n_hist:], mods[-1:], layout.current_only()
            spans, n_hist = layout.spans, layout.history
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
