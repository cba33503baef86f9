"""Prompt schedules for interactive, long videos (spec §2.5).

A prompt is a string or a schedule: a list of (prompt, n_chunks). When the prompt changes, the text embeddings
move from the old prompt to the new one linearly over the first `steps` chunks of the new prompt, with weights
linspace(0, 1, steps) (so with 3 steps: 0, 0.5, 1). Past the end of the schedule the last prompt continues (the
official code falls back to the first prompt there).
"""

from __future__ import annotations

import bisect
from itertools import accumulate

import torch

PromptSchedule = list[tuple[str, int]]


def as_schedule(prompt) -> PromptSchedule:
    """Normalise a prompt (str) or schedule (list of (str, n_chunks)) to a schedule; checks it."""
    if isinstance(prompt, str):
        return [(prompt, 1)]
    if not isinstance(prompt, (list, tuple)) or not prompt:
        raise ValueError(f"prompt must be a string or a non-empty list of (prompt, n_chunks), got {prompt!r}")
    schedule = []
    for j, entry in enumerate(prompt):
        if not (isinstance(entry, (list, tuple)) and len(entry) == 2 and isinstance(entry[0], str)):
            raise ValueError(f"prompt schedule entry {j} must be (prompt, n_chunks), got {entry!r}")
        text, n = entry
        if not isinstance(n, int) or isinstance(n, bool) or n < 1:
            raise ValueError(f"prompt schedule entry {j} ({text[:40]!r}) needs a positive number of chunks, got {n!r}")
        schedule.append((text, n))
    return schedule


def scheduled_chunks(schedule: PromptSchedule) -> int:
    """Chunks the schedule asks for (1 for a plain prompt)."""
    return sum(n for _, n in schedule)


def blend_for_chunk(schedule: PromptSchedule, chunk: int, steps: int) -> tuple[int, int, float]:
    """(a, b, w): chunk `chunk` uses lerp(E_a, E_b, w) of the prompts' text embeddings."""
    ends = list(accumulate(n for _, n in schedule))
    j = min(bisect.bisect_right(ends, chunk), len(schedule) - 1)
    into = chunk - (ends[j - 1] if j else 0)
    if j == 0 or into >= steps - 1:  # weight 1 (and steps = 1): the new prompt exactly, not lerp(a, b, 1.0)
        return j, j, 1.0
    return j - 1, j, into / (steps - 1)


def text_for_chunk(embeddings: torch.Tensor, schedule: PromptSchedule, chunk: int, steps: int) -> torch.Tensor:
    """embeddings [n_prompts, L, D] -> the [1, L, D] text embedding of one chunk."""
    a, b, w = blend_for_chunk(schedule, chunk, steps)
    if a == b:
        return embeddings[b : b + 1]
    return torch.lerp(embeddings[a : a + 1], embeddings[b : b + 1], w)
