"""`helios generate` and `helios info` print only helios' own lines: other libraries' logs and warnings appear with
--debug only (issue 10, point 4); and the bar says what is happening in every phase (point 3).

The real command in subprocesses, with `accelerate` hidden from them, as on a machine that lacks it: diffusers then
advises installing it on every model load. (The test extra installs accelerate: hiding it in the subprocess is what
puts the test on a newcomer's machine.)"""

import os
import re
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest

pytestmark = pytest.mark.slow  # real `helios` processes

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
       "OMP_NUM_THREADS": "1"}
ENV.pop("DIFFUSERS_VERBOSITY", None)  # an in-process `helios` run of another test may have set it in this process
# peft (in the test extra, for the LoRA oracle tests) requires accelerate, so a machine without accelerate has no peft
# either; hidden too, or diffusers, finding peft, imports its peft loader, which needs accelerate.
WITHOUT_ACCELERATE = ("import sys; sys.modules['accelerate'] = sys.modules['peft'] = None  # importlib finds neither\n"
                      "from helios.cli import main; sys.exit(main(sys.argv[1:]))")
FAST = ["--model", "helios-tiny", "--height", 64, "--width", 128, "--pyramid-steps", 1, 1, 1,
        "--no-amplify-first-chunk", "--seed", 7]
ACCELERATE_ADVICE = "Cannot initialize model with low cpu memory usage because `accelerate` was not found"
# What the bar draws (tqdm redraws it in place): its label, then the bar and the step count.
BAR = re.compile(r"^(encoding (text|image)|chunk \d+/\d+ (denoising|decoding|writing|saving state))\s")


def start(*args, cwd) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-c", WITHOUT_ACCELERATE, *map(str, args)], cwd=cwd, env=ENV, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    cwd = tmp_path_factory.mktemp("quiet")
    PIL.Image.new("RGB", (100, 60), (220, 120, 30)).save(cwd / "first.png")
    started = {
        "generate": start("generate", *FAST, "--prompt", "a fox", "--image", "first.png", "--num-frames", 66,
                          "--state", "fox.state", "--output", "fox.mp4", cwd=cwd),
        "info": start("info", "helios-tiny", cwd=cwd),
        "info --debug": start("info", "helios-tiny", "--debug", cwd=cwd),
    }
    results = {}
    for name, p in started.items():
        out, err = p.communicate(timeout=600)
        results[name] = (p.returncode, out, err)
    return results


def test_generate_prints_only_helios_lines_and_its_bar(runs):
    code, out, err = runs["generate"]
    assert code == 0, err
    assert out == ""
    frames = [frame.strip() for frame in re.split(r"[\r\n]", err) if frame.strip()]
    foreign = [frame for frame in frames if not frame.startswith("helios: ") and not BAR.match(frame)]
    assert foreign == [], foreign
    assert [f for f in frames if f.startswith("helios: ")][-1].startswith("helios: wrote fox.mp4: 65 frames")
    labels = {re.sub(r"^chunk \d+/\d+ ", "", BAR.match(frame).group(1)) for frame in frames if BAR.match(frame)}
    assert labels == {"encoding text", "encoding image", "denoising", "decoding", "writing", "saving state"}


def test_info_prints_nothing_on_stderr_and_debug_shows_the_libraries(runs):
    code, out, err = runs["info"]
    assert code == 0 and err == "", err
    assert "variant      distilled" in out
    code, out, err = runs["info --debug"]
    assert code == 0 and ACCELERATE_ADVICE in err  # the hidden accelerate is really missing: the advice is there


def test_only_helios_warnings_are_shown_without_debug():
    # In a subprocess: pytest records warnings instead of printing them.
    script = """if True:
        import os, sys, warnings
        from helios.cli.common import HELIOS_DIR, show_warnings
        show_warnings(quiet=False, debug=sys.argv[1] == "debug")
        warnings.warn_explicit("from somelib", UserWarning, "/site-packages/somelib/models.py", 1, module="somelib")
        warnings.warn_explicit("from helios", UserWarning, os.path.join(HELIOS_DIR, "options.py"), 1,
                               module="helios.sampling.options")
    """
    for debug in (False, True):
        result = subprocess.run([sys.executable, "-c", script, "debug" if debug else "-"], env=ENV, text=True,
                                capture_output=True, timeout=60)
        assert result.returncode == 0, result.stderr
        assert "helios: warning: from helios\n" in result.stderr
        assert ("UserWarning: from somelib" in result.stderr) == debug  # another library's: with --debug, as worded
        assert "helios: warning: from somelib" not in result.stderr
