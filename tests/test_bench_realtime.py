"""`python -m helios.bench realtime` at toy size on the CPU: the command a GPU session runs, checked end to end here
(the figures themselves are the GPU's: docs/benchmarks.md)."""

import json
import math
import subprocess
import sys

import pytest

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def results(tmp_path_factory):
    out = tmp_path_factory.mktemp("realtime") / "realtime.json"
    done = subprocess.run([sys.executable, "-m", "helios.bench", "realtime", "--size", "toy", "--height", "64",
                           "--width", "64", "--num-frames", "66", "--options", "eager,overlap,fp8",
                           "--forward-runs", "1", "--json", str(out)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout) == json.loads(out.read_text())
    return json.loads(out.read_text()), done.stderr


def test_each_option_reports_its_speed_memory_and_stage_forwards(results):
    data, _ = results
    assert (data["size"], data["height"], data["width"], data["num_frames"]) == ("toy", 64, 64, 66)
    for name in ("eager", "overlap"):
        row = data["options"][name]
        assert row["frames"] == 65 and row["fps"] == pytest.approx(65 / row["seconds"])
        assert 0 < row["first_chunk_s"] <= row["seconds"] and row["later_chunk_s"] > 0
        stages = [k for k in row["forward"]]
        assert stages == ["16x16", "32x32", "64x64"]  # the pyramid's three current sizes, the memory full size
        assert all(s["seconds"] > 0 and s["tflops"] > 0 and s["tokens"] > 0 for s in row["forward"].values())


def test_errors_are_against_the_eager_path_and_the_overlap_changes_nothing(results):
    data, _ = results
    assert "error" not in data["options"]["eager"]  # the baseline
    error = data["options"]["overlap"]["error"]
    assert error["forward_rel_err"] == 0 and math.isinf(error["video_psnr_db"])


def test_fp8_compute_is_skipped_by_name_on_a_cpu(results):
    data, err = results
    assert "fp8-compute" in data["options"]["fp8"]["skipped"]
    assert "fp8: skipped" in err


def test_the_reference_runs_side_by_side_and_matches(results):
    data, err = results
    ref = data["reference"]
    assert ref["frames"] == 65 and ref["fps"] > 0
    assert ref["psnr_vs_ours_eager_db"] > 60  # fp32 on a CPU: the same video up to rounding
    assert "| reference (diffusers 0.42.1) |" in err  # the markdown table for docs/benchmarks.md
