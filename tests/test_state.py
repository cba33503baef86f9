"""The generation state file: a versioned format that carries the run's settings, clear errors for files it cannot
read, and a full disk that neither corrupts the previous state nor earns advice to resume from a state never written
(issue 10, points 5 and 7)."""

import errno
import os
import subprocess
import uuid

import pytest
import torch

from helios import HeliosPipeline, SamplingOptions
from helios.sampling.options import DEFAULT_NEGATIVE_PROMPT
from helios.pipeline.state import FORMAT_VERSION, GenerationState, StateSaveError
from helios.pipeline.tiny import build_tiny_model

H, W = 64, 128
FAST = dict(height=H, width=W, pyramid_num_inference_steps_list=(1, 1, 1), is_amplify_first_chunk=False, seed=7)
SCHEDULE = [("a cat", 1), ("a dog", 2)]


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = build_tiny_model(tmp_path_factory.mktemp("tiny") / "distilled", variant="distilled", seed=0)
    return HeliosPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu")


@pytest.fixture(scope="module")
def states(pipe):
    """The states after chunks 0 and 1 of a 3-chunk run, and the run's chunks."""
    chunks = list(pipe.stream(SCHEDULE, SamplingOptions(num_frames=99, **FAST), negative_prompt="blurry"))
    return [c.state for c in chunks[:2]], chunks


def test_the_state_carries_the_runs_settings(pipe, states, tmp_path):
    (state, _), _ = states
    path = tmp_path / "run.state"
    state.with_metadata(model="helios-tiny", fps="12").save(path)
    loaded = GenerationState.load(path)
    assert loaded.schedule == SCHEDULE and loaded.negative_prompt == "blurry"
    assert loaded.options == pipe.plan(SCHEDULE, SamplingOptions(**FAST, num_frames=99)).opts  # resolved
    assert loaded.metadata == {"model": "helios-tiny", "fps": "12"} and state.metadata == {}  # with_metadata copies
    assert loaded.next_chunk == 1 and loaded.seed == 7 and torch.equal(loaded.rng_state, state.rng_state)
    assert torch.equal(loaded.history.latents, state.history.latents)


def test_resuming_from_the_state_alone_in_python(pipe, states):
    (state, _), chunks = states
    resumed = list(pipe.stream(None, resume=state))  # prompt schedule, options, negative prompt: the state's
    assert [c.index for c in resumed] == [1, 2]
    assert all(torch.equal(a.frames, b.frames) for a, b in zip(chunks[1:], resumed))
    with pytest.raises(ValueError, match="own options"):
        pipe.stream(None, SamplingOptions(seed=8), resume=state)


def test_resuming_with_other_settings_names_them(pipe, states):
    (state, _), _ = states
    with pytest.raises(ValueError, match=r"other settings: num_frames, seed, prompt \(schedule\)$"):
        pipe.stream([("a cat", 3)], SamplingOptions(**{**FAST, "seed": 8}, num_frames=132), "blurry", resume=state)
    with pytest.raises(ValueError, match=r"other settings: negative prompt$"):
        pipe.stream(SCHEDULE, SamplingOptions(**FAST, num_frames=99), DEFAULT_NEGATIVE_PROMPT, resume=state)


def test_a_file_of_random_bytes_is_refused_without_torchs_advice(tmp_path):
    path = tmp_path / "random.state"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ValueError) as caught:
        GenerationState.load(path)
    message = str(caught.value)
    assert message == f"{path}: not a helios generation state (not a file that helios saved, or damaged)"
    assert "weights_only" not in message  # torch's advice to load unsafely is not passed on


def test_an_older_format_is_refused_clearly(states, tmp_path):
    (state, _), _ = states
    old = {"format": 1, "history": state.history.state_dict(), "rng_state": state.rng_state, "next_chunk": 1,
           "seed": 7, "fingerprint": "0123456789abcdef"}  # what helios 0.1 saved
    torch.save(old, tmp_path / "old.state")
    with pytest.raises(ValueError, match="format 1, saved by an older version of helios; this one reads format 2"):
        GenerationState.load(tmp_path / "old.state")
    torch.save({**old, "format": FORMAT_VERSION + 1}, tmp_path / "new.state")
    with pytest.raises(ValueError, match="saved by a newer version"):
        GenerationState.load(tmp_path / "new.state")
    torch.save([1, 2, 3], tmp_path / "list.state")
    with pytest.raises(ValueError, match="not a helios generation state"):
        GenerationState.load(tmp_path / "list.state")


def _assert_full_disk_keeps_the_old_state(path, newer) -> None:
    before = path.read_bytes()
    with pytest.raises(StateSaveError) as caught:
        newer.save(path)
    assert str(caught.value) == (f"cannot save the generation state to {path}: No space left on device (the "
                                 "previous state, if any, is unchanged)")
    assert caught.value.errno == errno.ENOSPC
    assert path.read_bytes() == before and GenerationState.load(path).next_chunk == 1
    assert sorted(p.name for p in path.parent.iterdir() if p.name.startswith(".")) == []  # no temporary file left


def test_a_full_disk_keeps_the_previous_state_simulated(states, tmp_path, monkeypatch):
    # ENOSPC simulated in-process: the state's write is refused as a full disk refuses it (runs everywhere).
    (first, second), _ = states
    path = tmp_path / "run.state"
    first.save(path)
    real_fdopen = os.fdopen

    class FullDisk:
        def __init__(self, fd, mode):
            self.file = real_fdopen(fd, mode)

        def write(self, data):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

        def __getattr__(self, name):
            return getattr(self.file, name)

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            self.file.close()

    monkeypatch.setattr(os, "fdopen", FullDisk)
    _assert_full_disk_keeps_the_old_state(path, second)


@pytest.fixture
def small_tmpfs(tmp_path):
    """A real 1 MiB tmpfs (needs root and mount; where it cannot be mounted the test says so and is skipped)."""
    mount = tmp_path / f"tmpfs-{uuid.uuid4().hex[:6]}"
    mount.mkdir()
    if os.geteuid() != 0 or subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount)],
                                           capture_output=True).returncode != 0:
        pytest.skip("cannot mount a tmpfs here (not root, or no mount); the simulated test covers the code path")
    yield mount
    subprocess.run(["umount", str(mount)], check=True)


def test_a_full_disk_keeps_the_previous_state_on_a_real_tmpfs(states, small_tmpfs):
    (first, second), _ = states
    path = small_tmpfs / "run.state"
    first.save(path)
    with open(small_tmpfs / "filler", "wb", buffering=0) as filler:  # fill the disk to the last block
        with pytest.raises(OSError) as full:
            while True:
                filler.write(b"\0" * 4096)
        assert full.value.errno == errno.ENOSPC
    _assert_full_disk_keeps_the_old_state(path, second)
