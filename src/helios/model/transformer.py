"""HeliosTransformer3DModel: the Wan 2.1 video DiT extended with a multi-term memory of past latents.

Differences from Wan 2.1 (same weight names otherwise):
- three extra patch embeddings compress the history: short (2 latent frames, 1x), mid (2 frames, 2x2x2 coarser
  patches) and long (16 frames, 4x4x4 coarser). Their tokens are prepended as [long | mid | short | current] and
  their rotary tables are the cos/sin *averaged* over each coarse cell;
- history tokens are modulated with the embedding of t=0 (zero_history_timestep) and skip cross-attention
  (guidance_cross_attn); the output keeps only the current tokens;
- optionally, learnt per-head amplification of the history keys (is_amplify_history);
- Wan's top-level `scale_shift_table` is `norm_out.scale_shift_table`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from . import weights
from .config import HeliosConfig
from .hub import resolve_directory
from .layers import (
    ConditionEmbedder,
    Linear,
    OutputNorm,
    TransformerBlock,
    WholeSequence,
    grid_to_tokens,
    pad_replicate,
    rope_table,
)

_DEFAULT_CONFIG = HeliosConfig()
# The multi-term memory, in sequence order. `factor` is how many patches per axis one memory token covers.
MEMORY_TERMS = (("long", 4), ("mid", 2), ("short", 1))


@dataclass
class TransformerOutput:
    sample: torch.Tensor  # [B, out_channels, T, H, W] flow (velocity) prediction for the current latents


class HeliosTransformer3DModel(nn.Module):
    """The Helios video DiT. Build it from the config keys (the defaults are the published 14B model), or from a
    HeliosConfig; load published weights with `from_pretrained`."""

    def __init__(
        self,
        config: HeliosConfig | None = None,
        *,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        num_attention_heads: int = 40,
        attention_head_dim: int = 128,
        in_channels: int = 16,
        out_channels: int | None = 16,
        text_dim: int = 4096,
        freq_dim: int = 256,
        ffn_dim: int = 13824,
        num_layers: int = 40,
        cross_attn_norm: bool = True,
        qk_norm: str | None = "rms_norm_across_heads",
        eps: float = 1e-6,
        added_kv_proj_dim: int | None = None,
        rope_dim: tuple[int, int, int] = (44, 42, 42),
        rope_theta: float = 10000.0,
        guidance_cross_attn: bool = True,
        zero_history_timestep: bool = True,
        has_multi_term_memory_patch: bool = True,
        is_amplify_history: bool = False,
        history_scale_mode: str = "per_head",
    ):
        super().__init__()
        values = {k: v for k, v in locals().items() if k not in ("self", "config", "__class__")}
        if config is None:
            config = HeliosConfig(**values)
        else:
            changed = sorted(k for k, v in values.items() if v != getattr(_DEFAULT_CONFIG, k))
            if changed:
                raise TypeError(f"pass either a HeliosConfig or config keyword arguments, not both (got {changed})")
        self.config = cfg = config
        dim, patch = cfg.inner_dim, cfg.patch_size

        self.patch_embedding = nn.Conv3d(cfg.in_channels, dim, kernel_size=patch, stride=patch)
        if cfg.has_multi_term_memory_patch:
            for name, factor in MEMORY_TERMS:
                kernel = tuple(factor * p for p in patch)
                setattr(self, f"patch_{name}", nn.Conv3d(cfg.in_channels, dim, kernel_size=kernel, stride=kernel))
        self.condition_embedder = ConditionEmbedder(dim, cfg.freq_dim, cfg.text_dim)
        self.blocks = nn.ModuleList([TransformerBlock(cfg, dim) for _ in range(cfg.num_layers)])
        self.norm_out = OutputNorm(dim, cfg.eps)
        self.proj_out = Linear(dim, cfg.output_channels * math.prod(patch))
        # Where a forward's tokens live: all on this device; parallel.py swaps in one process's share.
        self.placement = WholeSequence()

    # The familiar entry points. Checkpoint IO lives in weights.py, which is handed the class to build, so this file
    # holds the model's math only.
    @classmethod
    def from_pretrained(cls, path_or_repo_id, subfolder: str | None = None, torch_dtype=None, device="cpu",
                        offload: str | None = None, quantize: str | None = None):
        """Load a folder (config.json + safetensors), a model folder's `subfolder`, or a hub repo id.

        offload="blocks": only the small modules are loaded; each block's weights are read from the memory-mapped
        checkpoint when the block runs (scale/stream_blocks.py).
        quantize: None, "int8" or "fp8" (weight-only, for memory), "fp8-compute" (fp8 matmuls, for speed on GPUs of
        SM 8.9+): the blocks' Linear layers, block by block while loading (scale/quantize.py); with offload="blocks", the quantized blocks are what streams."""
        if offload is None and quantize is None:
            return weights.load_transformer(cls, resolve_directory(path_or_repo_id, subfolder), torch_dtype, device)
        # The one import up a layer, on purpose: the familiar entry point takes the scale options (as diffusers'
        # takes quantization_config), and the scale layer does the work. Nothing in scale/ imports this module.
        from ..scale.loading import load_scaled

        return load_scaled(cls, path_or_repo_id, subfolder=subfolder, torch_dtype=torch_dtype, device=device,
                           offload=offload, quantize=quantize)

    def save_pretrained(self, directory, max_shard_size: int | str = "10GB") -> None:
        weights.save_transformer(self, directory, max_shard_size=max_shard_size)

    @property
    def dtype(self) -> torch.dtype:
        """The compute dtype: that of the matmul weights (some small modules stay fp32)."""
        return self.patch_embedding.weight.dtype

    @property
    def device(self) -> torch.device:
        return self.patch_embedding.weight.device

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep,
        encoder_hidden_states: torch.Tensor,
        indices_hidden_states=None,
        indices_latents_history_short=None,
        indices_latents_history_mid=None,
        indices_latents_history_long=None,
        latents_history_short=None,
        latents_history_mid=None,
        latents_history_long=None,
        return_dict: bool = True,
        attention_kwargs: dict[str, Any] | None = None,
    ):
        """Predict the flow of the current latents [B, C, T, H, W] given text [B, Lt, text_dim] and history."""
        history = {
            "short": (latents_history_short, indices_latents_history_short),
            "mid": (latents_history_mid, indices_latents_history_mid),
            "long": (latents_history_long, indices_latents_history_long),
        }
        timestep = check_inputs(self.config, hidden_states, timestep, encoder_hidden_states, indices_hidden_states, history)
        check_attention_kwargs(attention_kwargs)
        dtype, batch = self.dtype, hidden_states.shape[0]
        pt, ph, pw = self.config.patch_size

        current = self.patch_embedding(hidden_states.to(dtype))  # [B, D, T', H', W']
        frames, height, width = current.shape[2:]
        if indices_hidden_states is None:
            indices_hidden_states = torch.arange(frames)
        tokens = [grid_to_tokens(current)]
        rope_terms = [(self._index_rows(indices_hidden_states, batch), height, width, 1)]
        for name, factor in reversed(MEMORY_TERMS):  # short, mid, long: each is prepended
            latents, indices = history[name]
            if latents is None:
                continue
            kernel = tuple(factor * p for p in self.config.patch_size)
            embedded = getattr(self, f"patch_{name}")(pad_replicate(latents.to(dtype), kernel))
            h1, w1 = latents.shape[-2] // ph, latents.shape[-1] // pw  # the memory's grid at patch resolution
            tokens.insert(0, grid_to_tokens(embedded))
            rope_terms.insert(0, (self._index_rows(indices, batch), h1, w1, factor))
        cfg = self.config
        rope = rope_table(tuple(rope_terms), cfg.rope_dim, cfg.rope_theta, str(current.device))  # [B, L, 1, hd/2]
        h, rope, layout = self.placement.split(tokens, rope, cfg.zero_history_timestep)  # h [B, L, D]

        text = self.condition_embedder.text_embedder(encoder_hidden_states.to(dtype))
        temb, proj = self.condition_embedder.embed_time(timestep, dtype)
        projs = [proj]
        if len(layout.spans) == 2:  # history tokens are modulated with the embedding of t=0
            _, proj_t0 = self.condition_embedder.embed_time(torch.zeros(1, device=timestep.device), dtype)
            projs = [proj_t0, proj]

        for i, block in enumerate(self.blocks):
            h = block(h, text, layout, projs, rope, last=i == len(self.blocks) - 1)  # last: current tokens only

        out = self.placement.gather(self.proj_out(self.norm_out(h, temb)))  # [B, T'*H'*W', pt*ph*pw*C]
        out = out.reshape(batch, frames, height, width, pt, ph, pw, -1).permute(0, 7, 1, 4, 2, 5, 3, 6)
        out = out.reshape(batch, out.shape[1], frames * pt, height * ph, width * pw)
        return TransformerOutput(sample=out) if return_dict else (out,)

    @staticmethod
    def _index_rows(indices, batch: int) -> tuple:
        """Frame indices ([T] or [1 or B, T]) as B tuples of floats: the rotary table's cache key is made of values."""
        indices = torch.as_tensor(indices)
        rows = indices.reshape(-1, indices.shape[-1]).float().tolist()
        return tuple(tuple(r) for r in (rows * batch if len(rows) == 1 else rows))


