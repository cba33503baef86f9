"""Steering a running video: prompt changes that arrive while it is generated, applied at chunk boundaries.

A `Steering` is a mailbox shared by the caller (a server, a UI thread) and the pipeline's stream:
`steering.set(prompt, transition_chunks)` may be called at any time, from any thread; the stream takes the latest
update when it starts its next chunk (the last update wins; one replaced before a boundary never starts). The new
prompt's text is encoded when it arrives (in `set`, once the stream has bound its encoder), so a chunk boundary only
blends tensors.

`PromptTrack` is the plan's prompt schedule extended at chunk boundaries: until the first change the chunks blend
the schedule's prompts (plan.blend); a change at chunk k with N transition chunks gives chunk k + i the text
lerp(T_{k-1}, E_new, (i + 1) / N), where T_{k-1} is the text chunk k - 1 used (a blend itself if a transition was
under way), and exactly E_new from weight 1 on; N = 0 is a hard cut. That is the prompt schedule's linear blend,
started one chunk earlier: a change at chunk k with N >= 1 gives the frames of the schedule [(old, k - 1), (new, ...)]
with interpolation_steps = N + 1, and a hard cut those of [(old, k), (new, ...)] with interpolation_steps = 1.

Every chunk's record (`PromptTrack.record`) says which prompt it moved to, with what weight, and from which change;
the resumable state keeps these records, so a steered run resumes with the same texts.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Callable

import torch

DEFAULT_TRANSITION_CHUNKS = 3  # vLLM-Omni's default


@dataclass(frozen=True)
class PromptChange:
    prompt: str
    transition_chunks: int = DEFAULT_TRANSITION_CHUNKS
    event_id: str | None = None  # the caller's name for this change (the realtime protocol's event_id)


def check_change(prompt, transition_chunks) -> None:
    if not isinstance(prompt, str) or not prompt.strip():
        raise ValueError(f"prompt must be a non-empty string, got {prompt!r}")
    if not isinstance(transition_chunks, int) or isinstance(transition_chunks, bool) or transition_chunks < 0:
        raise ValueError(f"transition_chunks must be an integer >= 0 (0 is a hard cut), got {transition_chunks!r}")


class Steering:
    """Prompt changes for a running stream (see the module docstring). Thread-safe."""

    def __init__(self):
        self._lock = threading.Lock()
        self._pending: tuple[PromptChange, torch.Tensor | None] | None = None
        self._encode: Callable[[str], torch.Tensor] | None = None
        self.superseded: list[PromptChange] = []  # changes replaced before they started

    def set(self, prompt: str, transition_chunks: int = DEFAULT_TRANSITION_CHUNKS,
            event_id: str | None = None) -> PromptChange:
        """Queue a prompt change for the next chunk boundary; it replaces any change still waiting."""
        check_change(prompt, transition_chunks)
        change = PromptChange(prompt, transition_chunks, event_id)
        encode = self._encode
        text = encode(prompt) if encode is not None else None  # outside the lock: encoding takes a while
        with self._lock:
            if self._pending is not None:
                self.superseded.append(self._pending[0])
            self._pending = (change, text)
        return change

    def bind(self, encode: Callable[[str], torch.Tensor]) -> None:
        """Called by the stream: from now on prompts are encoded as they arrive (a waiting one at once)."""
        self._encode = encode
        with self._lock:
            pending = self._pending
        if pending is not None and pending[1] is None:
            text = encode(pending[0].prompt)
            with self._lock:
                if self._pending is pending:
                    self._pending = (pending[0], text)

    def take(self) -> tuple[PromptChange, torch.Tensor | None] | None:
        """The waiting change and its text (None if not encoded yet), or None; the stream calls it at a boundary."""
        with self._lock:
            pending, self._pending = self._pending, None
        return pending


class PromptTrack:
    """The text of every chunk: the plan's schedule, then the changes applied at chunk boundaries."""

    def __init__(self, plan, schedule_texts: torch.Tensor, encode: Callable[[str], torch.Tensor]):
        self.plan, self.schedule_texts, self.encode = plan, schedule_texts, encode  # schedule_texts [n, L, D]
        self.records: list[dict] = []  # one per chunk made so far
        self._change: tuple[PromptChange, int, torch.Tensor, torch.Tensor] | None = None  # change, chunk, source, E
        self._last: torch.Tensor | None = None  # the text of the previous chunk

    def text(self, k: int, change: tuple[PromptChange, torch.Tensor | None] | None = None) -> torch.Tensor:
        """Chunk k's text [1, L, D]; chunks must be asked for in order. `change` starts at this chunk."""
        if change is not None:
            new, encoded = change
            source = self._last if self._last is not None else self._schedule_text(max(k - 1, 0))
            self._change = (new, k, source, encoded if encoded is not None else self.encode(new.prompt))
        if self._change is None:
            a, b, w = self.plan.blend(k)
            text, record = self._schedule_text(k), {"prompt": self.plan.prompts[b], "weight": w, "change": None}
            if a != b:
                record["from"] = self.plan.prompts[a]
        else:
            new, start, source, target = self._change
            n = new.transition_chunks
            w = 1.0 if n == 0 else min(1.0, (k - start + 1) / n)
            text = target if w == 1.0 else torch.lerp(source, target, w)
            record = {"prompt": new.prompt, "weight": w,
                      "change": {"chunk": start, "transition_chunks": n, "event_id": new.event_id}}
        self._last = text
        self.records.append(record)
        return text

    def replay(self, records: list[dict]) -> None:
        """Recompute the texts of the chunks a saved state made (from its records), so that the next chunk
        continues any transition under way exactly."""
        for k, record in enumerate(records):
            change = record.get("change")
            starts = change is not None and change["chunk"] == k
            new = PromptChange(record["prompt"], change["transition_chunks"], change["event_id"]) if starts else None
            self.text(k, (new, None) if starts else None)

    def _schedule_text(self, k: int) -> torch.Tensor:
        a, b, w = self.plan.blend(k)
        if a == b:
            return self.schedule_texts[b : b + 1]
        return torch.lerp(self.schedule_texts[a : a + 1], self.schedule_texts[b : b + 1], w)
