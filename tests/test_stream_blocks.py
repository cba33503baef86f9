"""offload="blocks" for the transformer alone: exact results, the schedule of block reads, bad checkpoints, files
that change under a running job, and (in fresh processes) the host memory it saves."""

from __future__ import annotations

import errno
import json
import mmap
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import make_inputs, make_ours, randomize_, tiny_config

from helios import HeliosTransformer3DModel
from helios.scale.mapped import CheckpointChanged
from helios.scale.stream_blocks import BlockStream, load_streamed

ROOT = Path(__file__).resolve().parents[1]
CONFIG = tiny_config(num_layers=4)
WEIGHTS = "diffusion_pytorch_model.safetensors"


def _checkpoint(folder: Path, dtype=torch.float32, max_shard_size=None, **overrides) -> Path:
    model = randomize_(make_ours(tiny_config(**{**CONFIG, **overrides})), seed=3).to(dtype)
    if max_shard_size:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
    else:
        model.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory) -> Path:
    # 100 KB shards: the blocks' tensors spread over several files.
    return _checkpoint(tmp_path_factory.mktemp("streamed"), max_shard_size="100KB")


@pytest.mark.parametrize("slots", [1, 2])
@pytest.mark.parametrize("layout", ["helios", "none", "per_sample"])
def test_streamed_blocks_give_the_resident_models_output_bitwise(checkpoint, layout, slots):
    resident = HeliosTransformer3DModel.from_pretrained(checkpoint)
    streamed = load_streamed(HeliosTransformer3DModel, checkpoint, torch.float32, "cpu", slots=slots)
    inputs = make_inputs(CONFIG, layout, batch=2 if layout == "per_sample" else 1)
    with torch.inference_mode():
        expected = resident(**inputs).sample
        first, second = streamed(**inputs).sample, streamed(**inputs).sample  # a second forward reuses the slots
    assert torch.equal(first, expected) and torch.equal(second, expected)
    assert len(streamed.block_stream.slots) == slots


def test_from_pretrained_streams_with_one_block_in_memory_on_a_cpu(checkpoint):
    model = HeliosTransformer3DModel.from_pretrained(checkpoint, offload="blocks")
    assert not any(k.startswith("blocks.") for k in model.state_dict())  # the model holds no block weights
    assert model.block_stream.max_slots == 1 and model.block_stream.slots == []  # none before the first forward
    with torch.no_grad():  # also outside inference mode
        model(**make_inputs(CONFIG, "helios"))
    assert len(model.block_stream.slots) == 1


@pytest.mark.parametrize("stored, torch_dtype", [(torch.bfloat16, torch.float32), (torch.float32, torch.bfloat16)])
def test_a_checkpoint_in_another_dtype_is_converted_like_the_resident_loader_does(tmp_path, stored, torch_dtype):
    folder = _checkpoint(tmp_path, dtype=stored)
    resident = HeliosTransformer3DModel.from_pretrained(folder, torch_dtype=torch_dtype)
    streamed = HeliosTransformer3DModel.from_pretrained(folder, torch_dtype=torch_dtype, offload="blocks")
    inputs = make_inputs(CONFIG, "helios")
    with torch.inference_mode():
        assert torch.equal(streamed(**inputs).sample, resident(**inputs).sample)
    slot = streamed.block_stream.slots[0].module.state_dict()
    for name, tensor in resident.blocks[3].state_dict().items():  # fp32 islands stay fp32, as in the resident model
        assert slot[name].dtype == tensor.dtype and torch.equal(slot[name], tensor), name


@pytest.mark.slow
def test_compiled_streamed_blocks_equal_compiled_resident_blocks(checkpoint):
    from helios.scale.speed import compile_blocks

    resident = compile_blocks(HeliosTransformer3DModel.from_pretrained(checkpoint))
    streamed = compile_blocks(HeliosTransformer3DModel.from_pretrained(checkpoint, offload="blocks"))
    inputs = make_inputs(CONFIG, "helios")
    torch._dynamo.reset()
    with torch.inference_mode():
        expected = resident(**inputs).sample
        got = streamed(**inputs).sample
    assert torch.equal(got, expected)
    assert all(s.module._compiled_call_impl is not None for s in streamed.block_stream.slots)


# ---------------------------------------------------------------------------------------------------------------
# The schedule, seen through spies on the stream's request / fetch and on the slots' computations