def check_attention_kwargs(attention_kwargs) -> None:
    # The reference only reads a LoRA "scale" from attention_kwargs. It is accepted for call compatibility and not
    # applied: LoRA scales are set per adapter, outside the model (lora.set_lora_scale).
    unknown = set(attention_kwargs or {}) - {"scale"}
    if unknown:
        raise ValueError(f"attention_kwargs: unsupported keys {sorted(unknown)} (only 'scale' is accepted)")


def check_inputs(cfg: HeliosConfig, hidden_states, timestep, text, indices_current, history) -> torch.Tensor:
    """Validate shapes before any heavy work; returns the timestep as a [B] tensor."""
    _check_latents("hidden_states", hidden_states, cfg)
    batch = hidden_states.shape[0]
    if not isinstance(text, torch.Tensor) or text.ndim != 3 or text.shape[-1] != cfg.text_dim:
        got = tuple(text.shape) if isinstance(text, torch.Tensor) else type(text).__name__
        raise ValueError(f"encoder_hidden_states must be [B, seq_len, text_dim={cfg.text_dim}], got {got}")
    if text.shape[0] != batch:
        raise ValueError(f"encoder_hidden_states has batch {text.shape[0]}, hidden_states has batch {batch}")
    if text.shape[1] == 0:
        # Cross-attention over no tokens is a softmax over nothing: the output would be noise, not an error.
        raise ValueError(f"encoder_hidden_states has 0 tokens (shape {tuple(text.shape)}); pass at least one, "
                         "e.g. the text encoder's padded output")
    _check_indices("indices_hidden_states", indices_current, hidden_states, cfg, batch)
    for name, (latents, indices) in history.items():
        latent_arg, index_arg = f"latents_history_{name}", f"indices_latents_history_{name}"
        if (latents is None) != (indices is None):
            given, missing = (latent_arg, index_arg) if indices is None else (index_arg, latent_arg)
            raise ValueError(f"{given} was given without {missing}; pass both or neither")
        if latents is None:
            continue
        if not cfg.has_multi_term_memory_patch:
            raise ValueError(f"{latent_arg}: this model has no memory patches (has_multi_term_memory_patch=False)")
        _check_latents(latent_arg, latents, cfg)
        if latents.shape[0] != batch:
            raise ValueError(f"{latent_arg} has batch {latents.shape[0]}, hidden_states has batch {batch}")
        _check_indices(index_arg, indices, latents, cfg, batch)
    _check_memory_size(hidden_states, {f"latents_history_{k}": v[0] for k, v in history.items() if v[0] is not None})
    return _timestep_vector(timestep, batch, hidden_states.device)


