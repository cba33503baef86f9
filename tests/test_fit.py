"""fit.py: a plan per card from byte counts (device memory, host RAM, the model's sizes, the quantize choice), the
host cache's RAM rule, and `helios generate --offload auto` saying the plan it chose (a faked GPU on a CPU)."""

from __future__ import annotations

import pytest

from helios.cli import main
from helios.scale import fit
from helios.scale.fit import GB, GiB, NoPlanFits, host_cache_fits, model_sizes, plan_for

SIZES = model_sizes()  # the published 14B config at 384x640
RAM = 128 * GiB


def test_sizes_are_the_published_models():
    assert round(SIZES.transformer / GB, 1) == 28.7 and round(SIZES.block / GB, 2) == 0.70
    assert round(SIZES.transformer_bytes("int8") / GB, 1) == 14.6 and SIZES.num_blocks == 40
    assert 1.0 * GB < SIZES.activations < 4 * GB and len(SIZES.chunk_forwards) == 6  # 3 stages x 2 steps


@pytest.mark.parametrize("gib, quantize, offload, encoder", [
    (80, None, None, None), (48, None, None, None),
    (24, None, "blocks", None), (24, "int8", "text_encoder", None), (24, "fp8", "text_encoder", None),
    (16, None, "blocks", None), (16, "int8", "blocks", None),
    (12, None, "blocks", "cpu"),  # the 11.4 GB text encoder cannot visit a 12 GB card: it runs on the CPU
])
def test_the_plan_per_card(gib, quantize, offload, encoder):
    plan = plan_for(gib * GiB, RAM, quantize, SIZES)
    assert (plan.offload, plan.text_encoder_device, plan.quantize) == (offload, encoder, quantize)
    assert plan.device_bytes <= fit.usable(gib * GiB)  # never more than the card less the stated margin
    assert plan.seconds_per_chunk > 0 and "/" in plan.formula  # derived: FLOPs / throughput, bytes / link


def test_the_24_gb_line_says_int8_resident_with_the_encoder_leaving():
    plan = plan_for(24 * GiB, RAM, "int8", SIZES)
    assert plan.describe(24 * GiB) == "plan for 24 GB: int8 resident, text encoder to the CPU after encoding"


def test_streamed_plans_use_the_host_cache_only_when_the_ram_holds_it():
    assert plan_for(24 * GiB, RAM, None, SIZES).host_cache
    short = plan_for(24 * GiB, 24 * GiB, None, SIZES)  # 24 GB of RAM: the blocks stream from the checkpoint
    assert short.offload == "blocks" and not short.host_cache and "checkpoint" in short.name
    assert short.seconds_per_chunk > plan_for(24 * GiB, RAM, None, SIZES).seconds_per_chunk


def test_lora_rules_out_streamed_blocks():
    with pytest.raises(NoPlanFits, match="--lora"):
        plan_for(16 * GiB, RAM, None, SIZES, lora=True)


def test_nothing_fits_is_a_clear_error():
    with pytest.raises(NoPlanFits, match=r"device_memory: nothing fits in 2\.0 GB .* the smallest plan .*needs"):
        plan_for(2 * GiB, RAM, None, SIZES)
    assert issubclass(NoPlanFits, ValueError)


@pytest.mark.parametrize("kwargs, name", [
    (dict(device_memory=-1), "device_memory"), (dict(device_memory=2.5), "device_memory"),
    (dict(host_available="lots"), "host_available"), (dict(quantize="int4"), "quantize"),
    (dict(flops_per_s=0), "flops_per_s"), (dict(link=-5), "link"),
])
def test_bad_plan_inputs_name_the_argument(kwargs, name):
    args = dict(device_memory=24 * GiB, host_available=RAM, sizes=SIZES) | kwargs
    with pytest.raises(ValueError, match=name):
        plan_for(**args)


@pytest.mark.parametrize("available, fits", [(64 * GiB, True), (28 * GiB + 16 * GiB, True), (40 * GiB, False),
                                             (0, False)])
