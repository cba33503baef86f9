"""The `helios` command as a user runs it: the real console script in subprocesses, on the built-in helios-tiny.

Every subprocess pays for importing torch, transformers and diffusers (seconds, mostly on one core), so each run
checks several things, and runs that do not depend on each other overlap: the runs of the first tests start together
in a fixture, and the bad-input runs (most fail before those imports) go a few at a time.
"""

import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import av
import numpy as np
import PIL.Image
import pytest

from helpers import write_video

from helios.pipeline.media import read_video

pytestmark = pytest.mark.slow  # real `helios` processes

ROOT = Path(__file__).resolve().parents[1]
ENTRY_POINT = Path(sys.executable).parent / "helios"  # what `pip install -e .` puts beside the interpreter
# One thread per run: runs overlap on few cores, and torch's OpenMP threads waiting on busy cores would crawl.
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
       "OMP_NUM_THREADS": "1"}
H, W = 64, 128
FAST = ["--model", "helios-tiny", "--height", H, "--width", W, "--pyramid-steps", 1, 1, 1, "--no-amplify-first-chunk",
        "--seed", 7]
LONG = [*FAST, "--prompt", "a red fox running through fresh snow", "--num-frames", 132, "--fps", 12]  # 4 chunks


def command(*args, entry_point=False) -> list[str]:
    program = [str(ENTRY_POINT)] if entry_point else [sys.executable, "-m", "helios"]
    return [*program, *map(str, args)]


def run(*args, cwd, entry_point=False) -> subprocess.CompletedProcess:
    return subprocess.run(command(*args, entry_point=entry_point), cwd=cwd, env=ENV, capture_output=True, text=True,
                          timeout=300)


def playable_frames(path) -> np.ndarray:
    """The frames a player shows: decoding stops at the first broken packet (a chunk torn by a kill)."""
    frames = []
    with av.open(str(path)) as container:
        try:
            for packet in container.demux(video=0):
                frames += [frame.to_ndarray(format="rgb24") for frame in packet.decode()]
        except av.error.FFmpegError:
            pass
    return np.stack(frames)


