"""LoRA adapters: the file formats, strictness, atomic loading, and whole videos against diffusers 0.42.1's pipelines
with `load_lora_weights` of the same files (fp32, frames within 1e-5)."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import save_file

diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")  # the reference's LoRA loader needs it

from helpers import REFERENCE_CLASSES, contiguous_outputs, fake_hub_snapshot, set_scheduler_gamma  # noqa: E402

from helios import HeliosPipeline, HeliosTransformer3DModel, SamplingOptions  # noqa: E402
from helios.scale.lora import LoRALayer, load_lora, lora_adapters, set_lora_scale, unload_lora  # noqa: E402
from helios.pipeline.tiny import build_tiny_model  # noqa: E402
from helios.pipeline.vae import TINY_VAE_CONFIG, build_vae  # noqa: E402

H, W, PROMPT, NEGATIVE, SEED = 64, 128, "a red fox runs through the snow", "blurry, static", 7
OPTIONS = {  # (ours, the reference's keyword arguments): short runs
    "base": (dict(num_frames=33, num_inference_steps=2, guidance_scale=5.0),
             dict(num_frames=33, num_inference_steps=2, guidance_scale=5.0)),
    "distilled": (dict(num_frames=33, pyramid_num_inference_steps_list=(1, 1, 1), is_amplify_first_chunk=False),
                  dict(num_frames=33, pyramid_num_inference_steps_list=[1, 1, 1], guidance_scale=1.0)),
}
ATTENTION = [f"blocks.{i}.attn{a}.{p}" for i in range(2) for a in (1, 2) for p in ("to_q", "to_k", "to_v", "to_out.0")]
FFN = [f"blocks.{i}.ffn.{p}" for i in range(2) for p in ("net.0.proj", "net.2")]
# Adapter B also adapts layers outside the blocks, as the official training script can ("all-linear", patch convs).
OUTSIDE = ["proj_out", "condition_embedder.time_proj", "condition_embedder.text_embedder.linear_1", "patch_embedding"]


def lora_factors(model, layers, rank: int, seed: int, std: float = 0.2) -> dict[str, torch.Tensor]:
    """Random PEFT factors for `layers` of `model`, keys without prefix: {layer}.lora_A.weight / .lora_B.weight.

    std 0.2: the adapters change the tiny videos by 0.5-0.7 (frames in [0, 1]), and the runs stay where fp32
    reassociation keeps ours within 1e-5 of the reference's frames (measured 8e-6; at std 0.3 one case gave 1.1e-5)."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for name in layers:
        layer = model.get_submodule(name)
        if isinstance(layer, torch.nn.Conv3d):
            down, up = (rank, layer.in_channels, *layer.kernel_size), (layer.out_channels, rank, 1, 1, 1)
        else:
            down, up = (rank, layer.in_features), (layer.out_features, rank)
        out[f"{name}.lora_A.weight"] = torch.randn(down, generator=gen) * std
        out[f"{name}.lora_B.weight"] = torch.randn(up, generator=gen) * std
    return out


def write_lora(path, factors: dict, prefix: str = "transformer.", alpha: float | None = None, rank: int | None = None):
    """A LoRA file as diffusers' save_lora_weights writes it: prefixed keys, PEFT config as JSON metadata."""
    metadata = {"format": "pt"}
    if alpha is not None:
        layers = sorted({k.split(".lora_")[0] for k in factors})
        config = {"r": rank, "lora_alpha": alpha, "target_modules": layers}
        metadata["lora_adapter_metadata"] = json.dumps({f"transformer.{k}": v for k, v in config.items()})
    save_file({prefix + k: v.clone().contiguous() for k, v in factors.items()}, str(path), metadata=metadata)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """variant -> a tiny model folder written by the reference pipeline's save_pretrained."""
    root = tmp_path_factory.mktemp("lora-tiny")
    out = {}
    for variant in OPTIONS:
        source = set_scheduler_gamma(build_tiny_model(root / f"source-{variant}", variant=variant, seed=0), 0.25)
        # The built-in tiny VAE has 4 base channels (fast), and its RMS norms over 2-4 channels turn the latents'
        # float differences (7.7e-6 of 6.1 here, ours against the reference, with or without adapters) into frame
        # differences of about 1e-3. With 8 channels the decoder is tame, so the frames compare within 1e-5.
        torch.manual_seed(1)
        shutil.rmtree(source / "vae")
        build_vae({**TINY_VAE_CONFIG, "base_dim": 8}).save_pretrained(source / "vae")
        getattr(diffusers, REFERENCE_CLASSES[variant]).from_pretrained(source).save_pretrained(root / variant)
        out[variant] = root / variant
    return out


