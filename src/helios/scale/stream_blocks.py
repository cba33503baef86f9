"""offload="blocks": a transformer whose blocks stay in the checkpoint and stream through one or two buffers.

The model keeps its small modules (patch embeddings, condition embedder, output head: about 0.5 GB at 14B) where it
runs. Its `blocks` become placeholders (StreamedBlock) that hand each call to a BlockStream. The stream owns one or
two real blocks, its "slots", and copies the weights of the block being called into a slot from the memory-mapped
safetensors files (mapped.py), one tensor at a time. Nothing else of the blocks is ever held: the process never
has the whole transformer in memory, and what it read stays in the page cache, the kernel's to evict.

One call of block i:
    acquire(i)     block i's weights are in a slot: fetched one block ahead, or fetched now
    request(i+1)   the next block's weights start moving: into the other slot (two slots), or, with one slot,
                   a read-ahead hint so the kernel reads the file while block i computes
    compute        block i in its slot
    release        the slot may be overwritten once that compute is done

On CUDA there are two slots on the device (double buffering): a worker thread copies each tensor's mapped bytes
through a ring of pinned staging buffers (64 MiB each: the host never pins a copy of the model) and a side stream
moves them to the device, while the main stream computes the other slot; CUDA events order copy-after-compute and
compute-after-copy. On a CPU there is one slot by default and every copy is made on the calling thread.

Results equal those of the resident model exactly: the slots hold the same values (the same dtype conversion) and
run the same module code.

With quantize, the blocks are quantized once while loading and held in host memory (held_blocks.py); the stream then
copies a held block's int8 / float8 tensors and scales into its slots instead of the file's bytes: half of them.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ..model.weights import check_keys, param_dtype, read_config, weight_files
from .block_copies import (CpuCopies, CudaLink, HostCache, HostLink, StagedCopies, StreamStats, check_host_cache,
                           host_cache_fits, stream_slots)
from .held_blocks import hold_blocks, leaf_tensors
from .mapped import MappedCheckpoint


class StreamedBlock(nn.Module):
    """Stands in for transformer block `index`: calling it runs that block's weights in one of the stream's slots."""

    def __init__(self, index: int, stream: BlockStream):
        super().__init__()
        self.index, self.stream = index, stream

    def forward(self, *args, **kwargs):
        return self.stream.run(self.index, *args, **kwargs)

    def compile(self, *args, **kwargs):
        """torch.compile the modules that compute (the slots), not this placeholder, which reads files."""
        self.stream.compile(*args, **kwargs)

    def extra_repr(self) -> str:
        return f"index={self.index}, streamed"


@dataclass(eq=False)
class _Slot:
    module: nn.Module
    block: int | None = None  # whose weights it holds, or is receiving
    ready: object = None  # the copies' token to wait on before computing
    free: object = None  # the copies' token of the last compute on it, to wait on before overwriting
    busy: bool = False
    ahead: bool = False  # fetched for a block not yet computed: not to be overwritten by another prefetch
    used: int = 0  # when it was last acquired, to overwrite the least recently used


class BlockStream:
    """The blocks of one transformer, read from `checkpoint` into at most `slots` resident blocks on `device`.

    checkpoint: a MappedCheckpoint, or HeldBlocks (quantized blocks in host memory). template: a block on the meta
    device (the architecture; slots get empty tensors), or a held block (slots are copies of it).
    slots: None picks 1 on a CPU, and on CUDA as many as block_copies.SLOT_BUDGET holds (2 to 4): the blocks after the
    one computing are fetched up to slots - 1 ahead. host_cache (False | True | "auto"): keep every block's bytes in
    pinned host memory after its first read (block_copies.py); "auto" does so on CUDA when block_copies.host_cache_fits
    says the RAM holds them."""

    def __init__(self, checkpoint: MappedCheckpoint, template: nn.Module, num_blocks: int, torch_dtype, device,
                 slots: int | None = None, prefix: str = "blocks", host_cache=False):
        check_host_cache(host_cache)
        if slots is not None and (not isinstance(slots, int) or isinstance(slots, bool) or slots < 1):
            raise ValueError(f"slots must be a positive integer or None, got {slots!r}")
        self.checkpoint, self.num_blocks = checkpoint, num_blocks
        self.device = torch.device(device)
        if self.device.type == "cuda" and self.device.index is None:
            self.device = torch.device("cuda", torch.cuda.current_device())
        self.template = template
        self.names = list(leaf_tensors(template))
        self.keys = [[f"{prefix}.{i}.{name}" for name in self.names] for i in range(num_blocks)]
        self.dtypes = {name: param_dtype(f"{prefix}.0.{name}", torch_dtype) for name in self.names}
        self.block_bytes = sum(checkpoint.record(key).nbytes for key in self.keys[0])
        self.max_slots = slots or self._auto_slots()
        self.host_cache = self._use_cache(host_cache)
        self.copies = self._make_copies()
        self.slots: list[_Slot] = []
        self._clock = itertools.count(1)
        self._compile: tuple | None = None
        self.fetched_bytes = 0  # read from the checkpoint (or the held blocks) into slots, for measurements

    @property
    def stats(self) -> StreamStats | None:
        """Where the copies' time goes (block_copies.StreamStats); None (the default) measures nothing."""
        return self.copies.stats

    @stats.setter
    def stats(self, value: StreamStats | None) -> None:
        self.copies.stats = value

    def run(self, i: int, h: torch.Tensor, *args, **kwargs):
        if h.device != self.device:  # the slots cannot follow a .to(): say so before a kernel fails on it
            raise RuntimeError(f"this transformer streams its blocks on {self.device} (it was loaded with "
                               f"offload='blocks' for that device), got inputs on {h.device}")
        slot = self.acquire(i)
        for ahead in range(1, max(2, self.max_slots)):  # the next forward starts at block 0: fetched ahead too
            self.request((i + ahead) % self.num_blocks)
        try:
            return slot.module(h, *args, **kwargs)
        finally:
            self.release(slot)

    def acquire(self, i: int) -> _Slot:
        """The slot holding block i, ready to compute (its copies waited for)."""
        slot = next((s for s in self.slots if s.block == i), None) or self.fetch(i)
        try:
            self.copies.wait(slot.ready)
        except BaseException:
            slot.block = None  # a failed copy leaves the slot holding nothing
            raise
        slot.busy, slot.ahead, slot.used = True, False, next(self._clock)
        return slot

    def request(self, i: int) -> None:
        """Block i will be needed soon: start moving its weights if a slot is free, else hint the page cache."""
        if any(s.block == i for s in self.slots):
            return
        if len(self.slots) < self.max_slots or any(not s.busy and not s.ahead for s in self.slots):
            self.fetch(i)
        else:
            self.checkpoint.read_ahead(self.keys[i])

    def fetch(self, i: int) -> _Slot:
        """Start copying block i's weights into a free slot (the least recently used)."""
        slot = self._free_slot()
        slot.block, slot.ready = None, None
        tensors = leaf_tensors(slot.module)
        reads = [(key, tensors[name]) for key, name in zip(self.keys[i], self.names)]
        slot.ready = self.copies.fetch(self.checkpoint, reads, after=slot.free)
        slot.block, slot.ahead = i, True
        self.fetched_bytes += sum(self.checkpoint.record(key).nbytes for key in self.keys[i])
        if self.stats is not None:
            self.stats.blocks += 1
        return slot

    def finish_copies(self) -> None:
        """Wait until every fetch issued (the next forward's first blocks, fetched ahead) has landed: before
        reading the stats, or timing a forward on its own."""
        for slot in self.slots:
            if slot.ready is not None:
                self.copies.finish(slot.ready)

    def release(self, slot: _Slot) -> None:
        slot.free, slot.busy = self.copies.computed(), False

    def modules(self) -> list[nn.Module]:
        """The block modules this stream computes with, and the template later slots are copied from: a change made
        to each of them (parallel.py swaps the attention) holds for every block."""
        return [self.template, *(slot.module for slot in self.slots)]

    def compile(self, *args, **kwargs) -> None:
        if self._compile is None:
            self._compile = (args, kwargs)
            for slot in self.slots:
                slot.module.compile(*args, **kwargs)

    def _free_slot(self) -> _Slot:
        idle = [s for s in self.slots if not s.busy]
        if len(self.slots) < self.max_slots and not any(s.block is None for s in idle):
            self.slots.append(_Slot(self._new_block()))
            return self.slots[-1]
        if not idle:
            raise RuntimeError("every slot is computing a block; the block loop must release a slot first")
        # An empty slot first, then one whose block has computed, the least recently used; a slot fetched ahead
        # only when the forward went another way (an error, another call order) and nothing else is left.
        return min(idle, key=lambda s: (s.block is not None, s.ahead, s.used))

    def _auto_slots(self) -> int:
        if self.device.type != "cuda":
            return 1  # a CPU computes and copies on one thread: a second slot would only hold more memory
        return stream_slots(self.block_bytes, self.num_blocks)  # the device budget fit.py plans with too

    def _use_cache(self, host_cache) -> bool:
        if host_cache != "auto":
            return bool(host_cache)
        if self.device.type != "cuda":
            return False  # on a CPU the page cache is the host cache: nothing to gain
        # Held blocks are pinned where they are: the cache then costs no more RAM.
        extra = 0 if hasattr(self.checkpoint, "hold_in") else self.block_bytes * self.num_blocks
        return host_cache_fits(extra)

    def _make_copies(self):
        if self.device.type == "cuda":
            link = CudaLink(self.device)
            return StagedCopies(link, HostCache(link) if self.host_cache else None)
        if self.host_cache:  # a CPU run that asks for it: the same cached path as CUDA's, done synchronously
            return StagedCopies(HostLink(), HostCache(HostLink()))
        return CpuCopies()

    def _new_block(self) -> nn.Module:
        # Outside inference mode: inference tensors could not be overwritten in place by a later, ordinary forward.
        with torch.inference_mode(False), torch.no_grad():
            block = copy.deepcopy(self.template)
            if _on_meta(self.template):
                buffers = {name: torch.empty(t.shape, dtype=self.dtypes[name], device=self.device)
                           for name, t in self.template.state_dict().items()}
                block.load_state_dict(buffers, strict=True, assign=True)
            else:  # a held (quantized) block: the slot has its structure; its values are overwritten when fetched
                block = block.to(self.device)
        block = block.eval().requires_grad_(False)
        if self._compile is not None:
            block.compile(*self._compile[0], **self._compile[1])
        return block


