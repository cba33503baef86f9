"""LoRA files: where they are, and what they hold, as one set of low-rank factors per layer of the transformer.

Two layouts are read, both as safetensors (pickles are never loaded):

- diffusers / PEFT, what diffusers 0.42.1's Helios LoRA loader reads and what the official training script writes
  (`pytorch_lora_weights.safetensors` in its output folder, which the official `--lora_path` points to): keys
  `[transformer.]<layer>.lora_A.weight` (down, [r, in]) and `.lora_B.weight` (up, [out, r]), optionally
  `.lora_B.bias`. Each layer's output gains `(alpha / r) * up(down(x))`; alpha comes from the `lora_alpha`,
  `alpha_pattern` and `use_rslora` entries of the file's `lora_adapter_metadata` (PEFT's LoraConfig, as diffusers
  writes it), or from a `<layer>.alpha` tensor, and is r (scale 1) when there is none.
- Wan / ComfyUI (kohya-style), which diffusers also converts: `diffusion_model.<Wan name>.lora_down.weight`,
  `.lora_up.weight` and an optional `.alpha`, with Wan's module names (`self_attn.q`, `ffn.0`, `head.head`, ...).

Anything else in a file (full weights, DoRA magnitudes, weight diffs) is an error naming the key.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..model.hub import is_repo_id

ADAPTER_FILE = "pytorch_lora_weights.safetensors"  # diffusers' name, also the official training script's

# Wan's module names (the original checkpoints, ComfyUI LoRAs) -> ours, which are diffusers'.
WAN_NAMES = (
    (r"blocks\.(\d+)\.self_attn\.([qkv])", r"blocks.\1.attn1.to_\2"),
    (r"blocks\.(\d+)\.self_attn\.o", r"blocks.\1.attn1.to_out.0"),
    (r"blocks\.(\d+)\.cross_attn\.([qkv])", r"blocks.\1.attn2.to_\2"),
    (r"blocks\.(\d+)\.cross_attn\.o", r"blocks.\1.attn2.to_out.0"),
    (r"blocks\.(\d+)\.cross_attn\.([kv])_img", r"blocks.\1.attn2.add_\2_proj"),
    (r"blocks\.(\d+)\.ffn\.0", r"blocks.\1.ffn.net.0.proj"),
    (r"blocks\.(\d+)\.ffn\.2", r"blocks.\1.ffn.net.2"),
    (r"text_embedding\.0", "condition_embedder.text_embedder.linear_1"),
    (r"text_embedding\.2", "condition_embedder.text_embedder.linear_2"),
    (r"time_embedding\.0", "condition_embedder.time_embedder.linear_1"),
    (r"time_embedding\.2", "condition_embedder.time_embedder.linear_2"),
    (r"time_projection\.1", "condition_embedder.time_proj"),
    (r"head\.head", "proj_out"),
    (r"patch_embedding", "patch_embedding"),
)
# Key suffix -> which part of a layer's factors it is.
PARTS = {"lora_A.weight": "down", "lora_down.weight": "down", "lora_B.weight": "up", "lora_up.weight": "up",
         "lora_B.bias": "up_bias", "alpha": "alpha"}


@dataclass
class Factors:
    """One layer's LoRA from one file: output += scaling * up(down(x)) (+ scaling * up_bias)."""

    down: torch.Tensor  # [r, in] for a Linear; [r, in, kt, kh, kw] for a Conv3d
    up: torch.Tensor  # [out, r] or [out, r, 1, 1, 1]
    up_bias: torch.Tensor | None
    scaling: float  # alpha / r (alpha / sqrt(r) with rsLoRA)
    keys: dict[str, str]  # part -> the key it was read from, for error messages

    @property
    def rank(self) -> int:
        return self.down.shape[0]


def locate(path_or_repo, weight_name: str | None = None) -> Path:
    """The safetensors file: a file, a folder holding it (the official training output), or a hub repo id."""
    path = Path(path_or_repo).expanduser()
    if not path.exists() and is_repo_id(path_or_repo):
        from huggingface_hub import hf_hub_download

        try:
            return Path(hf_hub_download(str(path_or_repo), weight_name or ADAPTER_FILE))
        except Exception as err:  # hub errors are many classes; the message is what the user needs
            raise FileNotFoundError(f"{path_or_repo}: not a local LoRA file or folder, and the Hugging Face hub "
                                    f"could not provide {weight_name or ADAPTER_FILE}: {err}") from err
    if path.is_dir():
        candidates = [path / weight_name] if weight_name else [path / ADAPTER_FILE]
        if not candidates[0].is_file() and not weight_name:
            candidates = sorted(path.glob("*.safetensors"))
        if len(candidates) != 1 or not candidates[0].is_file():
            raise FileNotFoundError(f"{path}: no {weight_name or ADAPTER_FILE} and not exactly one .safetensors "
                                    "file in this folder; give the file")
        path = candidates[0]
    if not path.is_file():
        raise FileNotFoundError(f"{path_or_repo}: no such LoRA file")
    return path


