"""A plan per card: which offload, text-encoder placement and quantization fit a GPU, and what they cost.

Pure functions of byte counts (README "Low memory" has the table they make). Sizes of the transformer are derived
from its config (a meta-device model: parameter counts, the loader's dtype policy); the text encoder and the VAE
are the published components' sizes. Seconds are derived, not measured: a forward's FLOPs over the card's
throughput, bytes over the link's bandwidth, and a streamed forward takes the longer of its compute and its copies
(they overlap). The streamed blocks' own rules (slots per device budget, the pinned host cache's RAM rule) live
in block_copies.py, which the stream and these plans share.

The plans, fastest first (each needs less device memory than the one before):
  resident     everything on the device
  swap         offload="text_encoder": the text encoder and the transformer take turns on the device, each staying
               until the other needs it (the encoder leaves after a run's prompts are encoded); the VAE stays
  blocks       offload="blocks": the blocks stream to the device at every forward (from the pinned host cache
               when the RAM holds them, else from the checkpoint); the text encoder visits the device to encode
  blocks, text encoder on the CPU   when even the 11.4 GB encoder does not fit beside nothing
A plan is chosen only if its device bytes fit `usable(memory)`: the card less CUDA_CONTEXT and FRAGMENTATION. Without a quantize choice only bf16 plans are
considered: "auto" changes where weights live, never the video.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace

from .block_copies import GB, GiB, HOST_MARGIN, host_cache_fits, mem_available, stream_slots  # noqa: F401
from .quantize import SCHEMES as QUANTIZE_SCHEMES  # every scheme holds 1 byte per weight: the same plan sizes

CUDA_CONTEXT = int(0.8 * GB)  # the CUDA context, cuBLAS / attention workspaces: device memory no tensor of ours owns
FRAGMENTATION = 0.08  # of the device's memory, kept free for the caching allocator's fragmentation
TEXT_ENCODER_BYTES = int(11.4 * GB)  # UMT5-XXL encoder, bf16 (published)
VAE_BYTES = int(0.51 * GB)  # Wan 2.1 VAE, fp32 (published: 127 M parameters)
TEXT_TOKENS = 512
LINK = 25 * GB  # bytes/s host -> device: PCIe 4 x16 as measured by most machines (PCIe 5: ~50)
READ_RATE = 20 * GB  # bytes/s 4 reader threads pread from the page cache (~5 GB/s each: assumed, not measured)


class NoPlanFits(ValueError):
    """Nothing fits on the device, even the smallest plan."""


@dataclass(frozen=True)
class Sizes:
    """Bytes of the pipeline's parts and the FLOPs of a Distilled chunk, at one video size (what a plan weighs)."""

    transformer: int  # all weights, bf16 (the small modules kept in fp32 as the loader keeps them)
    block: int  # one block, bf16
    num_blocks: int
    quantized_block: int  # one block, int8 / fp8 weight-only (1 byte per matrix entry, a 4-byte scale per row)
    text_encoder: int
    vae: int
    activations: int  # the larger of a forward's and the VAE decode's working memory
    chunk_forwards: tuple  # FLOPs of each forward of a Distilled chunk (2 steps per pyramid stage)

    @property
    def non_block(self) -> int:
        return self.transformer - self.block * self.num_blocks

    def block_bytes(self, quantize: str | None) -> int:
        return self.quantized_block if quantize else self.block

    def transformer_bytes(self, quantize: str | None) -> int:
        return self.non_block + self.block_bytes(quantize) * self.num_blocks


