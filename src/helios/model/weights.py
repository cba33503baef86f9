"""Checkpoint IO for the transformer, in the diffusers layout the published repos use.

A transformer folder holds `config.json` and either `diffusion_pytorch_model.safetensors` or shards named in
`diffusion_pytorch_model.safetensors.index.json`. Loading builds the model on the meta device and assigns each tensor
read from the memory-mapped files, so no second full copy of the weights is ever held. Loading is strict.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from .config import HeliosConfig

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "diffusion_pytorch_model.safetensors"
INDEX_NAME = WEIGHTS_NAME + ".index.json"
SHARD_PATTERN = "diffusion_pytorch_model{suffix}.safetensors"

# Modules the reference keeps in fp32 whatever torch_dtype is asked for (matched on whole dotted name components).
KEEP_FP32 = frozenset({"time_embedder", "scale_shift_table", "norm1", "norm2", "norm3", "history_key_scale"})
# Keys the reference skips when present in a checkpoint (Wan image-to-video leftovers). We skip them too, loudly.
IGNORED_KEYS = re.compile(r"norm_added_q")


def param_dtype(name: str, torch_dtype: torch.dtype) -> torch.dtype:
    """The dtype parameter `name` gets when loading with torch_dtype (the reference's policy)."""
    return torch.float32 if KEEP_FP32.intersection(name.split(".")) else torch_dtype


def read_config(directory: Path) -> HeliosConfig:
    path = directory / CONFIG_NAME
    if not path.is_file():
        raise FileNotFoundError(f"{path}: missing transformer config")
    try:
        values = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{path}: not valid JSON ({err})") from err
    return HeliosConfig.from_dict(values, source=str(path))


def weight_files(directory: Path) -> dict[Path, list[str] | None]:
    """Weight files of a folder -> the keys the index assigns to each (None for a single unindexed file)."""
    index = directory / INDEX_NAME
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError) as err:
            raise ValueError(f"{index}: not a valid safetensors index ({err!r})") from err
        files: dict[Path, list[str]] = {}
        for key, name in weight_map.items():
            files.setdefault(directory / name, []).append(key)
        missing = [str(f) for f in files if not f.is_file()]
        if missing:
            raise FileNotFoundError(f"{index} lists shards that do not exist: {missing}")
        return files
    single = directory / WEIGHTS_NAME
    if single.is_file():
        return {single: None}
    raise FileNotFoundError(f"{directory}: no {WEIGHTS_NAME} and no {INDEX_NAME}")


def load_transformer(model_class, directory: Path, torch_dtype=None, device="cpu", prepare_block=None):
    """Build `model_class(config)` on the meta device and assign the checkpoint's tensors to it, strictly.

    prepare_block(block), if given, is called on each block right after its weights are assigned (quantization
    replaces them): the blocks are then read one at a time, so that at most one block's checkpoint weights are in
    memory besides what prepare_block made of the others."""
    config = read_config(directory)
    with torch.device("meta"):
        model = model_class(config)
    expected = {name: tuple(p.shape) for name, p in model.state_dict().items()}
    found = index_checkpoint(weight_files(directory), expected)
    torch_dtype = torch_dtype or torch.float32
    if prepare_block is None:
        model.load_state_dict(read_tensors(found, expected, torch_dtype, device), strict=True, assign=True)
    else:
        _load_block_by_block(model, lambda prefix: read_tensors(found, expected, torch_dtype, device, prefix),
                             prepare_block)
    return model.eval()


def _load_block_by_block(model, read, prepare_block) -> None:
    """read(prefix): the tensors under "blocks.<i>." (named without it), or under no block for prefix ""."""
    missing = model.load_state_dict(read(""), strict=False, assign=True).missing_keys
    assert all(k.startswith("blocks.") for k in missing), missing  # the checkpoint's keys were checked before
    _own_memory(model)
    for i, block in enumerate(model.blocks):
        block.load_state_dict(read(f"blocks.{i}."), strict=True, assign=True)
        prepare_block(block)
        _own_memory(block)


def _own_memory(module) -> None:
    """Copy the plain CPU tensors read from the checkpoint into memory of their own.

    A tensor read from a memory-mapped safetensors file keeps the whole file mapped, and with it every page read
    from the file so far: a kept bias would keep the full-precision weights that prepare_block has just replaced
    resident. Quantized tensors (subclasses) are made in memory already; the plain ones left are small (norms,
    biases, tables, embeddings: 2% of the 14B model)."""
    for sub in module.modules():
        for name, p in sub.named_parameters(recurse=False):
            if type(p) is torch.nn.Parameter and p.device.type == "cpu":
                setattr(sub, name, torch.nn.Parameter(p.detach().clone(), requires_grad=p.requires_grad))
        for name, b in sub.named_buffers(recurse=False):
            if type(b) is torch.Tensor and b.device.type == "cpu":
                setattr(sub, name, b.clone())


