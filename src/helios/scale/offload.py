"""Running where memory is short: which component is on the device when, for a whole pipeline.

Two modes (README "Low memory"):
- "model": every component lives in host memory and is on the device only while it runs: the text encoder for a
  run's prompts (their embeddings are kept), the transformer for a chunk's steps, the VAE for an encode or a decode.
  The device holds the largest component and its activations.
- "text_encoder": the text encoder and the transformer take turns on the device, and each stays there until the
  other needs it: the encoder leaves once a run's prompts are encoded (the transformer then stays for every chunk),
  and comes back only for a new prompt. The VAE stays on the device. The device holds the larger of the two.
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

PIPELINE_MODES = ("model", "blocks", "text_encoder")
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
    """No offload: every component stays where it was loaded, and the work runs on the transformer's device.

    The exception is a `releasable` component (the text encoder on a GPU, LoadPlan.placement): `release(name)`
    moves it to the host once its work is done, and `on_device(name)` brings it back, where it stays until the next
    release. The first release copies it to the host (11.4 GB at 14B); its host tensors are kept, so later releases
    copy nothing (the parameters point at them again), and a return is one copy to the device."""

    def __init__(self, transformer: nn.Module, releasable: dict[str, nn.Module] | None = None, device=None):
        """device: where a released component returns (default: the transformer's device)."""
        self._transformer = transformer
        self._releasable = dict(releasable or {})
        self._device = None if device is None else torch.device(device)
        self._host: dict[str, dict[str, torch.Tensor]] = {}  # a returned component -> its host tensors
        self.released: set[str] = set()

    @property
    def device(self) -> torch.device:
        return self._transformer.device

    @contextmanager
    def on_device(self, name: str):
        if name in self.released:
            device = self._device or self.device
            tensors = _tensors(self._releasable[name])
            # copy=True: to another device it is a copy anyway; on the same one it keeps the host tensors apart.
            self._host[name] = {key: _point(t, t.to(device, copy=True)) for key, t in tensors.items()}
            self.released.discard(name)
        yield

    def release(self, name: str) -> None:
        """Move a releasable component to the host (see the class); anything else stays where it is."""
        if name not in self._releasable or name in self.released:
            return
        host = self._host.pop(name, None)
        for key, tensor in _tensors(self._releasable[name]).items():
            _point(tensor, host[key] if host is not None else tensor.to("cpu"))
        self.released.add(name)

    def drop(self, name: str) -> None:
        """Stop releasing component `name` (a process that no longer runs it, as ComponentOffload.drop)."""
        self._releasable.pop(name, None)
        self._host.pop(name, None)
        self.released.discard(name)


class ComponentOffload:
    """Components on the host, each on `device` only inside `on_device(name)`; the others are moved out first."""

    def __init__(self, components: dict[str, nn.Module], device, resident=(), stay: bool = False):
        """components: name -> module, all on the host (except the `resident` ones, which are never moved: the
        transformer whose blocks stream, a text encoder that runs on the CPU). stay: a component stays on the
        device after its phase, until another phase needs the device (offload="text_encoder")."""
        self.device, self.stay = torch.device(device), stay
        self.active: list[str] = []  # the phases entered and not left, outermost first
        self.modules = dict(components)
        self.offloaded = [name for name in components if name not in resident]
        self.host: dict[str, dict[str, torch.Tensor]] = {}  # a component on the device -> its host tensors
        self.on = set()  # names of the offloaded components now on the device

    @contextmanager
    def on_device(self, name: str):
        self.active.append(name)
        try:
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
                # With stay, an outermost phase leaves its component there; a nested one (a prompt encoded
                # mid-chunk) gives the device back to the phase around it, as without stay.
                if not self.stay or len(self.active) > 1:
                    self.move(name, "host")
                    for other in evicted:
                        self.move(other, "device")
        finally:
            self.active.pop()

    def release(self, name: str) -> None:
        """Component `name` leaves the device now if it stayed there (stay) and no phase is running."""
        if name in self.on and not self.active:
            self.move(name, "host")

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
            # A text encoder on a GPU leaves it once a run's prompts are encoded (HeliosPipeline._start); on the
            # CPU there is nothing to gain, and one on a device of its own (text_encoder_device) stays there.
            gpu = self.text_encoder.type == "cuda" and "text_encoder" not in self.resident
            return Resident(pipe.transformer, {"text_encoder": pipe.text_encoder.model} if gpu else None)
        components = {"transformer": pipe.transformer, "vae": pipe.vae.vae, "text_encoder": pipe.text_encoder.model}
        return ComponentOffload(components, self.device, self.resident, stay=self.mode == "text_encoder")


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
    vae = device if mode == "text_encoder" else host  # with "text_encoder" only the encoder and transformer move
    resident = ((("transformer",) if mode == "blocks" else ()) + (("vae",) if mode == "text_encoder" else ())
                + (("text_encoder",) if text_encoder_device is not None else ()))
    return LoadPlan(mode, device, transformer, vae, text, resident)
