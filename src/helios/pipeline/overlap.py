"""Decoding off the critical path: chunk k is decoded while chunk k + 1 denoises (stream(overlap_decode=True)).

A producer thread denoises; the stream's own generator (the consumer) decodes and yields. They hand over one
chunk at a time, and the producer starts chunk k + 1 only once the consumer has taken chunk k, so denoising runs
ahead of the chunk being decoded or yielded by at most one chunk:
- the first chunk waits for nothing but its own denoise and decode (first-chunk latency is the sequential one);
- a steering change lands at the first chunk not yet started, which may be one later than without overlap;
- cancelling wastes at most the steps of one chunk.
The chunks, their frames, latents and states are the sequential path's: the producer runs the same code in the
same order (the generator, the memory and the prompt track are touched by it alone); only the decode moves.

On CUDA the consumer decodes on a stream of its own, so its kernels run beside the denoise's; the producer waits
for its stream at the end of each chunk (generate._wait), so the latents are complete before the decode reads them.
Offload (`offload="model"` / `"blocks"`) moves the VAE and the transformer on and off the device in turn, and a
steering change would bring the text encoder in mid-chunk: overlap is refused there (resolve_overlap).

Cancelling and errors: on_step returning True ends the stream after the chunks already denoised are yielded, as
without overlap; a consumer that stops iterating (or closes the generator) stops the producer at its next step and
waits for it, so no thread outlives the stream; an exception in the producer is raised in the consumer, after the
chunks before it. on_step is never called from both threads at once (a lock), but its "decode" event of chunk k may
come between the denoising steps of chunk k + 1.
"""

from __future__ import annotations

import queue
import threading
from contextlib import nullcontext
from typing import Callable, Iterator

import torch

from ..sampling.denoise import Cancelled


def resolve_overlap(overlap_decode, device: torch.device, offload: bool) -> bool:
    """overlap_decode (None: auto) -> whether a stream overlaps its decodes; a ValueError names what cannot."""
    if overlap_decode is not None and not isinstance(overlap_decode, bool):
        raise ValueError(f"overlap_decode must be True, False or None (auto), got {overlap_decode!r}")
    several = torch.distributed.is_available() and torch.distributed.is_initialized() \
        and torch.distributed.get_world_size() > 1
    if overlap_decode is None:  # on a CPU the two threads share the same cores: nothing to gain
        return device.type == "cuda" and not offload and not several
    if overlap_decode and offload:
        raise ValueError("overlap_decode=True does not work with offload: it takes the VAE and the transformer on "
                         "and off the device in turn, so a decode cannot run beside a denoise (use None or False)")
    if overlap_decode and several:
        raise ValueError("overlap_decode=True does not work under torch.distributed: every rank must see the steps "
                         "and chunk boundaries in the same order (use None or False)")
    return overlap_decode


def overlapped(denoise: Callable, decode: Callable, chunks: range, on_step, device: torch.device) -> Iterator:
    """Yield decode(denoise(k, report), report) for k in chunks, the denoise of k + 1 running in a thread while k
    is decoded. denoise raises Cancelled when its on_step (`report`) says stop."""
    producer = _Producer(denoise, chunks, on_step)
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None
    producer.start()
    try:
        while True:
            kind, item = producer.items.get()
            if kind == "end":
                return
            if kind == "error":
                raise item
            producer.go.release()  # chunk k is taken: the producer may start chunk k + 1
            with torch.cuda.stream(stream) if stream is not None else nullcontext():
                chunk = decode(item, producer.report)
            yield chunk
    finally:
        producer.close()


class _Producer:
    """The denoising thread. `go` allows it one chunk more; `items` carries ("chunk", x), ("error", e), ("end",)."""

    def __init__(self, denoise: Callable, chunks: range, on_step):
        self.denoise, self.chunks, self.on_step = denoise, chunks, on_step
        self.items: queue.Queue = queue.Queue(maxsize=1)
        self.go = threading.Semaphore(1)  # the first chunk starts at once
        self.stop = threading.Event()
        self._lock = threading.Lock()  # on_step is called from one thread at a time
        self._thread = threading.Thread(target=self._run, name="helios-denoise", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def report(self, info):
        """on_step for both threads: a stopped consumer cancels the producer at its next step."""
        if self.stop.is_set():
            return True
        if self.on_step is None:
            return None
        with self._lock:
            return self.on_step(info)

    def _run(self) -> None:
        try:
            for k in self.chunks:
                self.go.acquire()
                if self.stop.is_set():
                    return
                self.items.put(("chunk", self.denoise(k, self.report)))
        except Cancelled:
            pass
        except BaseException as err:  # raised again in the consumer, with its traceback
            self.items.put(("error", err))
            return
        self.items.put(("end", None))

    def close(self) -> None:
        """Stop the thread and wait for it (at most the rest of one step); what it still hands over is dropped."""
        self.stop.set()
        self.go.release()  # a producer waiting for its next chunk sees the stop
        while self._thread.is_alive():
            try:
                self.items.get(timeout=0.05)
            except queue.Empty:
                pass
        self._thread.join()
