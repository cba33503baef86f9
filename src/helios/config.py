"""Transformer configuration: the keys of the published `transformer/config.json`, as a frozen dataclass."""

from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Any

HISTORY_SCALE_MODES = ("scalar", "per_head")


@dataclass(frozen=True)
class HeliosConfig:
    """Field names and defaults are the reference's (the 14B model shared by Base, Mid and Distilled)."""

    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16
    out_channels: int | None = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"
    eps: float = 1e-6
    added_kv_proj_dim: int | None = None
    rope_dim: tuple[int, int, int] = (44, 42, 42)
    rope_theta: float = 10000.0
    guidance_cross_attn: bool = True
    zero_history_timestep: bool = True
    has_multi_term_memory_patch: bool = True
    is_amplify_history: bool = False
    history_scale_mode: str = "per_head"

    def __post_init__(self):
        # JSON gives lists; tuples keep the config hashable and comparable.
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        object.__setattr__(self, "rope_dim", tuple(int(d) for d in self.rope_dim))
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"patch_size must be 3 positive ints (t, h, w), got {self.patch_size}")
        if len(self.rope_dim) != 3 or sum(self.rope_dim) != self.attention_head_dim or any(d % 2 for d in self.rope_dim):
            raise ValueError(
                f"rope_dim must be 3 even ints summing to attention_head_dim={self.attention_head_dim}, "
                f"got {self.rope_dim}"
            )
        if self.qk_norm not in (None, "rms_norm_across_heads"):
            raise ValueError(f"qk_norm must be 'rms_norm_across_heads' or None, got {self.qk_norm!r}")
        if self.history_scale_mode not in HISTORY_SCALE_MODES:
            raise ValueError(f"history_scale_mode must be one of {HISTORY_SCALE_MODES}, got {self.history_scale_mode!r}")

    @property
    def inner_dim(self) -> int:
        return self.num_attention_heads * self.attention_head_dim

    @property
    def output_channels(self) -> int:
        # The reference treats out_channels=None (or 0) as "same as in_channels".
        return self.out_channels or self.in_channels

    @classmethod
    def from_dict(cls, values: dict[str, Any], source: str = "config") -> HeliosConfig:
        """Build from a config.json dict; unknown keys are named in a warning, not fatal."""
        known = {f.name for f in dataclasses.fields(cls)}
        # Keys starting with "_" (_class_name, _diffusers_version, ...) describe the file, not the model.
        unknown = sorted(k for k in values if k not in known and not k.startswith("_"))
        if unknown:
            warnings.warn(f"{source}: ignoring unknown transformer config keys {unknown}", stacklevel=2)
        return cls(**{k: v for k, v in values.items() if k in known})

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["patch_size"] = list(self.patch_size)
        out["rope_dim"] = list(self.rope_dim)
        return out
