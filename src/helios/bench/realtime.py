"""`python -m helios.bench realtime`: is Helios-Distilled real time here? End to end (text encoding, denoise, VAE
decode, frames on the host), ours with each speed option against the reference, in one command.

On a GPU it builds the published shapes with random weights (the 14B transformer, UMT5-XXL, the Wan VAE: nothing
is downloaded) and runs a 240-frame video at 384x640, pyramid (2, 2, 2), the amplified first chunk, after a one-chunk
warm-up per option. On a CPU it runs the same code at toy sizes, so that CI and a developer can check the command.

It prints, per option: frames per second, first-chunk latency (from the call to the first chunk's frames on the host),
seconds per later chunk, peak device memory, compile time, each pyramid stage's forward time and TFLOP/s, and the
option's error against the bf16 eager path (one forward's relative error, the video's PSNR). Then the reference.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import sys
import time
from types import SimpleNamespace

import torch

from ..sampling.options import SamplingOptions
from .builds import SIZES, build
from .common import forward_flops, helios_inputs, machine, timed, token_counts

PROMPT = "a red fox running through fresh snow"
# option -> what it adds, in order: each builds on the pipeline the previous ones left (compile and fp8 change it)
OPTIONS = {
    "eager": "bf16 eager, decode after denoise (the baseline of every error)",
    "overlap": "decode of chunk k while chunk k+1 denoises",
    "compile": "torch.compile of the repeated block, stage shapes compiled first, + overlap",
    "fp8": "fp8 compute (dynamic fp8 activations x fp8 weights) + compile + overlap",
}
STAGE_DIVISORS = (4, 2, 1)  # a pyramid's current latents per stage: 1/4, 1/2, then the full size


def parser() -> argparse.ArgumentParser:
    gpu = torch.cuda.is_available()
    p = argparse.ArgumentParser(prog="python -m helios.bench realtime", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", choices=SIZES, default="14b" if gpu else "toy",
                   help="14b: the published shapes (GPU); toy: the built-in tiny model (default on a CPU)")
    p.add_argument("--height", type=int, help="pixels (default 384, toy 128)")
    p.add_argument("--width", type=int, help="pixels (default 640, toy 192)")
    p.add_argument("--num-frames", type=int, help="frames of the timed video (default 240, toy 66)")
    p.add_argument("--options", default=",".join(OPTIONS) if gpu else "eager,overlap",
                   help=f"comma-separated, run in this order: {', '.join(OPTIONS)} (default: all on a GPU, "
                        "eager,overlap on a CPU)")
    p.add_argument("--compile-mode", default=None, help="torch.compile mode for the compile and fp8 options")
    p.add_argument("--no-reference", action="store_true", help="skip diffusers' pipeline")
    p.add_argument("--forward-runs", type=int, default=3, help="timed forwards per stage shape (median)")
    p.add_argument("--json", help="also write the results to this file")
    return p


def main(argv=None) -> None:
    args = parser().parse_args(argv)
    options = [o for o in args.options.split(",") if o]
    unknown = [o for o in options if o not in OPTIONS]
    if unknown:
        raise SystemExit(f"--options: unknown {', '.join(unknown)}; choose from {', '.join(OPTIONS)}")
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    toy = args.size == "toy"
    opts = SamplingOptions(height=args.height or (128 if toy else 384), width=args.width or (192 if toy else 640),
                           num_frames=args.num_frames or (66 if toy else 240), seed=0,
                           pyramid_num_inference_steps_list=(2, 2, 2), is_amplify_first_chunk=True)
    start = time.perf_counter()
    built = build(args.size, device, dtype, with_reference=not args.no_reference)
    results = {"machine": machine(), "size": args.size, "dtype": str(dtype)[6:], "height": opts.height,
               "width": opts.width, "num_frames": opts.num_frames, "build_s": time.perf_counter() - start,
               "options": {}}
    baseline = None
    for name in options:
        row = run_option(name, built, opts, args, device, baseline)
        results["options"][name] = row
        baseline = baseline or row.pop("_outputs", None)
        row.pop("_outputs", None)
        print(f"{name}: {summary(row)}", file=sys.stderr, flush=True)
        save(results, args.json)  # after each option: a run cut short by a time limit keeps what it measured
    if built.reference is not None:
        results["reference"] = run_reference(built, opts, device, baseline)
        print(f"reference: {summary(results['reference'])}", file=sys.stderr, flush=True)
    results["total_s"] = time.perf_counter() - start
    save(results, args.json)
    print(json.dumps(results, indent=2))
    print(table(results), file=sys.stderr)


def save(results: dict, path: str | None) -> None:
    if path:
        with open(path, "w") as f:
            json.dump(results, f, indent=2)


def run_option(name: str, built, opts, args, device, baseline) -> dict:
    """Prepare the pipeline for one option, time its forwards and a whole video, and measure its error."""
    from . import realtime_options

    pipe = built.ours
    row = {"what": OPTIONS[name]}
    try:
        stream_kwargs, row["setup"] = realtime_options.prepare(name, pipe, opts, args.compile_mode)
    except (ValueError, RuntimeError, NotImplementedError) as err:  # e.g. fp8 compute on a GPU without fp8 cores
        return {**row, "skipped": str(err)}
    row["forward"] = stage_forwards(pipe, opts, args.forward_runs, device)
    row.update(timed_video(pipe, opts, device, stream_kwargs))
    outputs = {"forward": row["forward"].pop("_output"), "frames": row.pop("_frames")}
    if baseline is not None:
        row["error"] = errors(outputs, baseline)
    else:
        row["_outputs"] = outputs
    return row


def stage_forwards(pipe, opts, runs: int, device) -> dict:
    """One transformer forward per pyramid stage shape, with the full memory: median seconds and TFLOP/s."""
    model, cfg = pipe.transformer, pipe.transformer.config
    out = {}
    for divisor in STAGE_DIVISORS:
        layout = SimpleNamespace(height=opts.height // divisor, width=opts.width // divisor, history_height=opts.height,
                                 history_width=opts.width, text_len=512)
        inputs = helios_inputs(cfg, layout, device, model.dtype)
        with torch.inference_mode():
            forward = lambda: model(**inputs, return_dict=False)[0]  # noqa: E731
            result = forward()  # warm-up (and compile, if it was not done before)
            seconds = sorted(timed(forward, device) for _ in range(runs))[runs // 2]
        n_cur, n_hist = token_counts(cfg, inputs)
        out[f"{layout.height}x{layout.width}"] = {
            "tokens": n_cur + n_hist, "seconds": seconds,
            "tflops": forward_flops(cfg, n_cur, n_hist, 512) / seconds / 1e12}
        out["_output"] = result.float().cpu()  # the last, full-size stage's: the error's forward
    return out


def timed_video(pipe, opts, device, stream_kwargs: dict) -> dict:
    """A one-chunk warm-up, then the whole video: FPS, first-chunk latency, later chunks, peak device memory."""
    warm = dataclasses.replace(opts, num_frames=33)
    for _ in pipe.stream(PROMPT, warm, **stream_kwargs):
        pass
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start, stamps, frames = time.perf_counter(), [], []
    for chunk in pipe.stream(PROMPT, opts, **stream_kwargs):
        stamps.append(time.perf_counter() - start)  # the chunk's frames are on the host: float32 CPU tensors
        frames.append(chunk.frames)
    seconds = stamps[-1]
    later = [b - a for a, b in zip(stamps, stamps[1:])]
    frames = torch.cat(frames)
    return {"fps": frames.shape[0] / seconds, "seconds": seconds, "frames": frames.shape[0],
            "first_chunk_s": stamps[0], "later_chunk_s": sum(later) / len(later) if later else None,
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None,
            "_frames": frames}


def run_reference(built, opts, device, baseline) -> dict:
    """diffusers' pipeline on the same modules and seed: its FPS, and its video against our eager one."""
    kwargs = dict(height=opts.height, width=opts.width, guidance_scale=1.0, output_type="pt",
                  pyramid_num_inference_steps_list=list(opts.pyramid_num_inference_steps_list),
                  is_amplify_first_chunk=opts.is_amplify_first_chunk)
    built.reference(PROMPT, num_frames=33, generator=torch.Generator().manual_seed(0), **kwargs)  # warm-up
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    video = built.reference(PROMPT, num_frames=opts.num_frames, generator=torch.Generator().manual_seed(0), **kwargs)
    frames = video.frames[0].permute(0, 2, 3, 1).float().cpu()  # [F, H, W, 3]: on the host, like ours
    seconds = time.perf_counter() - start
    row = {"fps": frames.shape[0] / seconds, "seconds": seconds, "frames": frames.shape[0],
           "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    if baseline is not None and baseline["frames"].shape == frames.shape:
        row["psnr_vs_ours_eager_db"] = psnr(frames, baseline["frames"])
    return row


def errors(outputs: dict, baseline: dict) -> dict:
    a, b = outputs["forward"].double(), baseline["forward"].double()
    return {"forward_rel_err": ((a - b).abs().max() / b.abs().max()).item(),
            "video_psnr_db": psnr(outputs["frames"], baseline["frames"])}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Frames in [0, 1]; inf when equal."""
    mse = (a.double() - b.double()).pow(2).mean().item()
    return math.inf if mse == 0 else 10 * math.log10(1.0 / mse)


def summary(row: dict) -> str:
    if "skipped" in row:
        return f"skipped ({row['skipped']})"
    text = f"{row['fps']:.2f} FPS, {row['seconds']:.1f} s for {row['frames']} frames"
    if row.get("first_chunk_s") is not None:
        text += f", first chunk {row['first_chunk_s']:.2f} s"
    return text


def table(results: dict) -> str:
    """The figures as a markdown table, for docs/benchmarks.md."""
    lines = ["| option | FPS | first chunk s | later chunk s | peak GiB | setup s | full-size forward s (TFLOP/s) "
             "| forward rel. err | video PSNR dB |", "|---|---|---|---|---|---|---|---|---|"]
    for name, row in results["options"].items():
        if "skipped" in row:
            lines.append(f"| {name} | skipped: {row['skipped']} |||||||| ")
            continue
        full = list(row["forward"].values())[-1]
        err = row.get("error", {})
        lines.append(f"| {name} | {row['fps']:.2f} | {row['first_chunk_s']:.2f} | {_num(row['later_chunk_s'])} | "
                     f"{_num(row['peak_gib'])} | {_num(row['setup'].get('seconds'))} | {full['seconds']:.3f} "
                     f"({full['tflops']:.0f}) | {_num(err.get('forward_rel_err'), '.2e')} | "
                     f"{_num(err.get('video_psnr_db'), '.1f')} |")
    ref = results.get("reference")
    if ref:
        lines.append(f"| reference (diffusers 0.42.1) | {ref['fps']:.2f} | | | {_num(ref['peak_gib'])} | | | | "
                     f"{_num(ref.get('psnr_vs_ours_eager_db'), '.1f')} |")
    return "\n".join(lines)


def _num(value, fmt: str = ".2f") -> str:
    return "-" if value is None else format(value, fmt)