def index_checkpoint(files: dict[Path, list[str] | None], expected: dict[str, tuple]) -> dict[str, tuple[Path, tuple]]:
    """Each checkpoint key -> (its file, its shape), from the headers only, after checking names and shapes."""
    found: dict[str, tuple[Path, tuple]] = {}
    for path, listed in files.items():
        with _open(path, "cpu") as f:
            keys = set(f.keys())
            if listed is not None and not set(listed) <= keys:
                raise ValueError(f"{path}: missing keys its index promises: {sorted(set(listed) - keys)[:10]}")
            for key in keys:
                found[key] = (path, tuple(f.get_slice(key).get_shape()))
    check_keys(found, expected)
    return found


def read_tensors(found: dict[str, tuple[Path, tuple]], expected: dict[str, tuple], torch_dtype, device,
                 prefix: str | None = None) -> dict:
    """The expected tensors, each cast to its policy dtype. With `prefix`, only those under it ("blocks.3."), named
    without it; "" selects the tensors under no "blocks." prefix (a quantized load reads block by block)."""
    def wanted(key: str) -> bool:
        if key not in expected:
            return False
        if prefix is None:
            return True
        return key.startswith(prefix) if prefix else not key.startswith("blocks.")

    by_file: dict[Path, list[str]] = {}
    for key, (path, _) in found.items():
        if wanted(key):
            by_file.setdefault(path, []).append(key)
    state = {}
    for path, keys in by_file.items():
        with _open(path, device) as f:
            for key in keys:
                state[key[len(prefix or ""):]] = f.get_tensor(key).to(param_dtype(key, torch_dtype))
    return state


def check_keys(found: dict[str, tuple[Path, tuple]], expected: dict[str, tuple]) -> None:
    ignored = sorted(k for k in found if k not in expected and IGNORED_KEYS.search(k))
    if ignored:
        warnings.warn(f"skipping checkpoint keys the model does not use: {ignored}", stacklevel=3)
    problems = []
    missing = sorted(set(expected) - set(found))
    if missing:
        problems.append(f"missing keys {missing}")
    unexpected = sorted(k for k in found if k not in expected and k not in ignored)
    if unexpected:
        files = sorted({str(found[k][0]) for k in unexpected})
        problems.append(f"unexpected keys {unexpected} (in {files})")
    for key, shape in expected.items():
        if key in found and found[key][1] != shape:
            problems.append(f"{key} in {found[key][0]} has shape {list(found[key][1])}, the model expects {list(shape)}")
    if problems:
        raise ValueError("checkpoint does not match the model config: " + "; ".join(problems))


def _open(path: Path, device):
    try:
        return safe_open(str(path), framework="pt", device=str(device))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path}: unreadable safetensors file (truncated or corrupt?): {err}") from err


def save_transformer(model, directory: str | os.PathLike, max_shard_size: int | str = "10GB") -> None:
    """Write config.json and (sharded) safetensors. Files are staged and moved in, so a failure leaves no mix."""
    from huggingface_hub import split_torch_state_dict_into_shards

    quantized = sorted(k for k, v in model.state_dict().items() if type(v) not in (torch.Tensor, torch.nn.Parameter))
    if quantized:  # torchao's tensors have no safetensors form; a quantized load is quick to redo
        raise ValueError(f"cannot save: {len(quantized)} weights are quantized ({quantized[0]}, ...); save the "
                         "checkpoint the model was loaded from, and quantize while loading: "
                         "from_pretrained(..., quantize=...)")
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    with torch.device("meta"):
        missing = sorted(set(type(model)(model.config).state_dict()) - set(state))
    if missing:  # a checkpoint without them would look whole and load nowhere
        raise ValueError(f"cannot save: the model does not hold {len(missing)} of its tensors ({missing[0]}, ...); "
                         "a model loaded with offload='blocks' reads its blocks from its checkpoint: copy that instead")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    split = split_torch_state_dict_into_shards(state, filename_pattern=SHARD_PATTERN, max_shard_size=max_shard_size)
    config = {"_class_name": "HeliosTransformer3DModel", "_diffusers_version": "0.42.1", **model.config.to_dict()}
    with tempfile.TemporaryDirectory(dir=directory, prefix=".saving-") as staging:
        staging = Path(staging)
        for filename, keys in split.filename_to_tensors.items():
            save_file({k: state[k] for k in keys}, str(staging / filename), metadata={"format": "pt"})
        if split.is_sharded:
            index = {"metadata": {"total_size": sum(t.numel() * t.element_size() for t in state.values())},
                     "weight_map": split.tensor_to_filename}
            (staging / INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
        (staging / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        # Weights from an earlier save with another sharding would be picked up by loaders; remove them.
        for old in directory.glob("diffusion_pytorch_model*.safetensors*"):
            old.unlink()
        for item in staging.iterdir():
            shutil.move(str(item), directory / item.name)
