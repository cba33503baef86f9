"""Host memory of offload="blocks" against a resident transformer: `python -m helios.bench memory`.

    python -m helios.bench memory                      # every case below, in a temporary folder, deleted afterwards
    python -m helios.bench memory --cases 6-block load --dir /mnt/big --keep

Each case makes the checkpoint it needs: random weights for a transformer config, written tensor by tensor as
sharded bf16 safetensors, so that writing never holds the model in memory either. Each measurement runs in a fresh
process: peak RSS (VmHWM, reset after the imports and again after loading) and seconds, for one forward at a small
token layout (Helios's layout at 64x64 pixels: 144 current + 32 + 4 + 4 memory tokens, 64 text tokens).

Cases (issue 12's targets in brackets):
- 14b: the published config (40 blocks, width 5120, 28.6 GB). "blocks" forward [peak RSS <= 4 GB]; and the resident
  model, in float32 under a data limit (it fails cleanly instead of calling the OOM killer) and in bfloat16 (its
  weights are the checkpoint's mapped pages: the kernel pages the file through the RAM). With too little disk, the
  largest number of blocks that fits, said so.
- 6-block: 6 blocks at width 5120. Forward with "blocks" [peak <= 0.5x the checkpoint] and resident [about 1.06x].
- load: loading that checkpoint with "blocks" [peak <= one block + the non-block weights].
- tiny: the same measurements at width 512 (a 12-block, 0.2 GB fp32 checkpoint), which the test suite runs.

With --device cuda (or --device cpu --toy, a smoke test), instead: one Distilled chunk per offload plan, timed, with
the device's peak and where the streamed copies' time goes (memory_plans.py).

Not a benchmark against the reference: it needs nothing but helios.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import shutil
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from ..model.config import HeliosConfig
from ..model.transformer import HeliosTransformer3DModel
from ..model.weights import CONFIG_NAME, INDEX_NAME, SHARD_PATTERN, param_dtype
from ..scale.mapped import DTYPES
from .common import helios_inputs, machine, rss_now, rss_peak

GB = 10**9
SAFETENSORS_DTYPE = {dtype: name for name, dtype in DTYPES.items()}
CASES = ("14b", "6-block", "load", "tiny")
CONFIGS = {
    "14b": HeliosConfig(),
    "6-block": HeliosConfig(num_layers=6),
    "tiny": HeliosConfig(num_attention_heads=8, attention_head_dim=64, rope_dim=(24, 20, 20), ffn_dim=2048,
                         text_dim=512, num_layers=12),
}


# -- checkpoints ----------------------------------------------------------------------------------------------------


def weight_specs(cfg: HeliosConfig, dtype: torch.dtype) -> list[tuple[str, tuple, torch.dtype]]:
    """(name, shape, dtype) of every tensor, in model order (a block's tensors together), with the loaders' dtype
    policy (some small modules are stored in fp32, as a bf16 model saved with save_pretrained has them)."""
    with torch.device("meta"):
        model = HeliosTransformer3DModel(cfg)
    return [(name, tuple(t.shape), param_dtype(name, dtype)) for name, t in model.state_dict().items()]


def nbytes(specs) -> int:
    return sum(math.prod(shape) * dtype.itemsize for _, shape, dtype in specs)


def write_random_checkpoint(folder: Path, cfg: HeliosConfig, dtype=torch.bfloat16, shard_bytes: int = 5 * GB,
                            seed: int = 0) -> int:
    """A transformer folder (config.json, shards, index) with random weights; returns the weights' bytes.

    One tensor is in memory at a time. The files are written under temporary names and renamed at the end, so an
    interrupted run leaves no checkpoint that looks whole."""
    folder.mkdir(parents=True, exist_ok=True)
    specs = weight_specs(cfg, dtype)
    shards: list[list] = [[]]
    for spec in specs:
        if shards[-1] and nbytes(shards[-1]) + nbytes([spec]) > shard_bytes:
            shards.append([])
        shards[-1].append(spec)
    names = [SHARD_PATTERN.format(suffix=f"-{i + 1:05d}-of-{len(shards):05d}") for i in range(len(shards))]
    gen = torch.Generator().manual_seed(seed)
    pool = torch.randn(2**22, generator=gen)  # weights are slices of one random pool: generating 14B draws is slow
    for name, shard in zip(names, shards):
        _write_shard(folder / f".{name}.partial", shard, pool, gen)
    index = {"metadata": {"total_size": nbytes(specs)},
             "weight_map": {spec[0]: name for name, shard in zip(names, shards) for spec in shard}}
    config = {"_class_name": "HeliosTransformer3DModel", **cfg.to_dict()}
    (folder / f".{INDEX_NAME}.partial").write_text(json.dumps(index, indent=2, sort_keys=True))
    (folder / f".{CONFIG_NAME}.partial").write_text(json.dumps(config, indent=2, sort_keys=True))
    for name in [*names, INDEX_NAME, CONFIG_NAME]:
        os.replace(folder / f".{name}.partial", folder / name)
    return nbytes(specs)


def _write_shard(path: Path, specs, pool: torch.Tensor, gen: torch.Generator) -> None:
    order = sorted(specs, key=lambda s: -s[2].itemsize)  # wider dtypes first: every tensor starts aligned
    header, offset = {"__metadata__": {"format": "pt"}}, 0
    for name, shape, dtype in order:
        size = math.prod(shape) * dtype.itemsize
        header[name] = {"dtype": SAFETENSORS_DTYPE[dtype], "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(raw)) + raw)
        for name, shape, dtype in order:
            f.write(_random(name, shape, pool, gen).to(dtype).view(torch.uint8).numpy().data)


def _random(name: str, shape: tuple, pool: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Values like tiny.randomize_'s: norm gains near 1, matrices with 1/fan_in variance, small biases and tables."""
    n = math.prod(shape)
    start = int(torch.randint(len(pool), (1,), generator=gen))
    tiled = pool if start + n <= len(pool) else pool.repeat(-(-(start + n) // len(pool)))
    noise = tiled[start : start + n].reshape(shape)
    if "norm" in name and name.endswith("weight") and len(shape) == 1:
        return 1.0 + 0.1 * noise
    if len(shape) >= 2 and not name.endswith("scale_shift_table"):
        return noise * (n // shape[0]) ** -0.5
    return 0.1 * noise


# -- one measurement, in a fresh process ----------------------------------------------------------------------------


def measure(folder: Path, offload: str | None, what: str, dtype: str, data_limit: int | None = None,
            timeout: float | None = None) -> dict:
    """Run `probe` in a new process; with data_limit, under RLIMIT_DATA (a failed allocation, not the OOM killer)."""
    cmd = [sys.executable, "-m", "helios.bench", "memory", "_probe", str(folder), offload or "none", what, dtype]

    def limit():
        resource.setrlimit(resource.RLIMIT_DATA, (data_limit, data_limit))

    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          preexec_fn=limit if data_limit else None)
    if done.returncode != 0:
        tail = " ".join(done.stderr.strip().splitlines()[-3:])[-600:]
        return {"ok": False, "returncode": done.returncode, "seconds": time.perf_counter() - start, "error": tail}
    return {"ok": True, **json.loads(done.stdout.strip().splitlines()[-1])}


def probe(folder: str, offload: str, what: str, dtype: str) -> None:
    """In this process: load (and run one forward); print peak RSS figures (bytes) and seconds as JSON."""
    torch_dtype = getattr(torch, dtype)
    warm_up(offload, torch_dtype)
    base = rss_now()
    start = time.perf_counter()
    model = HeliosTransformer3DModel.from_pretrained(folder, torch_dtype=torch_dtype,
                                                     offload=None if offload == "none" else offload)
    out = {"baseline_rss": base, "load_s": time.perf_counter() - start, "load_peak_rss": rss_peak()}
    if what == "forward":
        layout = SimpleNamespace(height=64, width=64, history_height=None, history_width=None, text_len=64)
        inputs = helios_inputs(model.config, layout, "cpu", torch_dtype)
        out["held_rss"], read = rss_now(), _read_bytes()
        start = time.perf_counter()
        with torch.inference_mode():
            sample = model(**inputs).sample
        out.update(forward_s=time.perf_counter() - start, forward_peak_rss=rss_peak(),
                   forward_disk_read=_read_bytes() - read, finite=bool(torch.isfinite(sample).all()))
    print(json.dumps(out))


def _read_bytes() -> int:
    """Bytes this process has made the kernel read from storage (page-cache hits are not counted)."""
    with open("/proc/self/io") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("read_bytes:"))


def warm_up(offload: str, torch_dtype) -> None:
    """Load and run a tiny model the same way first: the baseline then holds the imports, and the code and
    allocator pages that any first load and forward bring in (about 0.1 GB), which are not the model's memory."""
    from ..pipeline.tiny import TINY_TRANSFORMER

    layout = SimpleNamespace(height=64, width=64, history_height=None, history_width=None, text_len=8)
    with tempfile.TemporaryDirectory() as folder:
        HeliosTransformer3DModel(HeliosConfig(**TINY_TRANSFORMER)).save_pretrained(folder)
        model = HeliosTransformer3DModel.from_pretrained(folder, torch_dtype=torch_dtype,
                                                         offload=None if offload == "none" else offload)
        with torch.inference_mode():
            model(**helios_inputs(model.config, layout, "cpu", torch_dtype))
    del model


# -- the cases ------------------------------------------------------------------------------------------------------


def sizes(cfg: HeliosConfig, dtype) -> dict:
    specs = weight_specs(cfg, dtype)
    block = nbytes([s for s in specs if s[0].startswith("blocks.0.")])
    total = nbytes(specs)
    return {"checkpoint": total, "block": block, "non_block": total - block * cfg.num_layers}


def run_case(case: str, root: Path, free_disk: int) -> dict:
    dtype = torch.float32 if case == "tiny" else torch.bfloat16
    cfg, name = CONFIGS["6-block" if case == "load" else case], "float32" if case == "tiny" else "bfloat16"
    size = sizes(cfg, dtype)
    note = None
    if size["checkpoint"] + GB > free_disk:  # measure the largest that fits, and say so
        layers = max(1, (free_disk - GB - size["non_block"]) // size["block"])
        note = f"{size['checkpoint'] / GB:.1f} GB does not fit on the disk ({free_disk / GB:.1f} GB free): {layers} blocks"
        cfg = HeliosConfig(**{**cfg.to_dict(), "num_layers": int(layers)})
        size = sizes(cfg, dtype)
    folder = root / case
    start = time.perf_counter()
    write_random_checkpoint(folder, cfg, dtype)
    out = {"config": {"num_layers": cfg.num_layers, "width": cfg.inner_dim, "dtype": name}, **size,
           "write_s": time.perf_counter() - start, "note": note}
    try:
        if case == "load":
            out["blocks"] = measure(folder, "blocks", "load", name)
            return out
        out["blocks"] = measure(folder, "blocks", "forward", name)
        if case == "14b":
            out["resident"] = resident_attempt(folder)
        else:
            out["resident"] = measure(folder, None, "forward", name)
        return out
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def resident_attempt(folder: Path, timeout: float = 1200) -> dict:
    """A resident model from a checkpoint larger than the RAM, two ways.

    float32 (a CPU's default dtype) converts every weight into the process's memory: run under a data limit of the
    memory available now less 4 GiB for the other processes, so that it fails with an allocation error instead of
    calling the OOM killer. bfloat16 keeps the weights as the checkpoint's mapped pages (safetensors maps the files):
    a forward then makes the kernel page the whole file through the RAM it can spare; it is timed (with a timeout)
    and its peak RSS and disk reads reported."""
    limit = _meminfo("MemAvailable") - 4 * 2**30
    out = {"mem_total": _meminfo("MemTotal"), "float32_data_limit": limit}
    for dtype, cap in (("float32", limit), ("bfloat16", None)):
        try:
            out[dtype] = measure(folder, None, "forward", dtype, data_limit=cap, timeout=timeout)
        except subprocess.TimeoutExpired:
            out[dtype] = {"ok": False, "error": f"no forward within {timeout:.0f} s"}
    return out


def _meminfo(field: str) -> int:
    with open("/proc/meminfo") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith(field + ":"))


def summary(case: str, r: dict) -> list[str]:
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    lines = [f"{case}: {r['config']['num_layers']} blocks, width {r['config']['width']}, {r['config']['dtype']}, "
             f"checkpoint {gib(r['checkpoint'])} (one block {gib(r['block'])}, non-block {gib(r['non_block'])})"
             + (f" [{r['note']}]" if r.get("note") else "")]
    runs = [("blocks", r.get("blocks")), ("resident", r.get("resident"))]
    if case == "14b":
        runs[1:] = [(f"resident {dtype}", r["resident"][dtype]) for dtype in ("float32", "bfloat16")]
    for label, m in runs:
        if m is None:
            continue
        if not m["ok"]:
            lines.append(f"  {label}: failed ({m['error']})")
        elif "forward_peak_rss" in m:
            peak = m["forward_peak_rss"]
            lines.append(f"  {label}: forward {m['forward_s']:.1f} s, peak RSS {gib(peak)} = "
                         f"{peak / r['checkpoint']:.2f}x checkpoint (above the baseline {gib(m['baseline_rss'])}: "
                         f"{gib(peak - m['baseline_rss'])}), {gib(m['forward_disk_read'])} read from disk; "
                         f"load {m['load_s']:.1f} s")
        else:
            added = m["load_peak_rss"] - m["baseline_rss"]
            lines.append(f"  {label}: load {m['load_s']:.1f} s, peak RSS {gib(m['load_peak_rss'])}, above the "
                         f"baseline {gib(added)} = {added / (r['block'] + r['non_block']):.2f}x (one block + non-block)")
    return lines


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m helios.bench memory", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cases", nargs="+", choices=CASES, default=["6-block", "load", "14b"])
    p.add_argument("--dir", type=Path, help="where to write the checkpoints (default: the system's temporary folder)")
    p.add_argument("--device", help="cuda: a Distilled chunk per offload plan on the GPU instead of the host-memory "
                   "cases (memory_plans.py); cpu with --toy: the same, tiny")
    p.add_argument("--layers", type=int, help="with --device: blocks of the checkpoint (default 40; the issue's: 8)")
    p.add_argument("--toy", action="store_true", help="with --device: a tiny width at 64x128 (a smoke test)")
    p.add_argument("--plans", nargs="+", help="with --device: which plans (default: all of memory_plans.PLANS)")
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["_probe"]:
        return probe(*argv[1:])
    if argv[:1] == ["_plan"]:
        from .memory_plans import probe_plan

        return probe_plan(*argv[1:])
    args = p.parse_args(argv)
    parent = args.dir or Path(tempfile.gettempdir())
    parent.mkdir(parents=True, exist_ok=True)
    if args.device is not None:
        return _device_plans(p, args, parent)
    results = {"machine": machine(), "mem_total": _meminfo("MemTotal")}
    with tempfile.TemporaryDirectory(dir=parent, prefix="helios-memory-") as root:
        for case in args.cases:
            results[case] = run_case(case, Path(root), shutil.disk_usage(root).free)
            print("\n".join(summary(case, results[case])), file=sys.stderr, flush=True)
    print(json.dumps(results, indent=2))


def _device_plans(p: argparse.ArgumentParser, args, parent: Path) -> None:
    from .memory_plans import PLANS, run_plans

    plans = args.plans or list(PLANS)
    if args.device not in ("cuda", "cpu") or (args.device == "cpu" and not args.toy):
        p.error("--device must be cuda, or cpu with --toy")
    if args.layers is not None and args.layers < 1:
        p.error("--layers must be a positive integer")
    if any(plan not in PLANS for plan in plans):
        p.error(f"--plans: choose from {', '.join(PLANS)}")
    results = {"machine": machine(), "mem_total": _meminfo("MemTotal")}
    with tempfile.TemporaryDirectory(dir=parent, prefix="helios-plans-") as root:
        results["plans"] = run_plans(Path(root), args.device, args.layers, args.toy, plans,
                                     write_random_checkpoint)
    print(json.dumps(results, indent=2))
