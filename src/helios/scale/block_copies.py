"""How a streamed block's bytes reach its slot (stream_blocks.py decides which block, when), and where the time goes.

Three ways, by where the slots live and how much host RAM may be used:
- CpuCopies (a CPU run, the default there): the calling thread copies the mapped file into the slot.
- StagedCopies without a cache (CUDA, RAM short): a copy thread cuts each tensor into pieces; a pool of reader
  threads reads the pieces from the file (pread: no page faults on a mapping) or from the held blocks into a ring of
  pinned staging buffers, in parallel; the copy thread sends each filled buffer to the device on a side stream
  (a DMA) and reuses it once that DMA is done. One reader thread (the old design) reads at memcpy-plus-faults speed,
  5-6 GB/s, below PCIe; several keep the DMA engine busy.
- StagedCopies with a HostCache (CUDA, RAM enough): every block's stored bytes in pinned host memory, read once;
  then each fetch is DMAs only, at the link's speed. Held (quantized) blocks are pinned where they are: no second copy.

StreamStats (off by default: `stream.stats = StreamStats()`) adds up seconds and bytes per stage. The links (CudaLink,
and HostLink, which does the same work synchronously on the CPU) keep the CUDA calls in one place, so the staged
and cached paths run, and are tested bitwise, on a CPU too.
"""

from __future__ import annotations

import collections
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field, fields

import torch

from .mapped import as_bytes

STAGING_BYTES = 32 * 2**20  # a power of two: the pinned allocator rounds every allocation up to one
STAGING_BUFFERS = 8  # 256 MiB pinned in all: the host never pins a copy of the model unless the cache is chosen
READERS = 4  # reader threads: pread from the page cache runs at ~5-10 GB/s per thread; four exceed PCIe 5
GB, GiB = 10**9, 2**30
ARENA_BYTES = GiB  # the host cache's pinned allocations (a power of two, as the pinned allocator makes them)
SLOT_BUDGET = int(2.2 * GB)  # device bytes the streamed blocks' slots may take: 3 slots of a 14B bf16 block (0.70 GB)
MAX_SLOTS = 4  # at most 3 blocks fetched ahead
HOST_MARGIN = 16 * GiB  # RAM the host cache leaves free: the text encoder (11.4 GB, on the host with offload), the VAE,
#                         the process and the other programs


@dataclass
class StreamStats:
    """Seconds and bytes per stage of a BlockStream's copies, summed since it was made (or `reset`).

    read: file or held blocks -> pinned staging (page-cache reads, or page faults and a memcpy), summed over the
    reader threads (so it may exceed the wall time); fill: the same into the host cache, once per block;
    stage_wait: the copy thread waiting for the DMA to empty a staging buffer (the link is the bottleneck);
    h2d: the side stream's copies to the device (CUDA event times); wait: the compute thread waiting for a block's
    copies to be issued (a fetch that was not hidden); stall: the compute stream idle until a block's copies are
    done (CUDA event times); blocks: blocks fetched."""

    read_s: float = 0.0
    read_bytes: int = 0
    fill_s: float = 0.0
    fill_bytes: int = 0
    stage_wait_s: float = 0.0
    h2d_s: float = 0.0
    h2d_bytes: int = 0
    wait_s: float = 0.0
    stall_s: float = 0.0
    blocks: int = 0
    _events: list = field(default_factory=list, repr=False)  # (start, end, "h2d" | "stall"): timed when settled
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def add(self, stage: str, seconds: float, nbytes: int = 0) -> None:
        with self._lock:  # reader threads add concurrently
            setattr(self, f"{stage}_s", getattr(self, f"{stage}_s") + seconds)
            if nbytes:
                setattr(self, f"{stage}_bytes", getattr(self, f"{stage}_bytes") + nbytes)

    def add_events(self, stage: str, start, end, nbytes: int = 0) -> None:
        with self._lock:
            self._events.append((start, end, stage))
            if nbytes:
                setattr(self, f"{stage}_bytes", getattr(self, f"{stage}_bytes") + nbytes)

    def settle(self) -> StreamStats:
        """Turn the recorded CUDA events into seconds (waits for them: call it after the forward)."""
        with self._lock:
            events, self._events = self._events, []
        for start, end, stage in events:
            end.synchronize()
            self.add(stage, start.elapsed_time(end) / 1000)
        return self

    def as_dict(self) -> dict:
        self.settle()
        return {f.name: getattr(self, f.name) for f in fields(self) if not f.name.startswith("_")}

    def summary(self) -> str:
        """One line: each stage's seconds, and its GB/s where it moves bytes."""
        d, parts = self.as_dict(), []
        for stage in ("read", "fill", "h2d"):
            if d[f"{stage}_bytes"]:
                rate = d[f"{stage}_bytes"] / d[f"{stage}_s"] / 1e9 if d[f"{stage}_s"] else float("inf")
                parts.append(f"{stage} {d[f'{stage}_s']:.3f} s ({d[f'{stage}_bytes'] / 1e9:.2f} GB, {rate:.1f} GB/s)")
        parts += [f"{stage} {d[f'{stage}_s']:.3f} s" for stage in ("stage_wait", "wait", "stall") if d[f"{stage}_s"]]
        return f"{d['blocks']} blocks: " + (", ".join(parts) or "nothing copied")