def load_streamed(model_class, directory: Path, torch_dtype, device, slots: int | None = None, prepare_block=None,
                  host_cache="auto"):
    """Build `model_class` from a checkpoint folder with its blocks streamed: the small modules are read onto
    `device` now, each block's weights when it is called. Peak memory while loading: the small modules.

    prepare_block (quantization): each block is read and prepared now, and held in host memory (held_blocks.py);
    the stream copies the held blocks. The checkpoint is then closed: nothing more is read from it.
    host_cache: see BlockStream ("auto": pinned host memory on CUDA when the RAM holds the blocks)."""
    check_host_cache(host_cache)
    config = read_config(directory)
    checkpoint = MappedCheckpoint(_safetensors_files(directory))
    try:
        with torch.device("meta"):
            model = model_class(config)
        check_keys(checkpoint.shapes(), {name: tuple(t.shape) for name, t in model.state_dict().items()})
        blocks = model.blocks
        source, template = checkpoint, blocks[0]
        if prepare_block is not None:
            source = hold_blocks(checkpoint, template, len(blocks), torch_dtype, device, prepare_block)
            template = source.blocks[0]
        stream = BlockStream(source, template, len(blocks), torch_dtype, device, slots, host_cache=host_cache)
        model.blocks = nn.ModuleList(StreamedBlock(i, stream) for i in range(len(blocks)))
        with torch.no_grad():
            state = {key: checkpoint.read(key, param_dtype(key, torch_dtype), device) for key in model.state_dict()}
        model.load_state_dict(state, strict=True, assign=True)
    except BaseException:
        checkpoint.close()
        raise
    if source is not checkpoint:
        checkpoint.close()
    model.block_stream = stream
    return model.eval()


def _on_meta(module: nn.Module) -> bool:
    return next(iter(module.state_dict().values())).device.type == "meta"


def _safetensors_files(directory: Path) -> dict:
    """weight_files, with the reason when there is no safetensors checkpoint to stream from."""
    try:
        return weight_files(directory)
    except FileNotFoundError:
        others = sorted(p.name for p in directory.iterdir() if p.suffix in (".bin", ".pt", ".pth", ".ckpt", ".pkl"))
        if not others:
            raise
        raise ValueError(f"{directory}: offload='blocks' streams weights from memory-mapped safetensors files, and "
                         f"this folder has only {', '.join(others)} (a pickled checkpoint cannot be read one tensor "
                         "at a time without loading it whole): convert it to safetensors first") from None
