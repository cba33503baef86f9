"""One video on several processes: Ulysses sequence parallelism and CFG parallelism over torch.distributed.

Functions that take a finished model (or pipeline) and a process group, as torchtitan's parallelize.py and
gpt-fast's tp.py do; transformer.py knows nothing of them. They use two seams of the model: its token placement
(`model.placement`: where a forward's tokens live, all on one device by default) and the attention function of
every self-attention (`block.attn1.attention`).

Sequence parallelism (DeepSpeed-Ulysses, arXiv 2309.14509). Each of the N ranks of a group holds 1/N of every part
of the token sequence (long, mid and short memory, current chunk) with all heads. Everything but self-attention
works token by token, so it runs on the rank's tokens alone: modulation, rotary embedding, cross-attention to the
text (which every rank has), FFN, output head. Self-attention needs every token: one all-to-all trades the sequence
shards of q, k and v for head shards (every token, H/N heads), attention runs locally, and a second all-to-all
trades the output back. Each all-to-all sends (N-1)/N of what it is given. A part whose length does not divide by N
is padded with copies of its last token; the copies are left out of the keys and cut from the output, so they
change nothing. The keys are put back in their single-device order, so attention adds them up in the same order.

CFG parallelism. The ranks form two halves, each a sequence-parallel group of its own: the first half computes the
conditional velocity, the second the unconditional one, and rank i swaps its result with rank i + N/2.

parallelize_pipeline also makes the text encoding and the VAE decode happen once, on rank 0 (see there).
"""

from __future__ import annotations

import functools

import torch
import torch.distributed as dist

from ..model import kernels
from ..model.layers import TokenLayout


def parallelize(model, group=None):
    """Make `model` (a HeliosTransformer3DModel) run sequence-parallel over the processes of `group` (default: all).

    Every process of the group calls it, and then calls the model with the same inputs; each computes its share, and
    each gets the whole output. Needs a number of processes that divides the number of attention heads.
    """
    shards = SequenceShards(group)
    heads = model.config.num_attention_heads
    if heads % shards.size:
        raise ValueError(f"sequence parallelism over {shards.size} processes needs a number of attention heads that "
                         f"divides by {shards.size}; this model has {heads} heads (use a process count that divides "
                         f"{heads})")
    model.placement = shards
    attention = UlyssesAttention(shards)
    for block in _block_modules(model):
        block.attn1.attention = attention
    return model


def _block_modules(model) -> list:
    """The modules that compute the model's blocks: the blocks, or with offload="blocks" their stream's slots."""
    streams = {id(b.stream): b.stream for b in model.blocks if hasattr(b, "stream")}  # stream_blocks.StreamedBlock
    return [b for b in model.blocks if not hasattr(b, "stream")] + [m for s in streams.values() for m in s.modules()]


class SequenceShards:
    """The token placement of sequence parallelism: this rank's 1/N of each part of the sequence.

    Rank r holds rows [r*c, (r+1)*c) of a part of L tokens, c = ceil(L/N); rows past L are copies of the part's last
    token (padding). `order` (set by each forward's split) lists, for every real token in single-device order, where
    it lies in the sequence that an all-to-all gathers: rank 0's local tokens, then rank 1's, and so on.
    """

    def __init__(self, group=None):
        self.group = group
        self.size, self.rank = dist.get_world_size(group), dist.get_rank(group)
        self.order: torch.Tensor | None = None
        self.sent_bytes = 0  # what this rank's all-to-alls sent to other ranks (benchmarks read it)
        self.gathered_bytes = 0  # what this rank's share of the output went out as, to every other rank
        self.local_lengths: tuple[int, ...] = ()  # this rank's tokens of each part in the last forward (tests read it)

    def split(self, parts: list[torch.Tensor], rope: torch.Tensor, split_timestep: bool):
        lengths = tuple(p.shape[1] for p in parts)
        part_rows, rows, self.order = shard_indices(lengths, self.size, self.rank, str(rope.device))
        self.local_lengths, self.current = tuple(len(r) for r in part_rows), lengths[-1]
        h = torch.cat([p[:, r] for p, r in zip(parts, part_rows)], dim=1)  # [B, sum(c_i), D]: this rank's tokens
        local, current = sum(self.local_lengths), self.local_lengths[-1]
        return h, rope[:, rows], TokenLayout(local - current, current, split_timestep=split_timestep)

    def gather(self, out: torch.Tensor) -> torch.Tensor:
        """This rank's current tokens [B, c, C] -> all current tokens [B, L, C], the padding cut off."""
        if self.size == 1:
            return out
        pieces = [torch.empty_like(out) for _ in range(self.size)]
        dist.all_gather(pieces, out.contiguous(), group=self.group)
        self.gathered_bytes += out.numel() * out.element_size() * (self.size - 1)
        return torch.cat(pieces, dim=1)[:, : self.current]

    def all_to_all(self, send: torch.Tensor) -> torch.Tensor:
        """Block i of dim 0 goes to rank i; block i of the result came from rank i."""
        recv = torch.empty_like(send)
        dist.all_to_all_single(recv, send, group=self.group)
        self.sent_bytes += send.numel() * send.element_size() * (self.size - 1) // self.size
        return recv


