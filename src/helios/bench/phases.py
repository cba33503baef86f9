"""`python -m helios.bench phases`: where the time of the README's first command goes (ours only, no reference).

The command, `helios generate --model helios-tiny --prompt "a red fox running through fresh snow" --output fox.mp4`,
runs in fresh processes: the whole wall time (imports included) and the generation time its summary reports. One more
run in this process splits the time by phase with the pipeline's on_step events, the ones the progress bar shows.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from collections import defaultdict
from pathlib import Path

from .common import machine

PROMPT = "a red fox running through fresh snow"


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m helios.bench phases",
                                description="the README's first command: its wall time, and its time per phase")
    p.add_argument("--model", default="helios-tiny")
    p.add_argument("--runs", type=int, default=3, help="fresh processes of the whole command (default 3)")
    result = bench_phases(p.parse_args(argv))
    print(json.dumps(result, indent=2))
    wall, generation = result["command_wall_median_s"], result["generation_median_s"]
    print(f"the command: {wall:.1f} s, its generation {generation:.1f} s (medians)", file=sys.stderr)


def bench_phases(args) -> dict:
    runs = [_command(args.model) for _ in range(args.runs)]
    walls, generations = [w for w, _ in runs], [g for _, g in runs]
    return {"machine": machine(), "model": args.model, "command_wall_s": walls, "generation_s": generations,
            "command_wall_median_s": statistics.median(walls), "generation_median_s": statistics.median(generations),
            "phases_s": _phases(args.model)}


def _command(model: str) -> tuple[float, float]:
    """(wall seconds of the whole command, generation seconds from its summary) in a fresh process."""
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "helios", "generate", "--model", model, "--prompt", PROMPT,
                               "--output", str(Path(tmp) / "fox.mp4"), "--json"],
                              capture_output=True, text=True, check=True)
        wall = time.perf_counter() - start
    return wall, json.loads(done.stdout.splitlines()[-1])["seconds"]


def _phases(model: str) -> dict:
    """Seconds per phase of one run in this process (imports excluded). Each event closes the interval since the
    last one: a step's event closes denoising time, a phase's start closes the phase before it."""
    import torch

    from ..pipeline.folder import open_model
    from ..pipeline.generate import HeliosPipeline
    from ..pipeline.video_io import VideoSettings, VideoWriter, to_uint8
    from ..sampling.options import DEFAULT_NEGATIVE_PROMPT, SamplingOptions
    from ..sampling.plan import make_plan

    seconds, current = defaultdict(float), ["build and load", time.perf_counter()]

    def mark(phase: str | None) -> None:
        now = time.perf_counter()
        seconds[current[0]] += now - current[1]
        current[:] = [phase, now]

    with open_model(model) as folder, tempfile.TemporaryDirectory() as tmp:
        plan = make_plan(PROMPT, SamplingOptions(), folder.variant, folder.defaults, patch_size=folder.patch_size)
        pipe = HeliosPipeline.from_pretrained(folder, device="cpu")
        stream = pipe.stream(plan, negative_prompt=DEFAULT_NEGATIVE_PROMPT, on_step=lambda info: mark(info.phase))
        mark("denoise")  # the prompts are encoded: the first chunk starts
        opts = plan.opts
        writer = VideoWriter.create(Path(tmp) / "fox.mp4", VideoSettings(opts.width, opts.height, 24, 18, False))
        for chunk in stream:
            mark("write")
            writer.write(to_uint8(chunk.frames))
            mark("denoise")
        mark("write")
        writer.finish()
        mark(None)
    return {"size": f"{opts.height}x{opts.width}", "chunks": plan.num_chunks, "threads": torch.get_num_threads(),
            **{phase: round(s, 3) for phase, s in seconds.items()}, "total": round(sum(seconds.values()), 3)}
