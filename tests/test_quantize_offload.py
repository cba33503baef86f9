"""Quantization and LoRA with offload: quantized blocks streamed (offload="blocks") give the resident quantized
output bitwise at half the bytes per block; "model" offload moves quantized weights and LoRA adapters; what cannot
compose is refused by name."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

pytest.importorskip("torchao")

from test_lora import lora_factors, write_lora  # noqa: E402
from test_quantize import CONFIG, forward  # noqa: E402

from helios import HeliosConfig, HeliosPipeline, HeliosTransformer3DModel, SamplingOptions  # noqa: E402
from helios.scale.held_blocks import leaf_tensors  # noqa: E402
from helios.model.layers import Linear  # noqa: E402
from helios.scale.lora import load_lora  # noqa: E402
from helios.scale.offload import ComponentOffload  # noqa: E402
from helios.scale.quantize import parameter_bytes, quantization, quantize, quantize_block  # noqa: E402
from helios.pipeline.tiny import build_tiny_model  # noqa: E402

# Wider than test_quantize's CONFIG, so that the scales and the small tensors of a block (norms, biases, tables) weigh
# what they weigh in a real block: 1% here, 0.3% at 14B.
WIDE = dict(CONFIG, num_attention_heads=4, attention_head_dim=64, ffn_dim=1024, num_layers=2,
            rope_dim=(24, 20, 20))


def checkpoint(path, config: dict):
    torch.manual_seed(0)
    HeliosTransformer3DModel(HeliosConfig(**config)).to(torch.bfloat16).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("quantize-offload")
    return {"tiny": checkpoint(root / "tiny", CONFIG), "wide": checkpoint(root / "wide", WIDE)}


def load(folder, scheme=None, offload=None) -> HeliosTransformer3DModel:
    return HeliosTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16, quantize=scheme,
                                                    offload=offload)


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_quantized_blocks_stream_with_the_resident_quantized_output(folders, scheme):
    resident, streamed = load(folders["tiny"], scheme), load(folders["tiny"], scheme, "blocks")
    assert quantization(streamed) == quantization(resident) == scheme
    assert torch.equal(forward(streamed), forward(resident))  # bitwise: the slots hold the same quantized tensors
    assert torch.equal(forward(streamed, seed=1), forward(resident, seed=1))  # a second forward: slots reused


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_quantized_blocks_stream_at_half_the_bytes(folders, scheme):
    """Bytes copied into the slots per block, and host bytes of a held block, against the bf16 checkpoint's."""
    plain, quantized = load(folders["wide"], offload="blocks"), load(folders["wide"], scheme, "blocks")
    forward(plain), forward(quantized)
    blocks = WIDE["num_layers"]
    per_block = {"bf16": plain.block_stream.fetched_bytes / blocks,
                 scheme: quantized.block_stream.fetched_bytes / blocks}
    stored = load_file(folders["wide"] / "diffusion_pytorch_model.safetensors")
    bf16_block = sum(t.numel() * t.element_size() for k, t in stored.items() if k.startswith("blocks.0."))
    assert per_block["bf16"] == bf16_block  # the measurement sees every byte of a block
    assert 0.45 < per_block[scheme] / bf16_block < 0.53, per_block
    held = quantized.block_stream.checkpoint.blocks  # the quantized blocks, in host memory
    assert len(held) == blocks and all(parameter_bytes(b) == per_block[scheme] for b in held)
    assert all(t.device.type == "cpu" for b in held for t in leaf_tensors(b).values())


def test_a_streamed_transformer_refuses_what_it_cannot_take(folders, tmp_path):
    streamed = load(folders["tiny"], offload="blocks")
    with pytest.raises(ValueError, match=r"streams its blocks \(offload='blocks'\); quantize them while loading"):
        quantize(streamed, "int8")
    layers = ["blocks.0.attn1.to_q", "proj_out"]
    path = write_lora(tmp_path / "a.safetensors", lora_factors(load(folders["tiny"]), layers, rank=2, seed=0))
    with pytest.raises(ValueError, match=r"a.safetensors: transformer.blocks.0.attn1.to_q.lora_A.weight adapts a "
                                         r"block layer, and this transformer streams its blocks"):
        load_lora(streamed, path)
    assert not any(type(m).__name__ == "LoRALayer" for m in streamed.modules())  # nothing was changed


class StandInDevice(ComponentOffload):
    """ComponentOffload whose "device" copies are clones in host memory: which tensors the modules compute with can
    then be checked without a GPU (a real part that cannot exist here); the moves themselves are the real ones."""

    def _to_device(self, tensor):
        return tensor.clone()