@pytest.fixture(scope="module")
def files(folders, tmp_path_factory):
    """Two adapters for the tiny transformer: A (rank 4, blocks, no alpha) and B (rank 2, alpha 3, outside too)."""
    root = tmp_path_factory.mktemp("lora-files")
    model = HeliosTransformer3DModel.from_pretrained(folders["base"], "transformer")
    a = lora_factors(model, ATTENTION + FFN, rank=4, seed=1)
    b = lora_factors(model, ATTENTION[:4] + FFN[2:] + OUTSIDE, rank=2, seed=2)
    return {"a": write_lora(root / "a.safetensors", a), "b": write_lora(root / "b.safetensors", b, alpha=3.0, rank=2),
            "a_factors": a, "root": root}


def transformer(folders) -> HeliosTransformer3DModel:
    return HeliosTransformer3DModel.from_pretrained(folders["base"], "transformer", torch_dtype=torch.float32)


def forward(model, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    latents = torch.randn(1, 16, 2, 8, 8, generator=gen)
    text = torch.randn(1, 5, model.config.text_dim, generator=gen)
    history = dict(latents_history_short=torch.randn(1, 16, 2, 8, 8, generator=gen),
                   indices_latents_history_short=torch.tensor([[0, 1]]), indices_hidden_states=torch.tensor([[2, 3]]))
    with torch.inference_mode():
        return model(latents, torch.tensor([500.0]), text, **history).sample


# ---------------------------------------------------------------------------------------------------------------------
# Whole videos against the reference pipelines


def reference_pipeline(folder, variant):
    return contiguous_outputs(getattr(diffusers, REFERENCE_CLASSES[variant]).from_pretrained(folder))


class Videos:
    """Ours and the reference pipeline on one tiny folder, generating the same video."""

    def __init__(self, folders, variant):
        ours_opts, self.ref_kwargs = OPTIONS[variant]
        self.ours = HeliosPipeline.from_pretrained(folders[variant], torch_dtype=torch.float32, device="cpu")
        self.ref = reference_pipeline(folders[variant], variant)
        self.opts = SamplingOptions(height=H, width=W, seed=SEED, **ours_opts)

    def ours_frames(self) -> torch.Tensor:
        return self.ours.generate(PROMPT, self.opts, negative_prompt=NEGATIVE).frames

    def ref_frames(self) -> torch.Tensor:
        out = self.ref(prompt=PROMPT, negative_prompt=NEGATIVE, height=H, width=W, **self.ref_kwargs,
                       generator=torch.Generator().manual_seed(SEED), output_type="np")
        return torch.from_numpy(out.frames[0])


@pytest.mark.slow
def test_base_videos_match_the_reference_with_one_two_and_no_adapters(folders, files):
    v = Videos(folders, "base")
    plain = v.ours_frames()
    assert v.ours.load_lora_weights(files["a"], adapter_name="a") == "a"
    v.ref.load_lora_weights(str(files["a"]), adapter_name="a")
    one = v.ours_frames()
    assert (one - v.ref_frames()).abs().max() <= 1e-5
    assert (one - plain).abs().max() > 0.05  # the adapter does change the video

    v.ours.load_lora_weights(files["b"], adapter_name="b", scale=-0.7)
    v.ours.set_lora_scale("a", 0.5)
    v.ref.load_lora_weights(str(files["b"]), adapter_name="b")
    v.ref.set_adapters(["a", "b"], adapter_weights=[0.5, -0.7])
    two = v.ours_frames()
    assert (two - v.ref_frames()).abs().max() <= 1e-5
    assert (two - one).abs().max() > 0.05

    v.ours.unload_lora_weights()
    v.ref.unload_lora_weights()
    unloaded = v.ours_frames()
    assert torch.equal(unloaded, plain)
    assert (unloaded - v.ref_frames()).abs().max() <= 1e-5


@pytest.mark.slow
def test_pyramid_videos_match_the_reference_with_two_adapters(folders, files):
    """The distilled model through HeliosPyramidPipeline (three stages at three resolutions, DMD steps)."""
    v = Videos(folders, "distilled")
    v.ours.load_lora_weights(files["a"], adapter_name="a", scale=1.3)
    v.ours.load_lora_weights(files["b"], adapter_name="b", scale=0.6)
    v.ref.load_lora_weights(str(files["a"]), adapter_name="a")
    v.ref.load_lora_weights(str(files["b"]), adapter_name="b")
    v.ref.set_adapters(["a", "b"], adapter_weights=[1.3, 0.6])
    assert (v.ours_frames() - v.ref_frames()).abs().max() <= 1e-5
    v.ours.unload_lora_weights()
    v.ref.unload_lora_weights()
    assert (v.ours_frames() - v.ref_frames()).abs().max() <= 1e-5


def test_wan_comfyui_format_matches_the_reference(folders, files, tmp_path):
    """diffusion_model.<Wan names> with lora_down / lora_up / alpha, which diffusers converts on loading."""
    wan_names = {"attn1.to_q": "self_attn.q", "attn1.to_out.0": "self_attn.o", "attn2.to_k": "cross_attn.k",
                 "ffn.net.0.proj": "ffn.0", "ffn.net.2": "ffn.2"}
    model = transformer(folders)
    layers = [f"blocks.{i}.{n}" for i in range(2) for n in wan_names] + ["proj_out"]
    factors = lora_factors(model, layers, rank=4, seed=5)
    wan = {}
    for key, value in factors.items():
        layer, part = key.split(".lora_")
        name = layer.replace("proj_out", "head.head")
        for ours_name, wan_name in wan_names.items():
            name = name.replace(ours_name, wan_name)
        wan[f"diffusion_model.{name}.lora_{'down' if part == 'A.weight' else 'up'}.weight"] = value
        if name.startswith("blocks."):  # diffusers' converter takes alpha in blocks only (and refuses it elsewhere)
            wan[f"diffusion_model.{name}.alpha"] = torch.tensor(2.0)
    path = tmp_path / "wan.safetensors"
    save_file(wan, str(path))

    load_lora(model, path)
    reference = diffusers.HeliosTransformer3DModel.from_pretrained(folders["base"], subfolder="transformer")
    state = diffusers.HeliosPipeline.lora_state_dict(str(path))
    reference.load_lora_adapter(state, prefix="transformer", adapter_name="wan")
    with torch.inference_mode():
        gen = torch.Generator().manual_seed(0)
        args = (torch.randn(1, 16, 2, 8, 8, generator=gen), torch.tensor([500.0]), torch.randn(1, 5, 32, generator=gen))
        assert (model(*args).sample - reference(*args, return_dict=False)[0]).abs().max() <= 1e-5


# ---------------------------------------------------------------------------------------------------------------------
# Formats


def test_prefix_alpha_key_and_folder_forms_are_the_same_adapter(folders, files, tmp_path):
    model = transformer(folders)
    load_lora(model, files["b"], "b")
    expected = forward(model)
    unload_lora(model)
    # B's scaling is alpha / r = 3 / 2: without metadata, as explicit alpha tensors and without the prefix.
    factors = {k.removeprefix("transformer."): v for k, v in _read(files["b"]).items()}
    alphas = {k.split(".lora_")[0] + ".alpha": torch.tensor(3.0) for k in factors}
    bare = write_lora(tmp_path / "bare.safetensors", {**factors, **alphas}, prefix="")
    load_lora(model, bare, "bare")
    assert torch.allclose(forward(model), expected, atol=1e-6, rtol=0)
    unload_lora(model)
    # The official --lora_path is the training output folder, holding pytorch_lora_weights.safetensors.
    folder = tmp_path / "checkpoint-1000"
    folder.mkdir()
    (folder / "pytorch_lora_weights.safetensors").write_bytes(files["b"].read_bytes())
    load_lora(model, folder)
    assert torch.equal(forward(model), expected)
    assert lora_adapters(model) == {"default_0": 1.0}


def test_a_hub_repo_id_loads_from_the_offline_cache(folders, files, offline_hub):
    snapshot = fake_hub_snapshot(offline_hub, "someone/helios-fox-lora")
    (snapshot / "pytorch_lora_weights.safetensors").write_bytes(files["b"].read_bytes())
    model = transformer(folders)
    load_lora(model, files["b"], "file")
    expected = forward(model)
    unload_lora(model)
    assert load_lora(model, "someone/helios-fox-lora") == "default_0"
    assert torch.equal(forward(model), expected)
    with pytest.raises(FileNotFoundError, match="someone/missing: not a local LoRA file or folder"):
        load_lora(model, "someone/missing")


def test_scales_add_up_and_zero_is_no_adapter(folders, files):
    model = transformer(folders)
    plain = forward(model)
    load_lora(model, files["a"], "a", scale=0.0)
    assert (forward(model) - plain).abs().max() <= 1e-5
    set_lora_scale(model, "a", 1.0)
    full = forward(model)
    set_lora_scale(model, "a", 0.5)
    half = forward(model)
    # The side path is linear in the scale up to the block nonlinearities; at least it moves monotonically.
    assert 0 < (half - plain).abs().max() < (full - plain).abs().max()


def test_unloading_restores_the_original_layers_bitwise(folders, files):
    model = transformer(folders)
    originals = dict(model.named_modules())
    plain = forward(model)
    state = {k: v.clone() for k, v in model.state_dict().items()}
    load_lora(model, files["a"], "a")
    load_lora(model, files["b"], "b")
    assert set(model.state_dict()) == set(state)  # adapters never enter the checkpoint's keys
    unload_lora(model, "a")
    assert set(lora_adapters(model)) == {"b"}
    unload_lora(model)
    assert not any(isinstance(m, LoRALayer) for m in model.modules())
    assert all(originals[name] is module for name, module in model.named_modules())
    assert torch.equal(forward(model), plain)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())