def read_factors(path: Path) -> dict[str, Factors]:
    """Our layer name -> its factors, from one file; every key must be part of a layer's LoRA."""
    tensors, metadata = _read(path)
    if not tensors:
        raise ValueError(f"{path}: holds no tensors, not a LoRA file")
    wan = all(k.startswith("diffusion_model.") for k in tensors)
    grouped: dict[str, dict[str, tuple[str, torch.Tensor]]] = {}
    for key, tensor in tensors.items():
        layer, part = _split_key(key, wan, path)
        if part in grouped.setdefault(layer, {}):
            raise ValueError(f"{path}: {key} and {grouped[layer][part][0]} are the same LoRA factor")
        grouped[layer][part] = (key, tensor)
    config = _peft_config(metadata, path)
    return {layer: _factors(layer, parts, config, path) for layer, parts in grouped.items()}


def _read(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            return {k: f.get_tensor(k) for k in f.keys()}, f.metadata() or {}
    except (SafetensorError, OSError, ValueError, RuntimeError) as err:
        raise ValueError(f"{path}: not a readable safetensors file (truncated, or another format? LoRA files are "
                         f"read as safetensors only): {err}") from err


def _split_key(key: str, wan: bool, path: Path) -> tuple[str, str]:
    """'transformer.blocks.0.attn1.to_q.lora_A.weight' -> ('blocks.0.attn1.to_q', 'down')."""
    name = key.removeprefix("diffusion_model.") if wan else key.removeprefix("transformer.")
    for suffix, part in PARTS.items():
        if name.endswith("." + suffix):
            layer = name[: -len(suffix) - 1]
            return (_wan_to_ours(layer, key, path) if wan else layer), part
    raise ValueError(f"{path}: {key} is not a LoRA factor (lora_A / lora_B / lora_down / lora_up / alpha); full "
                     "weights, DoRA and weight-diff entries are not supported")


def _wan_to_ours(layer: str, key: str, path: Path) -> str:
    for pattern, ours in WAN_NAMES:
        if re.fullmatch(pattern, layer):
            return re.sub(pattern, ours, layer)
    raise ValueError(f"{path}: {key} names a Wan layer ({layer}) that Helios does not have")


def _peft_config(metadata: dict[str, str], path: Path) -> dict:
    """The PEFT LoraConfig entries diffusers stores under 'lora_adapter_metadata', without the 'transformer.'
    prefix of a pipeline's file."""
    raw = metadata.get("lora_adapter_metadata")
    if not raw:
        return {}
    try:
        values = json.loads(raw)
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: lora_adapter_metadata is not valid JSON ({err})") from err
    config = {k.removeprefix("transformer."): v for k, v in values.items() if not k.startswith("text_encoder")}
    if config.get("use_dora"):
        raise ValueError(f"{path}: a DoRA adapter (use_dora in its metadata); only plain LoRA is supported")
    return config


def _factors(layer: str, parts: dict, config: dict, path: Path) -> Factors:
    keys = {part: key for part, (key, _) in parts.items()}
    for needed, other in (("down", "up"), ("up", "down")):
        if needed not in parts:
            raise ValueError(f"{path}: {keys[other] if other in keys else next(iter(keys.values()))} has no "
                             f"matching {needed} factor for layer {layer}")
    down, up = parts["down"][1], parts["up"][1]
    rank = down.shape[0] if down.ndim >= 2 else 0
    if down.ndim not in (2, 5) or up.ndim != down.ndim or rank == 0 or up.shape[1] != rank:
        raise ValueError(f"{path}: {keys['down']} {list(down.shape)} and {keys['up']} {list(up.shape)} are not the "
                         "factors of one LoRA ([r, in] and [out, r], or Conv3d kernels)")
    if "alpha" in parts and parts["alpha"][1].numel() != 1:
        raise ValueError(f"{path}: {keys['alpha']} must hold one number, it has shape {list(parts['alpha'][1].shape)}")
    alpha = (parts["alpha"][1].item() if "alpha" in parts
             else _pattern(config.get("alpha_pattern"), layer, config.get("lora_alpha", rank)))
    expected_rank = _pattern(config.get("rank_pattern"), layer, config.get("r", rank))
    if expected_rank != rank:
        raise ValueError(f"{path}: {keys['down']} has rank {rank}, the file's metadata says r={expected_rank}")
    scaling = alpha / (math.sqrt(rank) if config.get("use_rslora") else rank)
    bias = parts["up_bias"][1] if "up_bias" in parts else None
    return Factors(down, up, bias, scaling, keys)


def _pattern(patterns: dict | None, layer: str, default):
    """PEFT's per-layer override: a pattern applies to a layer whose name it matches whole or as a dotted suffix."""
    for pattern, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({pattern})$", layer):
            return value
    return default
