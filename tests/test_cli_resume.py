"""`helios generate --resume STATE` continues a run from the state alone; arguments that contradict it are refused by
name; the advice to resume is only given when a state was really written (issue 10, points 5 and 7).

In-process (helios.cli.main), with Ctrl-C and a full disk injected at a chosen chunk: what matters here is what the
command does with its arguments and its state file, and tests/test_cli.py runs the real console script."""

import errno
import os

import numpy as np
import pytest

import helios.pipeline.state
import helios.pipeline.video_io
from helios.cli import main
from helios.pipeline.media import read_video

pytestmark = pytest.mark.slow  # whole runs of the command, in-process

H, W = 64, 128
RUN = ["--model", "helios-tiny", "--height", H, "--width", W, "--pyramid-steps", 1, 1, 1, "--no-amplify-first-chunk",
       "--seed", 7, "--prompt", "a red fox", "--negative-prompt", "blurry", "--num-frames", 66, "--fps", 12,
       "--crf", 20]


def generate(*args) -> int:
    return main(["generate", *map(str, args)])


def stop_at(monkeypatch, owner, name: str, call: int, error: BaseException) -> None:
    """Make the `call`-th call of the method `owner.name` (e.g. VideoWriter.write) raise `error` instead."""
    real, calls = getattr(owner, name), []

    def wrapper(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == call:
            raise error
        return real(self, *args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("full")
    old = os.getcwd()
    os.chdir(cwd)
    try:
        assert generate(*RUN, "--quiet", "--output", "fox.mp4") == 0
    finally:
        os.chdir(old)
    return read_video(cwd / "fox.mp4")


@pytest.fixture
def interrupted(tmp_path, monkeypatch, capsys):
    """A run with --state, stopped by Ctrl-C while writing chunk 1: chunk 0 and its state are saved."""
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    monkeypatch.chdir(run_dir)
    with monkeypatch.context() as patch:
        stop_at(patch, helios.pipeline.video_io.VideoWriter, "write", 2, KeyboardInterrupt())
        assert generate(*RUN, "--json", "--output", "fox.mp4", "--state", "fox.state") == 130
    err = capsys.readouterr().err
    assert ("interrupted after 1 chunks: the first 33 frames are in fox.partial.mp4; continue with: helios generate "
            "--resume fox.state") in err
    return run_dir


def test_the_state_alone_continues_the_run_from_anywhere(interrupted, uninterrupted, tmp_path, monkeypatch, capsys):
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the state keeps the output's absolute path
    assert generate("--resume", interrupted / "fox.state") == 0
    err = capsys.readouterr().err
    assert f"helios: wrote {interrupted / 'fox.mp4'}: 65 frames (5.4 s at 12 fps)" in err and "seed 7" in err
    frames, fps = read_video(interrupted / "fox.mp4")
    assert fps == 12 and np.array_equal(frames, uninterrupted[0])  # the same video as the uninterrupted run
    assert not (interrupted / "fox.partial.mp4").exists() and list(elsewhere.iterdir()) == []


def test_arguments_that_agree_with_the_state_are_fine(interrupted, uninterrupted, capsys):
    assert generate(*RUN, "--quiet", "--dtype", "auto", "--output", "fox.mp4", "--resume", "fox.state") == 0
    assert np.array_equal(read_video(interrupted / "fox.mp4")[0], uninterrupted[0])


def test_arguments_that_contradict_the_state_are_named(interrupted, capsys):
    before = sorted(p.name for p in interrupted.iterdir())
    partial = (interrupted / "fox.partial.mp4").read_bytes()
    code = generate("--resume", "fox.state", "--seed", 8, "--fps", 30, "--prompt", "a blue fox", "--model",
                    "helios-tiny-mid", "--output", "other.mp4", "--height", H, "--lossless", "--dtype", "bfloat16",
                    "--device", "cpu")
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1, err
    assert err.startswith("helios: error: --resume fox.state: these arguments contradict the saved run: "
                          "--model helios-tiny-mid (the run: helios-tiny); --output other.mp4 (the run: ")
    for named in ("--fps 30 (the run: 12)", "--lossless (the run: off)", "--dtype bfloat16 (the run: float32)",
                  "--prompt a blue fox (the run: a red fox)", "--seed 8 (the run: 7)"):
        assert named in err
    assert "--height" not in err and "--device" not in err  # the same height; another device is allowed
    assert sorted(p.name for p in interrupted.iterdir()) == before  # nothing touched
    assert (interrupted / "fox.partial.mp4").read_bytes() == partial


def test_the_state_keeps_the_low_memory_settings(interrupted):
    """A run made with --offload resumes with it (a resume alone must not run out of memory); another offload or
    text-encoder device given at resume is no contradiction: they change where the run goes on, not what it makes."""
    from helios.cli import build_parser
    from helios.cli.resume import resolve_arguments
    from helios.pipeline.state import GenerationState

    state = GenerationState.load(interrupted / "fox.state")
    assert state.metadata["offload"] is None and state.metadata["text_encoder_device"] is None  # the run's own
    state.with_metadata(offload="blocks", text_encoder_device="cpu").save("low.state")
    args = build_parser().parse_args(["generate", "--resume", "low.state"])
    resolve_arguments(args)
    assert (args.offload, args.text_encoder_device, args.model) == ("blocks", "cpu", "helios-tiny")
    args = build_parser().parse_args(["generate", "--resume", "low.state", "--offload", "model"])
    resolve_arguments(args)
    assert args.offload == "model"


def test_a_state_saved_from_python_needs_the_model(interrupted, capsys):
    from helios.pipeline.state import GenerationState

    state = GenerationState.load(interrupted / "fox.state")
    GenerationState(state.history, state.rng_state, state.next_chunk, state.seed, state.settings).save("py.state")
    assert generate("--resume", "py.state") == 2
    assert capsys.readouterr().err == ("helios: error: --model required; the state was saved from Python, without "
                                       "the command's settings\n")
    assert generate("--resume", "py.state", "--model", "helios-tiny", "--fps", 12, "--crf", 20, "--quiet",
                    "--output", "fox.mp4") == 0  # the pipeline's settings (prompt, options) come from the state


def test_without_resume_the_model_and_a_prompt_are_required(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert generate("--prompt", "a fox") == 2
    assert capsys.readouterr().err == ("helios: error: --model required (or --resume STATE, to continue a saved "
                                       "run)\n")
    assert generate() == 2
    assert "--model and --prompt or --prompt-schedule required" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_at_the_first_state_gives_no_advice_to_resume(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    full = helios.pipeline.state.StateSaveError("cannot save the generation state to fox.state: No space left on device (the "
                                       "previous state, if any, is unchanged)", errno.ENOSPC)
    stop_at(monkeypatch, helios.pipeline.state.GenerationState, "save", 1, full)
    assert generate(*RUN, "--quiet", "--output", "fox.mp4", "--state", "fox.state") == 1
    err = capsys.readouterr().err
    assert err == ("helios: error: generation failed after 1 chunks (the first 33 frames are in fox.partial.mp4): "
                   "cannot save the generation state to fox.state: No space left on device (the previous state, if "
                   "any, is unchanged)\n")
    assert not (tmp_path / "fox.state").exists()


def test_a_full_disk_at_a_later_state_points_to_the_one_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    full = helios.pipeline.state.StateSaveError("cannot save the generation state to fox.state: No space left on device",
                                       errno.ENOSPC)
    stop_at(monkeypatch, helios.pipeline.state.GenerationState, "save", 2, full)
    assert generate(*RUN, "--quiet", "--output", "fox.mp4", "--state", "fox.state") == 1
    err = capsys.readouterr().err
    assert "continue with: helios generate --resume fox.state): cannot save the generation state" in err
    assert helios.pipeline.state.GenerationState.load("fox.state").next_chunk == 1
    monkeypatch.undo()
    monkeypatch.chdir(tmp_path)
    assert generate("--resume", "fox.state", "--quiet") == 0  # and it does continue
