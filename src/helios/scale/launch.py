"""Several processes started by torchrun: the process group, each process's device, and the checks before a launch.

torchrun starts N copies of a command (`torchrun --nproc-per-node N -m helios generate ...`; on several nodes with
`--nnodes` and a rendezvous endpoint) and tells each its place in environment variables: WORLD_SIZE, RANK,
LOCAL_RANK, MASTER_ADDR, MASTER_PORT. Started any other way, a command is one process and none of this applies.

If a process dies, the others must not wait for it forever: the process group gets a timeout. With gloo a peer's
death closes its sockets and the others' next collective fails at once; a peer that hangs without dying is caught by
the timeout. With NCCL, torch's watchdog aborts a collective that outlasts the timeout
(TORCH_NCCL_ASYNC_ERROR_HANDLING, on by default), and torchrun ends the other processes of a node when one fails.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from datetime import timedelta
from typing import Iterator

DEFAULT_TIMEOUT_S = 600  # torch's own default for NCCL; loading a 14B model on every rank stays well inside it


def world_size() -> int:
    """The number of processes of this launch (1 when not started by torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    """This process's rank (0 when not started by torchrun); rank 0 writes files, progress and state."""
    return int(os.environ.get("RANK", "0"))


def check_launch(world: int, heads: int, cfg_parallel: bool, guidance: float) -> None:
    """Fail before anything is loaded if `world` processes cannot share this model's work."""
    if cfg_parallel:
        if world % 2:
            raise ValueError(f"--cfg-parallel runs the conditional and unconditional passes of guidance on two halves "
                             f"of the processes, so it needs an even number of them; started as {world} (use "
                             f"torchrun --nproc-per-node with an even count)")
        if guidance <= 1.0:
            raise ValueError(f"--cfg-parallel splits the two passes of classifier-free guidance, and this run has none "
                             f"(guidance {guidance:g}; Distilled samples without): leave --cfg-parallel out")
    n = world // 2 if cfg_parallel else world
    if heads % n:
        split = f" (two halves of {n} with --cfg-parallel)" if cfg_parallel else ""
        raise ValueError(f"{world} processes{split}: sequence parallelism splits the attention heads over {n} "
                         f"processes, and this model has {heads} heads, which do not divide by {n}")


def process_device(device):
    """This process's device: under torchrun, "cuda" means the GPU of its local rank."""
    import torch

    if device.type != "cuda" or world_size() <= 1:
        return device
    if device.index is not None:
        raise ValueError(f"--device {device}: under torchrun each process takes the GPU of its local rank; give "
                         "--device cuda (or auto), and choose GPUs with CUDA_VISIBLE_DEVICES")
    return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))


@contextmanager
def process_group(device, timeout_s: float = DEFAULT_TIMEOUT_S) -> Iterator[bool]:
    """The default process group for the launch (NCCL on CUDA, gloo otherwise), destroyed on exit.

    Yields True when the launch has several processes, False (and starts nothing) when it is one.
    """
    if world_size() <= 1:
        yield False
        return
    import torch
    import torch.distributed as dist

    cuda = device.type == "cuda"
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout_s),
                            device_id=device if cuda else None)
    try:
        yield True
    finally:
        dist.destroy_process_group()


def leave_together() -> None:
    """Wait for every process before the process group is torn down, after a run that succeeded everywhere.

    A process that tears its group down while a peer is still finishing the last collective can make that peer abort
    at exit (gloo: "terminate called without an active exception", about 1 launch in 5 of 4 CPU processes here).
    Not after a failure or an interruption: a peer that is gone would keep the others waiting until the timeout.
    """
    import torch.distributed as dist

    dist.barrier()