def _spy_schedule(monkeypatch) -> list[tuple[str, int]]:
    events = []
    for name in ("request", "fetch"):
        original = getattr(BlockStream, name)

        def spy(self, i, _original=original, _name=name):
            events.append((_name, i))
            return _original(self, i)

        monkeypatch.setattr(BlockStream, name, spy)
    new_block = BlockStream._new_block

    def watched(self):
        block = new_block(self)
        slot_of = lambda: next(s for s in self.slots if s.module is block)  # noqa: E731
        block.register_forward_pre_hook(lambda *_: events.append(("compute", slot_of().block)))
        return block

    monkeypatch.setattr(BlockStream, "_new_block", watched)
    read_ahead = BlockStream.__init__

    def with_hints(self, checkpoint, *args, **kwargs):
        read_ahead(self, checkpoint, *args, **kwargs)
        hint = checkpoint.read_ahead
        checkpoint.read_ahead = lambda keys: (events.append(("read_ahead", int(keys[0].split(".")[1]))), hint(keys))

    monkeypatch.setattr(BlockStream, "__init__", with_hints)
    return events


def test_two_slots_fetch_each_block_while_the_previous_one_computes(checkpoint, monkeypatch):
    events = _spy_schedule(monkeypatch)
    model = load_streamed(HeliosTransformer3DModel, checkpoint, torch.float32, "cpu", slots=2)
    with torch.inference_mode():
        for _ in range(2):
            model(**make_inputs(CONFIG, "helios"))
    computes = [i for kind, i in events if kind == "compute"]
    assert computes == [0, 1, 2, 3] * 2
    n = len(computes)
    for k, (kind, i) in enumerate(events):
        if kind != "compute":
            continue
        before = events[:k]
        # block i+1 was requested and its weights fetched before block i computed: one block ahead
        assert ("request", (i + 1) % 4) in before[-2:] and before[-1] == ("fetch", (i + 1) % 4)
    # block 0: fetched cold, then ahead at the end of each forward (for the next one)
    assert events[0] == ("fetch", 0) and events.count(("fetch", 0)) == 3
    assert not any(kind == "read_ahead" for kind, _ in events) and n == 8


def test_one_slot_reads_a_block_just_before_it_computes_and_hints_the_next(checkpoint, monkeypatch):
    events = _spy_schedule(monkeypatch)
    model = load_streamed(HeliosTransformer3DModel, checkpoint, torch.float32, "cpu", slots=1)
    with torch.inference_mode():
        model(**make_inputs(CONFIG, "helios"))
    expected = []
    for i in range(4):
        # fetched when needed (one block in memory), the next requested (page-cache read-ahead) before computing
        expected += [("fetch", i), ("request", (i + 1) % 4), ("read_ahead", (i + 1) % 4), ("compute", i)]
    assert events == expected


# ---------------------------------------------------------------------------------------------------------------
# Bad input and faults


def test_unknown_offload_modes_name_the_choices(checkpoint):
    with pytest.raises(ValueError, match=r"offload must be one of None, 'blocks', got 'layers'"):
        HeliosTransformer3DModel.from_pretrained(checkpoint, offload="layers")
    with pytest.raises(ValueError, match=r"None, 'blocks', got 'model'.*HeliosPipeline.from_pretrained\(offload='model'\)"):
        HeliosTransformer3DModel.from_pretrained(checkpoint, offload="model")


def test_blocks_on_a_pickled_checkpoint_says_why(tmp_path):
    model = make_ours(CONFIG)
    model.save_pretrained(tmp_path)
    (tmp_path / WEIGHTS).unlink()
    torch.save(model.state_dict(), tmp_path / "diffusion_pytorch_model.bin")
    with pytest.raises(ValueError, match=r"memory-mapped safetensors.*diffusion_pytorch_model\.bin.*convert it"):
        HeliosTransformer3DModel.from_pretrained(tmp_path, offload="blocks")


def test_blocks_on_a_file_that_is_not_safetensors_names_it(tmp_path):
    make_ours(CONFIG).save_pretrained(tmp_path)
    (tmp_path / WEIGHTS).write_bytes(b"PK\x03\x04 this is a zip archive, not safetensors")
    with pytest.raises(ValueError, match=rf"{WEIGHTS}: not a valid safetensors file"):
        HeliosTransformer3DModel.from_pretrained(tmp_path, offload="blocks")


def test_blocks_on_a_file_that_cannot_be_memory_mapped_says_why(tmp_path, monkeypatch):
    # A file system without mmap (some network and FUSE mounts) cannot be made here: mmap is made to fail the way
    # it fails on one (ENODEV).
    import helios.scale.mapped

    def no_mmap(*args, **kwargs):
        raise OSError(errno.ENODEV, os.strerror(errno.ENODEV))

    monkeypatch.setattr(helios.scale.mapped.mmap, "mmap", no_mmap)
    make_ours(CONFIG).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=rf"{WEIGHTS}: cannot be memory-mapped .*No such device.*local disk"):
        HeliosTransformer3DModel.from_pretrained(tmp_path, offload="blocks")
    monkeypatch.undo()
    assert mmap.mmap is not no_mmap


