"""LoRA adapters on a loaded transformer, applied as side paths.

Each adapted layer (a Linear, or a Conv3d patch embedding) is replaced by a `LoRALayer` that holds the layer's own
weight and bias and adds, for every adapter i, `scale_i * scaling_i * up_i(down_i(x))` before the layer's activation.
Side paths rather than weights merged in place, because then:
- several adapters keep their own scales, and changing one is changing a number;
- a quantized weight is never touched (torchao's int8 / fp8 tensors can't take a low-rank update), so LoRA works on
  a quantized transformer the same way;
- unloading puts the original layer objects back: the output is the original one, bit for bit.
The cost is two thin matmuls per adapted layer and adapter (rank r << width).

Loading is all or nothing: the file is read and every key checked against the model (layer, rank, shapes) and the
factors are moved to the layers' device and dtype before the model is changed, so a bad file leaves it as it was.
The file formats are in lora_format.py.
"""

from __future__ import annotations

import itertools
import math

import torch
import torch.nn.functional as F
from torch import nn

from ..model.kernels import ACTIVATIONS, linear
from .lora_format import Factors, locate, read_factors


class Adapter(nn.Module):
    """One adapter's factors on one layer. Non-persistent buffers: they follow the model's .to(), and the model's
    state dict stays the checkpoint's (save_pretrained never writes adapters into the base weights)."""

    def __init__(self, factors: Factors, scale: float, device, dtype, source: str = "", order: int = 0):
        super().__init__()
        self.register_buffer("down", factors.down.to(device, dtype), persistent=False)
        self.register_buffer("up", factors.up.to(device, dtype), persistent=False)
        bias = None if factors.up_bias is None else factors.up_bias.to(device, dtype)
        self.register_buffer("up_bias", bias, persistent=False)
        self.scaling = factors.scaling  # alpha / r, from the file
        self.scale = scale  # the user's
        self.source, self.order = source, order  # the file it came from; when it was loaded (lora_settings)


class LoRALayer(nn.Module):
    """Stands in for a Linear or Conv3d: the same weight and bias Parameters (same state-dict keys, no copy), plus
    the side paths of its adapters."""

    def __init__(self, base: nn.Module):
        super().__init__()
        self.weight, self.bias = base.weight, base.bias
        self.activation = getattr(base, "activation", None)
        self.conv = None
        if isinstance(base, nn.Conv3d):
            self.conv = dict(stride=base.stride, padding=base.padding, dilation=base.dilation)
        self.replaced = (base,)  # put back on unload; in a tuple, so not a submodule (its parameters are ours)
        self.adapters = nn.ModuleDict()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.conv is None:
            y = linear(x, self.weight, self.bias)
        else:
            y = F.conv3d(x, self.weight, self.bias, **self.conv)
        for a in self.adapters.values():
            if a.scale != 0:
                y = y + self._side_path(x, a) * (a.scale * a.scaling)
        # The replaced Linear's activation (the FFN's GELU) comes after the side paths, as in the reference (PEFT
        # adapts the projection, the GELU module follows it).
        return y if self.activation is None else ACTIVATIONS[self.activation](y)

    def _side_path(self, x: torch.Tensor, a: Adapter) -> torch.Tensor:
        down, up, bias = (t if t is None else t.to(x.dtype) for t in (a.down, a.up, a.up_bias))
        if self.conv is None:
            return F.linear(F.linear(x, down), up, bias)
        return F.conv3d(F.conv3d(x, down, None, **self.conv), up, bias)  # up is a 1x1x1 kernel


# ---------------------------------------------------------------------------------------------------------------------
# Loading, scales, unloading


def load_lora(model: nn.Module, path_or_repo, adapter_name: str | None = None, scale: float = 1.0,
              weight_name: str | None = None) -> str:
    """Add the LoRA in a file (or a folder / hub repo holding `weight_name`) to the model; returns the adapter's name
    (default: "default_<n>"). Raises naming the file and key if anything does not fit; the model is then unchanged."""
    _check_scale(scale)
    loaded = lora_adapters(model)
    name = adapter_name if adapter_name is not None else _default_name(loaded)
    if not isinstance(name, str) or not name or "." in name:
        raise ValueError(f"adapter_name={name!r}: give a non-empty name without dots")
    if name in loaded:
        raise ValueError(f"adapter_name={name!r} is loaded already; unload it or choose another name")
    path = locate(path_or_repo, weight_name)
    factors = read_factors(path)
    _check_not_streamed(model, factors, path)
    order = next(_LOADS)
    adapters = {layer: _prepare(model, layer, f, scale, path, order) for layer, f in factors.items()}
    for layer, adapter in adapters.items():  # nothing below can fail: the model changes only now
        _lora_layer(model, layer).adapters[name] = adapter
    return name


