"""Sequence parallelism measured: one forward (one denoising step without CFG) on N = 1, 2, 4 processes.

    python -m helios.bench parallel [--processes 1 2 4] [--height 192 --width 320 --layers 4 ...]

Each N is a torchrun launch (gloo on CPU, NCCL with --device cuda) of the same random model at Helios's token
layout (current chunk plus the 16/2/1 memory). Reported per N: the median time per step; the bytes each rank's
all-to-alls sent to other ranks per step, counted from the buffers handed to all_to_all_single, against the formula
(each all-to-all moves (N-1)/N of what it is given: q, k, v and the output of every block, each [L/N, H*D] per
rank; the last block queries only the current tokens); the bytes of the output's all-gather; and, on Linux, what
the loopback interface carried meanwhile (all ranks together, TCP framing included: a check from outside the
program, disturbed by anything else using loopback). At N = 1 the plain model and the parallel code path alternate
in one process: the cost of the parallel path itself.

On a CPU the processes share its cores, so this checks the communication volume, not the speed-up.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

import torch

from ..model.weights import param_dtype
from .common import alternate, helios_inputs, machine, timed, token_counts, transformer_config


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m helios.bench parallel", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--processes", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--height", type=int, default=192, help="pixels of the current chunk (default 192)")
    p.add_argument("--width", type=int, default=320)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--ffn", type=int, default=1024)
    p.add_argument("--text-dim", type=int, default=256)
    p.add_argument("--text-len", type=int, default=64)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--threads", type=int, default=1, help="torch threads per process on a CPU (default 1)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # internal: one process of a launch
    return p


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    args.history_height = args.history_width = None  # helios_inputs: the memory at the chunk's size
    if args.worker:
        return worker(args)
    rows = [launch(n, argv) for n in args.processes]
    print(json.dumps({"machine": machine(), "args": vars(args), "results": rows}, indent=2))
    print(table(rows), file=sys.stderr)


def launch(n: int, argv: list[str]) -> dict:
    """One torchrun launch of n worker processes; rank 0 prints the result as the last line of its output."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={n}",
               "-m", "helios.bench", "parallel", *argv, "--worker"]
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    done = subprocess.run(command, capture_output=True, text=True, env=env)
    if done.returncode:
        raise SystemExit(f"the launch on {n} processes failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def worker(args) -> None:
    import torch.distributed as dist

    from ..model.transformer import HeliosTransformer3DModel
    from ..scale.parallel import parallelize

    device = torch.device(args.device if args.device == "cpu" else f"cuda:{os.environ.get('LOCAL_RANK', '0')}")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    torch.set_num_threads(args.threads)
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    rank, n = dist.get_rank(), dist.get_world_size()
    dtype = getattr(torch, args.dtype)
    cfg = transformer_config(args)
    model = random_model(HeliosTransformer3DModel, cfg, device, dtype)
    inputs = helios_inputs(cfg, args, device, dtype)
    plain = (model.placement, [b.attn1.attention for b in model.blocks])
    parallelize(model)
    shards = model.placement

    def forward():
        dist.barrier()
        with torch.inference_mode():
            model(**inputs)

    result = {"processes": n}
    if n == 1:  # the plain path and the parallel path, alternating
        def plain_forward():
            saved = (model.placement, [b.attn1.attention for b in model.blocks])
            _swap(model, plain)
            try:
                forward()
            finally:
                _swap(model, saved)

        times = alternate({"plain": plain_forward, "parallel": forward}, args.runs, device)
        result["plain_step_s"] = statistics.median(times["plain"])
        result["overhead"] = statistics.median(a / b for a, b in zip(times["parallel"], times["plain"])) - 1
        step = times["parallel"]
    else:
        forward()  # warm-up
        lo_before = _loopback_bytes()
        sent_before, gathered_before = shards.sent_bytes, shards.gathered_bytes
        step = [timed(forward, device) for _ in range(args.runs)]
        lo = (_loopback_bytes() - lo_before) / args.runs if lo_before is not None else None
        result.update(sent_bytes=(shards.sent_bytes - sent_before) / args.runs,
                      gathered_bytes=(shards.gathered_bytes - gathered_before) / args.runs, loopback_bytes=lo)
    n_cur, n_hist = token_counts(cfg, inputs)
    element = torch.empty((), dtype=dtype).element_size()
    result.update(step_s=statistics.median(step), runs_s=step, tokens=n_cur + n_hist, current_tokens=n_cur,
                  formula_bytes=formula_bytes(cfg, n_cur, n_hist, n, element))
    if rank == 0:
        print(json.dumps(result))
    dist.barrier()  # leave together (see launch.leave_together)
    dist.destroy_process_group()


def random_model(cls, cfg, device, dtype):
    """The model with seeded random weights (the same on every rank), made on `device` in the dtypes loading would
    give (some modules stay fp32): the 14B shape never exists in fp32 or on the CPU."""
    with torch.device("meta"):
        model = cls(cfg).eval()
    model.to_empty(device=device)
    generator = torch.Generator(device).manual_seed(0)
    for name, p in model.named_parameters():
        p.data = torch.empty(p.shape, dtype=param_dtype(name, dtype), device=device)
        p.data.normal_(0, 0.02, generator=generator)
    return model


def formula_bytes(cfg, n_cur: int, n_hist: int, n: int, element: int) -> float:
    """Bytes one rank's all-to-alls send per forward: (N-1)/N of q, k, v and the output, each [L/N, H*D]."""
    width, total = cfg.inner_dim * element, n_cur + n_hist
    per_block = 4 * total / n * width  # q, k, v, output
    last = (2 * total + 2 * n_cur) / n * width  # the last block: k, v of all tokens; q and output of current ones
    return (n - 1) / n * ((cfg.num_layers - 1) * per_block + last)


def _swap(model, placement_and_attentions) -> None:
    placement, attentions = placement_and_attentions
    model.placement = placement
    for block, attention in zip(model.blocks, attentions):
        block.attn1.attention = attention


def _loopback_bytes() -> int | None:
    """Bytes sent through the loopback interface so far (Linux), else None."""
    try:
        line = next(ln for ln in Path("/proc/net/dev").read_text().splitlines() if ln.strip().startswith("lo:"))
    except (OSError, StopIteration):
        return None
    return int(line.split(":", 1)[1].split()[8])


def table(rows: list[dict]) -> str:
    mb = 1e6
    lines = ["N  step (s)  all-to-all sent / rank (MB)  formula (MB)  output gather / rank (MB)  loopback all (MB)"]
    for r in rows:
        if r["processes"] == 1:
            lines.append(f"1  {r['step_s']:8.3f}  (plain path {r['plain_step_s']:.3f} s: parallel path "
                         f"{100 * r['overhead']:+.1f} %)")
            continue
        lo = f"{r['loopback_bytes'] / mb:17.2f}" if r["loopback_bytes"] is not None else "-"
        lines.append(f"{r['processes']}  {r['step_s']:8.3f}  {r['sent_bytes'] / mb:27.2f}  "
                     f"{r['formula_bytes'] / mb:12.2f}  {r['gathered_bytes'] / mb:25.3f}  {lo}")
    return "\n".join(lines)
