"""Checkpoint IO: round trips, compatibility with diffusers in both directions, dtype policy, strict errors, hub ids."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from helpers import (
    fake_hub_snapshot,
    ReferenceModel,
    assert_same_state,
    capture_messages,
    make_inputs,
    make_ours,
    make_reference,
    randomize_,
    reference_from_pretrained,
    rel_err,
    state_dtypes,
    tiny_config,
)
from safetensors.torch import load_file, save_file

from helios import HeliosTransformer3DModel

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"
SHARD = re.compile(r"diffusion_pytorch_model-(\d{5})-of-(\d{5})\.safetensors")
# The tiny model is ~780 KB in fp32, patch_long.weight alone 512 KB: 100 KB shards give several files.
SHARDINGS = {"single": None, "sharded_str": "100KB", "sharded_int": 100_000}
# Every optional parameter family: history_key_scale, norm2 (affine), add_k/v_proj + norm_added_k.
FULL = dict(is_amplify_history=True, added_kv_proj_dim=24)


def _random_ours(config: dict, seed: int = 0) -> HeliosTransformer3DModel:
    torch.manual_seed(seed)
    return randomize_(make_ours(config), seed)


def _save(model, directory: Path, max_shard_size) -> None:
    if max_shard_size is None:
        model.save_pretrained(directory)
    else:
        model.save_pretrained(directory, max_shard_size=max_shard_size)


def _assert_layout(directory: Path, sharded: bool) -> None:
    names = sorted(p.name for p in directory.iterdir())
    shards = [n for n in names if SHARD.fullmatch(n)]
    if not sharded:
        assert names == ["config.json", WEIGHTS]
        return
    assert len(shards) >= 3
    assert sorted(names) == sorted(["config.json", INDEX, *shards])
    assert {SHARD.fullmatch(n).group(2) for n in shards} == {f"{len(shards):05d}"}
    assert sorted(int(SHARD.fullmatch(n).group(1)) for n in shards) == list(range(1, len(shards) + 1))
    weight_map = json.loads((directory / INDEX).read_text())["weight_map"]
    assert set(weight_map.values()) == set(shards)
    for shard in shards:  # the index tells the truth about every shard
        assert sorted(load_file(directory / shard)) == sorted(k for k, v in weight_map.items() if v == shard)


def _forward_both(ref, ours, seed=3):
    inputs = make_inputs(tiny_config(), "helios", batch=2, seed=seed)
    with torch.no_grad():
        return ref(**inputs).sample, ours(**inputs).sample


# ---------------------------------------------------------------------------------------------------------------
# Round trips and diffusers compatibility


@pytest.mark.parametrize("max_shard_size", SHARDINGS.values(), ids=SHARDINGS.keys())
def test_save_load_round_trip(max_shard_size, tmp_path):
    config = tiny_config(**FULL)
    model = _random_ours(config)
    _save(model, tmp_path, max_shard_size)
    _assert_layout(tmp_path, sharded=max_shard_size is not None)
    loaded = HeliosTransformer3DModel.from_pretrained(tmp_path)
    assert loaded.config == model.config
    assert_same_state(loaded.state_dict(), model.state_dict())


def test_save_over_previous_sharded_save(tmp_path):
    # A single-file save over a sharded one must not leave stale shards or index behind.
    model = _random_ours(tiny_config())
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    model.save_pretrained(tmp_path)
    _assert_layout(tmp_path, sharded=False)


def test_config_json_matches_reference(tmp_path):
    config = tiny_config(**FULL)
    make_ours(config).save_pretrained(tmp_path / "ours")
    make_reference(config).save_pretrained(tmp_path / "ref")
    ours = json.loads((tmp_path / "ours" / "config.json").read_text())
    ref = json.loads((tmp_path / "ref" / "config.json").read_text())
    assert {k: v for k, v in ours.items() if not k.startswith("_")} == {
        k: v for k, v in ref.items() if not k.startswith("_")
    }


@pytest.mark.parametrize("max_shard_size", SHARDINGS.values(), ids=SHARDINGS.keys())
def test_our_checkpoint_loads_in_diffusers(max_shard_size, tmp_path):
    config = tiny_config()
    ours = _random_ours(config)
    _save(ours, tmp_path / "transformer", max_shard_size)
    ref = reference_from_pretrained(tmp_path, subfolder="transformer")
    assert_same_state(ref.state_dict(), ours.state_dict())
    expected, out = _forward_both(ref, ours)
    assert rel_err(out, expected) <= 1e-5


@pytest.mark.parametrize("max_shard_size", SHARDINGS.values(), ids=SHARDINGS.keys())
def test_diffusers_checkpoint_loads_in_ours(max_shard_size, tmp_path):
    config = tiny_config(**FULL)
    ref = make_reference(config)
    kwargs = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    ref.save_pretrained(tmp_path / "transformer", **kwargs)
    ours = HeliosTransformer3DModel.from_pretrained(tmp_path, subfolder="transformer")
    assert_same_state(ours.state_dict(), ref.state_dict())


DTYPE_CASES = {
    "bf16": (torch.float32, torch.bfloat16),
    "fp16": (torch.float32, torch.float16),
    "fp32": (torch.float32, torch.float32),
    "none": (torch.float32, None),
    # A bf16 checkpoint (fp32-kept params stored fp32) loaded without torch_dtype: the reference upcasts to fp32.
    "bf16_checkpoint_none": (torch.bfloat16, None),
    "bf16_checkpoint_fp16": (torch.bfloat16, torch.float16),
}


@pytest.mark.parametrize("saved_dtype, torch_dtype", DTYPE_CASES.values(), ids=DTYPE_CASES.keys())
def test_from_pretrained_dtypes_and_values_match_reference(saved_dtype, torch_dtype, tmp_path):
    config = tiny_config(**FULL)
    make_reference(config).save_pretrained(tmp_path / "fp32")
    source = tmp_path / "fp32"
    if saved_dtype != torch.float32:
        source = tmp_path / "saved"
        reference_from_pretrained(tmp_path / "fp32", torch_dtype=saved_dtype).save_pretrained(source)
    ref = reference_from_pretrained(source, torch_dtype=torch_dtype)
    ours = HeliosTransformer3DModel.from_pretrained(source, torch_dtype=torch_dtype)
    assert state_dtypes(ours) == state_dtypes(ref)
    assert_same_state(ours.state_dict(), ref.state_dict())
    if torch_dtype in (torch.bfloat16, torch.float16):  # the policy is not vacuous
        assert state_dtypes(ours)["blocks.0.attn1.history_key_scale"] == torch.float32
        assert state_dtypes(ours)["blocks.0.attn1.to_q.weight"] == torch_dtype


# ---------------------------------------------------------------------------------------------------------------
# config.json keys


def _edit_config(directory: Path, **changes) -> None:
    path = directory / "config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def test_unknown_config_key_warns_and_loads(tmp_path, caplog):
    make_ours(tiny_config()).save_pretrained(tmp_path)
    _edit_config(tmp_path, window_size=[-1, -1], some_training_flag=True)
    with capture_messages(caplog) as messages:
        model = HeliosTransformer3DModel.from_pretrained(tmp_path)
    assert model.config.num_layers == 2
    assert any("some_training_flag" in m and "window_size" in m for m in messages) or (
        any("some_training_flag" in m for m in messages) and any("window_size" in m for m in messages)
    ), messages


def test_metadata_config_keys_do_not_warn(tmp_path, caplog):
    make_ours(tiny_config()).save_pretrained(tmp_path)
    _edit_config(
        tmp_path, _class_name="HeliosTransformer3DModel", _diffusers_version="0.42.1", _name_or_path="org/name"
    )
    with capture_messages(caplog) as messages:
        HeliosTransformer3DModel.from_pretrained(tmp_path)
    assert not [m for m in messages if "_class_name" in m or "_diffusers_version" in m or "_name_or_path" in m]


def test_wan_norm_added_q_key_is_ignored_like_reference(tmp_path):
    # The reference lists `norm_added_q` in _keys_to_ignore_on_load_unexpected (Wan I2V checkpoints carry it).
    config = tiny_config(added_kv_proj_dim=24)
    ref = make_reference(config)
    ref.save_pretrained(tmp_path)
    state = load_file(tmp_path / WEIGHTS)
    state["blocks.0.attn2.norm_added_q.weight"] = torch.ones(32)
    save_file(state, tmp_path / WEIGHTS, metadata={"format": "pt"})
    ours = HeliosTransformer3DModel.from_pretrained(tmp_path)
    assert_same_state(ours.state_dict(), ref.state_dict())
    assert_same_state(reference_from_pretrained(tmp_path).state_dict(), ref.state_dict())


# ---------------------------------------------------------------------------------------------------------------
# Strict loading errors: each must name the offending key and/or file.


def _rewrite(directory: Path, edit) -> None:
    state = load_file(directory / WEIGHTS)
    edit(state)
    save_file(state, directory / WEIGHTS, metadata={"format": "pt"})


def _truncate(directory: Path) -> None:
    data = (directory / WEIGHTS).read_bytes()
    (directory / WEIGHTS).write_bytes(data[: len(data) // 2])


def _corrupt_header(directory: Path) -> None:
    data = bytearray((directory / WEIGHTS).read_bytes())
    data[8:24] = b"\x00garbage-header\x00"
    (directory / WEIGHTS).write_bytes(bytes(data))


# id -> (damage to a single-file checkpoint folder, substrings the error message must contain)
DAMAGE = {
    "missing_key": (
        lambda d: _rewrite(d, lambda s: s.pop("blocks.1.attn2.norm_k.weight")),
        ["blocks.1.attn2.norm_k.weight"],
    ),
    "unexpected_key": (
        lambda d: _rewrite(d, lambda s: s.__setitem__("blocks.0.attn1.bogus.weight", torch.zeros(3))),
        ["blocks.0.attn1.bogus.weight"],
    ),
    "shape_mismatch": (
        lambda d: _rewrite(d, lambda s: s.__setitem__("proj_out.weight", torch.zeros(65, 32))),
        ["proj_out.weight"],
    ),
    "truncated_file": (_truncate, [WEIGHTS]),
    "corrupt_header": (_corrupt_header, [WEIGHTS]),
    "missing_weights": (lambda d: (d / WEIGHTS).unlink(), [WEIGHTS]),
    "missing_config": (lambda d: (d / "config.json").unlink(), ["config.json"]),
    "invalid_config_json": (lambda d: (d / "config.json").write_text("{not json"), ["config.json"]),
}


@pytest.mark.parametrize("damage, fragments", DAMAGE.values(), ids=DAMAGE.keys())
def test_load_errors_name_the_key_or_file(damage, fragments, tmp_path):
    make_ours(tiny_config()).save_pretrained(tmp_path)
    damage(tmp_path)
    with pytest.raises((ValueError, OSError)) as info:
        HeliosTransformer3DModel.from_pretrained(tmp_path)
    for fragment in fragments:
        assert fragment in str(info.value)


def test_missing_shard_is_named(tmp_path):
    make_ours(tiny_config()).save_pretrained(tmp_path, max_shard_size="100KB")
    shard = sorted(p for p in tmp_path.iterdir() if SHARD.fullmatch(p.name))[1]
    shard.unlink()
    with pytest.raises((ValueError, OSError), match=re.escape(shard.name)):
        HeliosTransformer3DModel.from_pretrained(tmp_path)


def test_shard_missing_a_key_its_index_promises(tmp_path):
    make_ours(tiny_config()).save_pretrained(tmp_path, max_shard_size="100KB")
    weight_map = json.loads((tmp_path / INDEX).read_text())["weight_map"]
    key = "blocks.1.ffn.net.2.weight"
    shard = tmp_path / weight_map[key]
    state = load_file(shard)
    state.pop(key)
    save_file(state, shard, metadata={"format": "pt"})
    with pytest.raises((ValueError, OSError), match=re.escape(key)):
        HeliosTransformer3DModel.from_pretrained(tmp_path)


def test_missing_directory_is_named(tmp_path):
    missing = tmp_path / "no-such-model"
    with pytest.raises((ValueError, OSError), match=re.escape(str(missing))):
        HeliosTransformer3DModel.from_pretrained(missing)


def test_missing_subfolder_is_named(tmp_path):
    make_ours(tiny_config()).save_pretrained(tmp_path)
    with pytest.raises((ValueError, OSError), match="transformer"):
        HeliosTransformer3DModel.from_pretrained(tmp_path, subfolder="transformer")


# ---------------------------------------------------------------------------------------------------------------
# Hub ids, resolved offline from a hand-made cache (layout of huggingface_hub's cache: models--{org}--{name}/
# refs/main holding the commit hash, snapshots/{hash}/... holding the files; real caches symlink to blobs/, which
# the resolver does not require).

REPO_ID = "tiny-org/tiny-helios"


@pytest.mark.parametrize("subfolder", [None, "transformer"])
@pytest.mark.parametrize("max_shard_size", [None, "100KB"], ids=["single", "sharded"])
def test_hub_id_resolves_from_offline_cache(subfolder, max_shard_size, offline_hub):
    config = tiny_config()
    model = _random_ours(config)
    snapshot = fake_hub_snapshot(offline_hub, REPO_ID)
    _save(model, snapshot / (subfolder or ""), max_shard_size)
    if subfolder:  # other pipeline components beside it must not be needed
        (snapshot / "scheduler").mkdir()
        (snapshot / "scheduler" / "scheduler_config.json").write_text("{}")
    loaded = HeliosTransformer3DModel.from_pretrained(REPO_ID, subfolder=subfolder)
    assert_same_state(loaded.state_dict(), model.state_dict())
    # The fake cache is a valid one: diffusers resolves it too (its sharded path needs local_files_only explicitly).
    ref = ReferenceModel.from_pretrained(REPO_ID, subfolder=subfolder, local_files_only=True)
    assert_same_state(ref.state_dict(), model.state_dict())


def test_uncached_hub_id_offline_is_named(offline_hub):
    with pytest.raises((ValueError, OSError), match=re.escape("tiny-org/not-cached")):
        HeliosTransformer3DModel.from_pretrained("tiny-org/not-cached", subfolder="transformer")