class Started:
    """A helios run started ahead of its test, so that runs overlap: each spends seconds importing on one core."""

    def __init__(self, *args, cwd: Path, entry_point=False, kill_after_chunks: int | None = None):
        self.cwd, self._result = cwd, None
        self._proc = subprocess.Popen(command(*args, entry_point=entry_point), cwd=cwd, env=ENV, text=True,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        self._watcher = None
        if kill_after_chunks is not None:  # needs --json: one line per finished chunk
            self._watcher = threading.Thread(target=self._kill_after, args=(kill_after_chunks,))
            self._watcher.start()

    def _kill_after(self, chunks: int) -> None:
        lines = []
        for line in self._proc.stdout:
            lines.append(line)
            if len(lines) == chunks:  # that chunk is written and its state saved: kill, no chance to clean up
                self._proc.send_signal(signal.SIGKILL)
                break
        self._proc.wait(timeout=300)
        self._result = subprocess.CompletedProcess(self._proc.args, self._proc.returncode, "".join(lines),
                                                   self._proc.stderr.read())

    def result(self) -> subprocess.CompletedProcess:
        if self._watcher is not None:
            self._watcher.join(timeout=300)
        if self._result is None:
            out, err = self._proc.communicate(timeout=300)
            self._result = subprocess.CompletedProcess(self._proc.args, self._proc.returncode, out, err)
        return self._result


@pytest.fixture(scope="module")
def started(tmp_path_factory) -> dict[str, Started]:
    assert ENTRY_POINT.is_file(), f"{ENTRY_POINT} is missing: install the package (pip install -e .)"
    t2v, killed, i2v, v2v, info = (tmp_path_factory.mktemp(name) for name in ("t2v", "killed", "i2v", "v2v", "info"))
    PIL.Image.new("RGB", (200, 120), (220, 120, 30)).save(i2v / "first.png")
    write_clip(v2v / "clip.mp4")
    (v2v / "story.tsv").write_text("# two prompts, one chunk each\n1\ta red fox\n1\ta red fox in the snow\n")
    runs = {
        # 4 chunks of text-to-video through the installed `helios` script, with --json
        "t2v": Started("generate", *LONG, "--json", "--output", "fox.mp4", cwd=t2v, entry_point=True),
        # the same, saving its state, killed once chunk 1 is written
        "killed": Started("generate", *LONG, "--json", "--output", "fox.mp4", "--state", "fox.state", cwd=killed,
                          kill_after_chunks=2),
        "i2v": Started("generate", *FAST, "--prompt", "a fox", "--image", "first.png", "--num-frames", 33, "--quiet",
                       "--output", "i2v.mp4", cwd=i2v),
        "v2v": Started("generate", *FAST, "--prompt-schedule", "story.tsv", "--video", "clip.mp4", "--fps", 30,
                       "--output", "v2v.mp4", cwd=v2v),
        "info": Started("info", "helios-tiny", cwd=info),
    }
    yield runs
    for run in runs.values():
        run.result()  # reap them all, even after a failure


def write_clip(path) -> None:
    """40 frames (more than one 33-frame chunk) at another size than the output."""
    write_video(path, np.stack([np.full((48, 96, 3), (6 * i, 100, 255 - 6 * i), np.uint8) for i in range(40)]))


def test_text_to_video_writes_the_file_and_json_lines(started):
    cwd, result = started["t2v"].cwd, started["t2v"].result()
    assert result.returncode == 0, result.stderr
    *chunks, done = [json.loads(line) for line in result.stdout.splitlines()]
    assert [c["index"] for c in chunks] == [0, 1, 2, 3] and {c["chunks"] for c in chunks} == {4}
    assert [c["frames"] for c in chunks] == [33, 33, 33, 30]  # 132 frames -> 4 chunks, trimmed to 4n + 1
    assert [c["frames_done"] for c in chunks] == [33, 66, 99, 129] and {c["total_frames"] for c in chunks} == {129}
    assert all(c["output"] == "fox.partial.mp4" and c["seconds"] > 0 and c["fps"] > 0 for c in chunks)
    assert done["event"] == "done" and done["output"] == "fox.mp4" and done["frames"] == 129
    assert done["video_fps"] == 12 and done["seed"] == 7 and done["peak_memory"]["RSS"] > 0 and done["seconds"] > 0
    frames, fps = read_video(cwd / "fox.mp4")
    assert frames.shape == (129, H, W, 3) and fps == 12
    assert [p.name for p in cwd.iterdir()] == ["fox.mp4"]  # the partial file became the output
    assert "random weights" in result.stderr and "its videos are noise" in result.stderr  # the built-in says so
    assert "Traceback" not in result.stderr


def test_a_killed_run_leaves_a_playable_prefix_and_resumes_to_the_same_video(started):
    assert started["t2v"].result().returncode == 0
    uninterrupted, cwd = started["t2v"].cwd / "fox.mp4", started["killed"].cwd
    reference, _ = read_video(uninterrupted)
    killed = started["killed"].result()
    assert killed.returncode == -signal.SIGKILL, killed.stderr
    assert [json.loads(line)["index"] for line in killed.stdout.splitlines()] == [0, 1]
    assert not (cwd / "fox.mp4").exists() and (cwd / "fox.state").is_file()
    prefix = playable_frames(cwd / "fox.partial.mp4")
    assert len(prefix) in (66, 99)  # chunk 2 may have finished before the kill landed
    assert np.array_equal(prefix, reference[: len(prefix)])

    resumed = run("generate", *LONG, "--output", "fox.mp4", "--resume", "fox.state", cwd=cwd)
    assert resumed.returncode == 0, resumed.stderr
    assert "chunk 4/4" in resumed.stderr and "helios: wrote fox.mp4: 129 frames (10.8 s at 12 fps)" in resumed.stderr
    frames, fps = read_video(cwd / "fox.mp4")
    # Exactly equal although H.264 is lossy: the finished chunks are copied byte for byte, x264 is deterministic,
    # and chunks are encoded independently; so even the files are the same bytes.
    assert fps == 12 and np.array_equal(frames, reference)
    assert (cwd / "fox.mp4").read_bytes() == uninterrupted.read_bytes()
    assert not (cwd / "fox.partial.mp4").exists()


def test_image_to_video_quietly(started):
    result = started["i2v"].result()
    assert (result.returncode, result.stdout, result.stderr) == (0, "", "")
    frames, fps = read_video(started["i2v"].cwd / "i2v.mp4")
    assert frames.shape == (33, H, W, 3) and fps == 24  # the default frame rate


def test_video_to_video_with_a_prompt_schedule_and_the_progress_bar(started):
    result = started["v2v"].result()
    assert result.returncode == 0, result.stderr
    frames, fps = read_video(started["v2v"].cwd / "v2v.mp4")
    assert frames.shape == (65, H, W, 3) and fps == 30  # the schedule's 2 chunks
    for shown in ("chunk 2/2", "frames 33/65", "ETA", "helios: wrote v2v.mp4: 65 frames (2.2 s at 30 fps) in",
                  "frames/s, peak memory RSS", "seed 7"):
        assert shown in result.stderr
    assert result.stdout == ""


def test_info_describes_and_checks_the_builtin_model(started):
    result = started["info"].result()
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for shown in ("variant      distilled", "pipeline     HeliosPyramidPipeline (is_distilled=True",
                  "sampler      HeliosDMDScheduler: dmd, 3 stage(s), dynamic linear shift",
                  "defaults     128x192, 99 frames (3 chunks of 33), pyramid steps [2, 2, 2], amplified first chunk",
                  "num_attention_heads=2", "num_layers=2", "rope_dim=[4, 6, 6]"):
        assert shown in out
    for name in ("transformer", "vae", "text_encoder"):
        assert re.search(rf"^ +{name} +\d{{1,3}}(,\d{{3}})* +float32 +[\d.]+ KiB +OK$", out, re.M), name
    for name in ("tokenizer", "scheduler"):
        assert re.search(rf"^ +{name} +- +- +[\d.]+ (B|KiB) +OK$", out, re.M), name


def test_info_names_missing_and_broken_components(tmp_path):
    from helios.cli.info import describe
    from helios.pipeline.tiny import build_tiny_model

    folder = build_tiny_model(tmp_path / "model")
    shutil.rmtree(folder / "vae")
    weights = folder / "text_encoder" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-10])
    for quick in (False, True):
        lines, ok = describe(folder, "model", quick=quick)
        report = "\n".join(lines)
        assert not ok and "MISSING: no folder" in report and "model.safetensors: truncated" in report
        assert re.search(r"^ +transformer .* OK$", report, re.M)


