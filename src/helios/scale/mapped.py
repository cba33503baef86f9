"""Memory-mapped safetensors, read one tensor at a time: where offload="blocks" gets its weights.

safetensors' own reader copies each tensor out of one long-lived mapping of the whole file, and every page it has
touched counts in the process's resident memory until the file is closed. Streaming a 28.6 GB transformer through a
machine with less RAM needs the opposite: map one tensor's bytes, copy them to where they are used (a block's
buffers, or a pinned staging buffer on the way to a GPU), unmap. The file's pages stay in the page cache, which the
kernel may evict at will; the process keeps none of them.

A job reads a checkpoint for as long as it runs, so a file can change under it (a re-download, a sync tool, a full
disk cleaned up). Reading a mapped page past the end of a truncated file kills the process with SIGBUS, deep inside a
copy. So every read first checks that the file is still the one that was opened (same inode, size and mtime) and
fails with CheckpointChanged, naming the file, if it is not.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

# safetensors dtype names -> torch dtypes
DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
MAX_HEADER = 100 * 2**20  # safetensors' own limit on the JSON header
WINDOW = 64 * 2**20  # bytes of a file mapped at a time


class CheckpointChanged(RuntimeError):
    """A weight file changed or disappeared while a job was reading weights from it."""


@dataclass(frozen=True)
class TensorRecord:
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int  # byte offset of the data in the file
    nbytes: int


class MappedFile:
    """One safetensors file: its header, and each tensor's bytes mapped on demand."""

    def __init__(self, path: str | os.PathLike):
        self.path, self._fd = Path(path), -1
        self._fd = os.open(self.path, os.O_RDONLY)
        try:
            self._identity = _identity(os.fstat(self._fd))
            self.tensors = _read_header(self._fd, self.path, self._identity[2])
            _check_mappable(self._fd, self.path)
        except BaseException:
            self.close()
            raise

    def check(self) -> None:
        """Raise CheckpointChanged if the file on disk is no longer the one that was opened."""
        try:
            now = _identity(os.stat(self.path))
        except FileNotFoundError:
            raise CheckpointChanged(f"{self.path}: the weight file disappeared while weights were being read from "
                                    "it; the job cannot go on (restore the file and resume)") from None
        if now != self._identity or _identity(os.fstat(self._fd)) != self._identity:
            raise CheckpointChanged(f"{self.path}: the weight file changed while weights were being read from it "
                                    "(size, mtime or inode differ from when it was opened); the job cannot go on")

    def pieces(self, key: str, size: int = WINDOW) -> Iterator[tuple[int, np.ndarray]]:
        """Tensor `key`'s bytes as (offset, read-only uint8 array) pieces of at most `size` bytes, each mapped only
        until the next one is asked for: a read holds at most `size` bytes of the file in this process."""
        record = self.tensors[key]
        for offset in range(0, record.nbytes, size):
            self.check()
            start, length = record.start + offset, min(size, record.nbytes - offset)
            base = start - start % mmap.ALLOCATIONGRANULARITY
            mapping = mmap.mmap(self._fd, start + length - base, offset=base, prot=mmap.PROT_READ)
            try:
                yield offset, np.frombuffer(mapping, np.uint8, length, start - base)
            finally:
                try:
                    mapping.close()
                except BufferError:  # a caller kept the array: the mapping goes when it does
                    pass

    def read_into(self, key: str, out: torch.Tensor) -> torch.Tensor:
        """Copy tensor `key` into `out` (same shape; any dtype and device: the copy converts)."""
        record = self.tensors[key]
        direct = out.device.type == "cpu" and out.dtype == record.dtype and out.is_contiguous()
        landing = out if direct else torch.empty(record.shape, dtype=record.dtype)
        dst = as_bytes(landing)
        for offset, piece in self.pieces(key):
            # numpy's copy is one plain memcpy; torch's splits it over threads, which stall on a busy machine.
            np.copyto(dst[offset : offset + len(piece)], piece)
        if not direct:
            out.copy_(landing)
        return out

    def read_piece(self, key: str, offset: int, out: np.ndarray) -> None:
        """Bytes [offset, offset + len(out)) of tensor `key` into `out`, with pread: the kernel copies from the page
        cache, with no mapping to fault in page by page (the streamed copies to a GPU read this way, from several
        threads at once). A file cut short reads short, and is reported, where a mapping would raise SIGBUS."""
        self.check()
        record, done = self.tensors[key], 0
        view = memoryview(out).cast("B")
        while done < len(view):
            n = os.preadv(self._fd, [view[done:]], record.start + offset + done)
            if n == 0:
                self.check()  # names the file if it changed
                raise CheckpointChanged(f"{self.path}: the weight file ended inside tensor {key!r}")
            done += n

    def read_ahead(self, keys) -> None:
        """Ask the kernel to start reading these tensors into the page cache (no memory of ours is used)."""
        if hasattr(os, "posix_fadvise"):
            for key in keys:
                record = self.tensors[key]
                os.posix_fadvise(self._fd, record.start, record.nbytes, os.POSIX_FADV_WILLNEED)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self):
        self.close()


