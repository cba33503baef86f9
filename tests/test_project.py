"""The project around the code: the README's commands, the example, the import rules."""

import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def test_ci_runs_the_readme_test_command():
    readme = (ROOT / "README.md").read_text()
    commands = re.findall(r"```sh\n(.*?)\n```", readme, flags=re.S)
    test_command = next(c for c in commands if "pytest" in c)
    assert test_command in (ROOT / ".ci" / "run").read_text()


@pytest.mark.slow
def test_example_runs():
    result = subprocess.run([sys.executable, str(ROOT / "examples" / "forward.py")], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    assert "flow prediction (1, 16, 9, 24, 40)" in result.stdout


def test_package_does_not_import_the_reference_model():
    # diffusers is the oracle of the tests; our model, samplers and loop must not depend on it. VAE/video code uses
    # its AutoencoderKLWan and VideoProcessor; the benchmark imports the reference to compare against it.
    for path in (ROOT / "src" / "helios").rglob("*.py"):
        if re.search(r"vae|video", path.name) or path.parent.name == "bench":
            continue
        assert not re.search(r"^\s*(from|import) diffusers", path.read_text(), flags=re.M), path


def test_import_has_no_side_effects(tmp_path):
    code = "import os, helios; print(sorted(os.listdir('.')))"
    result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, check=True)
    assert result.stdout.strip() == "[]"
