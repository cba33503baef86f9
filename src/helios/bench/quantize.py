"""`python -m helios.bench quantize`: what int8 / fp8 weight-only quantization costs and saves, against bf16.

- parameter bytes of the whole 14B transformer and of one block, which is what offload="blocks" copies per block
  (built on the meta device: torchao quantizes meta tensors too, so the byte count is exact without the memory);
- the error of one forward against bf16 (max and RMS, relative to the bf16 output), on a tiny and a mid-size model
  with random weights, next to the error of bf16 itself against fp32 for scale;
- CPU time of that forward, resident and with the quantized blocks streamed (offload="blocks");
- a whole tiny video (the distilled pipeline): PSNR of the frames against bf16's;
- peak RSS of from_pretrained(quantize="int8"), resident and with offload="blocks", against a bf16 load, in fresh
  processes.

Random weights are kinder to int8 than trained ones (no outlier rows), so the errors are a floor, not a forecast.
"""

from __future__ import annotations

import argparse
import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

from ..model.config import HeliosConfig
from ..model.transformer import HeliosTransformer3DModel
from ..model.weights import param_dtype
from ..scale.quantize import WEIGHT_ONLY as SCHEMES, parameter_bytes, quantize_block
from .common import machine, rss_now, rss_peak, timed

TINY = dict(num_attention_heads=2, attention_head_dim=16, ffn_dim=64, num_layers=2, text_dim=32, freq_dim=32,
            rope_dim=(4, 6, 6))
# Wan 1.3B's widths (1536, 8960) at 4 layers: a mid-size model whose matmuls are real-sized.
MID = dict(num_attention_heads=12, attention_head_dim=128, ffn_dim=8960, num_layers=4, text_dim=4096,
           rope_dim=(44, 42, 42))


def main(argv=None) -> None:
    if argv and argv[0] == "_qload":  # internal: one load's peak, in a fresh process
        return print(json.dumps(load_peak(argv[1], argv[2])))
    q = argparse.ArgumentParser(prog="python -m helios.bench quantize",
                                description="int8 / fp8 weight-only against bf16: bytes, error, time, PSNR, load peak")
    q.add_argument("--runs", type=int, default=3, help="timed forwards per scheme (default 3)")
    q.add_argument("--frames", type=int, default=9, help="latent frames of the mid-size forward (default 9)")
    q.add_argument("--size", type=int, default=24, help="latent height and width of the mid-size forward (default 24)")
    q.add_argument("--load-layers", type=int, default=8, help="layers of the mid-size checkpoint loaded for the peak")
    print(json.dumps(run(q.parse_args(argv)), indent=2))


def run(args) -> dict:
    return {"machine": machine(), "bytes_14b": bytes_14b(),
            "forward_tiny": forward_errors(HeliosConfig(**TINY), frames=2, size=8, runs=args.runs),
            "forward_mid": forward_errors(HeliosConfig(**MID), frames=args.frames, size=args.size, runs=args.runs),
            "video_tiny": video_psnr(), "load_peak": load_peaks(args.load_layers)}


def bytes_14b() -> dict:
    """Parameter bytes of the published transformer's shape, and of one of its blocks: bf16 as loaded, then quantized
    per scheme."""
    out, block = {}, {}
    for scheme in (None, *SCHEMES):
        with torch.device("meta"):
            model = HeliosTransformer3DModel(HeliosConfig())
        for name, p in model.named_parameters():  # the dtypes from_pretrained(torch_dtype=bf16) gives
            p.data = p.data.to(param_dtype(name, torch.bfloat16))
        for b in model.blocks if scheme else []:
            quantize_block(b, scheme)
        out[scheme or "bf16"], block[scheme or "bf16"] = parameter_bytes(model), parameter_bytes(model.blocks[0])
    return {**out, **{f"{s}_x_bf16": out[s] / out["bf16"] for s in SCHEMES},
            "block": {**block, **{f"{s}_x_bf16": block[s] / block["bf16"] for s in SCHEMES}}}


def forward_errors(cfg: HeliosConfig, frames: int, size: int, runs: int) -> dict:
    """One forward at Helios's layout (current latents + short/mid/long memory), per dtype and scheme."""
    folder = Path(tempfile.mkdtemp(prefix="helios-quant-"))
    try:
        torch.manual_seed(0)
        HeliosTransformer3DModel(cfg).to(torch.bfloat16).save_pretrained(folder)
        inputs = _inputs(cfg, frames, size)
        outputs, seconds = {}, {}
        half = torch.bfloat16
        for name, dtype, scheme, offload in (("fp32", torch.float32, None, None), ("bf16", half, None, None),
                                             ("int8", half, "int8", None), ("fp8", half, "fp8", None),
                                             ("int8_streamed", half, "int8", "blocks")):
            model = HeliosTransformer3DModel.from_pretrained(folder, torch_dtype=dtype, quantize=scheme,
                                                             offload=offload)
            outputs[name], seconds[name] = _timed_forward(model, inputs, runs)
            del model
    finally:
        shutil.rmtree(folder)
    bf16 = outputs["bf16"].float()
    errors = {name: _errors(outputs[name].float(), bf16) for name in ("fp32", "int8", "fp8")}
    return {"config": {k: v for k, v in cfg.to_dict().items() if k in MID}, "tokens": _tokens(frames, size),
            "error_vs_bf16": errors, "cpu_forward_s": seconds,
            "int8_streamed_equals_int8": bool(torch.equal(outputs["int8_streamed"], outputs["int8"])),
            "cpu_time_x_bf16": {name: seconds[name] / seconds["bf16"] for name in ("int8", "fp8", "int8_streamed")}}