def timed(stats: StreamStats | None, stage: str, nbytes: int = 0):
    """A context that adds its wall time to `stage` (nothing when stats are off)."""
    return _Timer(stats, stage, nbytes) if stats is not None else nullcontext()


class _Timer:
    def __init__(self, stats, stage, nbytes):
        self.stats, self.stage, self.nbytes = stats, stage, nbytes

    def __enter__(self):
        self.start = time.perf_counter()

    def __exit__(self, *exc):
        self.stats.add(self.stage, time.perf_counter() - self.start, self.nbytes)


class CpuCopies:
    """Copies on the calling thread, from the mapped file straight into the slot's tensors (a CPU run)."""

    def __init__(self):
        self.stats: StreamStats | None = None

    @torch.no_grad()
    def fetch(self, checkpoint, reads, after=None):
        for key, out in reads:
            with timed(self.stats, "read", checkpoint.record(key).nbytes):
                checkpoint.read_into(key, out)

    def wait(self, token) -> None:
        pass

    def finish(self, token) -> None:
        pass

    def computed(self):
        return None


class HostLink:
    """The device side of StagedCopies done synchronously on the CPU: the same code path as CUDA's, for CPU runs
    that ask for the host cache and for tests."""

    device = torch.device("cpu")

    def pinned(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8)

    def side(self):
        return nullcontext()

    def after(self, token) -> None:
        pass

    def record(self):
        return None

    def computed(self):
        return None

    def compute_waits(self, token, stats) -> None:
        pass

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stats) -> None:
        with timed(stats, "h2d", src.numel()):
            dst.copy_(src)

    def done(self, token) -> None:
        pass


