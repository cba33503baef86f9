"""`python -m helios.bench memory --device cuda`: one Distilled chunk's denoising per plan, timed, on a GPU.

    python -m helios.bench memory --device cuda                  # 40 blocks of the 14B width, 384x640 (H200: < 5 min)
    python -m helios.bench memory --device cuda --layers 8       # the issue's 8-block figures
    python -m helios.bench memory --device cpu --toy             # a tiny width at 64x128: a smoke test (seconds)

A random-weight checkpoint of the 14B config (bf16, tensor by tensor: memory.write_random_checkpoint) is written
once; then each plan runs in a fresh process: load the transformer as the plan loads it, one warm-up forward, then a
Distilled chunk: 3 pyramid stages x 2 steps at their token counts (current latents at 1/4, 1/2 and full height and
width, the full 16/2/1 memory, 512 text tokens). Reported per plan: seconds per chunk (and per forward), the
device's peak allocated memory, the process's peak RSS, and for streamed blocks StreamStats' stages (where the copy
time goes). The text encoder and the VAE are not part of it (fit.py adds their bytes to a plan).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

from ..model.config import HeliosConfig
from ..model.transformer import HeliosTransformer3DModel
from .common import helios_inputs, rss_now, rss_peak

# plan -> (offload, quantize, host_cache)
PLANS = {
    "resident": (None, None, None), "blocks": ("blocks", None, False), "blocks+cache": ("blocks", None, True),
    "int8": (None, "int8", None), "int8+blocks": ("blocks", "int8", "auto"),
}
TOY = dict(num_attention_heads=4, attention_head_dim=64, rope_dim=(24, 20, 20), ffn_dim=1024, text_dim=512)


def run_plans(root: Path, device: str, layers: int | None, toy: bool, plans, write_random_checkpoint) -> dict:
    """Write the checkpoint under `root` (with memory.py's writer), measure every plan in its own process;
    {plan: result}."""
    base = HeliosConfig(**TOY) if toy else HeliosConfig()
    cfg = HeliosConfig(**{**base.to_dict(), "num_layers": layers or (2 if toy else base.num_layers)})
    height, width = (64, 128) if toy else (384, 640)
    folder = root / "plans"
    start = time.perf_counter()
    size = write_random_checkpoint(folder, cfg, torch.bfloat16)
    out = {"config": {"num_layers": cfg.num_layers, "width": cfg.inner_dim, "height_width": [height, width]},
           "checkpoint": size, "write_s": time.perf_counter() - start}
    for plan in plans:
        cmd = [sys.executable, "-m", "helios.bench", "memory", "_plan", str(folder), plan, device, str(height),
               str(width)]
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            out[plan] = {"ok": False, "error": " ".join(done.stderr.strip().splitlines()[-3:])[-600:]}
        else:
            out[plan] = {"ok": True, **json.loads(done.stdout.strip().splitlines()[-1])}
        print(line(plan, out[plan]), file=sys.stderr, flush=True)
    return out


def probe_plan(folder: str, plan: str, device: str, height: str, width: str) -> None:
    """In this process: load as `plan` loads, warm up, time one Distilled chunk; print JSON."""
    from ..scale.block_copies import StreamStats
    from ..scale.quantize import quantize_block
    from ..scale.stream_blocks import load_streamed

    import functools

    offload, quantize, cache = PLANS[plan]
    dev, h, w = torch.device(device), int(height), int(width)
    base = rss_now()
    start = time.perf_counter()
    if offload == "blocks":
        prepare = functools.partial(quantize_block, scheme=quantize) if quantize else None
        model = load_streamed(HeliosTransformer3DModel, Path(folder), torch.bfloat16, dev, prepare_block=prepare,
                              host_cache=cache)
    else:
        model = HeliosTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16, device=dev,
                                                         quantize=quantize)
    out = {"load_s": time.perf_counter() - start, "baseline_rss": base}
    stages = [_inputs(model.config, h, w, s, dev) for s in (4, 2, 1)]
    with torch.inference_mode():
        model(**stages[0])  # warm-up: kernels chosen; with the host cache, the blocks it fills are filled here
        stream = getattr(model, "block_stream", None)
        if stream is not None:
            stream.finish_copies()
            stream.stats = StreamStats()
        _sync(dev)
        if dev.type == "cuda":
            torch.cuda.reset_peak_memory_stats(dev)
        forwards = []
        for inputs in stages:
            for _ in range(2):  # Distilled: 2 DMD steps per pyramid stage
                t = time.perf_counter()
                model(**inputs)
                _sync(dev)
                forwards.append(time.perf_counter() - t)
    out.update(chunk_s=sum(forwards), forward_s=forwards, peak_rss=rss_peak(),
               device_peak=torch.cuda.max_memory_allocated(dev) if dev.type == "cuda" else None,
               host_cache=getattr(stream, "host_cache", None), slots=getattr(stream, "max_slots", None))
    if stream is not None:
        stream.finish_copies()
        out["stats"] = stream.stats.as_dict()
        out["stats_line"] = stream.stats.summary()
    print(json.dumps(out))


def _inputs(cfg, height: int, width: int, shrink: int, device) -> dict:
    """A pyramid stage's forward: current latents `shrink` times smaller, the memory at full size."""
    layout = SimpleNamespace(height=height // shrink, width=width // shrink, history_height=height,
                             history_width=width, text_len=512)
    return helios_inputs(cfg, layout, device, torch.bfloat16)


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def line(plan: str, r: dict) -> str:
    if not r["ok"]:
        return f"  {plan}: failed ({r['error']})"
    peak = f", device peak {r['device_peak'] / 1e9:.2f} GB" if r.get("device_peak") is not None else ""
    text = (f"  {plan}: chunk {r['chunk_s']:.3f} s (forwards " + " ".join(f"{s:.3f}" for s in r["forward_s"])
            + f"){peak}, peak RSS {(r['peak_rss'] - r['baseline_rss']) / 1e9:.2f} GB above the baseline, "
            f"load {r['load_s']:.1f} s")
    if r.get("stats_line"):
        text += f"\n    slots {r['slots']}, host cache {r['host_cache']}: {r['stats_line']}"
    return text
