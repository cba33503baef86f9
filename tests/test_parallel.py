"""Sequence (Ulysses) and CFG parallelism: one video on several processes gives the single process's latents.

The slow tests start real processes on this CPU with gloo: torchrun launches of tests/parallel_cases.py (2 and 4
processes, every case in one launch), and the `helios` command under torchrun, where one process is killed and the
run resumed. Each process pays seconds for its imports, so the launches overlap: they start together in a fixture,
and the single-process results are computed meanwhile. The fast tests run in this process: the index arithmetic, the
parallel code path on a group of one, and the checks the command makes before a launch.
"""

import dataclasses
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist

import parallel_cases
from helpers import make_inputs, randomize_, tiny_config

from helios import HeliosPipeline, HeliosTransformer3DModel, SamplingOptions
from helios.scale.launch import check_launch
from helios.pipeline.media import read_video
from helios.sampling.options import DEFAULT_NEGATIVE_PROMPT
from helios.scale.parallel import SequenceShards, UlyssesAttention, parallelize, shard_indices
from helios.pipeline.state import GenerationState, run_settings
from helios.pipeline.tiny import build_tiny_model
from helios.pipeline.video_io import to_uint8

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
       "OMP_NUM_THREADS": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone"]


# -- fast: no other processes ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 4, 5])
def test_every_token_is_held_by_one_rank_and_found_in_the_gathered_order(n):
    lengths = (1, 7, 8, 13)  # fewer tokens than ranks, and lengths that do and do not divide by n
    whole = torch.arange(sum(lengths))
    per_rank = [shard_indices(lengths, n, r, "cpu") for r in range(n)]
    held = [rows for _, rows, _ in per_rank]
    assert all(len(rows) == sum(-(-length // n) for length in lengths) for rows in held)  # ceil(L/n) of each part
    gathered = torch.cat([whole[rows] for rows in held])  # what an all-to-all puts together
    order = per_rank[0][2]
    assert torch.equal(gathered[order], whole)  # every token once, in single-device order; padding left out


@pytest.fixture
def group_of_one():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield dist.group.WORLD
    dist.destroy_process_group()


def test_the_parallel_path_on_one_process_is_the_plain_path(group_of_one):
    config = tiny_config(num_attention_heads=4, num_layers=3, is_amplify_history=True)
    torch.manual_seed(0)
    plain = randomize_(HeliosTransformer3DModel(**config).eval(), seed=1)
    par = HeliosTransformer3DModel(**config).eval()
    par.load_state_dict(plain.state_dict())
    assert parallelize(par, group_of_one) is par
    assert isinstance(par.placement, SequenceShards)
    assert [type(b.attn1.attention) for b in par.blocks] == [UlyssesAttention] * 3  # every block, however many
    inputs = make_inputs(config, "padded", batch=2)
    with torch.inference_mode():
        assert torch.equal(par(**inputs).sample, plain(**inputs).sample)


def test_cfg_parallel_needs_an_even_number_of_processes(group_of_one):
    from helios.scale.parallel import parallelize_pipeline

    with pytest.raises(ValueError, match="needs an even number of them; got 1"):
        parallelize_pipeline(None, cfg_parallel=True)  # refused before the pipeline is touched


def test_launch_checks_name_the_numbers():
    check_launch(4, 40, cfg_parallel=True, guidance=5.0)  # two halves of 2: fine
    with pytest.raises(ValueError, match=r"3 processes: .* 40 heads, which do not divide by 3"):
        check_launch(3, 40, cfg_parallel=False, guidance=5.0)
    with pytest.raises(ValueError, match=r"12 processes \(two halves of 6.*40 heads"):
        check_launch(12, 40, cfg_parallel=True, guidance=5.0)
    with pytest.raises(ValueError, match="even number of them; started as 3"):
        check_launch(3, 40, cfg_parallel=True, guidance=5.0)
    with pytest.raises(ValueError, match="has none .guidance 1"):
        check_launch(2, 40, cfg_parallel=True, guidance=1.0)


@pytest.mark.parametrize("world, flags, message", [
    ("3", ["--model", "helios-tiny-base", "--cfg-parallel"], "even number of them; started as 3"),
    ("1", ["--model", "helios-tiny-mid", "--cfg-parallel"], "even number of them; started as 1"),
    ("4", ["--model", "helios-tiny"], "4 processes: .* 2 heads, which do not divide by 4"),
    ("2", ["--model", "helios-tiny", "--cfg-parallel"], "has none"),
])
def test_the_command_refuses_a_launch_that_cannot_work(world, flags, message, tmp_path, monkeypatch, capsys):
    """As torchrun starts it (WORLD_SIZE set): the checks come before the processes meet, so one process shows them."""
    from helios.cli import main

    monkeypatch.setenv("WORLD_SIZE", world)
    monkeypatch.setenv("RANK", "0")
    assert main(["generate", *flags, "--prompt", "a fox", "--output", str(tmp_path / "x.mp4")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("helios: error: ") and len(err.splitlines()) == 1
    assert re.search(message, err), err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("world, given, expected", [
    ("4", [], True), ("2", [], True), ("3", [], False), (None, [], False), ("4", ["--no-cfg-parallel"], False),
])
def test_a_resumed_run_keeps_cfg_parallel_where_the_launch_allows_it(world, given, expected, tmp_path, monkeypatch):
    """--resume STATE alone under torchrun: the state (saved by rank 0, read by every process) says the run used
    --cfg-parallel; a launch of an even number of processes keeps it, a single process or an odd count goes on
    without (the latents are the same either way), and --no-cfg-parallel turns it off."""
    from helios.cli import build_parser
    from helios.cli.resume import resolve_arguments
    from helios.sampling.history import History

    opts = parallel_cases.Case("base").opts()
    settings = run_settings("base", {f.name: getattr(opts, f.name) for f in dataclasses.fields(opts)},
                            [("a fox", 1)], None)
    state = GenerationState(History.empty(1, 16, 8, 8), torch.Generator().get_state(), 1, 11, settings,
                            {"model": "helios-tiny-base", "cfg_parallel": True})
    state.save(tmp_path / "fox.state")
    if world is None:
        monkeypatch.delenv("WORLD_SIZE", raising=False)
    else:
        monkeypatch.setenv("WORLD_SIZE", world)
    args = build_parser().parse_args(["generate", "--resume", str(tmp_path / "fox.state"), *given])
    resolve_arguments(args)
    assert args.cfg_parallel is expected and args.model == "helios-tiny-base"


# -- slow: real processes --------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def launches(tmp_path_factory):
    """Both torchrun launches of parallel_cases.py, started at once; the single-process latents computed meanwhile."""
    models = tmp_path_factory.mktemp("models4")
    for variant in ("base", "mid", "distilled"):
        build_tiny_model(models / variant, variant, seed=0, num_attention_heads=4)
    runs = {}
    for n in (2, 4):
        out = tmp_path_factory.mktemp(f"world{n}")
        command = [*TORCHRUN, f"--nproc-per-node={n}", str(ROOT / "tests" / "parallel_cases.py"), str(models), str(out)]
        runs[n] = (out, subprocess.Popen(command, cwd=out, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                         text=True))
    reference = {}
    for name, case in parallel_cases.CASES.items():
        chunks = list(parallel_cases.generate_case(parallel_cases.load(models, case), case))
        reference[name] = torch.cat([c.latents for c in chunks], dim=2)
    results = {}
    for n, (out, proc) in runs.items():
        log, _ = proc.communicate(timeout=600)
        results[n] = (out, proc.returncode, log)
    return reference, results


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 4])
def test_latents_equal_the_single_process_run(launches, n):
    reference, results = launches
    out, returncode, log = results[n]
    assert returncode == 0, log[-3000:]
    ranks = [json.loads((out / f"rank{r}.json").read_text()) for r in range(n)]
    for name, case in parallel_cases.CASES.items():
        latents = torch.load(out / f"{name}.pt")
        assert rel_err(latents, reference[name]) <= 1e-5, name  # in fact bit-equal so far: the keys keep their order
        seen = [r["cases"][name] for r in ranks]
        assert len({s["bytes"] for s in seen}) == 1 and len({s["checksum"] for s in seen}) == 1, name  # all agree
        chunks = len(seen[0]["frames"])
        # Text is encoded once, by rank 0; only rank 0 decodes (the others' chunks have no frames).
        assert [s["text_encodes"] for s in seen] == [1] + [0] * (n - 1), name
        assert [s["text_encoder_kept"] for s in seen] == [True] + [False] * (n - 1), name
        if parallel_cases.CASES[name].offload:  # and offload no longer moves the others' encoder to the device
            assert [s["text_encoder_moved"] for s in seen] == [True] + [False] * (n - 1), name
        assert [s["decodes"] for s in seen] == [chunks] + [0] * (n - 1), name
        assert all(s["frames"] == [0] * chunks for s in seen[1:]), name
        assert seen[0]["frames"][0] == 33
    # Resume: rank 0 saved the state after chunk 0, every rank loaded it; the rest is the uninterrupted run's.
    resumed = torch.load(out / "resumed.pt")
    assert rel_err(resumed, reference[parallel_cases.RESUMED][:, :, 9:]) <= 1e-5
    assert {r["resumed"] for r in ranks} == {"1 chunks from chunk 1"}
    assert f"{n} processes" in ranks[0]["heads_error"] and f"this model has {n + 1} heads" in ranks[0]["heads_error"]


@pytest.mark.slow
@pytest.mark.parametrize("n", [2, 4])
def test_each_rank_holds_its_share_of_every_part_of_the_sequence(launches, n):
    """Forwards at every token layout of helpers.LAYOUTS, batch 2, history-key amplification: equal outputs, and each
    rank held ceil(L/n) tokens of each part (memory terms and current chunk); some lengths need padding."""
    _, results = launches
    out, returncode, log = results[n]
    assert returncode == 0, log[-3000:]
    padded = 0
    for r in range(n):
        forwards = json.loads((out / f"rank{r}.json").read_text())["forwards"]
        for layout, seen in forwards.items():
            assert seen["rel_err"] <= 1e-5, (r, layout)
            assert seen["held"] == [-(-length // n) for length in seen["lengths"]], (r, layout)
            padded += any(length % n for length in seen["lengths"])
    assert padded >= n  # at least one layout had a part that does not divide by n


FAST = ["--model", "helios-tiny-base", "--height", "64", "--width", "128", "--steps", "2", "--seed", "7", "--prompt",
        "a red fox", "--num-frames", "99", "--lossless", "--json", "--output", "fox.mp4", "--dist-timeout", "60"]


@pytest.mark.slow
def test_a_rank_that_dies_stops_the_others_and_torchrun_resumes_the_video(tmp_path):
    """Two `helios generate --cfg-parallel` processes (Base: one computes the conditional pass, the other the
    unconditional one) started as torchrun starts them (the environment variables; rank 0 by the console script as
    `torchrun --no-python helios` does, rank 1 as `python -m helios`). Rank 1 is killed once rank 0 has written
    chunk 0; rank 0 must fail well inside the timeout and keep what it wrote. Then `torchrun --nproc-per-node 4 -m
    helios generate --resume fox.state`, the state alone (rank 0 saved it with the command's settings; every process
    reads them and the memory from it), finishes the video on 4 processes: CFG parallelism kept, each half splitting
    the tokens over 2. The video equals the single process's."""
    env = {**ENV, "WORLD_SIZE": "2", "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
           "MASTER_PORT": str(free_port())}
    programs = [[str(Path(sys.executable).parent / "helios")], [sys.executable, "-m", "helios"]]
    procs = [subprocess.Popen([*programs[r], "generate", *FAST, "--cfg-parallel", "--state", "fox.state"],
                              cwd=tmp_path, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE) for r in range(2)]
    try:
        first = json.loads(procs[0].stdout.readline() or "{}")
        assert first.get("index") == 0, procs[0].communicate(timeout=60)
        procs[1].send_signal(signal.SIGKILL)
        killed = time.monotonic()
        out, err = procs[0].communicate(timeout=120)
        waited = time.monotonic() - killed
    finally:
        for p in procs:
            p.kill()
            p.wait()
    # Well inside --dist-timeout 60: the dead peer's closed sockets end the collective (measured: about 1 s).
    assert procs[0].returncode == 1 and waited < 30, (waited, err)
    assert "helios: error: generation failed after 1 chunks" in err, err
    assert "continue with: helios generate --resume fox.state (under torchrun like this run" in err, err
    assert out == "" and procs[1].stdout.read() == ""  # rank 1 never printed progress
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fox.partial.mp4", "fox.state"]

    assert GenerationState.load(tmp_path / "fox.state").metadata["cfg_parallel"] is True

    resume = subprocess.Popen([*TORCHRUN, "--nproc-per-node=4", "-m", "helios", "generate", "--resume", "fox.state",
                               "--json", "--dist-timeout", "60"], cwd=tmp_path, env=ENV, text=True,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:  # the single process's video, while the launch starts
        opts = SamplingOptions(height=64, width=128, num_inference_steps=2, seed=7, num_frames=99)
        pipe = HeliosPipeline.from_pretrained("helios-tiny-base")
        expected = to_uint8(pipe.generate("a red fox", opts, negative_prompt=DEFAULT_NEGATIVE_PROMPT).frames)
        out, err = resume.communicate(timeout=300)
    finally:
        resume.kill()
        resume.wait()
    assert resume.returncode == 0, err[-3000:]
    events = [json.loads(line) for line in out.splitlines()]
    assert [e.get("index", e["event"]) for e in events] == [1, 2, "done"]  # once each: only rank 0 reports
    assert sorted(p.name for p in tmp_path.iterdir()) == ["fox.mp4", "fox.state"]
    assert GenerationState.load(tmp_path / "fox.state").metadata["cfg_parallel"] is True  # kept by the resume
    frames, _ = read_video(tmp_path / "fox.mp4")
    assert frames.shape == expected.shape
    assert np.abs(frames.astype(int) - expected.astype(int)).max() <= 1  # lossless RGB, equal up to rounding


HUNG = """
import sys, time, torch, torch.distributed as dist
from helios.scale.launch import process_group
with process_group(torch.device("cpu"), timeout_s=3):
    if dist.get_rank() == 1:
        time.sleep(120)  # alive, but never joins the collective: a hung process
    start = time.monotonic()
    try:
        dist.all_reduce(torch.ones(1))
    except RuntimeError as err:
        print(f"{time.monotonic() - start:.2f}", err)
        sys.exit(3)
"""


@pytest.mark.slow
def test_a_rank_that_hangs_stops_the_others_after_the_timeout():
    """A process that lives but never joins: the others' collective fails after the process group's timeout
    (--dist-timeout, here 3 s) instead of waiting forever. Two real processes, as torchrun would start them."""
    env = {**ENV, "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    procs = [subprocess.Popen([sys.executable, "-c", HUNG], env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
                              text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT) for r in range(2)]
    try:
        out, _ = procs[0].communicate(timeout=60)
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 3, out
    waited = float(out.split()[0])
    assert 2.5 <= waited < 15, out  # the timeout, not a peer that went away


@pytest.mark.slow
def test_the_benchmark_counts_what_the_formula_says():
    small = ["--height", "64", "--width", "64", "--layers", "2", "--heads", "2", "--head-dim", "16", "--ffn", "64",
             "--text-dim", "32", "--text-len", "8", "--runs", "2"]
    done = subprocess.run([sys.executable, "-m", "helios.bench", "parallel", "--processes", "1", "2", *small],
                          env=ENV, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    one, two = json.loads(done.stdout)["results"]
    assert one["processes"] == 1 and one["plain_step_s"] > 0 and "overhead" in one
    # 184 tokens (144 current + 40 memory) divide by 2: no padding, so the buffers are exactly the formula's bytes
    assert two["tokens"] == 184 and two["sent_bytes"] == two["formula_bytes"] > 0
    assert two["gathered_bytes"] == 72 * 64 * 4  # 72 current tokens x 64 outputs (16 channels x 2x2 patch), fp32
    assert two["loopback_bytes"] is None or two["loopback_bytes"] >= 2 * two["sent_bytes"]
    assert "all-to-all sent / rank" in done.stderr
