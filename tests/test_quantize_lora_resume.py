"""The transformer's quantization and LoRA adapters change what a run makes, so they are part of the run's settings
saved in its state: resuming with others is refused naming them, and `helios generate --resume STATE` alone loads
them again."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("torchao")

from test_cli_resume import generate, stop_at  # noqa: E402
from test_lora import lora_factors, write_lora  # noqa: E402

import helios.pipeline.state  # noqa: E402
import helios.pipeline.video_io  # noqa: E402
from helios import HeliosConfig, HeliosPipeline, HeliosTransformer3DModel, SamplingOptions  # noqa: E402
from helios.pipeline.generate import HeliosPipeline as Pipeline  # noqa: E402
from helios.pipeline.media import read_video  # noqa: E402
from helios.pipeline.tiny import TINY_TRANSFORMER, build_tiny_model  # noqa: E402

H, W = 64, 128
OPTS = SamplingOptions(height=H, width=W, num_frames=66, pyramid_num_inference_steps_list=(1, 1, 1),
                       is_amplify_first_chunk=False, seed=5)
RUN = ["--model", "helios-tiny", "--height", H, "--width", W, "--pyramid-steps", 1, 1, 1, "--no-amplify-first-chunk",
       "--seed", 7, "--prompt", "a red fox", "--num-frames", 66, "--lossless", "--quiet"]


@pytest.fixture(scope="module")
def adapters(tmp_path_factory):
    """Two LoRA files for the tiny transformer (helios-tiny's and build_tiny_model's)."""
    root = tmp_path_factory.mktemp("resume-lora")
    with torch.device("meta"):
        model = HeliosTransformer3DModel(HeliosConfig(**TINY_TRANSFORMER))
    layers = [f"blocks.{i}.{p}" for i in range(2) for p in ("attn1.to_q", "attn2.to_v", "ffn.net.2")]
    return {name: write_lora(root / f"{name}.safetensors", lora_factors(model, layers, rank=4, seed=seed))
            for name, seed in (("a", 1), ("b", 2))}


def first_chunk_state(pipe):
    return next(iter(pipe.stream("a red fox", OPTS))).state


def test_the_state_holds_quantize_and_the_adapters_and_resuming_with_others_is_refused(tmp_path, adapters):
    folder = build_tiny_model(tmp_path / "tiny")
    pipe = HeliosPipeline.from_pretrained(folder, device="cpu", quantize="int8")
    pipe.load_lora_weights(adapters["a"], scale=0.8)
    pipe.load_lora_weights(adapters["b"], adapter_name="b", scale=-0.5)
    state = first_chunk_state(pipe)
    assert state.quantize == "int8"
    assert state.lora == [(str(adapters["a"]), 0.8), (str(adapters["b"]), -0.5)]  # absolute paths, load order
    state.save(tmp_path / "run.state")

    pipe.set_lora_scale("b", -0.4)
    with pytest.raises(ValueError, match=r"other settings: LoRA adapters \(files, scales\)$"):
        pipe.generate(None, resume=tmp_path / "run.state")
    plain = HeliosPipeline.from_pretrained(folder, device="cpu")
    with pytest.raises(ValueError, match=r"other settings: quantize, LoRA adapters \(files, scales\)$"):
        plain.generate(None, resume=tmp_path / "run.state")
    plain_state = first_chunk_state(plain)
    # A plain run's settings are what they were before quantization and LoRA existed: older states still resume.
    assert "quantize" not in plain_state.settings and "lora" not in plain_state.settings
    assert plain_state.quantize is None and plain_state.lora == []


@pytest.mark.slow
def test_resume_alone_loads_them_again_and_contradictions_are_named(tmp_path, adapters, monkeypatch, capsys):
    extra = ["--quantize", "int8", "--lora", f"{adapters['a']}:0.8", "--lora", adapters["b"]]
    monkeypatch.chdir(tmp_path)
    assert generate(*RUN, *extra, "--output", "whole.mp4") == 0
    with monkeypatch.context() as patch:  # Ctrl-C while writing chunk 1: chunk 0 and its state are saved
        stop_at(patch, helios.pipeline.video_io.VideoWriter, "write", 2, KeyboardInterrupt())
        assert generate(*RUN, *extra, "--output", "fox.mp4", "--state", "fox.state") == 130
    capsys.readouterr()

    for flags, named in ((["--quantize", "fp8"], "--quantize fp8 (the run: int8)"),
                         (["--lora", f"{adapters['a']}:0.5", "--lora", adapters["b"]], "(the run: a.safetensors:0.8, "
                                                                                      "b.safetensors:1)"),
                         (["--lora", adapters["b"]], "--lora")):
        assert generate("--resume", "fox.state", *flags) == 2
        err = capsys.readouterr().err
        assert "these arguments contradict the saved run" in err and named in err, err

    loaded = []  # what the resumed run is loaded with, beside the video it makes
    from_pretrained, load_lora_weights = Pipeline.from_pretrained.__func__, Pipeline.load_lora_weights
    monkeypatch.setattr(Pipeline, "from_pretrained", classmethod(
        lambda cls, *a, **k: loaded.append(("quantize", k["quantize"])) or from_pretrained(cls, *a, **k)))
    monkeypatch.setattr(Pipeline, "load_lora_weights", lambda self, path, **k: loaded.append(
        (str(path), k["scale"])) or load_lora_weights(self, path, **k))
    assert generate("--resume", "fox.state") == 0
    assert loaded == [("quantize", "int8"), (str(adapters["a"]), 0.8), (str(adapters["b"]), 1.0)]
    assert (read_video(tmp_path / "fox.mp4")[0] == read_video(tmp_path / "whole.mp4")[0]).all()

    one_chunk = [*RUN[:RUN.index("--num-frames")], "--num-frames", 33, "--lossless", "--quiet"]
    assert generate(*one_chunk, "--output", "plain.mp4", "--state", "plain.state") == 0
    assert generate("--resume", "plain.state", "--quantize", "int8") == 2  # refused before "nothing to resume"
    assert "--quantize int8 (the run: none)" in capsys.readouterr().err


def test_helios_serve_takes_quantize_and_lora(tmp_path, adapters):
    """helios serve --quantize int8 --lora FILE:SCALE: its jobs run on that transformer (their states say so, and hold
    the library's latents with the same settings); --lora with --offload blocks is refused before loading."""
    import httpx
    from servers import FAST, ServerProcess, wait_for

    from helios.cli import main

    assert main(["serve", "--model", "helios-tiny", "--lora", str(adapters["a"]), "--offload", "blocks",
                 "--data-dir", str(tmp_path / "refused")]) == 2
    with ServerProcess(tmp_path / "serve", "--quantize", "int8", "--lora", f"{adapters['a']}:0.5") as server:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            video = client.post("/v1/videos", json={"prompt": "a red fox", "seconds": 1, "seed": 4, **FAST}).json()
            assert wait_for(client, video["id"])["status"] == "completed"
        (state,) = (tmp_path / "serve" / "data").rglob("state.pt")
        served = helios.pipeline.state.GenerationState.load(state)
    assert served.quantize == "int8" and served.lora == [(str(adapters["a"]), 0.5)]
    opts = SamplingOptions(height=64, width=64, num_frames=24, pyramid_num_inference_steps_list=(1, 1, 1),
                           is_amplify_first_chunk=False, seed=4)
    pipe = HeliosPipeline.from_pretrained("helios-tiny", quantize="int8")
    pipe.load_lora_weights(adapters["a"], scale=0.5)
    (chunk,) = pipe.stream("a red fox", opts)
    plain = next(iter(HeliosPipeline.from_pretrained("helios-tiny").stream("a red fox", opts)))
    assert torch.allclose(served.history.latents, chunk.state.history.latents, atol=1e-5)
    assert not torch.allclose(served.history.latents, plain.state.history.latents, atol=1e-2)  # the flags mattered
