"""Side-by-side benchmarks against the reference (diffusers 0.42.1): transformer forward, whole pipeline, loading.

    python -m helios.bench transformer [--height 192 --width 320 --layers 4 ...]
    python -m helios.bench pipeline [--variant base]
    python -m helios.bench load [--layers 6]
    python -m helios.bench memory [--cases ...]     (offload="blocks" vs resident host memory: see memory.py)
    python -m helios.bench phases [--model helios-tiny]   (ours only: the README's first command, phase by phase)
    python -m helios.bench parallel [--processes 1 2 4]   (helios/bench/parallel.py: no reference involved)
    python -m helios.bench quantize   (int8 / fp8 against bf16: ours only, see bench/quantize.py)

The reference is the oracle of the test suite (`pip install -e ".[test]"`); this module is the only one of the
package that imports it, for comparison. Runs alternate A B A B and report medians and the ratio ours / reference.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from ..model.config import HeliosConfig
from ..model.transformer import HeliosTransformer3DModel
from .common import (
    alternate,
    build_pair,
    compare,
    cuda_peak,
    forward_flops,
    helios_inputs,
    machine,
    reference_module,
    rss_now,
    rss_peak,
    token_counts,
    transformer_config,
)

# -- transformer ----------------------------------------------------------------------------------------------------


def bench_transformer(args) -> dict:
    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    cfg = transformer_config(args)
    ref, ours = build_pair(cfg, device, dtype)
    if args.compile:
        from ..scale.speed import compile_blocks

        compile_blocks(ours)
    inputs = helios_inputs(cfg, args, device, dtype)
    n_cur, n_hist = token_counts(cfg, inputs)
    results = {}

    def run(model, name):
        def fn():
            with torch.inference_mode():
                results[name] = model(**inputs).sample
        return fn

    fns = {"ours": run(ours, "ours"), "reference": run(ref, "reference")}
    times = alternate(fns, args.runs, device)
    out = {"machine": machine(), "config": cfg.to_dict(), "dtype": args.dtype, "compile": args.compile,
           "tokens": {"current": n_cur, "history": n_hist, "text": args.text_len}}
    out.update(compare(times))
    flops = forward_flops(cfg, n_cur, n_hist, args.text_len)
    for name in times:
        out[name]["tflops"] = flops / out[name]["median_s"] / 1e12
        if device.type == "cuda":
            out[name]["peak_gib"] = cuda_peak(fns[name])
    a, b = results["ours"].float(), results["reference"].float()
    out["max_rel_diff"] = ((a - b).abs().max() / b.abs().max()).item()
    if device.type == "cpu" and args.memory:
        out.update(cpu_forward_peaks(args))
    if args.profile:
        # Of three profiled forwards each, the one with the median total.
        out["profile"] = {name: sorted((time_by_kind(fn, device) for _ in range(3)), key=lambda p: p["total_s"])[1]
                          for name, fn in fns.items()}
        kernels = out["profile"]["ours"]["matmul_s"] + out["profile"]["ours"]["attention_s"]
        out["profile"]["floor_ratio"] = kernels / out["profile"]["reference"]["total_s"]
    return out


MATMUL_OPS = {"aten::addmm", "aten::mm", "aten::bmm", "aten::baddbmm", "mkldnn::_linear_pointwise"}


def time_by_kind(fn, device) -> dict:
    """A profiled forward, its time split into matrix multiplies, attention kernels and everything else.

    Our matmul plus attention time over the reference's total is the ratio we would reach if every other operation
    cost nothing: the floor of an exact-math forward with these kernels (`floor_ratio`).
    """
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]
                                + ([torch.profiler.ProfilerActivity.CUDA] if device.type == "cuda" else [])) as prof:
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
    events = prof.key_averages()

    def seconds(e) -> float:  # leaf operators: their own CPU time, or on CUDA the time of the kernels they launch
        return (e.device_time_total if device.type == "cuda" else e.self_cpu_time_total) / 1e6

    matmul = sum(seconds(e) for e in events if e.key in MATMUL_OPS)
    attention = sum(seconds(e) for e in events if e.key.startswith("aten::_scaled_dot_product_"))
    total = sum((e.self_device_time_total if device.type == "cuda" else e.self_cpu_time_total) for e in events) / 1e6
    return {"matmul_s": matmul, "attention_s": attention, "other_s": total - matmul - attention, "total_s": total}


def cpu_forward_peaks(args) -> dict:
    """Peak RSS added by one forward, each implementation in its own process (RSS peaks can't be told apart in one)."""
    peaks = {}
    for impl in ("ours", "reference"):
        cmd = [sys.executable, "-m", "helios.bench", *args.argv, "--peak-of", impl]
        result = subprocess.run(cmd, capture_output=True, text=True, check=True)
        peaks[impl] = json.loads(result.stdout.strip().splitlines()[-1])["forward_peak_gib"]
    return {"cpu_forward_peak_gib": peaks}


def forward_peak(args) -> None:
    device, dtype = torch.device("cpu"), getattr(torch, args.dtype)
    cfg = transformer_config(args)
    ref, ours = build_pair(cfg, device, dtype)
    model = ours if args.peak_of == "ours" else ref
    inputs = helios_inputs(cfg, args, device, dtype)
    base = rss_now()
    with torch.inference_mode():
        model(**inputs)
    print(json.dumps({"forward_peak_gib": (rss_peak() - base) / 2**30}))


# -- pipeline -------------------------------------------------------------------------------------------------------


def bench_pipeline(args) -> dict:
    from ..pipeline.generate import HeliosPipeline
    from ..pipeline.tiny import build_tiny_model
    from ..sampling.options import SamplingOptions

    diffusers = reference_module()
    root = Path(tempfile.mkdtemp(prefix="helios-bench-"))
    folder = build_tiny_model(root / args.variant, variant=args.variant)
    if args.variant != "base":  # the reference's fp32 Cholesky of the gamma = 1/3 block covariance fails on CPU
        cfg_path = folder / "scheduler" / "scheduler_config.json"
        cfg_path.write_text(json.dumps({**json.loads(cfg_path.read_text()), "gamma": 0.25}))
    ours = HeliosPipeline.from_pretrained(folder, torch_dtype=torch.float32, device=args.device)
    ref_cls = diffusers.HeliosPipeline if args.variant == "base" else diffusers.HeliosPyramidPipeline
    ref = ref_cls.from_pretrained(folder).to(args.device)
    ref.set_progress_bar_config(disable=True)
    ref.transformer.register_forward_hook(lambda m, a, out: tuple(o.contiguous() for o in out))
    steps = dict(num_inference_steps=args.steps) if args.variant == "base" else dict(
        pyramid_num_inference_steps_list=[args.steps] * 3)
    guidance = args.guidance if args.guidance is not None else (1.0 if args.variant == "distilled" else 5.0)
    shared = dict(height=args.height, width=args.width, num_frames=args.num_frames, guidance_scale=guidance)
    opts = SamplingOptions(seed=0, is_amplify_first_chunk=False, **shared,
                           **{k: tuple(v) if isinstance(v, list) else v for k, v in steps.items()})
    results = {}

    def run_ours():
        results["ours"] = ours.generate(args.prompt, opts).frames

    def run_ref():
        frames = ref(args.prompt, **shared, **steps, generator=torch.Generator().manual_seed(0), output_type="np")
        results["reference"] = torch.from_numpy(frames.frames[0])

    times = alternate({"ours": run_ours, "reference": run_ref}, args.runs, torch.device(args.device))
    out = {"machine": machine(), "variant": args.variant, "settings": {**shared, **steps}}
    out.update(compare(times))
    out["max_abs_frame_diff"] = (results["ours"] - results["reference"]).abs().max().item()
    shutil.rmtree(root)
    return out


# -- loading --------------------------------------------------------------------------------------------------------


def bench_load(args) -> dict:
    folder = Path(tempfile.mkdtemp(prefix="helios-load-"))
    cfg = HeliosConfig(num_attention_heads=args.heads, attention_head_dim=128, ffn_dim=args.ffn, num_layers=args.layers)
    torch.manual_seed(0)
    HeliosTransformer3DModel(cfg).to(torch.bfloat16).save_pretrained(folder, max_shard_size=args.shard_size)
    size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
    os.sync()  # written, not dirty, pages: what a downloaded checkpoint looks like
    runs = {"ours": [], "reference": []}
    for _ in range(args.runs):
        for impl in runs:
            cmd = [sys.executable, "-m", "helios.bench", "_load", impl, str(folder)]
            runs[impl].append(json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout))
    out = {"machine": machine(), "checkpoint_gib": size / 2**30, "shards": len(list(folder.glob("*.safetensors")))}
    for impl, rows in runs.items():
        out[impl] = {key: statistics.median(r[key] for r in rows) for key in rows[0]}
        out[impl]["peak_added_x_checkpoint"] = out[impl].pop("peak_added_bytes") / size
    out["load_ratio"] = out["ours"]["load_and_read_s"] / out["reference"]["load_and_read_s"]
    shutil.rmtree(folder)
    return out


