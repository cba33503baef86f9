"""offload="blocks" with quantize: the blocks, quantized once while loading, held in host memory for the stream.

A quantized block cannot be read from the checkpoint, which holds the full-precision weights; quantizing each block
again at every forward would cost more than the forward. So the loader reads each block once, quantizes it (on the
device the model runs on, as a resident quantized load does) and keeps it in host memory: int8 or float8 weights
with their scales, about half the bytes of bf16 (14.6 GB of blocks at 14B instead of 28.1 GB). `HeldBlocks` then
offers those tensors the way `mapped.MappedCheckpoint` offers the checkpoint's, and the BlockStream copies each block
into its slots as it would copy the file's bytes: half the bytes per block.

A quantized weight is a tensor subclass (torchao's) whose data are plain tensors inside it: its `qdata` and `scale`
(and int8's `zero_point`). `leaf_tensors` names those "<weight>#<inner>", so that the stream copies plain tensors
only, into the same inner tensors of its slots, which are copies of a held block.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from ..model.weights import param_dtype
from .mapped import TensorRecord, as_bytes


class HeldBlocks:
    """Blocks in host memory, read by key ("blocks.3.attn1.to_q.weight#qdata") like a MappedCheckpoint."""

    def __init__(self, blocks: list[nn.Module], prefix: str = "blocks"):
        self.blocks = blocks
        self.tensors = {f"{prefix}.{i}.{name}": t for i, block in enumerate(blocks)
                        for name, t in leaf_tensors(block).items()}

    def record(self, key: str) -> TensorRecord:
        t = self.tensors[key]
        return TensorRecord(t.dtype, tuple(t.shape), 0, t.numel() * t.element_size())

    def pieces(self, key: str, size: int):
        """The tensor's bytes in pieces of at most `size` (what the CUDA copies stage through pinned buffers)."""
        data = as_bytes(self.tensors[key])
        for offset in range(0, len(data), size):
            yield offset, data[offset : offset + size]

    def read_into(self, key: str, out: torch.Tensor) -> torch.Tensor:
        return out.copy_(self.tensors[key])

    def read_piece(self, key: str, offset: int, out) -> None:
        out[:] = as_bytes(self.tensors[key])[offset : offset + len(out)]

    def hold_in(self, key: str, alloc) -> torch.Tensor:
        """Move tensor `key` into memory from `alloc(nbytes)` (pinned memory, for the host cache) where it is: the
        held block's tensor then uses the new memory and the old is freed, so no second copy is kept. Returns its
        bytes (uint8)."""
        tensor = self.tensors[key]
        moved = alloc(tensor.numel() * tensor.element_size())
        moved.view(tensor.dtype).view(tensor.shape).copy_(tensor)
        tensor.data = moved.view(tensor.dtype).view(tensor.shape)
        return moved

    def read_ahead(self, keys) -> None:
        pass  # in memory already

    def close(self) -> None:
        pass


def hold_blocks(checkpoint, template: nn.Module, num_blocks: int, torch_dtype, device, prepare_block,
                prefix: str = "blocks") -> HeldBlocks:
    """Read each block from the checkpoint onto `device`, prepare_block it (quantize), keep it in host memory.
    Peak memory: the blocks held so far, plus one block in the checkpoint's precision and its quantization's
    temporaries."""
    held = []
    for i in range(num_blocks):
        block = _read_block(checkpoint, template, f"{prefix}.{i}.", torch_dtype, device)
        prepare_block(block)
        held.append(block.to("cpu"))
    return HeldBlocks(held, prefix)


def _read_block(checkpoint, template: nn.Module, prefix: str, torch_dtype, device) -> nn.Module:
    # Outside inference mode, as the stream's slots: a held block is copied into slots that later forwards overwrite.
    with torch.inference_mode(False), torch.no_grad():
        block = copy.deepcopy(template)  # on the meta device: the architecture only
        state = {name: checkpoint.read(prefix + name, param_dtype(prefix + name, torch_dtype), device)
                 for name in template.state_dict()}
        block.load_state_dict(state, strict=True, assign=True)
    return block.eval().requires_grad_(False)


def leaf_tensors(module: nn.Module) -> dict[str, torch.Tensor]:
    """The module's parameters and buffers as plain tensors by name; a tensor subclass as its inner tensors."""
    out: dict[str, torch.Tensor] = {}
    for name, tensor in module.state_dict(keep_vars=True).items():
        _flatten(name, tensor, out)
    return out


def _flatten(name: str, tensor: torch.Tensor, out: dict) -> None:
    if type(tensor) in (torch.Tensor, nn.Parameter):
        out[name] = tensor
        return
    inner, _ = tensor.__tensor_flatten__()  # torchao's tensors name their inner tensors: qdata, scale, ...
    for part in inner:
        if getattr(tensor, part) is not None:
            _flatten(f"{name}#{part}", getattr(tensor, part), out)