def test_the_host_cache_ram_rule(available, fits):
    assert host_cache_fits(28 * GiB, available=available) is fits  # MemAvailable less the 16 GiB margin holds it
    assert host_cache_fits(0, available=16 * GiB)  # held blocks pinned in place: nothing more is needed


def test_the_readme_table_has_a_row_per_card_and_precision():
    rows = fit.table()
    assert len(rows) == 8 and all(row.startswith("| ") for row in rows)


# ---------------------------------------------------------------------------------------------------------------
# The CLI: HELIOS_FAKE_DEVICE_MEMORY / HELIOS_FAKE_HOST_MEMORY (test-only) stand in for a GPU; the 14B sizes stand
# in for the tiny model's, so that the plan is the one a 24 GB card gets; the tiny model then runs that plan.

FAST = ["generate", "--model", "helios-tiny", "--height", "64", "--width", "128", "--pyramid-steps", "1", "1", "1",
        "--no-amplify-first-chunk", "--seed", "7", "--prompt", "a red fox", "--num-frames", "33"]


@pytest.mark.parametrize("quantize, line", [
    ([], "plan for 24 GB: bf16 blocks streamed from pinned RAM, text encoder on the GPU to encode"),
    (["--quantize", "int8"], "plan for 24 GB: int8 resident, text encoder to the CPU after encoding"),
])
def test_generate_says_the_plan_it_chose_in_one_line(tmp_path, monkeypatch, capsys, quantize, line):
    if quantize:
        pytest.importorskip("torchao")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HELIOS_FAKE_DEVICE_MEMORY", "24GiB")
    monkeypatch.setenv("HELIOS_FAKE_HOST_MEMORY", "64GiB")
    monkeypatch.setattr(fit, "model_sizes", lambda *args, **kwargs: SIZES)
    assert main([*FAST, *quantize, "--output", "fox.mp4"]) == 0
    err = capsys.readouterr().err
    assert f"helios: {line}\n" in err and err.count("plan for") == 1
    assert (tmp_path / "fox.mp4").is_file()


def test_generate_offload_none_and_cpu_auto_plan_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert main([*FAST, "--offload", "none", "--output", "a.mp4"]) == 0
    assert main([*FAST, "--output", "b.mp4"]) == 0  # auto on a CPU: no offload, no line
    assert "plan for" not in capsys.readouterr().err


def test_generate_refuses_a_bogus_offload_by_name(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit) as exit_info:
        main([*FAST, "--offload", "bogus", "--output", "fox.mp4"])
    assert exit_info.value.code == 2
    assert "argument --offload: invalid choice: 'bogus'" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


def test_fake_memory_parses_units(monkeypatch):
    monkeypatch.setenv("HELIOS_FAKE_DEVICE_MEMORY", "24GiB")
    assert fit.fake_memory("DEVICE") == 24 * GiB
    monkeypatch.setenv("HELIOS_FAKE_DEVICE_MEMORY", "1000")
    assert fit.fake_memory("DEVICE") == 1000
    monkeypatch.delenv("HELIOS_FAKE_DEVICE_MEMORY")
    assert fit.fake_memory("DEVICE") is None


@pytest.mark.slow
def test_memory_bench_device_plans_run_on_a_cpu_in_toy_mode():
    """`python -m helios.bench memory --device cpu --toy`: every plan of the GPU run, tiny, in fresh processes."""
    import json
    import os
    import subprocess
    import sys
    from pathlib import Path

    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1] / "src")}
    done = subprocess.run([sys.executable, "-m", "helios.bench", "memory", "--device", "cpu", "--toy", "--plans",
                           "resident", "blocks", "blocks+cache"], capture_output=True, text=True, env=env,
                          timeout=300, check=True)
    plans = json.loads(done.stdout)["plans"]
    assert all(plans[name]["ok"] and len(plans[name]["forward_s"]) == 6 for name in ("resident", "blocks", "blocks+cache"))
    assert plans["blocks+cache"]["host_cache"] and plans["blocks+cache"]["stats"]["h2d_bytes"] > 0
    assert "blocks+cache: chunk" in done.stderr