def load_once(impl: str, folder: str) -> None:
    """In a fresh process: load with torch_dtype=bf16, read every weight once (mmap pages are faulted in lazily).

    Both processes first import the same modules (diffusers, and the torch internals a first meta-device op
    imports, about 2 s once per process), so that the timing is the loading, not the imports.
    """
    diffusers = reference_module()
    with torch.device("meta"):
        torch.nn.Linear(2, 2)
    cls = HeliosTransformer3DModel if impl == "ours" else diffusers.HeliosTransformer3DModel
    base = rss_now()
    start = time.perf_counter()
    model = cls.from_pretrained(folder, torch_dtype=torch.bfloat16)
    loaded = time.perf_counter() - start
    with torch.no_grad():
        for p in model.parameters():
            p.sum()
    used = time.perf_counter() - start
    print(json.dumps({"load_s": loaded, "load_and_read_s": used, "peak_added_bytes": rss_peak() - base}))


# -- command line ---------------------------------------------------------------------------------------------------


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m helios.bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    t = sub.add_parser("transformer", help="one forward at Helios's token layout, ours vs the reference")
    t.add_argument("--height", type=int, default=192, help="pixels of the current chunk (default 192)")
    t.add_argument("--width", type=int, default=320)
    t.add_argument("--history-height", type=int, help="pixels of the memory (default: --height; pyramid stages "
                   "run the current chunk at 1/2 or 1/4 of the memory's size)")
    t.add_argument("--history-width", type=int)
    t.add_argument("--layers", type=int, default=4)
    t.add_argument("--heads", type=int, default=12)
    t.add_argument("--head-dim", type=int, default=64)
    t.add_argument("--ffn", type=int, default=3072)
    t.add_argument("--text-dim", type=int, default=4096)
    t.add_argument("--text-len", type=int, default=512)
    t.add_argument("--runs", type=int, default=5)
    t.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    t.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    t.add_argument("--compile", action="store_true", help="torch.compile our repeated blocks")
    t.add_argument("--memory", action="store_true", help="CPU: also measure each forward's peak RSS (subprocesses)")
    t.add_argument("--profile", action="store_true", help="also split a profiled forward (median of 3) into "
                   "matmul, attention and other time, and report the floor ratio")
    t.add_argument("--peak-of", choices=["ours", "reference"], help=argparse.SUPPRESS)  # internal: --memory
    pl = sub.add_parser("pipeline", help="a whole tiny generation, ours vs the reference pipeline")
    pl.add_argument("--variant", default="base", choices=["base", "mid", "distilled"])
    pl.add_argument("--height", type=int, default=64)
    pl.add_argument("--width", type=int, default=128)
    pl.add_argument("--num-frames", type=int, default=66)
    pl.add_argument("--steps", type=int, default=4)
    pl.add_argument("--guidance", type=float, help="default: 1 for distilled (it samples without CFG), else 5")
    pl.add_argument("--prompt", default="a red fox runs through fresh snow")
    pl.add_argument("--runs", type=int, default=3)
    pl.add_argument("--device", default="cpu")
    lo = sub.add_parser("load", help="from_pretrained(torch_dtype=bf16) of a sharded bf16 checkpoint: peak RSS, time")
    lo.add_argument("--layers", type=int, default=6)
    lo.add_argument("--heads", type=int, default=16)
    lo.add_argument("--ffn", type=int, default=8192)
    lo.add_argument("--shard-size", default="300MB")
    lo.add_argument("--runs", type=int, default=3)
    ld = sub.add_parser("_load", add_help=False)
    ld.add_argument("impl")
    ld.add_argument("folder")
    return p


def main(argv=None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    args = parser().parse_args(argv)
    args.argv = argv
    if getattr(args, "peak_of", None):
        return forward_peak(args)
    if args.command == "_load":
        return load_once(args.impl, args.folder)
    result = {"transformer": bench_transformer, "pipeline": bench_pipeline, "load": bench_load}[args.command](args)
    print(json.dumps(result, indent=2))
    summary = result.get("ratio", result.get("load_ratio"))
    pairs = f" (median of per-pair ratios {result['pair_ratio_median']:.3f})" if "pair_ratio_median" in result else ""
    print(f"ratio ours / reference: {summary:.3f}{pairs}", file=sys.stderr)