def _replace(path: Path) -> None:
    staged = path.with_name(path.name + ".new")
    staged.write_bytes(path.read_bytes())
    os.replace(staged, path)  # same bytes, another file (as a re-download puts it)


def _touch(path: Path) -> None:
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))


def _truncate(path: Path) -> None:
    os.truncate(path, path.stat().st_size // 2)  # reading its mapped pages now would raise SIGBUS


@pytest.mark.parametrize("change", [Path.unlink, _replace, _touch, _truncate],
                         ids=["deleted", "replaced", "modified", "truncated"])
def test_a_checkpoint_that_changes_under_a_running_job_is_an_error_naming_the_file(tmp_path, change):
    folder = _checkpoint(tmp_path)
    model = HeliosTransformer3DModel.from_pretrained(folder, offload="blocks")
    inputs = make_inputs(CONFIG, "helios")
    changed = []
    model.blocks[1].register_forward_pre_hook(lambda *_: changed or changed.append(change(folder / WEIGHTS)))
    with torch.inference_mode(), pytest.raises(CheckpointChanged, match=re.escape(f"{folder / WEIGHTS}: the weight file")):
        model(**inputs)  # block 0 was read before the change, block 1 is read after it
    assert changed and model.block_stream.slots[0].block is None  # the slot is not trusted for anything


def test_a_streamed_model_moved_elsewhere_says_where_it_streams(checkpoint):
    # No second device here: the block is handed tokens on the meta device, as after a model.to(another device).
    model = HeliosTransformer3DModel.from_pretrained(checkpoint, offload="blocks")
    with pytest.raises(RuntimeError, match=r"streams its blocks on cpu .* got inputs on meta"):
        model.blocks[0](torch.zeros(1, 3, 32, device="meta"), None, None, None, None)


def test_saving_a_streamed_model_is_refused_before_writing_anything(checkpoint, tmp_path):
    model = HeliosTransformer3DModel.from_pretrained(checkpoint, offload="blocks")
    with pytest.raises(ValueError, match=r"does not hold \d+ of its tensors \(blocks\.0\..*offload='blocks'"):
        model.save_pretrained(tmp_path / "copy")
    assert not (tmp_path / "copy").exists()


# ---------------------------------------------------------------------------------------------------------------
# Host memory, in fresh processes (peak RSS of a process is noisy only across processes, not within one)


@pytest.mark.slow
def test_memory_bench_tiny_case_shows_the_bounds():
    """The `python -m helios.bench memory` command, on its tiny case (a 0.2 GB checkpoint, docs/benchmarks.md has
    the 4.7 GB and 28.6 GB ones). Figures are above each process's baseline (imports, and the code and allocator
    pages a first load and forward bring in): at this size those ~0.1 GB would hide what is measured."""
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src")}
    done = subprocess.run([sys.executable, "-m", "helios.bench", "memory", "--cases", "tiny"], capture_output=True,
                          text=True, env=env, timeout=600, check=True)
    result = json.loads(done.stdout)["tiny"]
    blocks, resident = result["blocks"], result["resident"]
    load, checkpoint = result["block"] + result["non_block"], result["checkpoint"]
    assert blocks["ok"] and resident["ok"] and blocks["finite"]
    assert blocks["load_peak_rss"] - blocks["baseline_rss"] <= load + 4 * 2**20  # one block + the non-block weights
    assert blocks["forward_peak_rss"] - blocks["baseline_rss"] <= 0.5 * checkpoint
    assert resident["forward_peak_rss"] - resident["baseline_rss"] >= 0.9 * checkpoint  # it measures the weights
    assert "tiny: 12 blocks" in done.stderr and "blocks: forward" in done.stderr


# ---------------------------------------------------------------------------------------------------------------
# The copy pipeline's modes (block_copies.py): the host cache, staged parallel reads, prefetch depth, stats. The
# CUDA path's logic runs here through HostLink, which does the device side synchronously.


def _staged(stream, cache: bool, **kwargs):
    from helios.scale.block_copies import HostCache, HostLink, StagedCopies

    stream.copies = StagedCopies(HostLink(), HostCache(HostLink()) if cache else None, **kwargs)
    return stream


@pytest.mark.parametrize("mode", ["cache", "staged", "staged-tiny-pieces", "3-slots", "4-slots"])
def test_every_copy_mode_gives_the_resident_output_bitwise(checkpoint, mode):
    from helios.scale.block_copies import StreamStats

    resident = HeliosTransformer3DModel.from_pretrained(checkpoint)
    slots = int(mode[0]) if mode.endswith("slots") else 2
    streamed = load_streamed(HeliosTransformer3DModel, checkpoint, torch.float32, "cpu", slots=slots,
                             host_cache=mode == "cache")
    stream = streamed.block_stream
    if mode.startswith("staged"):  # 3 staging buffers of 512 bytes: tensors cut into many pieces, read by 3 threads
        _staged(stream, False, **(dict(staging_bytes=512, buffers=3, readers=3) if "tiny" in mode else {}))
    stream.stats = StreamStats()
    inputs = make_inputs(CONFIG, "helios")
    with torch.inference_mode():
        expected = resident(**inputs).sample
        assert torch.equal(streamed(**inputs).sample, expected) and torch.equal(streamed(**inputs).sample, expected)
    stream.finish_copies()  # block 0, fetched ahead for a next forward, has landed too
    stats = stream.stats.as_dict()
    assert stats["blocks"] * stream.block_bytes == stream.fetched_bytes  # every fetch counted, at its bytes
    if mode == "cache":  # read once into the cache (fill), then every fetch copies from it
        assert stats["fill_bytes"] == 4 * stream.block_bytes and stats["read_bytes"] == 0
        assert stats["h2d_bytes"] == stream.fetched_bytes and stream.host_cache
        assert stream.copies.cache.nbytes == 4 * stream.block_bytes
        arenas = {t.untyped_storage().data_ptr() for t in stream.copies.cache.tensors.values()}
        assert len(arenas) == 1  # carved from one arena, not one (power-of-two rounded) allocation per tensor
    elif mode.startswith("staged"):
        assert stats["read_bytes"] == stats["h2d_bytes"] == stream.fetched_bytes
    else:  # the CPU path: one copy, on the calling thread
        assert stats["read_bytes"] == stream.fetched_bytes and len(stream.slots) == slots
    assert all(stats[k] >= 0 for k in stats) and stats["read_s"] + stats["fill_s"] > 0


def test_slots_fetch_up_to_slots_minus_one_blocks_ahead(checkpoint, monkeypatch):
    events = _spy_schedule(monkeypatch)
    model = load_streamed(HeliosTransformer3DModel, checkpoint, torch.float32, "cpu", slots=3)
    with torch.inference_mode():
        model(**make_inputs(CONFIG, "helios"))
    fetched_before = {}
    for k, (kind, i) in enumerate(events):
        if kind == "compute":
            fetched_before[i] = {j for kind2, j in events[:k] if kind2 == "fetch"}
    assert fetched_before[0] == {0, 1, 2} and fetched_before[1] == {0, 1, 2, 3}  # two blocks ahead


def test_stats_are_off_by_default_and_sum_to_the_bytes_moved(checkpoint):
    from helios.scale.block_copies import StreamStats

    model = load_streamed(HeliosTransformer3DModel, checkpoint, torch.float32, "cpu")
    assert model.block_stream.stats is None and not model.block_stream.host_cache  # CPU, auto: no cache
    model.block_stream.stats = stats = StreamStats()
    with torch.inference_mode():
        model(**make_inputs(CONFIG, "helios"))
    assert stats.blocks == 4 and stats.read_bytes == model.block_stream.fetched_bytes
    assert "4 blocks: read" in stats.summary() and "GB/s" in stats.summary()


@pytest.mark.parametrize("bad", ["yes", 1, None, "on"])
def test_bad_host_cache_values_name_the_argument(checkpoint, bad):
    with pytest.raises(ValueError, match=r"host_cache must be True, False or 'auto'"):
        load_streamed(HeliosTransformer3DModel, checkpoint, torch.float32, "cpu", host_cache=bad)


@pytest.mark.parametrize("bad", [0, -1, 1.5, True])
def test_bad_slot_counts_name_the_argument(checkpoint, bad):
    with pytest.raises(ValueError, match=r"slots must be a positive integer"):
        load_streamed(HeliosTransformer3DModel, checkpoint, torch.float32, "cpu", slots=bad)


def test_pread_of_a_file_cut_short_names_it(tmp_path):
    import numpy as np

    from helios.scale.mapped import MappedCheckpoint

    folder = _checkpoint(tmp_path)
    path = folder / WEIGHTS
    checkpoint = MappedCheckpoint({path: None})
    key = max(checkpoint.where, key=lambda k: checkpoint.record(k).start)  # the last tensor in the file
    out = np.empty(checkpoint.record(key).nbytes, np.uint8)
    checkpoint.read_piece(key, 0, out)  # whole: fine
    assert out.tobytes() == path.read_bytes()[checkpoint.record(key).start :][: len(out)]
    os.truncate(path, path.stat().st_size - 8)
    with pytest.raises(CheckpointChanged, match=re.escape(str(path))):
        checkpoint.read_piece(key, 0, out)
    checkpoint.close()
