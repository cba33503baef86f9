"""Resumable generation: everything needed to continue a video after a chunk, saved to one file.

The state holds the memory (history latents + anchor), the RNG state of the single generator every random draw
comes from, the index of the next chunk, and a fingerprint of the settings, so that resuming with other settings
is refused instead of silently producing a different video.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch

from .history import History

FORMAT_VERSION = 1


@dataclass(frozen=True)
class GenerationState:
    history: History
    rng_state: torch.Tensor  # torch.Generator("cpu").get_state()
    next_chunk: int
    seed: int
    fingerprint: str

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temp file + rename): an interrupted save leaves the previous state intact."""
        path = Path(path)
        payload = {"format": FORMAT_VERSION, "history": self.history.state_dict(), "rng_state": self.rng_state,
                   "next_chunk": self.next_chunk, "seed": self.seed, "fingerprint": self.fingerprint}
        fd, tmp = tempfile.mkstemp(dir=path.parent or ".", prefix=f".{path.name}.")
        try:
            with os.fdopen(fd, "wb") as f:
                torch.save(payload, f)
            os.replace(tmp, path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: str | os.PathLike, device=None) -> GenerationState:
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except FileNotFoundError:
            raise
        except Exception as err:  # pickle/zip errors come in many classes
            raise ValueError(f"{path}: not a helios generation state ({err})") from err
        if not isinstance(payload, dict) or payload.get("format") != FORMAT_VERSION:
            raise ValueError(f"{path}: not a helios generation state (format {FORMAT_VERSION})")
        return cls(History.from_state_dict(payload["history"], device), payload["rng_state"],
                   int(payload["next_chunk"]), int(payload["seed"]), str(payload["fingerprint"]))


def fingerprint(**settings) -> str:
    """A short digest of the JSON-able settings that determine a video."""
    text = json.dumps(settings, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:16]
