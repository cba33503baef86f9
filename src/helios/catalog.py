"""The models the `helios` command accepts by name: built-in tiny models, local folders and Hugging Face repos.

A built-in model is a deterministic tiny random model (tiny.py) written to a temporary folder for the duration of the
command. It is not cached: building takes well under a second (less than importing torch), the bytes are the same
every time, and a cache would only add a stale-files problem (a cache written by an older tiny.py) and files in the
user's home directory. The built-in models carry their own defaults (a small size and a short video) so that a
first run on a laptop CPU takes seconds.
"""

from __future__ import annotations

import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator


@dataclass(frozen=True)
class BuiltinModel:
    variant: str  # "base" | "mid" | "distilled": the sampler and defaults of that published model
    defaults: dict = field(default_factory=dict)  # SamplingOptions fields that override the variant's defaults


# 192x320 (a half-size 384x640) and three chunks: a few seconds per chunk on two CPU cores.
_TINY = dict(height=192, width=320, num_frames=99)
BUILTIN_MODELS = {
    "helios-tiny": BuiltinModel("distilled", _TINY),
    "helios-tiny-mid": BuiltinModel("mid", _TINY),
    "helios-tiny-base": BuiltinModel("base", _TINY),
}
PUBLISHED = ("BestWishYsh/Helios-Base", "BestWishYsh/Helios-Mid", "BestWishYsh/Helios-Distilled")


def noise_notice(name: str) -> str:
    return (f"{name} is a tiny model with random weights, built on the fly so that the command runs anywhere: "
            f"its videos are noise. For real videos use --model {PUBLISHED[2]} (GPU).")


def check_model_name(name: str) -> None:
    """Fail fast (before loading anything heavy) on a name that is no built-in, folder or repo id."""
    from .weights import REPO_ID

    if name in BUILTIN_MODELS or Path(name).expanduser().exists() or REPO_ID.match(name):
        return
    raise ValueError(
        f"unknown model {name!r}: not a built-in model ({', '.join(BUILTIN_MODELS)}), not an existing folder, "
        f"and not a Hugging Face repo id such as {PUBLISHED[2]}"
    )


@contextmanager
def model_folder(name: str) -> Iterator[tuple[Path, BuiltinModel | None]]:
    """(folder, built-in entry or None) for a --model argument; a built-in model's folder lives for the `with`."""
    check_model_name(name)
    builtin = BUILTIN_MODELS.get(name)
    if builtin is None:
        from .weights import resolve_directory  # a repo id is fetched (or found in the cache) here

        yield resolve_directory(name), None
        return
    from .tiny import build_tiny_model

    with tempfile.TemporaryDirectory(prefix=f"{name}-") as tmp:
        yield build_tiny_model(Path(tmp) / name, variant=builtin.variant, seed=0), builtin
