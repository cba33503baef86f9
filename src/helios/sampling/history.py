"""The multi-term memory of one video: recent latents, the anchor frame, and their fixed frame indices.

Every chunk sees the same relative positions (docs/design.md §2.2): with the default sizes (16, 2, 1) and
keep_first_frame, `arange(29)` splits into anchor 0 | long 1..16 | mid 17..18 | last 19 | current 20..28, and the short memory is
[anchor, last frame]. Without keep_first_frame there is no anchor and the short memory is the last two frames.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class History:
    """latents: the last `capacity` latents [B, C, N, h, w] (fp32, zero-padded at the front); anchor [B, C, 1, h, w]."""

    latents: torch.Tensor
    anchor: torch.Tensor | None = None
    sizes: tuple[int, int, int] = (16, 2, 1)  # long, mid, short (the short term's last frames)
    keep_first_frame: bool = True

    @classmethod
    def empty(cls, batch, channels, height, width, sizes=(16, 2, 1), keep_first_frame=True, device=None) -> History:
        sizes = _term_sizes(sizes, keep_first_frame)
        latents = torch.zeros(batch, channels, sum(sizes), height, width, device=device)
        return cls(latents, None, sizes, keep_first_frame)

    @property
    def capacity(self) -> int:
        return sum(self.sizes)

    def append(self, latents: torch.Tensor) -> None:
        """Remember new latents [B, C, T, h, w] (fp32); only the most recent `capacity` frames are kept."""
        self.latents = torch.cat([self.latents, latents.float()], dim=2)[:, :, -self.capacity :]

    def add_chunk(self, latents: torch.Tensor, chunk: int, skip_first_chunk: bool = False) -> None:
        """Remember the clean latents of generated chunk `chunk`, and take the anchor from them when it is due.

        The anchor is the first latent of chunk 0 (unless an input image or video gave one), or of chunk 1 with
        `skip_first_chunk` (when the first chunk came out static). Without keep_first_frame there is no anchor.
        """
        due = (chunk == 0 and self.anchor is None) or (skip_first_chunk and chunk == 1)
        if self.keep_first_frame and due:
            self.anchor = latents[:, :, :1].float()
        self.append(latents)

    def copy(self, device=None) -> History:
        """An independent copy (new tensors), on `device` if given: a snapshot that later chunks cannot change."""
        anchor = None if self.anchor is None else self.anchor.to(device).clone()
        return History(self.latents.to(device).clone(), anchor, self.sizes, self.keep_first_frame)

    def terms(self, dtype: torch.dtype) -> dict[str, torch.Tensor]:
        """The transformer's history inputs: latents_history_{long,mid,short} in `dtype`."""
        long, mid, short = self.latents.split(self.sizes, dim=2)
        if self.keep_first_frame:
            anchor = self.anchor if self.anchor is not None else torch.zeros_like(short[:, :, :1])
            short = torch.cat([anchor.to(short), short], dim=2)
        return {
            "latents_history_long": long.to(dtype),
            "latents_history_mid": mid.to(dtype),
            "latents_history_short": short.to(dtype),
        }

    def indices(self, frames: int, device=None) -> dict[str, torch.Tensor]:
        """Frame indices [1, n] of every term and of `frames` current latents; constant from chunk to chunk."""
        long, mid, short = self.sizes
        first = 1 if self.keep_first_frame else 0
        positions = torch.arange(first + long + mid + short + frames, device=device)
        prefix, pos_long, pos_mid, pos_short, current = positions.split([first, long, mid, short, frames])
        return {
            "indices_hidden_states": current[None],
            "indices_latents_history_long": pos_long[None],
            "indices_latents_history_mid": pos_mid[None],
            "indices_latents_history_short": torch.cat([prefix, pos_short])[None],
        }

    def state_dict(self) -> dict:
        return {"latents": self.latents.cpu(), "anchor": None if self.anchor is None else self.anchor.cpu(),
                "sizes": list(self.sizes), "keep_first_frame": self.keep_first_frame}

    @classmethod
    def from_state_dict(cls, state: dict, device=None) -> History:
        anchor = state["anchor"]
        return cls(state["latents"].to(device), None if anchor is None else anchor.to(device),
                   tuple(state["sizes"]), bool(state["keep_first_frame"]))


def _term_sizes(sizes, keep_first_frame: bool) -> tuple[int, int, int]:
    """Sizes of the buffer split (long, mid, short). Without the anchor the short term takes one more frame.

    The reference adds that frame to the split but not to the buffer and then fails to split 19 frames into
    16 + 2 + 2; we size the buffer to the split.
    """
    sizes = tuple(int(s) for s in sizes)
    if len(sizes) != 3 or any(s < 1 for s in sizes):
        raise ValueError(f"history_sizes must be three positive ints (long, mid, short), got {sizes}")
    long, mid, short = sorted(sizes, reverse=True)  # the reference orders them from big to small
    return (long, mid, short) if keep_first_frame else (long, mid, short + 1)
