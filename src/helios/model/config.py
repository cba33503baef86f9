"""Transformer configuration: the keys of the published `transformer/config.json`, as a frozen dataclass."""

from __future__ import annotations

import dataclasses
import math
import numbers
import warnings
from dataclasses import dataclass
from typing import Any

HISTORY_SCALE_MODES = ("scalar", "per_head")
# The type of every field, checked on construction: a config.json with "num_layers": "many" or a model built with
# num_attention_heads=0 fails at once, naming the key, instead of deep in torch (or building a zero-width model).
_POSITIVE_INTS = ("num_attention_heads", "attention_head_dim", "in_channels", "text_dim", "freq_dim", "ffn_dim",
                  "num_layers")
_OPTIONAL_INTS = ("out_channels", "added_kv_proj_dim")  # None, or an int (out_channels 0 means "as in_channels")
_POSITIVE_FLOATS = ("eps", "rope_theta")
_BOOLS = ("cross_attn_norm", "guidance_cross_attn", "zero_history_timestep", "has_multi_term_memory_patch",
          "is_amplify_history")


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
        for name in _POSITIVE_INTS:
            self._set(name, _integer(name, getattr(self, name), minimum=1))
        for name in _OPTIONAL_INTS:
            if getattr(self, name) is not None:
                self._set(name, _integer(name, getattr(self, name), minimum=1 if name == "added_kv_proj_dim" else 0))
        for name in _POSITIVE_FLOATS:
            value = getattr(self, name)
            if not _is_real(value) or not math.isfinite(value) or value <= 0:
                raise ValueError(f"{name} must be a positive number, got {value!r}")
            self._set(name, float(value))
        for name in _BOOLS:
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        for name in ("patch_size", "rope_dim"):
            self._set(name, _triple(name, getattr(self, name)))
        if sum(self.rope_dim) != self.attention_head_dim or any(d % 2 for d in self.rope_dim):
            raise ValueError(
                f"rope_dim must be 3 even ints summing to attention_head_dim={self.attention_head_dim}, "
                f"got {self.rope_dim}"
            )
        if self.qk_norm not in (None, "rms_norm_across_heads"):
            raise ValueError(f"qk_norm must be 'rms_norm_across_heads' or None, got {self.qk_norm!r}")
        if self.history_scale_mode not in HISTORY_SCALE_MODES:
            raise ValueError(f"history_scale_mode must be one of {HISTORY_SCALE_MODES}, got {self.history_scale_mode!r}")

    def _set(self, name: str, value) -> None:
        object.__setattr__(self, name, value)

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
        try:
            return cls(**{k: v for k, v in values.items() if k in known})
        except ValueError as err:
            raise ValueError(f"{source}: {err}") from None

    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["patch_size"] = list(self.patch_size)
        out["rope_dim"] = list(self.rope_dim)
        return out


def _is_real(value) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _triple(name: str, value) -> tuple[int, int, int]:
    """3 positive ints (t, h, w) as a tuple: JSON gives lists; tuples keep the config hashable and comparable."""
    ok = isinstance(value, (list, tuple)) and len(value) == 3
    if not ok or any(not isinstance(v, numbers.Integral) or isinstance(v, bool) or v < 1 for v in value):
        raise ValueError(f"{name} must be 3 positive ints (t, h, w), got {value!r}")
    return tuple(int(v) for v in value)


def _integer(name: str, value, minimum: int) -> int:
    """`value` as an int if it is one (numpy ints too; not bools, floats or strings), else a ValueError naming `name`."""
    if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value < minimum:
        what = "a positive integer" if minimum == 1 else f"an integer >= {minimum}"
        raise ValueError(f"{name} must be {what}, got {value!r}")
    return int(value)
