"""The speed work keeps results: cached rope tables keyed by value, attention backends, autograd and compile paths
(the compiled blocks' graphs counted with dynamo's own counters: one per block kind and stage size, all compiled
before the first chunk), and the benchmark commands."""

import json
import re
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    TEXT_LEN,
    Layout,
    make_inputs,
    make_pair,
    reference_forward,
    rel_err,
    tiny_config,
)
from torch._dynamo.testing import CompileCounter
from torch._dynamo.utils import counters

from helios.cli import main
from helios.model.kernels import SDPA_BACKENDS, attention, linear
from helios.model.layers import rope_table
from helios.scale import speed
from helios.scale.speed import compile_blocks, precompile, stage_sizes


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


# ---------------------------------------------------------------------------------------------------------------------
# torch.compile of the blocks: graphs counted with dynamo's own counters

LATENT = (8, 16)  # full-resolution latents of the compile tests; a 3-stage pyramid runs the current ones at 2x4, 4x8
FRAMES = 3  # current latent frames
# Compiled against eager, fp32, max |diff| / max |eager| over the three stage sizes: measured 2.8e-7 through dynamo's
# FX graph (CompileCounter: F.linear where eager CPU inference takes oneDNN's matmul) and 3.1e-7 through Inductor.
# The bound is about 6x that: summation order, not a different computation.
COMPILED_REL = 2e-6


def stage_inputs(config: dict, hw: tuple[int, int]) -> dict:
    """A pipeline-like forward at one stage: the current latents at `hw`, the three memory terms at full size."""
    layout = Layout(*hw, current=tuple(range(20, 20 + FRAMES)), short=(0, 19), mid=(17, 18), long=tuple(range(1, 17)),
                    history_hw=LATENT)
    return make_inputs(config, layout)


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()  # graphs compiled by other tests would be reused (the cache is per code object)
    counters.clear()
    yield
    torch._dynamo.reset()


def test_blocks_compile_one_graph_per_kind_and_stage_size_before_generation_and_match_eager(fresh_dynamo):
    config = tiny_config(num_layers=3)
    _, model = make_pair(config)
    inputs = [stage_inputs(config, hw) for hw in stage_sizes(LATENT, 3)]
    assert [tuple(x["hidden_states"].shape[-2:]) for x in inputs] == [(2, 4), (4, 8), (8, 16)]
    with torch.inference_mode():
        eager = [model(**x).sample for x in inputs]
    graphs = CompileCounter()
    assert compile_blocks(model, backend=graphs) is model
    seconds = precompile(model, LATENT, stages=3, frames=FRAMES, text_len=TEXT_LEN)
    # 3 stage sizes x 2 block kinds (the last block computes the current tokens only), shared by the 3 blocks.
    assert graphs.frame_count == 6 and counters["stats"]["unique_graphs"] == 6 and seconds > 0
    for _ in range(2):  # generation: the stage sizes again, twice: not one graph more
        with torch.inference_mode():
            compiled = [model(**x).sample for x in inputs]
        assert graphs.frame_count == 6 and counters["stats"]["unique_graphs"] == 6
    assert max(rel_err(c, e) for c, e in zip(compiled, eager)) <= COMPILED_REL


def test_a_fifth_stage_size_is_still_compiled(fresh_dynamo):
    """dynamo's recompile limit (8 per code object) counts every block's graphs together; past it every block would
    run eager with one log line as the only sign. compile_blocks raises it."""
    config = tiny_config(num_layers=2)
    _, model = make_pair(config)
    graphs = CompileCounter()
    compile_blocks(model, backend=graphs)
    for size in (2, 4, 6, 8, 10):  # five resolutions of one stage each: 10 graphs
        precompile(model, (size, size), frames=1, memory_frames=None, text_len=TEXT_LEN)
    assert graphs.frame_count == 10 and counters["stats"]["unique_graphs"] == 10


def test_blocks_compiled_by_inductor_without_graph_breaks_match_eager(fresh_dynamo):
    """The real backend: fullgraph=True fails on any Python-side data-dependent logic or host sync inside a block."""
    config = tiny_config(num_layers=2)
    _, model = make_pair(config)
    inputs = stage_inputs(config, LATENT)
    with torch.inference_mode():
        eager = model(**inputs).sample
        compile_blocks(model, mode="default")
        compiled = model(**inputs).sample
        assert counters["stats"]["unique_graphs"] == 2  # the two block kinds, at one stage size
        again = model(**inputs).sample
    assert counters["stats"]["unique_graphs"] == 2
    assert rel_err(compiled, eager) <= COMPILED_REL and torch.equal(again, compiled)


