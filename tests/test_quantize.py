"""Weight-only int8 / fp8 quantization (torchao): what is quantized and what is kept, quantizing block by block while
loading (peak memory), error bounds against bf16 that the measurements in docs/benchmarks.md justify, LoRA on a
quantized transformer, and bad input."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

pytest.importorskip("torchao")

from helios import HeliosConfig, HeliosPipeline, HeliosTransformer3DModel, SamplingOptions  # noqa: E402
from helios.scale import quantize as quantize_module  # noqa: E402
from helios.bench.quantize import bytes_14b, psnr  # noqa: E402
from helios.model.layers import Linear  # noqa: E402
from helios.scale.lora import load_lora  # noqa: E402
from helios.scale.quantize import check_scheme, is_quantized, parameter_bytes, quantize  # noqa: E402
from helios.pipeline.tiny import build_tiny_model  # noqa: E402

SCHEMES = ("int8", "fp8")
# Tiny, but every kind of layer: memory patches, amplified history keys, the affine cross-attention norm.
CONFIG = dict(num_attention_heads=2, attention_head_dim=32, ffn_dim=128, num_layers=3, text_dim=48, freq_dim=32,
              rope_dim=(12, 10, 10), is_amplify_history=True, history_scale_mode="per_head")
# Error of one forward of CONFIG against bf16 (max |diff| / max |bf16|, RMS diff / RMS bf16), measured: int8
# 0.0071 / 0.0058, fp8 0.021 / 0.014 (fp32 against bf16: 0.0068 / 0.0061). The bounds are twice that; the mid-size
# model's errors are smaller (docs/benchmarks.md).
MAX_REL = {"int8": 0.015, "fp8": 0.045}
RMS_REL = {"int8": 0.012, "fp8": 0.03}
# PSNR of a whole tiny video against bf16, measured with the 4-channel tiny VAE (which turns small latent differences
# into large pixel ones): int8 35.1 dB, fp8 31.2 dB (fp32 34.9 dB); bounds 6 dB lower.
MIN_PSNR = {"int8": 29.0, "fp8": 25.0}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    path = tmp_path_factory.mktemp("quantize") / "transformer"
    torch.manual_seed(0)
    HeliosTransformer3DModel(HeliosConfig(**CONFIG)).to(torch.bfloat16).save_pretrained(path)
    return path


def load(folder, scheme=None, dtype=torch.bfloat16) -> HeliosTransformer3DModel:
    return HeliosTransformer3DModel.from_pretrained(folder, torch_dtype=dtype, quantize=scheme)


def forward(model, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    latents = {f"latents_history_{n}": torch.randn(1, 16, t, 16, 16, generator=gen)
               for n, t in (("short", 2), ("mid", 2), ("long", 16))}
    with torch.inference_mode():
        return model(torch.randn(1, 16, 3, 16, 16, generator=gen), torch.tensor([700.0]),
                     torch.randn(1, 9, CONFIG["text_dim"], generator=gen), indices_hidden_states=torch.arange(20, 23),
                     indices_latents_history_short=torch.tensor([0, 19]), indices_latents_history_mid=
                     torch.tensor([17, 18]), indices_latents_history_long=torch.arange(1, 17), **latents).sample


def is_block_linear(model, name: str) -> bool:
    module = model.get_submodule(name.rsplit(".", 1)[0])
    return name.startswith("blocks.") and isinstance(module, Linear) and name.endswith(".weight")


@pytest.mark.parametrize("scheme", SCHEMES)
def test_only_the_blocks_linear_weights_are_quantized_while_loading(folder, scheme):
    plain, quantized = load(folder), load(folder, scheme)
    kept = dict(plain.named_parameters())
    for name, p in quantized.named_parameters():
        if is_block_linear(quantized, name):
            assert type(p) is not torch.nn.Parameter and p.shape == kept[name].shape, name
        else:  # patch embeddings, condition embedder, norms, modulation tables, biases, output head: as loaded
            assert type(p) is torch.nn.Parameter and p.dtype == kept[name].dtype and torch.equal(p, kept[name]), name
    # Quantizing block by block while loading gives the model that quantizing the loaded model gives.
    assert torch.equal(forward(quantized), forward(quantize(plain, scheme)))


@pytest.mark.parametrize("scheme", SCHEMES)
def test_forward_error_against_bf16_is_bounded(folder, scheme):
    reference = forward(load(folder)).float()
    out = forward(load(folder, scheme)).float()
    max_rel = ((out - reference).abs().max() / reference.abs().max()).item()
    rms_rel = ((out - reference).square().mean().sqrt() / reference.square().mean().sqrt()).item()
    assert 0 < max_rel <= MAX_REL[scheme] and rms_rel <= RMS_REL[scheme]


@pytest.mark.slow
def test_a_whole_tiny_video_stays_close_to_bf16(tmp_path):
    """The distilled pipeline, 33 frames through three pyramid stages: PSNR of the frames against bf16's."""
    folder = build_tiny_model(tmp_path / "distilled", variant="distilled")
    opts = SamplingOptions(height=64, width=128, num_frames=33, seed=0)
    frames = {}
    for scheme in (None, *SCHEMES):
        pipe = HeliosPipeline.from_pretrained(folder, torch_dtype=torch.bfloat16, device="cpu", quantize=scheme)
        assert is_quantized(pipe.transformer) == (scheme is not None)
        frames[scheme] = pipe.generate("a red fox running through fresh snow", opts).frames
    for scheme in SCHEMES:
        assert MIN_PSNR[scheme] <= psnr(frames[scheme], frames[None]) < float("inf")


