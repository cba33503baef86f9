"""Offload of whole pipelines ("model", "blocks", a text encoder on the CPU): the same videos as without, the
schedule of moves (a spy on the move function: there is no second device here), resume, compile, and the CLI."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import PIL.Image
import pytest
import torch

from helios import HeliosPipeline, SamplingOptions
from helios.cli import main
from helios.pipeline.media import read_video
from helios.scale.offload import ComponentOffload, plan_loading
from helios.pipeline.state import GenerationState
from helios.pipeline.tiny import build_tiny_model

ROOT = Path(__file__).resolve().parents[1]
H, W = 64, 128
IMAGE = PIL.Image.new("RGB", (W, H), (200, 30, 30))


def _opts(variant: str, num_frames: int, **extra) -> SamplingOptions:
    steps = dict(num_inference_steps=2) if variant == "base" else dict(pyramid_num_inference_steps_list=(1, 1, 1))
    return SamplingOptions(height=H, width=W, num_frames=num_frames, is_amplify_first_chunk=False, seed=7,
                           **steps, **extra)


CASES = {"t2v": (66, {}), "i2v": (33, {"image": IMAGE})}  # two chunks of text-to-video, one of image-to-video


@pytest.fixture(scope="module")
def resident_videos(tiny_folders):
    """(variant, conditioning) -> the video without offload, computed once."""
    cache = {}

    def video(variant, conditioning):
        if (variant, conditioning) not in cache:
            pipe = HeliosPipeline.from_pretrained(tiny_folders[variant], device="cpu")
            frames, extra = CASES[conditioning]
            cache[variant, conditioning] = pipe.generate("a red fox", _opts(variant, frames), **extra)
        return cache[variant, conditioning]

    return video


@pytest.mark.parametrize("conditioning", CASES)
@pytest.mark.parametrize("variant", ["base", "mid", "distilled"])
@pytest.mark.parametrize("offload", ["model", "blocks", "text_encoder"])
def test_offloaded_pipelines_make_the_same_video_bitwise(tiny_folders, resident_videos, variant, conditioning,
                                                         offload):
    pipe = HeliosPipeline.from_pretrained(tiny_folders[variant], device="cpu", offload=offload)
    frames, extra = CASES[conditioning]
    video = pipe.generate("a red fox", _opts(variant, frames), **extra)
    expected = resident_videos(variant, conditioning)
    assert torch.equal(video.frames, expected.frames) and torch.equal(video.latents, expected.latents)
    assert (pipe.transformer.blocks[0].__class__.__name__ == "StreamedBlock") == (offload == "blocks")


def test_a_text_encoder_on_the_cpu_gives_the_same_video(tiny_folders, resident_videos):
    pipe = HeliosPipeline.from_pretrained(tiny_folders["distilled"], device="cpu", offload="blocks",
                                          text_encoder_device="cpu")
    video = pipe.generate("a red fox", _opts("distilled", 66))
    assert torch.equal(video.frames, resident_videos("distilled", "t2v").frames)


def test_unknown_offload_mode_names_the_choices_before_loading_anything(tiny_folder, monkeypatch):
    import helios.pipeline.generate

    monkeypatch.setattr(helios.pipeline.generate, "open_model_folder", lambda *a: pytest.fail("loaded before checking"))
    with pytest.raises(ValueError, match=r"offload must be one of None, 'model', 'blocks', 'text_encoder', got 'disk'"):
        HeliosPipeline.from_pretrained(tiny_folder, device="cpu", offload="disk")
    with pytest.raises(ValueError, match=r"got True"):
        HeliosPipeline.from_pretrained(tiny_folder, device="cpu", offload=True)


def test_load_plans_say_where_each_component_lives():
    cuda = torch.device("cuda")
    plan = plan_loading(None, cuda)
    assert (plan.transformer, plan.vae, plan.text_encoder, plan.resident) == (cuda, cuda, cuda, ())
    plan = plan_loading("model", cuda, "cpu")
    assert (plan.transformer.type, plan.vae.type, plan.text_encoder.type) == ("cpu", "cpu", "cpu")
    assert plan.resident == ("text_encoder",) and plan.transformer_offload is None
    plan = plan_loading("blocks", cuda)
    assert plan.transformer == cuda and plan.vae.type == "cpu" and plan.resident == ("transformer",)
    assert plan.transformer_offload == "blocks"


# ---------------------------------------------------------------------------------------------------------------
# Where the moves go: a spy on ComponentOffload.move records every move; hooks on the models record, whenever one
# of them computes, which components the moves so far have put on the device.


def _record_phases(pipe, monkeypatch) -> list:
    log, on = [], set()
    move = ComponentOffload.move

    def spy(self, name, to):
        log.append(("move", name, to))
        (on.add if to == "device" else on.discard)(name)
        return move(self, name, to)

    monkeypatch.setattr(ComponentOffload, "move", spy)

    def phase(name):
        return lambda *_: log.append((name, frozenset(on)))

    pipe.text_encoder.model.register_forward_pre_hook(phase("encode text"))
    pipe.vae.vae.encoder.register_forward_pre_hook(phase("encode image"))
    pipe.vae.vae.decoder.register_forward_pre_hook(phase("decode"))
    pipe.transformer.register_forward_pre_hook(phase("denoise"))
    return log


def _phases(log) -> list:
    """Consecutive computations in one phase with the same components on the device, collapsed to one entry."""
    out = []
    for entry in log:
        if entry[0] != "move" and (not out or out[-1] != entry):
            out.append(entry)
    return out


def test_model_offload_puts_each_component_on_the_device_only_while_it_runs(tiny_folder, monkeypatch):
    pipe = HeliosPipeline.from_pretrained(tiny_folder, device="cpu", offload="model")
    log = _record_phases(pipe, monkeypatch)
    pipe.generate("a red fox", _opts("distilled", 66), image=IMAGE)
    only = frozenset
    assert _phases(log) == [
        ("encode text", only({"text_encoder"})),
        ("encode image", only({"vae"})),
        ("denoise", only({"transformer"})), ("decode", only({"vae"})),  # chunk 0
        ("denoise", only({"transformer"})), ("decode", only({"vae"})),  # chunk 1
    ]
    moves = [entry[1:] for entry in log if entry[0] == "move"]
    assert moves == [("text_encoder", "device"), ("text_encoder", "host"), ("vae", "device"), ("vae", "host"),
                     *[("transformer", "device"), ("transformer", "host"), ("vae", "device"), ("vae", "host")] * 2]
    # the text encoder ran once (its embeddings are kept for the run), the transformer for all of a chunk's steps
    assert sum(1 for entry in log if entry[0] == "encode text") == 1
    assert sum(1 for entry in log if entry[0] == "denoise") == 6


def test_block_offload_keeps_the_transformer_and_moves_the_others(tiny_folder, monkeypatch):
    pipe = HeliosPipeline.from_pretrained(tiny_folder, device="cpu", offload="blocks", text_encoder_device="cpu")
    log = _record_phases(pipe, monkeypatch)
    pipe.generate("a red fox", _opts("distilled", 33))
    only = frozenset
    assert _phases(log) == [("encode text", only()), ("denoise", only()), ("decode", only({"vae"}))]
    assert [entry[1:] for entry in log if entry[0] == "move"] == [("vae", "device"), ("vae", "host")]


def test_text_encoder_offload_moves_the_encoder_out_once_and_keeps_the_transformer(tiny_folder, monkeypatch):
    pipe = HeliosPipeline.from_pretrained(tiny_folder, device="cpu", offload="text_encoder")
    plan = plan_loading("text_encoder", torch.device("cuda"))
    assert (plan.transformer.type, plan.vae.type, plan.text_encoder.type, plan.resident) == ("cpu", "cuda", "cpu",
                                                                                              ("vae",))
    log = _record_phases(pipe, monkeypatch)
    pipe.generate("a red fox", _opts("distilled", 66))
    only = frozenset
    assert _phases(log) == [("encode text", only({"text_encoder"})),  # the VAE is resident: it never moves
                            *[("denoise", only({"transformer"})), ("decode", only({"transformer"}))] * 2]
    # the encoder leaves when the transformer first needs the device; the transformer then stays for every chunk
    assert [e[1:] for e in log if e[0] == "move"] == [("text_encoder", "device"), ("text_encoder", "host"),
                                                      ("transformer", "device")]
    with pipe.placement.on_device("transformer"):  # a prompt change mid-chunk: the device is given back after it
        pipe._encode_texts(["a new prompt"], _opts("distilled", 33).resolve(pipe.variant))
        assert pipe.placement.on == {"transformer"}


def test_a_phase_nested_in_another_gives_the_device_back(tiny_folder, monkeypatch):
    pipe = HeliosPipeline.from_pretrained(tiny_folder, device="cpu", offload="model")
    log = _record_phases(pipe, monkeypatch)
    with pipe.placement.on_device("transformer"):
        pipe._encode_texts(["a new prompt"], _opts("distilled", 33).resolve(pipe.variant))  # e.g. a prompt change
        assert pipe.placement.on == {"transformer"}
    assert [e[1:] for e in log if e[0] == "move"] == [("transformer", "device"), ("transformer", "host"),
                                                        ("text_encoder", "device"), ("text_encoder", "host"),
                                                        ("transformer", "device"), ("transformer", "host")]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: the same schedule against real CUDA memory")
def test_on_a_gpu_each_phase_has_only_its_component_in_device_memory(tiny_folder):
    pipe = HeliosPipeline.from_pretrained(tiny_folder, device="cuda", offload="model")
    seen = []

    def devices(name):
        modules = {"text_encoder": pipe.text_encoder.model, "vae": pipe.vae.vae, "transformer": pipe.transformer}
        return lambda *_: seen.append((name, {n: next(m.parameters()).device.type for n, m in modules.items()},
                                       torch.cuda.memory_allocated()))  # recorded for a failure's message

    pipe.text_encoder.model.register_forward_pre_hook(devices("text_encoder"))
    pipe.vae.vae.decoder.register_forward_pre_hook(devices("vae"))
    pipe.transformer.register_forward_pre_hook(devices("transformer"))
    pipe.generate("a red fox", _opts("distilled", 33))
    assert [name for name, _, _ in seen][:2] == ["text_encoder", "transformer"] and seen[-1][0] == "vae"
    for name, where, _ in seen:
        assert where == {n: "cuda" if n == name else "cpu" for n in where}, (name, where)
    for module in (pipe.text_encoder.model, pipe.vae.vae, pipe.transformer):  # all back on the host after the run
        assert {p.device.type for p in module.parameters()} == {"cpu"}


# ---------------------------------------------------------------------------------------------------------------
# Resume and compile


@pytest.mark.slow
@pytest.mark.parametrize("offload", ["model", "blocks"])
def test_resuming_with_offload_gives_the_uninterrupted_video(tiny_folder, resident_videos, tmp_path, offload):
    opts = _opts("distilled", 66)
    pipe = HeliosPipeline.from_pretrained(tiny_folder, device="cpu", offload=offload)
    first = next(pipe.stream("a red fox", opts))
    first.state.save(tmp_path / "run.state")
    fresh = HeliosPipeline.from_pretrained(tiny_folder, device="cpu", offload=offload)
    (rest,) = fresh.stream("a red fox", opts, resume=tmp_path / "run.state")
    expected = resident_videos("distilled", "t2v")
    assert torch.equal(torch.cat([first.frames, rest.frames]), expected.frames)


@pytest.mark.slow
def test_compiled_block_offload_makes_the_compiled_resident_video(tiny_folders):
    # Base: one resolution, so one compiled graph (every pyramid stage would recompile, for minutes on a CPU).
    from helios.scale.speed import compile_blocks

    opts = _opts("base", 33)
    videos = []
    for offload in (None, "blocks"):
        pipe = HeliosPipeline.from_pretrained(tiny_folders["base"], device="cpu", offload=offload)
        compile_blocks(pipe.transformer)
        videos.append(pipe.generate("a red fox", opts))
    assert torch.equal(videos[0].frames, videos[1].frames)


# ---------------------------------------------------------------------------------------------------------------
# The command line

FAST = ["--model", "helios-tiny", "--height", H, "--width", W, "--pyramid-steps", 1, 1, 1, "--no-amplify-first-chunk",
        "--seed", 7, "--prompt", "a red fox", "--quiet", "--lossless"]


@pytest.mark.slow
def test_generate_offload_flags_write_the_same_video(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    args = ["generate", *map(str, FAST), "--num-frames", "66"]
    assert main([*args, "--output", "plain.mp4"]) == 0
    assert main([*args, "--offload", "blocks", "--text-encoder-device", "cpu", "--output", "blocks.mp4"]) == 0
    assert main([*args, "--offload", "model", "--output", "model.mp4"]) == 0
    plain = read_video(tmp_path / "plain.mp4")[0]
    assert plain.shape == (65, H, W, 3)
    for name in ("blocks.mp4", "model.mp4"):
        assert (read_video(tmp_path / name)[0] == plain).all(), name


def test_generate_rejects_bad_offload_flags(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    args = ["generate", *map(str, FAST), "--num-frames", "33", "--output", "fox.mp4"]
    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--offload", "disk"])
    assert exit_info.value.code == 2
    assert "--offload: invalid choice: 'disk' (choose from 'auto', 'none', 'text_encoder', 'model', 'blocks')" in capsys.readouterr().err
    assert main([*args, "--text-encoder-device", "tpu:x"]) == 2
    assert "--text-encoder-device tpu:x" in capsys.readouterr().err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_a_checkpoint_deleted_under_a_running_generation_fails_naming_it_and_keeps_the_finished_chunks(tmp_path):
    model = build_tiny_model(tmp_path / "model", variant="distilled")
    weights = model / "transformer" / "diffusion_pytorch_model.safetensors"
    env = {**os.environ, "PYTHONPATH": str(ROOT / "src"), "OMP_NUM_THREADS": "1"}
    args = [str(a) for a in FAST if a not in ("--quiet",)]
    args[args.index("helios-tiny")] = str(model)
    cmd = [sys.executable, "-m", "helios", "generate", *args, "--num-frames", "132", "--offload", "blocks", "--json",
           "--state", "fox.state", "--output", "fox.mp4"]
    proc = subprocess.Popen(cmd, cwd=tmp_path, env=env, text=True, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    first = json.loads(proc.stdout.readline())  # chunk 0 is written and its state saved
    weights.unlink()
    out, err = proc.communicate(timeout=300)
    assert first["index"] == 0 and proc.returncode == 1, err
    assert f"{weights}: the weight file disappeared" in err and "Traceback" not in err
    done = 1 + len(out.splitlines())  # chunks finished before the next block read found the file gone
    assert done < 4 and not (tmp_path / "fox.mp4").exists()  # no final video
    frames = read_video(tmp_path / "fox.partial.mp4")[0]
    assert frames.shape[0] == 33 * done  # the finished chunks, whole and playable
    assert GenerationState.load(tmp_path / "fox.state").next_chunk == done  # the state matches the file
    shutil.rmtree(model)