def set_lora_scale(model: nn.Module, adapter_name: str, scale: float) -> None:
    _check_scale(scale)
    adapters = [layer.adapters[adapter_name] for layer in _lora_layers(model) if adapter_name in layer.adapters]
    if not adapters:
        raise ValueError(f"adapter_name={adapter_name!r}: no such adapter (loaded: {sorted(lora_adapters(model))})")
    for adapter in adapters:
        adapter.scale = float(scale)


def unload_lora(model: nn.Module, adapter_name: str | None = None) -> None:
    """Remove one adapter, or all; a layer left without adapters is the original layer object again."""
    if adapter_name is not None and adapter_name not in lora_adapters(model):
        raise ValueError(f"adapter_name={adapter_name!r}: no such adapter (loaded: {sorted(lora_adapters(model))})")
    for name, layer in list(model.named_modules()):
        if not isinstance(layer, LoRALayer):
            continue
        if adapter_name is None:
            layer.adapters.clear()
        elif adapter_name in layer.adapters:
            del layer.adapters[adapter_name]
        if not layer.adapters:
            model.set_submodule(name, layer.replaced[0])


def lora_settings(model: nn.Module) -> list[tuple[str, float]]:
    """(file, scale) of each loaded adapter, in the order they were loaded: what they change in a video (a run's
    settings, state.run_settings). The file is the safetensors file read, as an absolute path."""
    first = {}
    for layer in _lora_layers(model):
        for a in layer.adapters.values():
            first.setdefault(a.order, (a.source, a.scale))
    return [first[order] for order in sorted(first)]


def lora_adapters(model: nn.Module) -> dict[str, float]:
    """Loaded adapters -> their scale."""
    return {name: a.scale for layer in _lora_layers(model) for name, a in layer.adapters.items()}


def _lora_layers(model: nn.Module) -> list[LoRALayer]:
    return [m for m in model.modules() if isinstance(m, LoRALayer)]


def _default_name(loaded: dict) -> str:
    n = len(loaded)
    while f"default_{n}" in loaded:
        n += 1
    return f"default_{n}"


def _check_scale(scale) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not math.isfinite(scale):
        raise ValueError(f"scale={scale!r}: must be a finite number")


def _check_not_streamed(model: nn.Module, factors: dict, path) -> None:
    """A transformer loaded with offload="blocks" has no block layers to adapt: each call of a block runs the block's
    weights in one of a few shared slots (stream_blocks.py)."""
    if getattr(model, "block_stream", None) is None:
        return
    inside = sorted(layer for layer in factors if layer.startswith("blocks."))
    if inside:
        raise ValueError(f"{path}: {factors[inside[0]].keys['down']} adapts a block layer, and this transformer "
                         "streams its blocks (offload='blocks'), which takes no LoRA adapters on them; use "
                         "offload='model' (or none) with LoRA")


def _lora_layer(model: nn.Module, layer: str) -> LoRALayer:
    module = model.get_submodule(layer)
    if not isinstance(module, LoRALayer):
        module = LoRALayer(module)
        model.set_submodule(layer, module)
    return module


_LOADS = itertools.count()  # numbers the loads, so that lora_settings lists adapters in the order they were loaded


def _prepare(model: nn.Module, layer: str, factors: Factors, scale: float, path, order: int) -> Adapter:
    """The factors checked against the layer they name, on its device and in its compute dtype."""
    key = factors.keys["down"]
    try:
        module = model.get_submodule(layer)
    except AttributeError:
        raise ValueError(f"{path}: {key} matches no layer of this transformer ({layer}): is it a LoRA for another "
                         "model?") from None
    base = module.replaced[0] if isinstance(module, LoRALayer) else module
    if isinstance(base, nn.Linear):
        down, up = (factors.rank, base.in_features), (base.out_features, factors.rank)
    elif isinstance(base, nn.Conv3d) and base.groups == 1:
        down, up = (factors.rank, base.in_channels, *base.kernel_size), (base.out_channels, factors.rank, 1, 1, 1)
    else:
        raise ValueError(f"{path}: {key} targets {layer}, a {type(base).__name__}: LoRA applies to Linear and Conv3d "
                         "layers")
    for part, shape in (("down", down), ("up", up), ("up_bias", up[:1])):
        tensor = getattr(factors, part)
        if tensor is not None and tuple(tensor.shape) != shape:
            raise ValueError(f"{path}: {factors.keys[part]} has shape {list(tensor.shape)}, layer {layer} needs "
                             f"{list(shape)}: is it a LoRA for another model?")
    weight = base.weight
    # A quantized weight's side path runs in the activations' dtype, which is the model's.
    dtype = weight.dtype if type(weight) in (torch.Tensor, nn.Parameter) else model.dtype
    return Adapter(factors, float(scale), weight.device, dtype, str(path.absolute()), order)