@pytest.mark.slow
def test_the_14b_transformer_in_int8_is_at_most_055x_bf16():
    sizes = bytes_14b()  # on the meta device: exact bytes, no memory
    assert 28.0e9 < sizes["bf16"] < 29.0e9
    assert sizes["int8_x_bf16"] <= 0.55 and sizes["fp8_x_bf16"] <= 0.55


@pytest.mark.slow
def test_loading_never_holds_the_bf16_and_the_quantized_model_together(tmp_path):
    """Peak RSS added by from_pretrained, in fresh processes, against the bf16 checkpoint's size: a bf16 load adds
    1.0x; one that held the bf16 and the int8 model together would add 1.5x; block by block adds 0.5x plus one bf16
    block (1/12 here) and one layer's temporaries: 0.76x measured."""
    config = HeliosConfig(num_attention_heads=4, attention_head_dim=128, ffn_dim=2048, num_layers=12, text_dim=512)
    torch.manual_seed(0)
    HeliosTransformer3DModel(config).to(torch.bfloat16).save_pretrained(tmp_path, max_shard_size="40MB")
    size = sum(f.stat().st_size for f in tmp_path.glob("*.safetensors"))
    peaks = {}
    for scheme in ("bf16", "int8", "int8+blocks"):  # int8+blocks: the quantized blocks held in RAM for streaming
        cmd = [sys.executable, "-m", "helios.bench", "_qload", str(tmp_path), scheme]
        row = json.loads(subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.splitlines()[-1])
        peaks[scheme] = row["peak_added_bytes"] / size
    assert peaks["bf16"] > 0.9  # the measurement does see the weights
    assert peaks["int8"] < 0.85 and peaks["int8+blocks"] < 0.85, peaks


def test_lora_on_a_quantized_transformer_is_a_side_path(folder, tmp_path):
    from test_lora import lora_factors, write_lora

    plain, quantized = load(folder), load(folder, "int8")
    path = write_lora(tmp_path / "a.safetensors", lora_factors(plain, ["blocks.0.attn1.to_q", "blocks.1.ffn.net.0.proj",
                                                                      "blocks.2.attn2.to_out.0"], rank=4, seed=3))
    before = {"plain": forward(plain), "int8": forward(quantized)}
    for model in (plain, quantized):
        load_lora(model, path)
    delta_plain, delta_int8 = forward(plain) - before["plain"], forward(quantized) - before["int8"]
    assert delta_plain.abs().max() > 0.05
    assert (delta_int8 - delta_plain).abs().max() <= 0.1 * delta_plain.abs().max()
    assert is_quantized(quantized)  # the quantized weights are untouched; the adapter sits beside them
    with pytest.raises(ValueError, match="unload the LoRA adapters first"):
        quantize(plain, "int8")


# ---------------------------------------------------------------------------------------------------------------------
# Bad input


def test_unknown_scheme_names_the_choices(folder):
    for call in (lambda: load(folder, "int4"), lambda: HeliosPipeline.from_pretrained(folder.parent, quantize="nf4"),
                 lambda: quantize(load(folder), "fp16")):
        with pytest.raises(ValueError, match="choose one of int8, fp8"):
            call()


def test_quantizing_twice_is_refused(folder):
    with pytest.raises(ValueError, match="quantized already"):
        quantize(load(folder, "int8"), "fp8")


def test_fp8_that_does_not_run_here_says_so_naming_the_device(monkeypatch):
    check_scheme("fp8", "cpu")  # this torch and torchao run float8 weight-only matmuls on CPU

    def no_float8(block, scheme):
        raise RuntimeError("no kernel for Float8_e4m3fn")

    monkeypatch.setattr(quantize_module, "quantize_block", no_float8)
    quantize_module._probe.cache_clear()
    with pytest.raises(ValueError, match=r"quantize='fp8': float8 weight-only matmuls do not run on cpu with torch"):
        check_scheme("fp8", "cpu")
    quantize_module._probe.cache_clear()


def test_parameter_bytes_count_the_quantized_data(folder):
    plain, quantized = load(folder), load(folder, "int8")
    blocks = sum(p.numel() for n, p in plain.named_parameters() if is_block_linear(plain, n))
    # int8 data: 1 byte instead of 2 per block weight, plus one scale and zero point per output row.
    saved = parameter_bytes(plain) - parameter_bytes(quantized)
    assert 0.9 * blocks < saved < blocks


def test_a_quantized_transformer_is_not_saved(folder, tmp_path):
    with pytest.raises(ValueError, match=r"cannot save: \d+ weights are quantized \(blocks\.0\..*quantize while loading"):
        load(folder, "int8").save_pretrained(tmp_path / "out")
    assert not (tmp_path / "out").exists()  # nothing written
