"""Model folders: the published layout, read in one place, and the names a model can be given by.

A Helios model folder is laid out like the published repos (BestWishYsh/Helios-Base, -Mid, -Distilled):

    model_index.json                  pipeline class + flags: which sampler (the variant) the weights are for
    scheduler/scheduler_config.json   the sampler's settings
    transformer/                      config.json + safetensors (single file or shards with an index)
    vae/                              the Wan VAE (diffusers AutoencoderKLWan)
    text_encoder/, tokenizer/         UMT5 (transformers)

A model is named by a local folder, a Hugging Face repo id (fetched into, or found in, the hub cache;
HF_HUB_OFFLINE is respected), or a built-in name: a deterministic tiny model with random weights (tiny.py), built in a
temporary folder that lives as long as whoever opened it. Building takes well under a second and gives the same bytes
every time, so it is not cached. The built-in models carry their own defaults (a small size, a short video) so that a
first run on a laptop CPU takes seconds.
"""

from __future__ import annotations

import json
import os
import struct
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from ..model.hub import is_repo_id, resolve_directory

if TYPE_CHECKING:  # imported where used: naming a model must not cost importing torch
    from ..sampling.options import Variant

COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
PIPELINE_CLASSES = ("HeliosPipeline", "HeliosPyramidPipeline")
PUBLISHED = ("BestWishYsh/Helios-Base", "BestWishYsh/Helios-Mid", "BestWishYsh/Helios-Distilled")
WEIGHT_COMPONENTS = ("transformer", "vae", "text_encoder")
_MAX_HEADER = 100 * 2**20  # a safetensors header is JSON; anything bigger is not one


@dataclass(frozen=True)
class BuiltinModel:
    variant: str  # "base" | "mid" | "distilled": the sampler and defaults of that published model
    defaults: dict = field(default_factory=dict)  # SamplingOptions fields that override the variant's defaults


# 128x192 (multiples of 64, as the pyramid needs, near 384x640's shape) and three chunks, so that the memory and
# ETA are at work: about a second per chunk on two CPU cores (docs/benchmarks.md).
_TINY = dict(height=128, width=192, num_frames=99)
BUILTIN_MODELS = {
    "helios-tiny": BuiltinModel("distilled", _TINY),
    "helios-tiny-mid": BuiltinModel("mid", _TINY),
    "helios-tiny-base": BuiltinModel("base", _TINY),
}


@dataclass(frozen=True)
class ModelFolder:
    """A resolved, checked model folder: where it is, how it samples, and its defaults."""

    path: Path
    variant: Variant
    builtin: str | None = None  # the built-in model's name, if it is one

    @property
    def defaults(self) -> dict:
        """SamplingOptions values for every field left unset: the variant's, then a built-in model's own."""
        from ..sampling.options import VARIANT_DEFAULTS

        own = BUILTIN_MODELS[self.builtin].defaults if self.builtin else {}
        return {**VARIANT_DEFAULTS[self.variant.name], **own}

    @property
    def patch_size(self) -> tuple[int, int, int]:
        """The transformer's patch size, from its config.json (the sampler's schedules depend on it). Reading it
        checks the whole config, naming the file and the key of a bad value, before any weight is read."""
        from ..model.config import HeliosConfig

        path = self.component("transformer") / "config.json"
        return HeliosConfig.from_dict(read_json(path), source=str(path)).patch_size

    @property
    def attention_heads(self) -> int:
        """The transformer's attention heads, from its config.json (sequence parallelism splits them)."""
        from ..model.config import HeliosConfig

        path = self.component("transformer") / "config.json"
        return HeliosConfig.from_dict(read_json(path), source=str(path)).num_attention_heads

    def check_weight_files(self) -> None:
        """Check that every safetensors file is whole (its header, and the size that header promises), reading
        no weights: a truncated file fails now, naming itself, not after the components before it have loaded."""
        for name in WEIGHT_COMPONENTS:
            for path in sorted(self.component(name).glob("*.safetensors")):
                safetensors_header(path)

    def component(self, name: str) -> Path:
        """The folder of one component (a name from COMPONENTS)."""
        return self.path / name


def read_folder(path: str | os.PathLike, builtin: str | None = None) -> ModelFolder:
    """Check that `path` holds a whole model folder and read its variant; errors name the missing parts."""
    path = Path(path)
    missing = [c for c in COMPONENTS if not (path / c).is_dir()]
    if not (path / "model_index.json").is_file():
        missing.insert(0, "model_index.json")
    if missing:
        raise FileNotFoundError(f"{path}: not a complete Helios model folder, missing {', '.join(missing)}")
    return ModelFolder(path, read_variant(path), builtin)


