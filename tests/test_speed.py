"""The speed work keeps results: cached rope tables keyed by value, attention backends, autograd and compile paths,
and the benchmark commands."""

import json
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import make_inputs, make_pair, reference_forward, rel_err, tiny_config

from helios.model.kernels import SDPA_BACKENDS, attention, linear
from helios.model.layers import rope_table
from helios.scale.speed import compile_blocks


def test_rope_table_is_cached_by_value_not_by_tensor():
    config = tiny_config()
    ref, ours = make_pair(config)
    inputs = make_inputs(config, "helios", batch=1)
    rope_table.cache_clear()
    with torch.no_grad():
        ours(**inputs)
        first = rope_table.cache_info()
        copies = {k: (v.clone() if torch.is_tensor(v) else v) for k, v in inputs.items()}  # new tensors, same values
        ours(**copies)
        assert rope_table.cache_info().hits == first.hits + 1
        # Change the indices in place: same tensor object, new values. A cache keyed on the tensor would now serve
        # the old table; ours must compute the new one and still match the reference.
        inputs["indices_hidden_states"] += 5
        assert rel_err(ours(**inputs).sample, reference_forward(ref, inputs)) <= 1e-5


def test_attention_uses_the_cpu_flash_kernel_and_equals_plain_softmax():
    assert SDPA_BACKENDS["cuda"][0].name == "CUDNN_ATTENTION" and SDPA_BACKENDS["cpu"][0].name == "FLASH_ATTENTION"
    q, k, v = (torch.randn(2, 37, 3, 16) for _ in range(3))
    with torch.profiler.profile() as prof:
        out = attention(q, k, v)
    assert any("flash_attention" in e.key for e in prof.key_averages())
    weights = torch.softmax(torch.einsum("bqhd,bkhd->bhqk", q, k) / 4.0, dim=-1)
    expected = torch.einsum("bhqk,bkhd->bqhd", weights, v).flatten(2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)


def _kernels(fn) -> set[str]:
    with torch.profiler.profile() as prof:
        fn()
    return {e.key for e in prof.key_averages()}


@pytest.mark.parametrize("gelu", [False, True], ids=["plain", "gelu"])
def test_cpu_linear_runs_onednn_in_inference_and_agrees_with_f_linear(gelu):
    activation = "gelu_tanh" if gelu else None
    x, weight, bias = torch.randn(2, 300, 96), torch.randn(160, 96) / 10, torch.randn(160)
    expected = F.linear(x, weight, bias)
    expected = F.gelu(expected, approximate="tanh") if gelu else expected
    with torch.inference_mode():
        assert "mkldnn::_linear_pointwise" in _kernels(lambda: linear(x, weight, bias, activation=activation))
        torch.testing.assert_close(linear(x, weight, bias, activation=activation), expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(linear(x[:, 100:], weight), F.linear(x[:, 100:], weight), rtol=1e-5, atol=1e-5)
    # With autograd on, the op without a backward is never used, and gradients flow.
    w = weight.clone().requires_grad_()
    assert "mkldnn::_linear_pointwise" not in _kernels(lambda: linear(x, w, bias, activation=activation))
    linear(x, w, bias, activation=activation).sum().backward()
    assert w.grad is not None and w.grad.abs().sum() > 0


def test_cpu_linear_in_bf16_applies_gelu_to_the_rounded_product_like_the_reference():
    x, weight, bias = (t.to(torch.bfloat16) for t in (torch.randn(64, 96), torch.randn(160, 96) / 10, torch.randn(160)))
    with torch.inference_mode():
        out = linear(x, weight, bias, activation="gelu_tanh")
        assert torch.equal(out, F.gelu(F.linear(x, weight, bias), approximate="tanh"))


def test_autograd_path_equals_the_inference_path():
    config = tiny_config()
    _, ours = make_pair(config)
    inputs = make_inputs(config, "helios", batch=2)
    with torch.inference_mode():
        fast = ours(**inputs).sample
    out = ours(**inputs).sample  # grad enabled: span-wise ops concatenate, linears use F.linear (MKL, not oneDNN)
    out.square().mean().backward()
    assert rel_err(out.detach(), fast) <= 1e-6
    assert all(p.grad is not None for p in ours.blocks[0].parameters() if p.requires_grad)


@pytest.mark.slow
def test_compiled_blocks_have_no_graph_breaks_and_match_eager():
    """fullgraph=True fails on any Python-side data-dependent logic or host sync inside a block."""
    config = tiny_config(num_layers=2)
    ref, ours = make_pair(config)
    inputs = make_inputs(config, "helios", batch=1)
    with torch.inference_mode():
        eager = ours(**inputs).sample
        for block in ours.blocks:
            block.compile(fullgraph=True, dynamic=False)
        compiled = ours(**inputs).sample
    assert rel_err(compiled, eager) <= 1e-5
    assert compile_blocks(ours) is ours


def run_bench(*args) -> dict:
    result = subprocess.run([sys.executable, "-m", "helios.bench", *args], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert "ratio ours / reference" in result.stderr
    return json.loads(result.stdout)


@pytest.mark.slow
@pytest.mark.parametrize("extra", ["", "--memory", "--profile"])
def test_transformer_benchmark_reports_ratio_and_agreement(extra):
    small = ["--layers", "1", "--heads", "2", "--head-dim", "16", "--ffn", "32", "--text-dim", "32",
             "--text-len", "8", "--height", "64", "--width", "64", "--runs", "2"]
    out = run_bench("transformer", *small, *([extra] if extra else []))
    assert out["tokens"] == {"current": 144, "history": 32 + 4 + 4, "text": 8}
    assert out["max_rel_diff"] <= 1e-5 and out["ratio"] > 0 and len(out["ours"]["runs_s"]) == 2
    pairs = [a / b for a, b in zip(out["ours"]["runs_s"], out["reference"]["runs_s"])]
    assert out["pair_ratio_median"] == pytest.approx(sum(pairs) / 2)
    if extra == "--memory":
        assert set(out["cpu_forward_peak_gib"]) == {"ours", "reference"}
    if extra == "--profile":
        for impl in ("ours", "reference"):
            split = out["profile"][impl]
            assert split["matmul_s"] > 0 and split["attention_s"] > 0 and split["other_s"] >= 0
            assert split["matmul_s"] + split["attention_s"] + split["other_s"] == pytest.approx(split["total_s"])
        floor = (out["profile"]["ours"]["matmul_s"] + out["profile"]["ours"]["attention_s"]) / out["profile"][
            "reference"]["total_s"]
        assert out["profile"]["floor_ratio"] == pytest.approx(floor)


@pytest.mark.slow
def test_pipeline_and_load_benchmarks_run():
    pipe = run_bench("pipeline", "--runs", "1", "--steps", "1", "--num-frames", "33")
    assert pipe["max_abs_frame_diff"] <= 1e-3
    load = run_bench("load", "--layers", "1", "--heads", "1", "--ffn", "256", "--runs", "1", "--shard-size", "2MB")
    assert load["shards"] > 1 and load["ours"]["peak_added_x_checkpoint"] > 0
