"""Opt-in speed-ups that take a model: compiling the repeated blocks.

These are functions applied to a model (like gpt-fast's `apply_tp`), not model options, so the model code stays the
reference's math. Their numerical effect is measured in docs/benchmarks.md.
"""

from __future__ import annotations

from ..model.transformer import HeliosTransformer3DModel


def compile_blocks(model: HeliosTransformer3DModel, mode: str | None = None) -> HeliosTransformer3DModel:
    """torch.compile each transformer block in place (the blocks are identical, so one compiled graph serves all).

    Shapes are static within a pyramid stage; `dynamic=False` specialises per stage resolution, which is what the
    official scripts do ("max-autotune-no-cudagraphs", dynamic=False).
    """
    for block in model.blocks:
        block.compile(mode=mode, dynamic=False)
    return model