def read_variant(folder: Path) -> Variant:
    """How a model folder samples: from model_index.json and scheduler/scheduler_config.json."""
    from ..sampling.options import Variant
    from ..sampling.schedule import SchedulerConfig

    index = read_json(folder / "model_index.json")
    pipeline = index.get("_class_name")
    if pipeline not in PIPELINE_CLASSES:
        raise ValueError(f"{folder / 'model_index.json'}: _class_name must be one of {PIPELINE_CLASSES}, "
                         f"got {pipeline!r}")
    scheduler = SchedulerConfig.from_dict(read_json(folder / "scheduler" / "scheduler_config.json"))
    if pipeline == "HeliosPipeline":
        return Variant("base", scheduler)
    distilled = bool(index.get("is_distilled", False))
    return Variant("distilled" if distilled else "mid", scheduler, bool(index.get("is_cfg_zero_star", False)), distilled)


def check_model_name(name: str) -> None:
    """Fail fast (before loading anything heavy) on a name that is no built-in, folder or repo id."""
    if name in BUILTIN_MODELS or Path(name).expanduser().exists() or is_repo_id(name):
        return
    raise ValueError(
        f"unknown model {name!r}: not a built-in model ({', '.join(BUILTIN_MODELS)}), not an existing folder, "
        f"and not a Hugging Face repo id such as {PUBLISHED[2]}"
    )


@contextmanager
def open_model(name: str | os.PathLike) -> Iterator[ModelFolder]:
    """The checked model folder of a name; a built-in model's temporary folder lives for the `with`."""
    holder, model = open_model_folder(name)
    try:
        yield model
    finally:
        if holder is not None:
            holder.cleanup()


@contextmanager
def model_path(name: str | os.PathLike) -> Iterator[tuple[Path, str | None]]:
    """(folder, built-in name or None) of a name, unchecked (for reporting on incomplete folders)."""
    holder, path, builtin = _locate(name)
    try:
        yield path, builtin
    finally:
        if holder is not None:
            holder.cleanup()


def open_model_folder(name) -> tuple[tempfile.TemporaryDirectory | None, ModelFolder]:
    """(the temporary directory to keep alive, or None; the checked model folder) of a folder, a hub repo id, a
    built-in name, or a ModelFolder."""
    if isinstance(name, ModelFolder):
        return None, name
    holder, path, builtin = _locate(name)
    try:
        return holder, read_folder(path, builtin)
    except BaseException:
        if holder is not None:
            holder.cleanup()
        raise


def _locate(name) -> tuple[tempfile.TemporaryDirectory | None, Path, str | None]:
    name = str(name) if isinstance(name, os.PathLike) else name
    if not isinstance(name, str):
        raise ValueError(f"model must be a folder, a hub repo id or a built-in name, got {type(name).__name__}")
    check_model_name(name)
    if name not in BUILTIN_MODELS:
        return None, resolve_directory(name), None
    from .tiny import build_tiny_model

    holder = tempfile.TemporaryDirectory(prefix=f"{name}-")
    try:
        return holder, build_tiny_model(Path(holder.name) / name, variant=BUILTIN_MODELS[name].variant, seed=0), name
    except BaseException:
        holder.cleanup()
        raise


def noise_notice(name: str) -> str:
    return (f"{name} is a tiny model with random weights, built on the fly so that the command runs anywhere: "
            f"its videos are noise. For real videos use --model {PUBLISHED[2]} (GPU).")


def safetensors_header(path: Path) -> dict:
    """{name: {dtype, shape, data_offsets}} of a safetensors file, after checking that the file is complete."""
    size = path.stat().st_size
    with open(path, "rb") as f:
        length = struct.unpack("<Q", f.read(8))[0] if size >= 8 else -1
        if not 0 < length <= min(_MAX_HEADER, size - 8):
            raise ValueError(f"{path}: not a safetensors file")
        try:
            header = json.loads(f.read(length))
            header.pop("__metadata__", None)
            end = 8 + length + max((info["data_offsets"][1] for info in header.values()), default=0)
        except (ValueError, KeyError, TypeError, IndexError, AttributeError) as err:
            raise ValueError(f"{path}: not a safetensors file (its header: {err!r})") from None
    if size < end:
        raise ValueError(f"{path}: truncated ({size:,} bytes, its header describes {end:,})")
    return header


def read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing (a Helios model folder needs model_index.json and scheduler/)")
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
