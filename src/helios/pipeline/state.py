"""Resumable generation: everything needed to continue a video after a chunk, saved to one file.

The state holds the memory (history latents + anchor), the RNG state of the single generator every random draw
comes from, the index of the next chunk, the settings that determine the video (variant, resolved options with
the seed, prompt schedule, negative prompt; the transformer's quantization and LoRA adapters when it has them) and
the prompt each chunk used (steering changes included), so that a run can be continued from the state alone, and
resuming with other settings is refused instead of silently producing a different video. An application keeps its
own settings beside them in `metadata` (the `helios` command: the model, the output file, the video encoding).

The file is a torch.save archive read back with weights_only=True (no code runs on load); the settings, metadata
and prompt records are stored as JSON text in it, so that they need no pickling rules.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..sampling.history import History

# 1: a digest of the settings only (helios 0.1 before resuming from the state alone); 2: the settings themselves.
FORMAT_VERSION = 2


class StateSaveError(OSError):
    """The state could not be written (a full disk, a quota, a vanished folder); the previous state file is intact.
    Its message says so; `errno` is the write's."""

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


@dataclass(frozen=True)
class GenerationState:
    history: History
    rng_state: torch.Tensor  # torch.Generator("cpu").get_state()
    next_chunk: int
    seed: int
    settings: dict  # run_settings(...): what determines the video, as JSON-able values
    metadata: dict = field(default_factory=dict)  # the application's own JSON-able settings, saved with the state
    prompts: tuple[dict, ...] = ()  # per chunk made: the prompt it moved to, its weight, its steering change

    @property
    def schedule(self) -> list[tuple[str, int]]:
        """The run's prompt schedule ([(prompt, 1)] for a plain prompt)."""
        return [(text, n) for text, n in self.settings["schedule"]]

    @property
    def options(self):
        """The run's resolved SamplingOptions, its seed included."""
        from ..sampling.options import SamplingOptions

        return SamplingOptions(**{k: tuple(v) if isinstance(v, list) else v for k, v in self.settings["opts"].items()})

    @property
    def negative_prompt(self) -> str | None:
        return self.settings["negative_prompt"]

    @property
    def quantize(self) -> str | None:
        """The run's quantization of the transformer ("int8", "fp8", "fp8-compute"), or None."""
        return self.settings.get("quantize")

    @property
    def lora(self) -> list[tuple[str, float]]:
        """The run's LoRA adapters: (file, scale), in the order they were loaded."""
        return [(source, scale) for source, scale in self.settings.get("lora", [])]

    def with_metadata(self, **metadata) -> GenerationState:
        return dataclasses.replace(self, metadata={**self.metadata, **metadata})

    def save(self, path: str | os.PathLike) -> None:
        """Write atomically (temp file + rename): a failed or interrupted save leaves the previous state intact.

        The archive is built in memory first, so that a full disk is an OSError of the write (StateSaveError), not
        one of torch's zip-writer messages."""
        path = Path(path)
        payload = {"format": FORMAT_VERSION, "history": self.history.state_dict(), "rng_state": self.rng_state,
                   "next_chunk": self.next_chunk, "seed": self.seed, "settings": json.dumps(self.settings),
                   "metadata": json.dumps(self.metadata), "prompts": json.dumps(list(self.prompts))}
        buffer = io.BytesIO()
        torch.save(payload, buffer)
        tmp = None
        try:
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
            with os.fdopen(fd, "wb") as f:
                f.write(buffer.getbuffer())
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except OSError as err:
            raise StateSaveError(f"cannot save the generation state to {path}: {err.strerror or err} (the previous "
                                 "state, if any, is unchanged)", err.errno) from err
        finally:
            if tmp is not None and Path(tmp).exists():
                Path(tmp).unlink()

    @classmethod
    def load(cls, path: str | os.PathLike, device=None) -> GenerationState:
        """Read a state saved by `save`. Anything else is a ValueError naming the file; torch's own message is not
        passed on (for a foreign file it advises weights_only=False, which would run the file's code)."""
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
        except (FileNotFoundError, IsADirectoryError, PermissionError):
            raise
        except Exception as err:  # pickle/zip errors come in many classes
            raise ValueError(f"{path}: not a helios generation state (not a file that helios saved, or damaged)") \
                from err
        version = payload.get("format") if isinstance(payload, dict) else None
        if not isinstance(version, int) or isinstance(version, bool):
            raise ValueError(f"{path}: not a helios generation state (no format version)")
        if version != FORMAT_VERSION:
            age = "an older" if version < FORMAT_VERSION else "a newer"
            raise ValueError(f"{path}: a generation state of format {version}, saved by {age} version of helios; "
                             f"this one reads format {FORMAT_VERSION}: start the run again")
        try:
            return cls(History.from_state_dict(payload["history"], device), payload["rng_state"],
                       int(payload["next_chunk"]), int(payload["seed"]), json.loads(payload["settings"]),
                       json.loads(payload["metadata"]), tuple(json.loads(payload["prompts"])))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ValueError(f"{path}: a damaged helios generation state ({type(err).__name__}: {err})") from err


def run_settings(variant: str, opts: dict, schedule, negative_prompt: str | None, quantize: str | None = None,
                 lora=()) -> dict:
    """What determines a video, as JSON values (tuples become lists), so that a loaded state compares equal.

    quantize and lora ((file, scale) per adapter, in load order) are the transformer's; they are left out when it
    has none, so a plain run's settings are what they were before they existed (older states resume)."""
    settings = {"variant": variant, "opts": opts, "schedule": [list(entry) for entry in schedule],
                "negative_prompt": negative_prompt}
    if quantize is not None:
        settings["quantize"] = quantize
    if lora:
        settings["lora"] = [[source, scale] for source, scale in lora]
    return json.loads(json.dumps(settings))


def differences(saved: dict, given: dict) -> list[str]:
    """Names of the settings that differ (an option as its name: "seed", "height"; else "prompt schedule", ...)."""
    names = [k for k in sorted(set(saved.get("opts", {})) | set(given.get("opts", {})))
             if saved.get("opts", {}).get(k) != given.get("opts", {}).get(k)]
    labels = {"variant": "model variant", "schedule": "prompt (schedule)", "negative_prompt": "negative prompt",
              "quantize": "quantize", "lora": "LoRA adapters (files, scales)"}
    return names + [label for key, label in labels.items() if saved.get(key) != given.get(key)]