def _check_memory_size(current: torch.Tensor, memory: dict[str, torch.Tensor]) -> None:
    """The memory terms share one height and width: that of the full-resolution latents. The current latents have it
    too, except in a pyramid sampler's early stages, where they are downsampled by 2 per stage (docs/design.md §2.1:
    the memory stays full size), so the memory is 2^s times the current size, with one s >= 0 for both axes."""
    if not memory:
        return
    (first, latents), (h, w) = next(iter(memory.items())), current.shape[-2:]
    for name, other in memory.items():
        if other.shape[-2:] != latents.shape[-2:]:
            raise ValueError(f"{name} is {tuple(other.shape[-2:])} (H, W), {first} is {tuple(latents.shape[-2:])}: "
                             "all memory terms are slices of one history of full-resolution latents")
    mh, mw = latents.shape[-2:]
    scale = mh // h
    if mh % h or scale & (scale - 1) or (mh, mw) != (h * scale, w * scale):
        raise ValueError(
            f"{first} is {mh}x{mw} (H x W), hidden_states is {h}x{w}: the memory must have the full-resolution size, "
            f"the current size times 2^s, s >= 0 the pyramid stages to go ({h}x{w}, {2 * h}x{2 * w}, {4 * h}x{4 * w}, ...)"
        )


def _check_latents(name: str, latents, cfg: HeliosConfig) -> None:
    if not isinstance(latents, torch.Tensor) or latents.ndim != 5 or latents.shape[0] == 0:
        got = tuple(latents.shape) if isinstance(latents, torch.Tensor) else type(latents).__name__
        raise ValueError(f"{name} must be a 5-D tensor [B >= 1, C={cfg.in_channels}, T, H, W], got {got}")
    if latents.shape[1] != cfg.in_channels:
        raise ValueError(f"{name} must have C={cfg.in_channels} channels ([B, C, T, H, W]), got {tuple(latents.shape)}")
    for axis, size, p in zip("THW", latents.shape[2:], cfg.patch_size):
        if size % p or size == 0:
            raise ValueError(
                f"{name}: {axis}={size} must be a positive multiple of the patch size {p} "
                f"(patch_size={cfg.patch_size}), got shape {tuple(latents.shape)}"
            )


def _check_indices(name: str, indices, latents: torch.Tensor, cfg: HeliosConfig, batch: int) -> None:
    if indices is None:
        return
    shape = tuple(torch.as_tensor(indices).shape)
    frames = latents.shape[2] // cfg.patch_size[0]
    ok = len(shape) in (1, 2) and shape[-1] == frames and (len(shape) == 1 or shape[0] in (1, batch))
    if not ok:
        raise ValueError(f"{name} must have shape [{frames}] or [B={batch}, {frames}] (one index per frame), got {shape}")


def _timestep_vector(timestep, batch: int, device) -> torch.Tensor:
    t = torch.as_tensor(timestep, device=device)
    if t.ndim == 0:
        t = t[None]
    if t.ndim != 1 or t.shape[0] not in (1, batch):
        raise ValueError(f"timestep must be a scalar or have shape [1] or [B={batch}], got {tuple(t.shape)}")
    return t.expand(batch)