# ---------------------------------------------------------------------------------------------------------------------
# Bad input: clear errors, and the model is unchanged after any of them


def _read(path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(path))


def _bad_files(files, tmp_path):
    a = files["a_factors"]
    key = "blocks.0.attn1.to_q.lora_A.weight"
    flux = {"single_transformer_blocks.0.attn.to_q.lora_A.weight": torch.zeros(4, 3072),
            "single_transformer_blocks.0.attn.to_q.lora_B.weight": torch.zeros(3072, 4)}
    truncated = tmp_path / "truncated.safetensors"
    truncated.write_bytes(files["a"].read_bytes()[:-100])
    pickle = tmp_path / "lora.bin"
    torch.save(a, pickle)
    cases = {
        "unknown-layer": (write_lora(tmp_path / "u.safetensors", {**a, "blocks.9.attn1.to_q.lora_A.weight": a[key],
                                                                   "blocks.9.attn1.to_q.lora_B.weight": a[key].T}),
                          "transformer.blocks.9.attn1.to_q.lora_A.weight"),
        "rank-mismatch": (write_lora(tmp_path / "r.safetensors", {**a, key: a[key][:3]}), "transformer." + key),
        "shape-mismatch": (write_lora(tmp_path / "s.safetensors", {**a, key: torch.zeros(4, 48)}),
                           "transformer." + key),
        "another-model": (write_lora(tmp_path / "flux.safetensors", flux), "single_transformer_blocks.0"),
        "not-a-layer": (write_lora(tmp_path / "n.safetensors", {"blocks.0.norm2.lora_A.weight": torch.zeros(4, 32),
                                                                "blocks.0.norm2.lora_B.weight": torch.zeros(32, 4)}),
                        "blocks.0.norm2"),
        "full-weights": (write_lora(tmp_path / "f.safetensors", {**a, "blocks.0.norm2.weight": torch.ones(32)}),
                         "transformer.blocks.0.norm2.weight"),
        "missing-up": (write_lora(tmp_path / "m.safetensors", {key: a[key]}), "transformer." + key),
        "truncated": (truncated, "truncated.safetensors"),
        "pickle": (pickle, "lora.bin"),
    }
    return cases


