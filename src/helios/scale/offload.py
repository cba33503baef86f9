"""Running where memory is short: which component is on the device when, for a whole pipeline.

Two modes (README "Low memory"):
- "model": every component lives in host memory and is on the device only while it runs: the text encoder for a
  run's prompts (their embeddings are kept), the transformer for a chunk's steps, the VAE for an encode or a decode.
  The device holds the largest component and its activations.
- "blocks": "model", and the transformer's blocks stream from the memory-mapped checkpoint through the device one
  block at a time (stream_blocks.py); the transformer's small modules stay on the device.

The pipeline marks each phase with `placement.on_device(name)`; without offload the placement is `Resident`, which
moves nothing. Going back to the host copies nothing: a component's parameters point at their host tensors again,
and the device copies are dropped.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

PIPELINE_MODES = ("model", "blocks")
TRANSFORMER_MODES = ("blocks",)  # "model" is about a pipeline's components; one transformer has nothing to swap


def check_offload(mode, allowed=PIPELINE_MODES, what: str = "HeliosPipeline.from_pretrained") -> str | None:
    """`mode` if it is None or one of `allowed`, else a ValueError that names the choices."""
    if mode is None or (isinstance(mode, str) and mode in allowed):
        return mode
    choices = ", ".join(repr(m) for m in (None, *allowed))
    hint = ""
    if mode == "model" and "model" not in allowed:
        hint = " ('model' offload swaps a pipeline's components: use HeliosPipeline.from_pretrained(offload='model'))"
    raise ValueError(f"{what}: offload must be one of {choices}, got {mode!r}{hint}")


class Resident:
    """No offload: every component stays where it was loaded, and the work runs on the transformer's device."""

    def __init__(self, transformer: nn.Module):
        self._transformer = transformer

    @property
    def device(self) -> torch.device:
        return self._transformer.device

    @contextmanager
    def on_device(self, name: str):
        yield

    def drop(self, name: str) -> None:
        """Nothing to let go of: nothing is moved."""


class ComponentOffload:
    """Components on the host, each on `device` only inside `on_device(name)`; the others are moved out first."""

    def __init__(self, components: dict[str, nn.Module], device, resident=()):
        """components: name -> module, all on the host (except the `resident` ones, which are never moved: the
        transformer whose blocks stream, a text encoder that runs on the CPU)."""
        self.device = torch.device(device)
        self.modules = dict(components)
        self.offloaded = [name for name in components if name not in resident]
        self.host: dict[str, dict[str, torch.Tensor]] = {}  # a component on the device -> its host tensors
        self.on = set()  # names of the offloaded components now on the device

    @contextmanager
    def on_device(self, name: str):
        if name not in self.offloaded or name in self.on:  # resident, or already there (nested use)
            yield
            return
        evicted = sorted(self.on)
        for other in evicted:
            self.move(other, "host")
        self.move(name, "device")
        try:
            yield
        finally:
            self.move(name, "host")
            for other in evicted:  # a phase nested in another (a prompt encoded mid-chunk) gives the device back
                self.move(other, "device")

    def drop(self, name: str) -> None:
        """Stop moving component `name` and let go of its host tensors: a process that no longer runs it (under
        parallel.py the ranks other than 0 receive the text embeddings instead of encoding them)."""
        self.host.pop(name, None)
        self.modules.pop(name, None)
        if name in self.offloaded:  # on_device(name) is then a no-op, as for a resident component
            self.offloaded.remove(name)

    def move(self, name: str, to: str) -> None:
        """Put component `name`'s tensors on the device (`to="device"`) or back on the host (`to="host"`).

        The host tensors are taken when the component leaves for the device, not once at the start: tensors added
        since (LoRA adapters) travel too, and removed ones are not kept alive."""
        tensors = _tensors(self.modules[name])
        if to == "device":
            self.host[name] = {key: _point(tensor, self._to_device(tensor)) for key, tensor in tensors.items()}
            self.on.add(name)
        else:
            host = self.host.pop(name)
            for key, tensor in tensors.items():
                _point(tensor, host[key])
            self.on.discard(name)

    def _to_device(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor.to(self.device)


def _tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's own parameter and buffer objects by name (a tied weight once): what its layers compute with."""
    out = {f"p:{k}": v for k, v in module.named_parameters()}
    out.update({f"b:{k}": v for k, v in module.named_buffers()})
    return out


def _point(tensor: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """Make a module's parameter or buffer object hold `value`'s data, copying nothing; returns a tensor holding
    what it held before (to point it back at). Setting `.data` of a detached view would change the view only.

    A tensor subclass (torchao's quantized weights) cannot take another's data: its contents are swapped with
    `value`'s, as nn.Module.to does, and `value` then holds the old contents."""
    if type(tensor) in (torch.Tensor, nn.Parameter):
        old = tensor.detach()  # shares the storage the tensor has now
        tensor.data = value
        return old
    if value is not tensor:
        if isinstance(tensor, nn.Parameter):
            value._is_param = True  # what nn.Parameter marks a subclass with: the module's object stays a Parameter
        torch.utils.swap_tensors(tensor, value)
    return value


@dataclass(frozen=True)
class LoadPlan:
    """Where each component of a pipeline is loaded, and how the pipeline moves them afterwards."""

    mode: str | None
    device: torch.device  # where the work runs
    transformer: torch.device
    vae: torch.device
    text_encoder: torch.device
    resident: tuple[str, ...] = ()  # components that stay where they were loaded

    @property
    def transformer_offload(self) -> str | None:
        return "blocks" if self.mode == "blocks" else None

    def placement(self, pipe):
        """The pipeline's placement: Resident without offload, else a ComponentOffload of its components."""
        if self.mode is None:
            return Resident(pipe.transformer)
        components = {"transformer": pipe.transformer, "vae": pipe.vae.vae, "text_encoder": pipe.text_encoder.model}
        return ComponentOffload(components, self.device, self.resident)


def plan_loading(mode, device, text_encoder_device=None) -> LoadPlan:
    """offload mode (checked) + the device the work runs on -> where each component is loaded.

    With offload, components load into host memory, except the streamed transformer (its small modules go to the
    device; its blocks stay in the checkpoint). text_encoder_device puts the text encoder on its own device for good
    (e.g. "cpu": it then needs no device memory at all).
    """
    mode = check_offload(mode)
    device = torch.device(device)
    host = torch.device("cpu") if mode else device
    text = torch.device(text_encoder_device) if text_encoder_device is not None else host
    transformer = device if mode == "blocks" else host
    resident = (("transformer",) if mode == "blocks" else ()) + (("text_encoder",) if text_encoder_device is not None else ())
    return LoadPlan(mode, device, transformer, host, text, resident)