class CudaLink:
    """A side stream on `device` for the copies; CUDA events order copy-after-compute and compute-after-copy."""

    def __init__(self, device: torch.device):
        self.device = device
        self.stream = torch.cuda.Stream(device)

    def pinned(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    @contextmanager
    def side(self):
        with torch.cuda.device(self.device), torch.cuda.stream(self.stream):
            yield

    def after(self, token) -> None:
        self.stream.wait_event(token)  # the slot's last compute is done before it is overwritten

    def record(self):
        return self.stream.record_event()

    def computed(self):
        return torch.cuda.current_stream(self.device).record_event()

    def compute_waits(self, token, stats) -> None:
        compute = torch.cuda.current_stream(self.device)
        if stats is None:
            compute.wait_event(token)
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(compute)
        compute.wait_event(token)
        end.record(compute)
        stats.add_events("stall", start, end)

    def copy(self, dst: torch.Tensor, src: torch.Tensor, stats) -> None:
        if stats is None:
            dst.copy_(src, non_blocking=True)
            return
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record(self.stream)
        dst.copy_(src, non_blocking=True)
        end.record(self.stream)
        stats.add_events("h2d", start, end, src.numel())

    def done(self, token) -> None:
        token.synchronize()


class HostCache:
    """Every streamed tensor's stored bytes in (pinned) host memory, filled on first use: a block read once from the
    file, then copied to the device at the link's speed. Held blocks (a source with `hold_in`) are moved into pinned
    memory where they are, so the cache costs no RAM beyond the held blocks."""

    def __init__(self, link, arena_bytes: int = ARENA_BYTES):
        self.link, self.arena_bytes = link, arena_bytes
        self.tensors: dict[str, torch.Tensor] = {}  # key -> uint8, its stored bytes
        self._arena, self._used = None, 0

    def _alloc(self, nbytes: int) -> torch.Tensor:
        """`nbytes` of pinned memory carved from 1 GiB arenas: torch's pinned allocator rounds each allocation up
        to a power of two, so one per tensor (141.6 MB FFN weights -> 256 MiB) would take ~1.6x the blocks' bytes."""
        start = -(-self._used // 64) * 64  # aligned for any dtype's view
        if self._arena is None or start + nbytes > self._arena.numel():
            self._arena, start = self.link.pinned(max(self.arena_bytes, nbytes)), 0
        self._used = start + nbytes
        return self._arena[start : start + nbytes]

    @property
    def nbytes(self) -> int:
        return sum(t.numel() for t in self.tensors.values())

    def get(self, source, key: str, readers: ThreadPoolExecutor, piece: int, stats) -> torch.Tensor:
        if key not in self.tensors:
            with timed(stats, "fill", source.record(key).nbytes):
                self.tensors[key] = self._fill(source, key, readers, piece)
        return self.tensors[key]

    def _fill(self, source, key, readers, piece) -> torch.Tensor:
        if hasattr(source, "hold_in"):
            return source.hold_in(key, self._alloc)
        nbytes = source.record(key).nbytes
        host = self._alloc(nbytes)
        data = as_bytes(host)
        jobs = [readers.submit(source.read_piece, key, offset, data[offset : offset + piece])
                for offset in range(0, nbytes, piece)]
        for job in jobs:
            job.result()
        return host


class StagedCopies:
    """Copies to the slots through `link` (a side stream), from the host cache or through pinned staging buffers
    filled by reader threads. fetch() returns a token (a future of the copies' event) for wait()."""

    def __init__(self, link, cache: HostCache | None = None, staging_bytes: int = STAGING_BYTES,
                 buffers: int = STAGING_BUFFERS, readers: int = READERS):
        self.link, self.cache, self.piece = link, cache, staging_bytes
        self.device = link.device
        self.staging = [] if cache is not None else [link.pinned(staging_bytes) for _ in range(buffers)]
        self.emptied: list = [None] * len(self.staging)  # per staging buffer: the event of the last copy out of it
        self.next = 0
        self._pending: collections.deque = collections.deque()  # (read job, staging buffer, destination), oldest first
        self.readers = ThreadPoolExecutor(readers, thread_name_prefix="helios-read")
        self.worker = ThreadPoolExecutor(1, thread_name_prefix="helios-blocks")  # issues one block's copies in order
        self.stats: StreamStats | None = None

    def fetch(self, checkpoint, reads, after=None):
        return self.worker.submit(self._copy, checkpoint, reads, after)

    def wait(self, token) -> None:
        with timed(self.stats, "wait"):
            event = token.result()
        self.link.compute_waits(event, self.stats)

    def finish(self, token) -> None:
        event = token.result()
        if event is not None:
            self.link.done(event)

    def computed(self):
        return self.link.computed()

    @torch.no_grad()
    def _copy(self, source, reads, after):
        try:
            return self._copy_block(source, reads, after)
        except BaseException:
            for job, _, _ in self._pending:  # let the reads in flight finish before their buffers are reused
                job.exception()
            self._pending.clear()
            raise

    def _copy_block(self, source, reads, after):
        with self.link.side():
            if after is not None:
                self.link.after(after)
            for key, out in reads:
                stored = source.record(key).dtype
                # A tensor stored in another dtype arrives as it is stored, then is converted on the device.
                landing = out if stored == out.dtype else torch.empty(out.shape, dtype=stored, device=self.device)
                dst = landing.view(-1).view(torch.uint8)
                if self.cache is not None:
                    self.link.copy(dst, self.cache.get(source, key, self.readers, self.piece, self.stats), self.stats)
                else:
                    self._staged(source, key, dst)
                if landing is not out:
                    self._drain()  # its bytes are all on the device before the conversion reads them
                    out.copy_(landing)
            self._drain()
            return self.link.record()

    def _staged(self, source, key: str, dst: torch.Tensor) -> None:
        """Tensor `key` -> dst through the staging ring: up to len(staging) pieces are being read at once."""
        nbytes = source.record(key).nbytes
        for offset in range(0, nbytes, self.piece):
            length = min(self.piece, nbytes - offset)
            if len(self._pending) == len(self.staging):
                self._land(*self._pending.popleft())
            k = self._take_buffer()
            job = self.readers.submit(self._read, source, key, offset, self.staging[k][:length])
            self._pending.append((job, k, dst[offset : offset + length]))

    def _take_buffer(self) -> int:
        k, self.next = self.next, (self.next + 1) % len(self.staging)
        if self.emptied[k] is not None:
            with timed(self.stats, "stage_wait"):
                self.link.done(self.emptied[k])  # its previous bytes have reached the device
        return k

    def _read(self, source, key: str, offset: int, buffer: torch.Tensor) -> None:
        with timed(self.stats, "read", buffer.numel()):
            source.read_piece(key, offset, as_bytes(buffer))

    def _land(self, job, k: int, dst: torch.Tensor) -> None:
        job.result()  # the piece is in staging buffer k (a read error surfaces here, in the fetch's future)
        self.link.copy(dst, self.staging[k][: dst.numel()], self.stats)
        self.emptied[k] = self.link.record()

    def _drain(self) -> None:
        while self._pending:
            self._land(*self._pending.popleft())


def stream_slots(block_bytes: int, num_blocks: int) -> int:
    """How many blocks the stream keeps on a GPU: as many as SLOT_BUDGET holds, 2 to MAX_SLOTS."""
    return max(1, min(MAX_SLOTS, num_blocks, max(2, SLOT_BUDGET // max(1, block_bytes))))


def check_host_cache(value) -> None:
    if not (value is True or value is False or value == "auto"):
        raise ValueError(f"host_cache must be True, False or 'auto', got {value!r}")


def host_cache_fits(nbytes: int, available: int | None = None, margin: int = HOST_MARGIN) -> bool:
    """host_cache="auto": pin `nbytes` of blocks in RAM only if MemAvailable less `margin` holds them."""
    available = mem_available() if available is None else available
    return available - margin >= nbytes


def mem_available() -> int:
    """The kernel's MemAvailable (bytes); 0 where /proc/meminfo is missing (no host cache then)."""
    try:
        with open("/proc/meminfo") as f:
            return next(int(line.split()[1]) * 1024 for line in f if line.startswith("MemAvailable:"))
    except (OSError, StopIteration, ValueError):
        return 0