def test_bad_files_are_errors_naming_file_and_key_and_change_nothing(folders, files, tmp_path):
    model = transformer(folders)
    load_lora(model, files["b"], "b", scale=0.5)
    before = forward(model)
    layers = {name: type(m) for name, m in model.named_modules()}
    for case, (path, named) in _bad_files(files, tmp_path).items():
        with pytest.raises(ValueError) as err:
            load_lora(model, path, "new")
        message = str(err.value)
        assert str(path) in message and named in message, (case, message)
        assert lora_adapters(model) == {"b": 0.5}, case
        assert {name: type(m) for name, m in model.named_modules()} == layers, case
    assert torch.equal(forward(model), before)


def test_bad_arguments(folders, files, tmp_path):
    model = transformer(folders)
    load_lora(model, files["a"], "a")
    with pytest.raises(ValueError, match="adapter_name='a' is loaded already"):
        load_lora(model, files["b"], "a")
    with pytest.raises(ValueError, match="scale="):
        load_lora(model, files["b"], "b", scale=float("nan"))
    with pytest.raises(ValueError, match=r"adapter_name='x': no such adapter \(loaded: \['a'\]\)"):
        set_lora_scale(model, "x", 1.0)
    with pytest.raises(ValueError, match="adapter_name='x'"):
        unload_lora(model, "x")
    with pytest.raises(FileNotFoundError, match="no such LoRA file"):
        load_lora(model, tmp_path / "missing.safetensors")
    with pytest.raises(FileNotFoundError, match="not exactly one"):
        load_lora(model, tmp_path)  # an empty folder
    assert lora_adapters(model) == {"a": 1.0}