@functools.lru_cache(maxsize=64)
def shard_indices(lengths: tuple[int, ...], n: int, rank: int, device: str):
    """(part_rows, rows, order) for parts of `lengths` tokens split over n ranks; cached, a few small index tensors.

    part_rows: for each part, the rows that rank `rank` holds (padding repeats the part's last token); rows: the same
    as positions in the whole sequence; order: for each real token of the whole sequence, its position in the
    gathered sequence [rank 0's tokens | rank 1's | ...].
    """
    counts = [-(-length // n) for length in lengths]
    part_rows, order, offset = [], [], 0
    for length, c in zip(lengths, counts):
        part_rows.append(torch.arange(rank * c, (rank + 1) * c).clamp(max=max(length - 1, 0)))
        j = torch.arange(length)
        order.append(j // c * sum(counts) + offset + j % c)
        offset += c
    starts = [sum(lengths[:i]) for i in range(len(lengths))]
    rows = torch.cat([start + r for start, r in zip(starts, part_rows)])
    return tuple(r.to(device) for r in part_rows), rows.to(device), torch.cat(order).to(device)


class UlyssesAttention:
    """Self-attention over the whole sequence for q, k, v [B, L_local, H, D] that hold this rank's tokens."""

    def __init__(self, shards: SequenceShards, attention=kernels.attention):
        self.shards, self.attention = shards, attention

    def __deepcopy__(self, memo):  # a copied block (a streamed model's new slot) shares the process group's attention
        return self

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        s = self.shards
        if s.size == 1:
            return self.attention(q, k, v)
        # One all-to-all for q, k and v when they have the same length (the last block queries fewer tokens).
        if q.shape[1] == k.shape[1]:
            q, k, v = self._to_heads([q, k, v])
        else:
            (q,), (k, v) = self._to_heads([q]), self._to_heads([k, v])
        k, v = k[:, s.order], v[:, s.order]  # the real keys, in single-device order
        out = self.attention(q, k, v)  # [B, N*Lq, H/N * D]
        return self._to_tokens(out.unflatten(-1, (q.shape[2], -1)))

    def _to_heads(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Each [B, L, H, D] (this rank's tokens, all heads) -> [B, N*L, H/N, D] (all ranks' tokens, our heads)."""
        n = self.shards.size
        b, length, heads, d = tensors[0].shape
        send = torch.empty(n, len(tensors), b, length, heads // n, d, dtype=tensors[0].dtype, device=tensors[0].device)
        for i, x in enumerate(tensors):
            send[:, i] = x.view(b, length, n, heads // n, d).permute(2, 0, 1, 3, 4)
        recv = self.shards.all_to_all(send)  # [N (source rank), S, B, L, H/N, D]
        return list(recv.permute(1, 2, 0, 3, 4, 5).flatten(2, 3).unbind(0))

    def _to_tokens(self, out: torch.Tensor) -> torch.Tensor:
        """[B, N*L, H/N, D] (all tokens, our heads) -> [B, L, H*D] (our tokens, all heads)."""
        n = self.shards.size
        b, total, heads, d = out.shape
        send = out.view(b, n, total // n, heads, d).transpose(0, 1).contiguous()
        recv = self.shards.all_to_all(send)  # [N (head group), B, L, H/N, D]
        return recv.permute(1, 2, 0, 3, 4).flatten(2)


# ---------------------------------------------------------------------------------------------------------------------
# The pipeline: CFG parallelism, and the work that one rank does for all


def parallelize_pipeline(pipe, cfg_parallel: bool = False):
    """Make a HeliosPipeline generate one video with all processes of the default group, which every one of them
    calls with the same arguments (and then `stream` or `generate`, likewise).

    - The transformer runs sequence-parallel over all processes, or with `cfg_parallel` over each half of them, the
      halves computing the conditional and unconditional passes of classifier-free guidance.
    - Text is encoded once, by rank 0, which sends the embeddings to the others; they drop their text encoder.
    - Only rank 0 decodes latents to frames: on the other ranks a chunk's `frames` are empty (0 frames).
    - I2V / V2V: every rank encodes the input (keeping its random generator in step), then all take rank 0's latents.
    With `cfg_parallel`, a run without guidance (Distilled) would compute the same pass on both halves: the `helios`
    command refuses that combination. Returns the process group of the transformer's sequence parallelism.
    """
    world, rank = dist.get_world_size(), dist.get_rank()
    if cfg_parallel and world % 2:
        raise ValueError(f"CFG parallelism runs the conditional and unconditional passes on two halves of the "
                         f"processes, so it needs an even number of them; got {world}")
    sequence_group = None
    if cfg_parallel:
        from torch.distributed.device_mesh import init_device_mesh

        mesh = init_device_mesh(pipe.device.type, (2, world // 2), mesh_dim_names=("cfg", "sequence"))
        sequence_group = mesh.get_group("sequence")
        pipe.guidance_pair = CfgParallel(mesh.get_group("cfg"))
    parallelize(pipe.transformer, sequence_group)
    pipe.text_encoder = SharedTextEncoder(pipe.text_encoder, rank == 0, pipe.device)
    if rank != 0:
        pipe.placement.drop("text_encoder")  # with offload: no more moving an encoder that never runs here
    pipe.vae = RankZeroDecoder(pipe.vae, rank == 0)
    return sequence_group


class CfgParallel:
    """A guidance pair (denoise.GuidancePair) over a group of two: rank 0 of it computes the conditional velocity,
    rank 1 the unconditional one, and they swap."""

    def __init__(self, group):
        self.group, self.conditional = group, dist.get_rank(group) == 0

    def __call__(self, model, x, t, text, negative_text):
        v = model(x, t, text if self.conditional else negative_text).contiguous()
        both = [torch.empty_like(v), torch.empty_like(v)]
        dist.all_gather(both, v, group=self.group)
        return both[0], both[1]


class SharedTextEncoder:
    """Rank 0's text encoder for every rank: rank 0 encodes and broadcasts the embeddings from `device` (where the
    pipeline works: NCCL sends only GPU tensors, and the encoder may run on the CPU)."""

    def __init__(self, encoder, encodes: bool, device):
        self.dim, self.dtype, self.device, self.tokenizer = encoder.dim, encoder.dtype, device, encoder.tokenizer
        self.encoder = encoder if encodes else None  # the other ranks let theirs go

    def encode(self, prompts: list[str], max_sequence_length: int = 512) -> torch.Tensor:
        if self.encoder is not None:
            out = self.encoder.encode(prompts, max_sequence_length).to(self.device).contiguous()
        else:
            out = torch.empty(len(prompts), max_sequence_length, self.dim, dtype=self.dtype, device=self.device)
        dist.broadcast(out, src=0)
        return out


class RankZeroDecoder:
    """The pipeline's VideoVAE, decoding on rank 0 only; encodes are made the same on every rank."""

    def __init__(self, vae, decodes: bool):
        self.vae, self.decodes = vae, decodes

    def __getattr__(self, name):  # preprocess, postprocess, dtype, ...: the VAE's own
        if name == "vae":  # not set yet (copying): no recursion
            raise AttributeError(name)
        return getattr(self.vae, name)

    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        latents = self.vae.encode(pixels, generator).contiguous()  # on every rank: the generator draws alike
        dist.broadcast(latents, src=0)  # and every rank takes the same latents, whatever its kernels did
        return latents

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        if self.decodes:
            return self.vae.decode(latents)
        b, _, _, h, w = latents.shape
        s = self.vae.scale_factor_spatial
        return torch.empty(b, 3, 0, h * s, w * s, dtype=self.vae.dtype, device=self.vae.device)  # no frames here
