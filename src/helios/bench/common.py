"""What the benchmarks share: the machine's name, the reference, Helios's token layout and its FLOPs, timing and
memory readings. No benchmark command lives here, and this module imports none of them."""

from __future__ import annotations

import os
import platform
import statistics
import time

import torch

from ..model.config import HeliosConfig
from ..model.transformer import HeliosTransformer3DModel
from ..model.weights import param_dtype
from ..sampling.history import History


def reference_module():
    try:
        import diffusers
    except ImportError as err:  # the test extra installs it
        raise SystemExit('the benchmarks compare with diffusers 0.42.1: pip install -e ".[test]"') from err
    return diffusers


def machine() -> str:
    if torch.cuda.is_available():
        return f"{torch.cuda.get_device_name()} (torch {torch.__version__})"
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return f"{cpu}, {torch.get_num_threads()} threads (torch {torch.__version__})"


def transformer_config(args) -> HeliosConfig:
    d = args.head_dim
    spatial = 2 * (d // 6)  # Wan's split of the head dim over (t, y, x): 128 -> (44, 42, 42)
    return HeliosConfig(num_attention_heads=args.heads, attention_head_dim=d, ffn_dim=args.ffn,
                        num_layers=args.layers, text_dim=args.text_dim, rope_dim=(d - 2 * spatial, spatial, spatial))


def helios_inputs(cfg: HeliosConfig, args, device, dtype) -> dict:
    """One denoising forward at Helios's real layout: 9 current latents + the 16/2/1 memory with its indices."""
    g = torch.Generator().manual_seed(0)
    h, w = args.height // 8, args.width // 8
    hh, hw = (args.history_height or args.height) // 8, (args.history_width or args.width) // 8
    memory = History.empty(1, cfg.in_channels, hh, hw)
    memory.append(torch.randn(memory.latents.shape, generator=g))  # a full memory
    memory.anchor = torch.randn(1, cfg.in_channels, 1, hh, hw, generator=g)
    inputs = {**memory.terms(dtype), **memory.indices(9)}
    inputs.update(hidden_states=torch.randn(1, cfg.in_channels, 9, h, w, generator=g).to(dtype),
                  timestep=torch.tensor([500.0]),
                  encoder_hidden_states=torch.randn(1, args.text_len, cfg.text_dim, generator=g).to(dtype))
    return {k: v.to(device) for k, v in inputs.items()}


def token_counts(cfg: HeliosConfig, inputs: dict) -> tuple[int, int]:
    _, _, t, h, w = inputs["hidden_states"].shape
    cur = t * h * w // 4
    hist = 0
    for name, factor in (("short", 1), ("mid", 2), ("long", 4)):
        _, _, ft, fh, fw = inputs[f"latents_history_{name}"].shape
        hist += -(-ft // factor) * -(-fh // (2 * factor)) * -(-fw // (2 * factor))
    return cur, hist


def forward_flops(cfg: HeliosConfig, n_cur: int, n_hist: int, text_len: int) -> float:
    """FLOPs of one forward (docs/design.md §7.2): linear layers, self- and cross-attention; 2 FLOPs per
    multiply-add."""
    n, d, f = n_cur + n_hist, cfg.inner_dim, cfg.ffn_dim
    per_layer = 2 * n * 4 * d * d + 2 * n * 2 * d * f + 2 * n_cur * 2 * d * d + 2 * text_len * 2 * d * d
    per_layer += 4 * n * n * d + 4 * n_cur * text_len * d
    return cfg.num_layers * per_layer


def build_pair(cfg: HeliosConfig, device, dtype):
    """The reference with random weights, and ours holding the same weights."""
    diffusers = reference_module()
    torch.manual_seed(0)
    ref = diffusers.HeliosTransformer3DModel(**cfg.to_dict()).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.normal_(0, 0.02)
    ours = HeliosTransformer3DModel(cfg).eval()
    ours.load_state_dict(ref.state_dict())
    for model in (ref, ours):  # the dtypes from_pretrained(torch_dtype=dtype) gives: some modules stay fp32
        for name, p in model.named_parameters():
            p.data = p.data.to(device, param_dtype(name, dtype))
    return ref, ours


def timed(fn, device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - start


def alternate(fns: dict, runs: int, device) -> dict:
    """Warm each up once, then time A B A B ...; returns name -> list of seconds."""
    for fn in fns.values():
        fn()
    times = {name: [] for name in fns}
    for _ in range(runs):
        for name, fn in fns.items():
            times[name].append(timed(fn, device))
    return times


def compare(times: dict) -> dict:
    """Medians per implementation, their ratio, and the median of the per-pair ratios: each A B pair runs back to
    back, so a pair's ratio is immune to the machine drifting between pairs (shared cores, a VM's page faults)."""
    out = {name: {"median_s": statistics.median(t), "runs_s": t} for name, t in times.items()}
    out["ratio"] = out["ours"]["median_s"] / out["reference"]["median_s"]
    out["pair_ratio_median"] = statistics.median(a / b for a, b in zip(times["ours"], times["reference"]))
    return out


def cuda_peak(fn) -> float:
    torch.cuda.reset_peak_memory_stats()
    fn()
    return torch.cuda.max_memory_allocated() / 2**30


def rss_now() -> int:
    """Current RSS, after resetting the peak (VmHWM) to it, so that rss_peak() measures from here on."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def rss_peak() -> int:
    """This process's peak RSS. Not getrusage's ru_maxrss: that survives fork and exec, so a child started by a
    large parent reports the parent's peak. VmHWM belongs to the process image and starts afresh at exec."""
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))