def model_sizes(config=None, height: int = 384, width: int = 640) -> Sizes:
    """Sizes of a transformer config (default: the published 14B one) at height x width pixels, 9 latent frames."""
    from ..model.config import HeliosConfig
    from ..model.transformer import HeliosTransformer3DModel
    from ..model.weights import param_dtype

    import torch

    cfg = config or HeliosConfig()
    with torch.device("meta"):
        model = HeliosTransformer3DModel(cfg)
    nbytes = {name: t.numel() * param_dtype(name, torch.bfloat16).itemsize for name, t in model.state_dict().items()}
    block = [(name, t) for name, t in model.state_dict().items() if name.startswith("blocks.0.")]
    quantized = sum(t.numel() + 4 * t.shape[0] if t.dim() == 2 else nbytes[name] for name, t in block)
    dim, ffn = cfg.inner_dim, cfg.ffn_dim
    current = 9 * (height // 16) * (width // 16)  # 8640 at 384x640; the pyramid's stages have 1/4 and 1/16 of it
    memory = current * 2400 // 8640  # the 16/2/1 memory at full resolution (design.md 1.2): 2400 at 384x640
    # A forward's live tensors: a few [L, dim] ones and the FFN's [L, ffn] hidden, bf16 (the H200 run: 1.4 GB)
    forward = (current + memory) * (6 * dim + 2 * ffn) * 2
    # The VAE decoder's widest maps: 4 frames x 96 channels x H x W in fp32, about 6 alive (0.38 GB each here).
    decode = 6 * 4 * 96 * height * width * 4
    stages = [current // 16, current // 4, current]
    flops = tuple(cfg.num_layers * _block_flops(c + memory, dim, ffn) for c in stages for _ in range(2))
    return Sizes(sum(nbytes.values()), sum(nbytes[n] for n, _ in block), cfg.num_layers, quantized,
                 TEXT_ENCODER_BYTES, VAE_BYTES, max(forward, decode), flops)


def _block_flops(tokens: int, dim: int, ffn: int) -> float:
    """Multiply-adds x 2 of one block: self-attention projections (4 dim^2) and scores (2 L^2 dim, twice), the
    cross-attention's query and output projections and its scores against 512 text tokens, the FFN (2 dim ffn)."""
    linear = 2 * tokens * (6 * dim * dim + 2 * dim * ffn)
    attention = 4 * tokens * tokens * dim + 4 * tokens * TEXT_TOKENS * dim
    return linear + attention


def usable(device_memory: int) -> int:
    """Device bytes a plan may fill: the card's less the CUDA context and the allocator's fragmentation margin."""
    return int(device_memory * (1 - FRAGMENTATION)) - CUDA_CONTEXT


@dataclass(frozen=True)
class Plan:
    """A way to run the pipeline on one card, and what it costs (derived)."""

    name: str
    offload: str | None  # HeliosPipeline.from_pretrained's offload
    text_encoder_device: str | None  # None: with the others (on the device when it runs); "cpu": there for good
    quantize: str | None
    host_cache: bool  # with "blocks": the blocks in pinned host memory (what host_cache="auto" decides)
    device_bytes: int  # the peak it needs on the device (before the margin)
    host_bytes: int  # host RAM it needs beyond the process (the offloaded components, the pinned cache)
    seconds_per_chunk: float  # derived: one Distilled chunk at 384x640, denoising only (no VAE, no text encoding)
    formula: str  # how seconds_per_chunk was derived

    def describe(self, device_memory: int) -> str:
        return f"plan for {device_memory / GiB:.0f} GB: {self.name}"


def plan_for(device_memory: int, host_available: int, quantize: str | None = None, sizes: Sizes | None = None,
             flops_per_s: float = 400e12, link: float = LINK, lora: bool = False) -> Plan:
    """The fastest plan whose device bytes fit `device_memory` (the card's, or its free bytes) with the margin.

    host_available: RAM free for the pipeline (MemAvailable). quantize: None (bf16 plans only) or a scheme.
    flops_per_s: the card's sustained bf16 throughput; link: host -> device bytes/s. lora: adapters are loaded
    (streamed blocks take none: no "blocks" plan)."""
    _check_plan_inputs(device_memory, host_available, quantize, flops_per_s, link)
    sizes = sizes or model_sizes()
    room, candidates = usable(device_memory), _candidates(sizes, quantize, host_available, flops_per_s, link)
    for plan in candidates:
        if plan.device_bytes <= room and plan.host_bytes <= host_available and not (lora and plan.offload == "blocks"):
            return plan
    smallest = candidates[-1]
    raise NoPlanFits(f"device_memory: nothing fits in {device_memory / GiB:.1f} GB ({room / GB:.1f} GB usable after "
                     f"the CUDA context and a {FRAGMENTATION:.0%} margin): the smallest plan ({smallest.name}) needs "
                     f"{smallest.device_bytes / GB:.1f} GB of device memory and {smallest.host_bytes / GB:.1f} GB "
                     "of RAM" + ("; with --lora, streamed blocks are not an option" if lora else ""))


def _check_plan_inputs(device_memory, host_available, quantize, flops_per_s, link) -> None:
    for name, value in (("device_memory", device_memory), ("host_available", host_available)):
        if not isinstance(value, int) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a number of bytes (an int >= 0), got {value!r}")
    if quantize is not None and quantize not in QUANTIZE_SCHEMES:
        choices = ", ".join(map(repr, QUANTIZE_SCHEMES))
        raise ValueError(f"quantize must be None or one of {choices}, got {quantize!r}")
    for name, value in (("flops_per_s", flops_per_s), ("link", link)):
        if not isinstance(value, (int, float)) or not value > 0:
            raise ValueError(f"{name} must be a positive number, got {value!r}")


def _candidates(s: Sizes, q: str | None, host: int, flops: float, link: float) -> list[Plan]:
    """Every plan for these sizes, fastest first; each needs no more device memory than the one before."""
    t, te, act, vae = s.transformer_bytes(q), s.text_encoder, s.activations, s.vae
    compute = sum(s.chunk_forwards) / flops
    label = f"{q} " if q else "bf16 "
    how = f"{sum(s.chunk_forwards) / 1e15:.2f} PFLOP / {flops / 1e12:.0f} TFLOP/s"
    plans = [
        Plan(f"{label}resident, text encoder on the GPU", None, None, q, False, t + te + vae + act,
             0, compute, how),
        Plan(f"{label}resident, text encoder to the CPU after encoding", "text_encoder", None, q, False,
             max(t, te) + vae + act, te, compute, how + " (the encoder's trip: once per prompt, not per chunk)"),
    ]
    slots = stream_slots(s.block_bytes(q), s.num_blocks)
    streamed = s.non_block + slots * s.block_bytes(q) + act
    blocks = s.block_bytes(q) * s.num_blocks
    cache = host - HOST_MARGIN >= (0 if q else blocks)  # held (quantized) blocks are pinned where they are
    rate = link if cache else min(link, READ_RATE)
    per_forward = [max(f / flops, blocks / rate) for f in s.chunk_forwards]
    held = blocks if q else 0  # quantized blocks are held in RAM; bf16 ones stay in the file (page cache)
    formula = (f"sum over the 6 forwards of max(FLOPs / {flops / 1e12:.0f} TFLOP/s, {blocks / GB:.1f} GB / "
               f"{rate / GB:.0f} GB/s{'' if cache else ' (read from the checkpoint)'})")
    where = "from pinned RAM" if cache else "from the checkpoint"
    plans.append(Plan(f"{label}blocks streamed {where}, text encoder on the GPU to encode", "blocks", None, q, cache,
                      max(streamed, te), te + held + (blocks if cache and not q else 0), sum(per_forward), formula))
    plans.append(replace(plans[-1], name=f"{label}blocks streamed {where}, text encoder on the CPU",
                         text_encoder_device="cpu", device_bytes=streamed))
    return plans


# The README table's cards: (example, sustained bf16 FLOP/s). 80 GB: the H200 run, 18 ms for a 14B block at
# 11,040 tokens (9.1 TFLOP: 505 TFLOP/s); the others: half their datasheet's dense bf16 peak (assumed).
CARDS = {80: ("H100 / H200", 500e12), 48: ("L40S", 180e12), 24: ("RTX 4090", 80e12), 16: ("RTX 4080", 50e12)}


def table(host_available: int = 128 * GiB, link: float = LINK) -> list[str]:
    """README rows: the plan per card of CARDS, bf16 and int8 (derived figures)."""
    rows, sizes = [], model_sizes()
    for gib, (card, flops) in CARDS.items():
        for q in (None, "int8"):
            try:
                p = plan_for(gib * GiB, host_available, q, sizes, flops_per_s=flops, link=link)
                rows.append(f"| {gib} GB ({card}) | {q or 'bf16'} | {p.name} | {p.device_bytes / GB:.1f} GB | "
                            f"{p.seconds_per_chunk:.1f} s ({p.formula}) |")
            except NoPlanFits as err:
                rows.append(f"| {gib} GB | {q or 'bf16'} | none: {err} | | |")
    return rows


def fake_memory(name: str) -> int | None:
    """Test-only hook: HELIOS_FAKE_DEVICE_MEMORY / HELIOS_FAKE_HOST_MEMORY (bytes, or e.g. "24GiB") stand in for
    the device's and the host's memory when planning (the CLI's tests run on machines without a GPU)."""
    text = os.environ.get(f"HELIOS_FAKE_{name}_MEMORY")
    if not text:
        return None
    units = {"GIB": GiB, "GB": GB, "MIB": 2**20, "MB": 10**6}
    for unit, factor in units.items():
        if text.upper().endswith(unit):
            return int(float(text[: -len(unit)]) * factor)
    return int(text) if text.isdigit() else math.floor(float(text))
