"""The speed options of `python -m helios.bench realtime`, each a change to the pipeline made through the library's
own functions (what a user would call), and the stream() arguments that go with it. They run in the order of
realtime.OPTIONS: compile and fp8 change the transformer for the options after them."""

from __future__ import annotations

import time


def prepare(name: str, pipe, opts, compile_mode: str | None) -> tuple[dict, dict]:
    """(stream keyword arguments, what the setup took) for option `name`, applied to `pipe` in place."""
    if name == "eager":
        return {"overlap_decode": False}, {}
    if name == "overlap":
        return {"overlap_decode": True}, {}
    if name == "compile":
        return {"overlap_decode": True}, compile_stages(pipe, opts, compile_mode)
    if name == "fp8":
        from ..scale.quantize import check_scheme, quantize

        check_scheme("fp8-compute", pipe.device)  # refused by name where it cannot run: the option is then skipped
        start = time.perf_counter()
        quantize(pipe.transformer, "fp8-compute")
        setup = {"quantize_s": time.perf_counter() - start}
        return {"overlap_decode": True}, {**setup, **compile_stages(pipe, opts, compile_mode)}
    raise ValueError(f"unknown option {name!r}")


def compile_stages(pipe, opts, mode: str | None) -> dict:
    """Compile the blocks and every pyramid stage's shape before the first chunk; the seconds it took."""
    from ..scale.speed import check_mode, compile_blocks, precompile

    check_mode(mode, pipe.device)
    compile_blocks(pipe.transformer, mode=mode)
    stages = len(opts.pyramid_num_inference_steps_list)
    seconds = precompile(pipe.transformer, (opts.height // 8, opts.width // 8), stages=stages,
                         frames=opts.num_latent_frames_per_chunk)
    return {"seconds": seconds, "mode": mode or "default", "stages": stages}