# ---------------------------------------------------------------------------------------------------------------------
# The command line: --lora PATH[:SCALE] (repeatable) and --quantize


@pytest.mark.slow
def test_helios_generate_lora_and_quantize_flags(files, tmp_path):
    """The installed `helios` script on helios-tiny (the tiny transformer the adapters above were made for)."""
    import os
    import re
    import subprocess
    import sys
    from concurrent.futures import ThreadPoolExecutor
    from pathlib import Path

    from test_cli_quiet import BAR

    from helios.pipeline.media import read_video

    entry_point = Path(sys.executable).parent / "helios"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DIFFUSERS_VERBOSITY", None)  # an in-process `helios` run of another test may have set it here
    common = ["generate", "--model", "helios-tiny", "--height", "64", "--width", "128", "--pyramid-steps", "1", "1",
              "1", "--no-amplify-first-chunk", "--seed", "3", "--prompt", "a red fox", "--num-frames", "33",
              "--lossless"]
    flux = write_lora(tmp_path / "flux.safetensors", {"single_transformer_blocks.0.attn.to_q.lora_A.weight":
                                                      torch.zeros(4, 3072)})
    a, b = f"{files['a']}:0.8", str(files["b"])
    runs = {  # name -> (extra arguments, expected exit code, expected text on stderr)
        "plain": (["--quiet"], 0, None),
        "lora": (["--quiet", "--lora", a, "--lora", b], 0, None),
        "int8+lora": (["--quantize", "int8", "--lora", a, "--lora", b], 0, None),  # with the bar: helios' lines only
        "int8 --debug": (["--quantize", "int8", "--debug"], 0, "torchao"),  # the import chatter is there to hide
        "int8+blocks": (["--quiet", "--quantize", "int8", "--offload", "blocks"], 0, None),
        "unknown-scheme": (["--quantize", "int4"], 2, "--quantize: invalid choice: 'int4' (choose from"),
        "missing-lora": (["--lora", str(tmp_path / "missing.safetensors")], 2, "missing.safetensors: no such file"),
        "bad-scale": (["--lora", f"{files['a']}:nan"], 2, "PATH:SCALE with a finite SCALE"),
        "other-model": (["--lora", str(flux)], 2, f"{flux}: transformer.single_transformer_blocks.0"),
        "lora+blocks": (["--lora", a, "--offload", "blocks"], 2, "--lora with --offload blocks: streamed blocks"),
    }

    def attempt(name):
        out = tmp_path / f"{name.replace(' ', '')}.mp4"
        cmd = [str(entry_point), *common, *runs[name][0], "--output", str(out)]
        return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600), out

    with ThreadPoolExecutor(max_workers=4) as pool:
        results = dict(zip(runs, pool.map(attempt, runs)))
    for name, (flags, code, message) in runs.items():
        result, out = results[name]
        assert result.returncode == code, (name, result.stderr)
        if code:
            assert result.stderr.count("\n") == 1 and message in result.stderr, (name, result.stderr)
            assert not out.exists()
        elif "--quiet" in flags:
            assert result.stderr == "", (name, result.stderr)  # nothing, torchao's import chatter included
        elif message:
            assert message in result.stderr, (name, result.stderr)
        else:
            lines = [line.strip() for line in re.split(r"[\r\n]", result.stderr) if line.strip()]
            assert [line for line in lines if not line.startswith("helios: ") and not BAR.match(line)] == []
    frames = {name: read_video(results[name][1])[0].astype(float) for name in runs if runs[name][1] == 0}
    assert abs(frames["lora"] - frames["plain"]).max() > 20  # the adapters do change the video (0-255 levels)
    assert abs(frames["int8+lora"] - frames["lora"]).mean() < 0.25 * abs(frames["lora"] - frames["plain"]).mean()
    assert (frames["int8+blocks"] == frames["int8 --debug"]).all()  # streamed int8 blocks: the resident int8 video