def storage(module) -> dict[str, int]:
    return {name: t.untyped_storage().data_ptr() for name, t in leaf_tensors(module).items()}


def test_model_offload_moves_quantized_weights_and_adapters_and_back(folders, tmp_path):
    model = load(folders["tiny"], "int8")
    path = write_lora(tmp_path / "a.safetensors", lora_factors(model, ["blocks.1.attn2.to_v"], rank=2, seed=0))
    reference = forward(model)
    offload = StandInDevice({"transformer": model}, "cpu")
    at_home = storage(model)
    with offload.on_device("transformer"):
        assert set(storage(model).values()).isdisjoint(at_home.values())  # every tensor, quantized ones included
        assert torch.equal(forward(model), reference)
    assert storage(model) == at_home  # back on the host tensors themselves: nothing was copied to stay
    load_lora(model, path)  # an adapter loaded after the placement was made moves with the rest
    with_adapter = forward(model)
    adapter_home = storage(model.blocks[1].attn2.to_v.adapters)
    with offload.on_device("transformer"):
        assert set(storage(model.blocks[1].attn2.to_v.adapters).values()).isdisjoint(adapter_home.values())
        assert torch.equal(forward(model), with_adapter)
    assert type(model.blocks[0].attn1.to_q.weight) is not torch.nn.Parameter  # still torchao's int8 tensor
    assert isinstance(model.blocks[0].attn1.to_q.weight, torch.nn.Parameter)


@pytest.mark.slow
def test_offloaded_quantized_pipelines_make_the_resident_quantized_video(tmp_path):
    """helios-tiny's distilled folder, int8 (fp32 activations): resident and offload="blocks"; resident and
    offload="model" with a LoRA adapter (on a CPU the moves stay on the host: what is checked is that they run)."""
    folder = build_tiny_model(tmp_path / "tiny")
    opts = SamplingOptions(height=64, width=128, num_frames=33, pyramid_num_inference_steps_list=(1, 1, 1),
                           is_amplify_first_chunk=False, seed=3)
    adapter = None
    frames = {}
    for name, offload, lora in (("resident", None, False), ("blocks", "blocks", False), ("resident+lora", None, True),
                                ("model+lora", "model", True)):
        pipe = HeliosPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu", quantize="int8",
                                              offload=offload)
        if lora:
            adapter = adapter or write_lora(tmp_path / "a.safetensors", lora_factors(
                pipe.transformer, [f"blocks.{i}.{p}" for i in range(2) for p in ("attn1.to_q", "ffn.net.2")], 4, 1))
            pipe.load_lora_weights(adapter)
        frames[name] = pipe.generate("a red fox", opts).frames
    assert torch.equal(frames["blocks"], frames["resident"])
    assert torch.equal(frames["model+lora"], frames["resident+lora"])
    assert (frames["resident+lora"] - frames["resident"]).abs().max() > 0.05


def test_quantize_block_leaves_a_block_the_stream_can_flatten():
    """leaf_tensors names each quantized weight's inner tensors: what the slots receive, one plain tensor each."""
    block = torch.nn.Sequential(Linear(64, 32))
    quantize_block(block, "int8")
    names = set(leaf_tensors(block))
    assert {"0.weight#qdata", "0.weight#scale", "0.bias"} <= names
    assert all(type(t) in (torch.Tensor, torch.nn.Parameter) for t in leaf_tensors(block).values())


@pytest.mark.parametrize("scheme", ["int8", "fp8"])
def test_quantized_blocks_through_the_host_cache_keep_the_output_and_take_no_second_copy(folders, scheme):
    import functools

    from helios.scale.block_copies import StreamStats
    from helios.scale.stream_blocks import load_streamed

    resident = load(folders["tiny"], scheme)
    streamed = load_streamed(HeliosTransformer3DModel, folders["tiny"], torch.bfloat16, "cpu", host_cache=True,
                             prepare_block=functools.partial(quantize_block, scheme=scheme))
    stream = streamed.block_stream
    stream.stats = StreamStats()
    assert torch.equal(forward(streamed), forward(resident))
    assert torch.equal(forward(streamed, seed=1), forward(resident, seed=1))
    stream.finish_copies()
    stats = stream.stats.as_dict()
    held = stream.checkpoint.tensors
    # the cache is the held tensors themselves, moved (pinned on CUDA) where they are: no second copy in RAM
    assert stats["fill_bytes"] == stream.copies.cache.nbytes == sum(t.numel() * t.element_size() for t in held.values())
    for key, cached in stream.copies.cache.tensors.items():
        assert cached.data_ptr() == held[key].data_ptr()
    assert stats["h2d_bytes"] == stream.fetched_bytes and stats["read_bytes"] == 0
