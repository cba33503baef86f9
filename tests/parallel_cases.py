"""The cases of tests/test_parallel.py in real processes: `torchrun --nproc-per-node N parallel_cases.py MODELS OUT`.

One launch runs every case (each process pays seconds for its imports, so launches are few). Rank 0 saves each
case's latents to OUT/<case>.pt; every rank writes what it saw to OUT/rank<r>.json (tokens held, text encodes,
decodes, a checksum of its latents, errors). The test computes the single-process results itself, with the same
functions (`generate_case`), and compares.

MODELS holds tiny model folders with 4 attention heads (MODELS/base, mid, distilled).
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from helios import HeliosPipeline, SamplingOptions

STEPS = dict(num_inference_steps=2, pyramid_num_inference_steps_list=(1, 1, 1), is_amplify_first_chunk=False, seed=11)


@dataclass(frozen=True)
class Case:
    variant: str
    cfg_parallel: bool = False
    image: bool = False  # I2V, else T2V
    options: dict = field(default_factory=dict)
    offload: str | None = None  # HeliosPipeline.from_pretrained's

    def opts(self) -> SamplingOptions:
        return SamplingOptions(**{**STEPS, "height": 64, "width": 64, "num_frames": 33, **self.options})


# Token counts that do not divide by 2 or 4: Base at 48x48 has 81 current tokens (9 frames of 3x3 patches) and 18
# short-memory ones; the first pyramid stage of Mid and Distilled at 64x64 has 9 current tokens (9 frames of 1x1).
CASES = {
    "base_cfg_parallel_t2v": Case("base", cfg_parallel=True, options=dict(height=48, width=48)),
    "base_i2v": Case("base", image=True, options=dict(height=48, width=48)),
    "mid_cfg_parallel_t2v": Case("mid", cfg_parallel=True),
    "distilled_t2v_two_chunks": Case("distilled", options=dict(num_frames=66)),
    "distilled_i2v": Case("distilled", image=True),
    # two capabilities that take a model, together: blocks streamed from the checkpoint, and sequence parallelism
    "distilled_t2v_offload_blocks": Case("distilled", offload="blocks"),
}
RESUMED = "distilled_t2v_two_chunks"  # also resumed from its state after chunk 0


def still_image() -> np.ndarray:
    """A deterministic [40, 56, 3] float image in [0, 1] (another size than the video's: it is resized)."""
    y, x = np.mgrid[0:40, 0:56].astype(np.float32)
    return np.stack([y / 39, x / 55, (x + y) / 94], axis=-1)


def load(models: Path, case: Case) -> HeliosPipeline:
    """The case's pipeline. The tests compare latents, so the VAE decode (a second per chunk, the bulk of the time
    here) is replaced by a stand-in that returns black frames and counts its calls (`pipe.vae.decodes`)."""
    pipe = HeliosPipeline.from_pretrained(models / case.variant, torch_dtype=torch.float32, device="cpu",
                                          offload=case.offload)
    vae, calls = pipe.vae, []

    def decode(latents):
        calls.append(latents.shape)
        b, _, t, h, w = latents.shape
        return torch.full((b, 3, 4 * (t - 1) + 1, 8 * h, 8 * w), -1.0)

    vae.decode, vae.decodes = decode, calls
    return pipe


def generate_case(pipe: HeliosPipeline, case: Case, **kwargs):
    media = {"image": still_image()} if case.image else {}
    return pipe.stream("a red fox running through fresh snow", case.opts(), **media, **kwargs)


def main(models: Path, out: Path) -> None:
    import torch.distributed as dist

    from helios.scale.parallel import parallelize, parallelize_pipeline

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    seen: dict = {"cases": {}}
    for name, case in CASES.items():
        pipe = load(models, case)
        parallelize_pipeline(pipe, cfg_parallel=case.cfg_parallel)
        encodes = _count(pipe.text_encoder.encoder, "encode")
        chunks = list(generate_case(pipe, case))
        latents = torch.cat([c.latents for c in chunks], dim=2)
        if rank == 0:
            torch.save(latents, out / f"{name}.pt")
        seen["cases"][name] = {
            "text_encodes": encodes(), "decodes": len(pipe.vae.vae.decodes),
            "frames": [c.frames.shape[0] for c in chunks],
            "text_encoder_kept": pipe.text_encoder.encoder is not None,
            "text_encoder_moved": "text_encoder" in getattr(pipe.placement, "offloaded", ()),  # offload's to move
            "tokens_held": list(pipe.transformer.placement.local_lengths),
            "checksum": float(latents.double().sum()), "bytes": latents.numpy().tobytes().hex()[:64],
        }
        if name == RESUMED:
            seen["resumed"] = _resume(pipe, case, out, rank)
    seen["heads_error"] = _heads_error(models, world, parallelize)
    seen["forwards"] = _forwards(parallelize)
    (out / f"rank{rank}.json").write_text(json.dumps(seen))
    dist.barrier()  # leave together (see helios.scale.launch.leave_together)
    dist.destroy_process_group()


def _resume(pipe, case: Case, out: Path, rank: int) -> str:
    """Rank 0 saves the state after chunk 0; every rank loads it and generates the rest."""
    import torch.distributed as dist

    first = next(generate_case(pipe, case))
    if rank == 0:
        first.state.save(out / "after_chunk0.state")
    dist.barrier()
    rest = list(generate_case(pipe, case, resume=out / "after_chunk0.state"))
    if rank == 0:
        torch.save(torch.cat([c.latents for c in rest], dim=2), out / "resumed.pt")
    return f"{len(rest)} chunks from chunk {rest[0].index}"


def _forwards(parallelize) -> dict:
    """One forward per token layout of tests/helpers.py (memory terms present or not, padded grids, pyramid stage 0),
    batch 2 with different positions per sample, history-key amplification per head: the parallel model's output
    against the plain model's, on every rank; and how many tokens of each part this rank held."""
    from helpers import LAYOUTS, make_inputs, randomize_, rel_err, tiny_config

    from helios import HeliosTransformer3DModel

    config = tiny_config(num_attention_heads=4, is_amplify_history=True)
    torch.manual_seed(0)  # the same weights on every rank: the constructor draws from the global generator
    plain = randomize_(HeliosTransformer3DModel(**config).eval(), seed=1)
    par = HeliosTransformer3DModel(**config).eval()
    par.load_state_dict(plain.state_dict())
    parallelize(par)
    lengths, split = [], plain.placement.split
    plain.placement.split = lambda parts, *args: (lengths.append([p.shape[1] for p in parts]), split(parts, *args))[1]
    results = {}
    with torch.inference_mode():
        for name in LAYOUTS:
            inputs = make_inputs(config, name, batch=2, seed=3)
            expected, got = plain(**inputs).sample, par(**inputs).sample
            results[name] = {"rel_err": rel_err(got, expected), "lengths": lengths[-1],
                             "held": list(par.placement.local_lengths)}
    return results


def _heads_error(models: Path, world: int, parallelize) -> str:
    """The error for a model whose heads do not divide by the process count (world + 1 heads)."""
    from helios import HeliosTransformer3DModel
    from helios.model.config import HeliosConfig

    config = json.loads((models / "distilled" / "transformer" / "config.json").read_text())
    keys = {k: v for k, v in config.items() if not k.startswith("_")}
    model = HeliosTransformer3DModel(HeliosConfig.from_dict({**keys, "num_attention_heads": world + 1}))
    try:
        parallelize(model)
    except ValueError as err:
        return str(err)
    return "no error"


def _count(obj, method: str):
    """Count calls of obj.method (on ranks that have no such object, none)."""
    calls = [0]
    if obj is not None:
        original = getattr(obj, method)

        def counted(*args, **kwargs):
            calls[0] += 1
            return original(*args, **kwargs)

        setattr(obj, method, counted)
    return lambda: calls[0]


if __name__ == "__main__":
    main(Path(sys.argv[1]), Path(sys.argv[2]))