class MappedCheckpoint:
    """The safetensors files of one checkpoint, by tensor name."""

    def __init__(self, files: dict[Path, list[str] | None]):
        """files: path -> the keys an index assigns to it (None for an unindexed single file), as
        weights.weight_files returns them."""
        self.files: list[MappedFile] = []
        self.where: dict[str, MappedFile] = {}
        try:
            for path, listed in files.items():
                f = MappedFile(path)
                self.files.append(f)
                if listed is not None and not set(listed) <= set(f.tensors):
                    raise ValueError(f"{path}: missing keys its index promises: {sorted(set(listed) - set(f.tensors))[:10]}")
                self.where.update(dict.fromkeys(f.tensors, f))
        except BaseException:
            self.close()
            raise

    def shapes(self) -> dict[str, tuple[Path, tuple[int, ...]]]:
        """key -> (file, shape), for checking against a model's names and shapes."""
        return {key: (f.path, f.tensors[key].shape) for key, f in self.where.items()}

    def record(self, key: str) -> TensorRecord:
        return self.where[key].tensors[key]

    def pieces(self, key: str, size: int | None = None):
        return self.where[key].pieces(key, size or WINDOW)

    def read_into(self, key: str, out: torch.Tensor) -> torch.Tensor:
        return self.where[key].read_into(key, out)

    def read_piece(self, key: str, offset: int, out: np.ndarray) -> None:
        self.where[key].read_piece(key, offset, out)

    def read(self, key: str, dtype: torch.dtype, device="cpu") -> torch.Tensor:
        """A new tensor holding `key`, in `dtype` on `device`."""
        return self.read_into(key, torch.empty(self.record(key).shape, dtype=dtype, device=device))

    def read_ahead(self, keys) -> None:
        by_file: dict[MappedFile, list[str]] = {}
        for key in keys:
            by_file.setdefault(self.where[key], []).append(key)
        for f, its_keys in by_file.items():
            f.read_ahead(its_keys)

    def close(self) -> None:
        for f in self.files:
            f.close()


def as_bytes(t: torch.Tensor) -> np.ndarray:
    """A contiguous CPU tensor's bytes as a writable uint8 array (shared memory, no copy)."""
    return t.reshape(-1).view(torch.uint8).numpy()


def _identity(st: os.stat_result) -> tuple:
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns)


def _read_header(fd: int, path: Path, size: int) -> dict[str, TensorRecord]:
    """Parse and check the header: 8 bytes of little-endian length, then JSON {name: {dtype, shape, data_offsets}}."""
    def bad(why: str) -> ValueError:
        return ValueError(f"{path}: not a valid safetensors file ({why})")

    if size < 8:
        raise bad(f"{size} bytes")
    (length,) = struct.unpack("<Q", os.pread(fd, 8, 0))
    if length > min(MAX_HEADER, size - 8):
        raise bad(f"header length {length} for a file of {size} bytes")
    try:
        header = json.loads(os.pread(fd, length, 8))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise bad(f"header is not JSON: {err}") from None
    if not isinstance(header, dict):
        raise bad("header is not a JSON object")
    data_start, records = 8 + length, {}
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        try:
            dtype, shape, (begin, end) = DTYPES[entry["dtype"]], tuple(int(n) for n in entry["shape"]), entry["data_offsets"]
        except (KeyError, TypeError, ValueError):
            raise bad(f"tensor {key!r} has an unsupported or malformed entry {entry!r}") from None
        nbytes = math.prod(shape) * dtype.itemsize
        if end - begin != nbytes or begin < 0 or data_start + end > size:
            raise bad(f"tensor {key!r}: data_offsets {[begin, end]} do not fit its shape or the file")
        records[key] = TensorRecord(dtype, shape, data_start + begin, nbytes)
    return records


def _check_mappable(fd: int, path: Path) -> None:
    try:
        mmap.mmap(fd, 0, access=mmap.ACCESS_READ).close()
    except (OSError, ValueError) as err:
        raise ValueError(f"{path}: cannot be memory-mapped ({err}); offload='blocks' reads weights through mmap, one "
                         "tensor at a time: put the checkpoint on a local disk") from None
