"""Opt-in speed-ups that take a model: torch.compile of the repeated blocks, compiled before the first chunk.

These are functions applied to a model (like gpt-fast's `apply_tp`), not model options, so the model code stays the
reference's math. Their numerical effect is measured in docs/benchmarks.md.

How many graphs. `compile_blocks` torch.compiles every block with the same options. That makes one graph per block
*kind* and stage shape, shared by all 40 blocks, not one graph per block: with dynamo's own counters on torch 2.13
(tests/test_speed.py), 3 blocks x 3 stage sizes make 6 graphs, and a second pass over those sizes makes none.
Dynamo inlines the block (nn.Module inlining is always on in torch 2.13; `inline_inbuilt_nn_modules` is a deprecated
no-op), so a block's parameters are graph inputs and its guards check the block's type and Python attributes (eps,
the flags), never its identity; the compiled code is cached on TransformerBlock.forward's code object, which every
block shares, and the per-block compile wrappers compare equal. The kinds: the last block (last=True) computes only
the current tokens after self-attention, the others all tokens; a LoRA adapter on some blocks only makes those a
kind of their own. The shapes: dynamic=False guards the token counts as constants, so every stage size is its own
graph: the current latents at 1/4, 1/2 and full size in a pyramid sampler (the memory terms always full size), one
size in Base. 3 stages x 2 kinds = 6 graphs per resolution.

So per-block recompiles are not what made the first call slow (178 s for 8 blocks, measured on an H200): that was
the compiler at work inside the first forward (Inductor, and GEMM autotuning in the max-autotune modes); the split
of those seconds was not measured here (no GPU). What made compiling not pay, and is fixed here:
- the compiles happened during generation: each stage of the first chunk stopped for the compiler. `precompile`
  runs one dummy forward per stage size before the first chunk, and returns how long that took;
- dynamo's recompile limit (8 per code object) counts the graphs of all blocks together: a fifth stage size (a
  server's second resolution) hit it, and every block ran eager from then on with one log line as the only sign.
  `compile_blocks` raises it to RECOMPILE_LIMIT.
"""

from __future__ import annotations

import logging
import time

import torch

from ..model.transformer import HeliosTransformer3DModel

# None and "default": Inductor's defaults. "max-autotune-no-cudagraphs": GEMM autotuning, what the official scripts
# use. "reduce-overhead": CUDA graphs (the stage shapes are static), CUDA only.
MODES = (None, "default", "max-autotune-no-cudagraphs", "reduce-overhead")
# 6 graphs per resolution (3 stages x 2 block kinds), more with LoRA on some blocks: room for about 10 resolutions.
RECOMPILE_LIMIT = 64

log = logging.getLogger(__name__)


def check_mode(mode, device) -> str | None:
    """The compile mode, checked before anything is compiled or loaded: a known one, runnable on `device`."""
    if mode not in MODES:
        raise ValueError(f"mode={mode!r}: unknown compile mode, choose one of "
                         f"{', '.join(str(m) for m in MODES)}")
    device = torch.device(device)
    if mode == "reduce-overhead" and device.type != "cuda":
        raise ValueError(f"mode='reduce-overhead' records CUDA graphs and needs a CUDA device; this model is on "
                         f"{device}: use mode=None or 'max-autotune-no-cudagraphs'")
    return None if mode == "default" else mode


def compile_blocks(model: HeliosTransformer3DModel, mode: str | None = None, *,
                   backend="inductor") -> HeliosTransformer3DModel:
    """torch.compile every transformer block in place, one graph per block kind and stage shape (module docstring).

    mode: one of MODES. backend: torch.compile's; another than "inductor" (e.g. "eager", or a CompileCounter to count
    graphs) takes no mode. Call `precompile` next, so that no chunk waits for the compiler.
    """
    mode = check_mode(mode, model.device)
    if backend != "inductor" and mode is not None:
        raise ValueError(f"mode={mode!r} applies to the inductor backend, got backend={backend!r}")
    # Raised, never lowered: the limit counts every block's graphs together (module docstring).
    torch._dynamo.config.recompile_limit = max(torch._dynamo.config.recompile_limit, RECOMPILE_LIMIT)
    # fullgraph: a graph break would split each block into pieces compiled and guarded apart; fail loudly instead
    # (in precompile, before any chunk). dynamic=False: the stage shapes are few and static, as in the official
    # scripts. Streamed blocks (offload="blocks") pass this on to the slots that compute.
    options = {"backend": backend, "dynamic": False, "fullgraph": True} | ({"mode": mode} if mode else {})
    for block in model.blocks:
        block.compile(**options)
    return model


def stage_sizes(latent_size: tuple[int, int], stages: int = 1) -> list[tuple[int, int]]:
    """The current latents' (h, w) at each stage of a pyramid sampler with `stages` stages, smallest first: each stage
    halves the next one's size, the last is `latent_size` (docs/design.md §4.4). One stage: Base."""
    h, w = latent_size
    if not isinstance(stages, int) or stages < 1:
        raise ValueError(f"stages must be a positive int, got {stages!r}")
    scale = 2 ** (stages - 1)
    if h <= 0 or w <= 0 or h % scale or w % scale:
        raise ValueError(f"latent_size={latent_size}: with {stages} stages, height and width must be positive "
                         f"multiples of {scale}")
    return [(h // 2**s, w // 2**s) for s in reversed(range(stages))]


def precompile(model: HeliosTransformer3DModel, latent_size: tuple[int, int], *, stages: int = 1, frames: int = 9,
               memory_frames: tuple[int, int, int] | None = (16, 2, 2), text_len: int = 512) -> float:
    """Run one dummy forward per stage size, so that every graph a generation needs is compiled now; returns seconds.

    latent_size: the full-resolution latent (h, w) (pixels / 8); stages: the sampler's (3 for Mid and Distilled, 1
    for Base); frames: current latent frames per chunk; memory_frames: the (long, mid, short) memory inputs' frames,
    always at full resolution (None: no memory); text_len: the text tokens (max_sequence_length). The values are
    zeros: the graphs depend on shapes, dtypes and the grad mode only.
    """
    cfg, device, dtype = model.config, model.device, model.dtype
    start = time.perf_counter()
    for h, w in stage_sizes(latent_size, stages):
        inputs = _dummy_inputs(cfg, (frames, h, w), latent_size, memory_frames, text_len, device, dtype)
        with torch.inference_mode():  # as the pipeline's chunks run: grad mode is part of the graphs' guards
            model(**inputs)
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    seconds = time.perf_counter() - start
    log.info("compiled the transformer's blocks for %d stage size(s) in %.1f s", stages, seconds)
    return seconds


def _dummy_inputs(cfg, current: tuple[int, int, int], full_hw, memory_frames, text_len: int, device, dtype) -> dict:
    """Forward arguments of the given sizes, with the pipeline's layout: frame indices [memory | current]."""
    frames = current[0]
    inputs = {"hidden_states": torch.zeros(1, cfg.in_channels, *current, device=device, dtype=dtype),
              "timestep": torch.full((1,), 999.0, device=device),
              "encoder_hidden_states": torch.zeros(1, text_len, cfg.text_dim, device=device, dtype=dtype)}
    position = 0
    for name, n in zip(("long", "mid", "short"), memory_frames or ()):
        inputs[f"latents_history_{name}"] = torch.zeros(1, cfg.in_channels, n, *full_hw, device=device, dtype=dtype)
        inputs[f"indices_latents_history_{name}"] = torch.arange(position, position + n)[None]
        position += n
    inputs["indices_hidden_states"] = torch.arange(position, position + frames)[None]
    return inputs
