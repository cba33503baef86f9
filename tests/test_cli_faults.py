"""Faults during a real `helios generate` process: SIGTERM, and a disk that fills up. Both runs start together (each
spends seconds importing on one core), on a prebuilt tiny model folder so that nothing but the video is written.
"""

from __future__ import annotations

import errno
import json
import os
import resource
import signal
import subprocess
import sys
import threading
from pathlib import Path

import av
import numpy as np
import pytest

from helios.pipeline.media import read_video
from helios.pipeline.video_io import read_fragments

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
       "OMP_NUM_THREADS": "1"}
FAST = ["--height", 64, "--width", 128, "--pyramid-steps", 1, 1, 1, "--no-amplify-first-chunk", "--seed", 7,
        "--prompt", "a red fox running through fresh snow", "--num-frames", 99]  # 3 chunks of about 117 KB
DISK = 200_000  # room for the first chunk, not for the second


def start(model: Path, cwd: Path, *args, preexec_fn=None) -> subprocess.Popen:
    command = [sys.executable, "-m", "helios", "generate", "--model", str(model), *map(str, FAST), *map(str, args)]
    return subprocess.Popen(command, cwd=cwd, env=ENV, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            preexec_fn=preexec_fn)


def limit_file_size():
    """In the child: files stop growing at DISK bytes (the kernel's EFBIG), as on a full disk."""
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
    resource.setrlimit(resource.RLIMIT_FSIZE, (DISK, resource.getrlimit(resource.RLIMIT_FSIZE)[1]))


def terminate_after_first_chunk(proc: subprocess.Popen, results: dict) -> None:
    lines = [proc.stdout.readline()]  # --json: one line per chunk written
    proc.send_signal(signal.SIGTERM)  # chunk 1 is being made now
    out, err = proc.communicate(timeout=600)  # --json shows no bar: stderr holds a few lines, the pipe cannot fill
    results["terminated"] = subprocess.CompletedProcess(proc.args, proc.returncode, "".join(lines) + out, err)


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny_folder):
    model = tiny_folder
    terminated, full = tmp_path_factory.mktemp("terminated"), tmp_path_factory.mktemp("full")
    mounted = os.geteuid() == 0  # root: a real full disk, a small tmpfs (ENOSPC); else a file size limit (EFBIG)
    if mounted:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK}", "tmpfs", str(full)], check=True)
    try:
        results = {}
        proc = start(model, terminated, "--json", "--state", "fox.state", "--output", "fox.mp4")
        watcher = threading.Thread(target=terminate_after_first_chunk, args=(proc, results))
        watcher.start()
        proc = start(model, full, "--quiet", "--output", "fox.mp4", preexec_fn=None if mounted else limit_file_size)
        out, err = proc.communicate(timeout=600)
        results["full"] = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
        watcher.join()
        yield {"terminated": (terminated, results["terminated"]), "full": (full, results["full"], mounted)}
    finally:
        if mounted:
            subprocess.run(["umount", str(full)], check=True)


def test_sigterm_ends_a_run_like_ctrl_c(runs):
    cwd, result = runs["terminated"]
    assert result.returncode == 128 + signal.SIGTERM, result.stderr
    assert [json.loads(line)["index"] for line in result.stdout.splitlines()] == [0]
    assert "helios: interrupted after 1 chunks: the first 33 frames are in fox.partial.mp4" in result.stderr
    assert "--resume fox.state" in result.stderr and "Traceback" not in result.stderr
    assert read_video(cwd / "fox.partial.mp4")[0].shape == (33, 64, 128, 3) and (cwd / "fox.state").is_file()


def test_a_full_disk_leaves_a_playable_prefix_and_says_so(runs):
    cwd, result, mounted = runs["full"]
    reason = os.strerror(errno.ENOSPC if mounted else errno.EFBIG)  # "No space left on device" / "File too large"
    assert result.returncode == 1, result.stderr
    assert result.stderr == (f"helios: error: cannot write fox.partial.mp4: {reason} (the first 33 frames are "
                             "in fox.partial.mp4)\n"), result.stderr
    assert not (cwd / "fox.mp4").exists()
    partial = cwd / "fox.partial.mp4"
    _, fragments = read_fragments(partial)
    assert len(fragments) == 1 and partial.stat().st_size == fragments[0][0] + fragments[0][1]  # no torn tail
    with av.open(str(partial)) as container:  # every packet decodes
        frames = [f.to_ndarray(format="rgb24") for p in container.demux(video=0) for f in p.decode()]
    assert np.stack(frames).shape == (33, 64, 128, 3)
