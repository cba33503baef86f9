"""The kernels: the fast linear is chosen by what this CPU runs, and every path gives the reference's results.

oneDNN has no bf16 inner product below AVX-512: a CPU with AVX2 only (many AMD EPYCs) failed every bf16 forward
when the fast path was assumed. ONEDNN_MAX_CPU_ISA=AVX2, set before oneDNN starts (so: in a subprocess), makes this
machine behave like one, whatever it is.
"""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from helios.model import kernels

ROOT = Path(__file__).resolve().parents[1]
PROBE = "import torch; from helios.model import kernels; " \
        "print(kernels.onednn_linear(torch.bfloat16) is not None, kernels.onednn_linear(torch.float32) is not None)"


def run(code_or_args, **env):
    args = ["-c", code_or_args] if isinstance(code_or_args, str) else code_or_args
    return subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONPATH": str(ROOT / "src"), **env}, timeout=600)


def test_below_avx512_bf16_takes_the_default_path_and_fp32_keeps_onednn():
    result = run(PROBE, ONEDNN_MAX_CPU_ISA="AVX2")
    assert result.stdout.split() == ["False", "True"], result.stderr


def test_the_fast_path_can_be_switched_off():
    assert run(PROBE, HELIOS_FAST_LINEAR="0").stdout.split() == ["False", "False"]


def test_a_bf16_model_runs_on_an_avx2_cpu():
    code = ("import torch; from helios import HeliosTransformer3DModel as M; from helpers import make_inputs, tiny_config;"
            "m = M(**tiny_config()).to(torch.bfloat16).eval(); x = make_inputs(tiny_config());"
            "y = m(**{k: v.to(torch.bfloat16) if v.is_floating_point() else v for k, v in x.items()}).sample;"
            "print(tuple(y.shape), bool(y.isfinite().all()))")
    result = run(code, ONEDNN_MAX_CPU_ISA="AVX2", PYTHONPATH=f"{ROOT / 'src'}{os.pathsep}{ROOT / 'tests'}")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "(1, 16, 9, 8, 16) True"


@pytest.mark.slow
@pytest.mark.parametrize("env", [{"ONEDNN_MAX_CPU_ISA": "AVX2"}, {"HELIOS_FAST_LINEAR": "0"}], ids=["avx2", "no-fast-path"])
def test_the_model_tests_pass_on_an_avx2_cpu_and_without_the_fast_path(env):
    """The fp32 and bf16 comparisons with the reference, run again in a process that sees another CPU."""
    args = ["-m", "pytest", "-p", "no:cacheprovider", "tests/test_model.py", "-k", "matches_reference or bf16"]
    result = run(args, **env)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert " passed" in result.stdout and " failed" not in result.stdout


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("activation", [None, "gelu_tanh"])
def test_linear_equals_f_linear_on_every_path(dtype, activation):
    g = torch.Generator().manual_seed(0)
    x, w, b = (torch.randn(s, generator=g).to(dtype) for s in ((2, 37, 64), (48, 64), (48,)))
    expected = F.linear(x, w, b)
    expected = kernels.gelu_tanh(expected) if activation else expected
    with torch.inference_mode():
        got = kernels.linear(x, w, b, activation)
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, expected, rtol=tol, atol=tol)


def test_tensor_subclass_weights_take_the_default_path(monkeypatch):
    class Marked(torch.Tensor):  # stands in for a quantized weight (torchao's are tensor subclasses)
        pass

    monkeypatch.setattr(kernels, "onednn_linear", lambda dtype: pytest.fail("the fast path saw a subclass"))
    w = torch.randn(8, 16).as_subclass(Marked)
    with torch.inference_mode():
        kernels.linear(torch.randn(2, 16), w)


def test_attention_and_linears_are_replaced_from_outside_the_model():
    """The seams context parallelism and quantization/LoRA use: a block's attention function, its Linear modules."""
    from helpers import make_inputs, tiny_config

    from helios import HeliosTransformer3DModel
    from helios.model.layers import Linear

    model = HeliosTransformer3DModel(**tiny_config()).eval()
    inputs = make_inputs(tiny_config())
    with torch.inference_mode():
        expected = model(**inputs).sample
    calls = {"attention": 0, "linear": 0}

    def counting_attention(q, k, v):
        calls["attention"] += 1
        return kernels.attention(q, k, v)

    class CountingLinear(torch.nn.Module):  # wraps a Linear, as a LoRA side path would
        def __init__(self, base):
            super().__init__()
            self.base = base

        def forward(self, x):
            calls["linear"] += 1
            return self.base(x)

    linears = 0
    for block in model.blocks:
        block.attn1.attention = block.attn2.attention = counting_attention
        for parent in list(block.modules()):
            for name, child in list(parent.named_children()):
                if isinstance(child, Linear):
                    setattr(parent, name, CountingLinear(child))
                    linears += 1
    with torch.inference_mode():
        out = model(**inputs).sample
    assert torch.equal(out, expected)
    assert calls["attention"] == 2 * len(model.blocks)
    # every matmul of every block went through a Linear module (the FFN's first one, with its GELU, too)
    assert linears == 10 * len(model.blocks)  # q, k, v, out of both attentions, and the FFN's two
    assert calls["linear"] == linears  # each called once per forward