def _inputs(cfg: HeliosConfig, frames: int, size: int) -> dict:
    g = torch.Generator().manual_seed(1)
    history = {"short": 2, "mid": 2, "long": 16}
    inputs = {f"latents_history_{n}": torch.randn(1, 16, t, size, size, generator=g) for n, t in history.items()}
    inputs.update(indices_latents_history_long=torch.arange(1, 17)[None], indices_latents_history_mid=
                  torch.tensor([[17, 18]]), indices_latents_history_short=torch.tensor([[0, 19]]),
                  indices_hidden_states=torch.arange(20, 20 + frames)[None],
                  hidden_states=torch.randn(1, 16, frames, size, size, generator=g), timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, 64, cfg.text_dim, generator=g))
    return inputs


def _tokens(frames: int, size: int) -> int:
    side = size // 2
    return frames * side * side + 2 * side * side + math.ceil(side / 2) ** 2 + 4 * math.ceil(side / 4) ** 2


def _timed_forward(model, inputs: dict, runs: int) -> tuple[torch.Tensor, float]:

    out = {}

    def forward():
        with torch.inference_mode():
            out["y"] = model(**inputs).sample

    forward()  # warm-up
    return out["y"], statistics.median(timed(forward, torch.device("cpu")) for _ in range(runs))


def _errors(a: torch.Tensor, ref: torch.Tensor) -> dict:
    return {"max_rel": ((a - ref).abs().max() / ref.abs().max()).item(),
            "rms_rel": ((a - ref).square().mean().sqrt() / ref.square().mean().sqrt()).item()}


def video_psnr() -> dict:
    """A whole tiny distilled video (33 frames, 3 pyramid stages) per scheme; PSNR of the frames against bf16's."""
    from ..pipeline.generate import HeliosPipeline
    from ..pipeline.tiny import build_tiny_model
    from ..sampling.options import SamplingOptions

    root = Path(tempfile.mkdtemp(prefix="helios-quant-video-"))
    try:
        folder = build_tiny_model(root / "distilled", variant="distilled")
        opts = SamplingOptions(height=64, width=128, num_frames=33, seed=0)
        frames = {}
        for name, dtype, scheme in (("fp32", torch.float32, None), ("bf16", torch.bfloat16, None),
                                    ("int8", torch.bfloat16, "int8"), ("fp8", torch.bfloat16, "fp8")):
            pipe = HeliosPipeline.from_pretrained(folder, torch_dtype=dtype, device="cpu", quantize=scheme)
            frames[name] = pipe.generate("a red fox running through fresh snow", opts).frames
    finally:
        shutil.rmtree(root)
    return {f"psnr_db_{name}_vs_bf16": psnr(frames[name], frames["bf16"]) for name in ("fp32", "int8", "fp8")}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """Of frames in [0, 1]."""
    mse = (a.float() - b.float()).square().mean().item()
    return float("inf") if mse == 0 else 10 * math.log10(1 / mse)


def load_peaks(layers: int) -> dict:
    """Peak RSS added by from_pretrained(torch_dtype=bf16), plain and quantized, each in a fresh process."""
    folder = Path(tempfile.mkdtemp(prefix="helios-quant-load-"))
    try:
        torch.manual_seed(0)
        HeliosTransformer3DModel(HeliosConfig(**{**MID, "num_layers": layers})).to(torch.bfloat16).save_pretrained(
            folder, max_shard_size="300MB")
        size = sum(f.stat().st_size for f in folder.glob("*.safetensors"))
        out = {"checkpoint_bytes": size}
        for scheme in ("bf16", "int8", "int8+blocks"):
            cmd = [sys.executable, "-m", "helios.bench", "quantize", "_qload", str(folder), scheme]
            row = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
            out[scheme] = {**row, "peak_added_x_checkpoint": row["peak_added_bytes"] / size}
    finally:
        shutil.rmtree(folder)
    return out


def load_peak(folder: str, scheme: str) -> dict:
    """In a fresh process: load, touch every weight (mmap pages are read lazily), report the peak RSS it added."""

    quantize, _, offload = scheme.partition("+")  # "int8+blocks": quantized blocks held for streaming
    quantize, offload = (None if quantize == "bf16" else quantize), (offload or None)
    with tempfile.TemporaryDirectory() as warm:  # first a tiny load: the imports and caches a first load pays for
        HeliosTransformer3DModel(HeliosConfig(**TINY)).save_pretrained(warm)
        HeliosTransformer3DModel.from_pretrained(warm, torch_dtype=torch.bfloat16, quantize=quantize, offload=offload)
    base = rss_now()
    model = HeliosTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16, quantize=quantize,
                                                     offload=offload)
    with torch.no_grad():
        for p in model.parameters():
            if type(p) in (torch.Tensor, torch.nn.Parameter):  # quantized weights were made in memory already
                p.sum()
    held = [] if offload is None else model.block_stream.checkpoint.blocks  # the quantized blocks in host memory
    return {"peak_added_bytes": rss_peak() - base,
            "parameter_bytes": parameter_bytes(model) + sum(parameter_bytes(b) for b in held)}