def test_compile_modes_are_checked_before_anything_compiles():
    config = tiny_config(num_layers=1)
    _, model = make_pair(config)
    with pytest.raises(ValueError, match=r"mode='fast': unknown compile mode, choose one of None, default, "
                                         r"max-autotune-no-cudagraphs, reduce-overhead"):
        compile_blocks(model, "fast")
    with pytest.raises(ValueError, match=r"mode='reduce-overhead' records CUDA graphs and needs a CUDA device; this "
                                         r"model is on cpu"):
        compile_blocks(model, "reduce-overhead")
    with pytest.raises(ValueError, match="applies to the inductor backend"):
        compile_blocks(model, "max-autotune-no-cudagraphs", backend="eager")
    assert all(getattr(b, "_compiled_call_impl", None) is None for b in model.blocks)  # nothing compiled
    for size, stages in (((6, 8), 3), ((0, 8), 1)):
        with pytest.raises(ValueError, match=re.escape(f"latent_size={size}: with {stages} stages")):
            stage_sizes(size, stages)
    with pytest.raises(ValueError, match="stages must be a positive int"):
        stage_sizes((8, 8), 0)


def test_helios_generate_compiles_every_stage_size_before_the_first_chunk(tmp_path, monkeypatch, capsys, fresh_dynamo):
    """helios-tiny (Distilled: three pyramid stages), two chunks, in-process; the blocks' graphs counted."""
    graphs, modes = CompileCounter(), []
    real = speed.compile_blocks
    # The counting backend: Inductor's CPU compile of six graphs would take a minute here.
    monkeypatch.setattr(speed, "compile_blocks", lambda model, mode=None: modes.append(mode) or real(
        model, backend=graphs))
    out = tmp_path / "fox.mp4"
    run = ["generate", "--model", "helios-tiny", "--height", "64", "--width", "128", "--pyramid-steps", "1", "1", "1",
           "--no-amplify-first-chunk", "--seed", "1", "--prompt", "a fox", "--num-frames", "66", "--device", "cpu"]
    assert main([*run, "--compile", "--output", str(out)]) == 0
    assert modes == [None] and out.is_file()
    assert graphs.frame_count == 6  # all compiled by precompile: generating two chunks compiled nothing more
    assert "helios: compiled the transformer's blocks for 3 stage size(s) in" in capsys.readouterr().err
    # --compile-mode implies --compile; one that cannot run here is refused before the model is loaded.
    monkeypatch.setattr(speed, "precompile", lambda *a, **k: pytest.fail("the model was loaded"))
    assert main([*run, "--compile-mode", "reduce-overhead", "--output", str(tmp_path / "no.mp4")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "mode='reduce-overhead' records CUDA graphs" in err
    assert not (tmp_path / "no.mp4").exists()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs and the GPU compile modes need a CUDA GPU")
@pytest.mark.parametrize("mode", ["max-autotune-no-cudagraphs", "reduce-overhead"])
def test_gpu_compile_modes_match_eager(fresh_dynamo, mode):
    """reduce-overhead replays CUDA graphs whose outputs are the next block's inputs: a replay that overwrote them
    would show here, over the stage sizes twice. bf16: compiled and eager round differently, ~1e-2 of the output."""
    config = tiny_config(num_layers=3, attention_head_dim=32, ffn_dim=128)
    _, model = make_pair(config)
    model = model.to("cuda", torch.bfloat16)
    inputs = [{k: v.cuda() if torch.is_tensor(v) else v for k, v in stage_inputs(config, hw).items()}
              for hw in stage_sizes(LATENT, 3)]
    with torch.inference_mode():
        eager = [model(**x).sample.float() for x in inputs]
    compile_blocks(model, mode)
    precompile(model, LATENT, stages=3, frames=FRAMES, text_len=TEXT_LEN)
    graphs = counters["stats"]["unique_graphs"]
    for _ in range(2):
        with torch.inference_mode():
            compiled = [model(**x).sample.float().clone() for x in inputs]
        assert max(rel_err(c, e) for c, e in zip(compiled, eager)) <= 0.03
    assert counters["stats"]["unique_graphs"] == graphs <= 6


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