def bad_inputs(tmp_path) -> dict:
    (tmp_path / "broken.png").write_bytes(b"not a png")
    (tmp_path / "broken.mp4").write_bytes(b"not an mp4")
    (tmp_path / "bad.tsv").write_text("2 chunks without a tab\n")
    cases = {
        "zero frames": (["--num-frames", 0], "argument --num-frames: must be a positive integer, got '0'"),
        "negative frames": (["--num-frames", -4], "must be a positive integer, got '-4'"),
        "missing image": (["--image", "missing.png"], "--image missing.png: no such file"),
        "unreadable image": (["--image", "broken.png"], "image: cannot read broken.png"),
        "unreadable video": (["--video", "broken.mp4"], "video: cannot read broken.mp4"),
        "a size the pyramid can't take": (["--height", 100], "height must be a positive multiple of 64"),
        "unknown model": (["--model", "no-such-model"], "unknown model 'no-such-model': not a built-in model"),
        "unwritable output": (["--output", "/proc/fox.mp4"], "--output /proc/fox.mp4 cannot be written"),
        "output folder missing": (["--output", "nowhere/fox.mp4"], "the folder nowhere does not exist"),
        "not an mp4": (["--output", "fox.mkv"], "give a name ending in .mp4"),
        "bad schedule": (["--prompt-schedule", "bad.tsv"], "bad.tsv:1: expected 'n_chunks<TAB>prompt'"),
        "no state to resume": (["--resume", "none.state"], "--resume none.state: no such file"),
    }
    if os.geteuid() != 0:  # root writes anywhere
        (tmp_path / "read-only").mkdir(mode=0o555)
        cases["read-only folder"] = (["--output", "read-only/fox.mp4"], "cannot be written")
    return cases


def test_bad_input_is_one_line_on_stderr_and_leaves_no_file(tmp_path):
    cases = bad_inputs(tmp_path)
    before = sorted(tmp_path.iterdir())

    def attempt(change):
        prompt = [] if "--prompt-schedule" in change else ["--prompt", "a fox"]
        return run("generate", *FAST, *prompt, "--num-frames", 33, *change, cwd=tmp_path)

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(cases, pool.map(attempt, [change for change, _ in cases.values()])))
        debug = pool.submit(attempt, ["--image", "missing.png", "--debug"]).result()
    for name, (_, message) in cases.items():
        result = results[name]
        assert result.returncode == 2, (name, result.stderr)
        assert result.stdout == "" and result.stderr.count("\n") == 1, (name, result.stderr)
        assert result.stderr.startswith("helios: error: ") and message in result.stderr, (name, result.stderr)
    assert sorted(tmp_path.iterdir()) == before  # nothing half-written
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "FileNotFoundError" in debug.stderr


def test_compile_flag_compiles_the_pipelines_transformer(tmp_path, monkeypatch):
    # In-process, with compile_blocks recorded rather than run: compiling every pyramid stage on CPU would take
    # minutes, and tests/test_speed.py checks that compiled blocks match eager ones.
    import helios.scale.speed
    from helios.cli import main

    compiled = []
    monkeypatch.setattr(helios.scale.speed, "compile_blocks", lambda model, mode=None: compiled.append(model) or model)
    monkeypatch.chdir(tmp_path)
    args = [*map(str, FAST), "--prompt", "a fox", "--num-frames", "33", "--quiet"]
    assert main(["generate", *args, "--output", "fox.mp4", "--compile"]) == 0
    assert len(compiled) == 1 and type(compiled[0]).__name__ == "HeliosTransformer3DModel"
    assert read_video(tmp_path / "fox.mp4")[0].shape == (33, H, W, 3)
    assert main(["generate", *args, "--output", "plain.mp4"]) == 0 and len(compiled) == 1  # not without the flag
