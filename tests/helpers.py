"""What the tests share: tiny configs, the diffusers oracle, input layouts, the one error metric, tiny model folders,
video files, and the reference's gamma = 1/3 workaround.

The oracle is the installed diffusers 0.42.1 ("the reference" below). Tests build tiny random models in-process and
compare; nothing is downloaded.
"""

from __future__ import annotations

import json
import logging
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import av
import numpy as np
import torch
from diffusers import HeliosTransformer3DModel as ReferenceModel
from torch import nn

from helios import HeliosTransformer3DModel

ROOT = Path(__file__).resolve().parents[1]
REFERENCE_CLASSES = {"base": "HeliosPipeline", "mid": "HeliosPyramidPipeline", "distilled": "HeliosPyramidPipeline"}

# 2 heads x 16 dims; rope_dim splits the head dim like the real (44, 42, 42) split of 128.
TINY = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=16,
    out_channels=16,
    text_dim=32,
    freq_dim=32,
    ffn_dim=64,
    num_layers=2,
    rope_dim=(4, 6, 6),
)
TEXT_LEN = 7  # odd on purpose; the real model pads to 512


def tiny_config(**overrides) -> dict:
    """Keyword arguments accepted by both HeliosTransformer3DModel classes."""
    return {**TINY, **overrides}


def randomize_(model: nn.Module, seed: int = 0, std: float = 0.2) -> nn.Module:
    """Perturb every parameter: the ones/zeros defaults of norms, scale_shift_tables and history_key_scale hide bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            # history_key_scale goes through a sigmoid: spread it so that heads get clearly different scales.
            scale = 1.5 if name.endswith("history_key_scale") else std
            p.add_(torch.randn(p.shape, generator=gen, dtype=torch.float32).to(p.dtype) * scale)
    return model


def make_reference(config: dict, seed: int = 0) -> ReferenceModel:
    torch.manual_seed(seed)
    return randomize_(ReferenceModel(**config), seed).eval()


def make_ours(config: dict) -> HeliosTransformer3DModel:
    return HeliosTransformer3DModel(**config).eval()


def make_pair(config: dict, seed: int = 0):
    """(reference, ours) with identical random weights; ours loaded strictly from the reference's state dict."""
    ref = make_reference(config, seed)
    ours = make_ours(config)
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def rel_err(a, b) -> float:
    """max|a - b| / max|b| in float64 (b is the reference); tensors or arrays of the same shape."""
    a, b = (x.detach().double() if isinstance(x, torch.Tensor) else torch.as_tensor(np.asarray(x)).double()
            for x in (a, b))
    assert a.shape == b.shape, (a.shape, b.shape)
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


# ---------------------------------------------------------------------------------------------------------------
# Input layouts. Each memory term is (frame indices) or None; the number of latent frames is len(indices).


@dataclass(frozen=True)
class Layout:
    height: int  # latent height (pixels / 8)
    width: int
    current: tuple[int, ...] | None  # None: let the model use its default arange over the current frames
    short: tuple[int, ...] | None = None
    mid: tuple[int, ...] | None = None
    long: tuple[int, ...] | None = None
    num_frames: int | None = None  # current frames when `current` is None
    history_hw: tuple[int, int] | None = None  # latent size of the memory when it differs from the current one
    # Added to batch element 1's current-frame indices only: RoPE is relative, so shifting every index of a sample
    # alike would change nothing; shifting only the current frames gives each sample different relative positions.
    shift_second_current: int = 0

    @property
    def frames(self) -> int:
        return len(self.current) if self.current is not None else self.num_frames


def _r(a: int, b: int) -> tuple[int, ...]:
    return tuple(range(a, b))


LAYOUTS = {
    # The released layout (docs/design.md §2.2): arange(29) split [1, 16, 2, 1, 9], short = [prefix, x1] = [0, 19].
    "helios": Layout(8, 16, current=_r(20, 29), short=(0, 19), mid=(17, 18), long=_r(1, 17)),
    "none": Layout(8, 16, current=(0, 1, 2)),
    "default_indices": Layout(8, 16, current=None, num_frames=3),
    "short": Layout(8, 16, current=(4, 5, 6), short=(2, 3)),
    "short_mid": Layout(8, 16, current=(4, 5, 6), short=(2, 3), mid=(0, 1)),
    "short_long": Layout(8, 16, current=(20, 21), short=(0, 19), long=_r(1, 17)),
    # 12x20 latents are not multiples of the mid (4) / long (8) spatial kernels, and 1 mid / 3 long frames are not
    # multiples of their temporal kernels (2 / 4): exercises the replicate padding of latents and of the RoPE grid.
    "padded": Layout(12, 20, current=(10, 11, 12), short=(0, 9), mid=(8,), long=(4, 5, 7)),
    # Different positions per batch element (indices are [B, T]).
    "per_sample": Layout(8, 16, _r(20, 29), short=(0, 19), mid=(17, 18), long=_r(1, 17), shift_second_current=5),
    # Pyramid stage 0 (Mid/Distilled pipelines): the current latents are downsampled, the memory stays full size.
    "pyramid_stage0": Layout(4, 8, _r(20, 29), short=(0, 19), mid=(17, 18), long=_r(1, 17), history_hw=(8, 16)),
    # Memory terms without the short one: the reference crashes on these (see reference_forward).
    "mid_only": Layout(8, 16, current=(5, 6, 7), mid=(3, 4)),
    "long_only": Layout(12, 20, current=(5, 6, 7), long=(1, 2, 3, 4)),
    "mid_long": Layout(8, 16, current=_r(20, 29), mid=(17, 18), long=_r(1, 17)),
}


def _indices(idx: tuple[int, ...], batch: int, shift: int) -> torch.Tensor:
    rows = [torch.tensor(idx, dtype=torch.long) + (shift if b == 1 else 0) for b in range(batch)]
    return torch.stack(rows)


def make_timestep(batch: int, kind: str = "float") -> torch.Tensor:
    """Different timesteps per batch element: fractional floats, or integers as int64 (the Base pipeline's)."""
    if kind == "float":
        return torch.tensor([937.25, 41.5, 500.0][:batch], dtype=torch.float32)
    if kind == "int":
        return torch.tensor([999, 3, 500][:batch], dtype=torch.int64)
    raise ValueError(kind)


def make_inputs(
    config: dict,
    layout: str | Layout = "helios",
    batch: int = 1,
    seed: int = 0,
    timestep: str = "float",
) -> dict:
    """fp32 forward keyword arguments (the reference's names) for `layout`."""
    lay = LAYOUTS[layout] if isinstance(layout, str) else layout
    gen = torch.Generator().manual_seed(seed)
    c = config.get("in_channels", 16)

    def latents(frames: int, hw=(lay.height, lay.width)) -> torch.Tensor:
        return torch.randn(batch, c, frames, *hw, generator=gen)

    inputs = dict(
        hidden_states=latents(lay.frames),
        timestep=make_timestep(batch, timestep),
        encoder_hidden_states=torch.randn(batch, TEXT_LEN, config["text_dim"], generator=gen),
    )
    if lay.current is not None:
        inputs["indices_hidden_states"] = _indices(lay.current, batch, lay.shift_second_current)
    for name in ("short", "mid", "long"):
        idx = getattr(lay, name)
        if idx is not None:
            inputs[f"latents_history_{name}"] = latents(len(idx), lay.history_hw or (lay.height, lay.width))
            inputs[f"indices_latents_history_{name}"] = _indices(idx, batch, 0)
    return inputs


class _EmptyPatch(nn.Module):
    """Stands in for the reference's patch_short: a 0-frame token grid of the right height and width."""

    def __init__(self, dim: int, patch_size):
        super().__init__()
        self.dim, self.patch_size = dim, patch_size

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, _, _, h, w = x.shape
        return x.new_zeros(b, self.dim, 0, h // self.patch_size[1], w // self.patch_size[2])


@torch.no_grad()
def reference_forward(ref: ReferenceModel, inputs: dict) -> torch.Tensor:
    """The reference's output sample for `inputs`.

    Reference bug ([D] forward, steps 4-5): the mid and long branches compute their RoPE grid at (H1, W1), two local
    variables that only the short branch assigns, so mid or long memory without short memory raises
    UnboundLocalError. For those inputs we give the reference an empty (0-frame) short memory through a stub
    patch_short: it adds no tokens, and H1, W1 become H/ph, W/pw of that latent, which is what the mid/long grid
    means. The tests assert separately that the unpatched reference still crashes, so this notices a fix upstream.
    """
    needs_stub = inputs.get("latents_history_short") is None and (
        inputs.get("latents_history_mid") is not None or inputs.get("latents_history_long") is not None
    )
    if not needs_stub:
        return ref(**inputs).sample
    hist = inputs.get("latents_history_mid")
    hist = hist if hist is not None else inputs["latents_history_long"]
    b, c, _, h, w = hist.shape
    stub_inputs = dict(
        inputs,
        latents_history_short=hist.new_zeros(b, c, 0, h, w),
        indices_latents_history_short=torch.zeros(b, 0, dtype=torch.long),
    )
    original = ref.patch_short
    ref.patch_short = _EmptyPatch(original.out_channels, ref.config.patch_size)
    try:
        return ref(**stub_inputs).sample
    finally:
        ref.patch_short = original


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints


def reference_from_pretrained(path, subfolder: str | None = None, torch_dtype: torch.dtype | None = None):
    """diffusers' loader (it needs `accelerate` for any model with `_keep_in_fp32_modules`, as Helios has)."""
    return ReferenceModel.from_pretrained(path, subfolder=subfolder, torch_dtype=torch_dtype).eval()


def state_dtypes(model: nn.Module) -> dict[str, torch.dtype]:
    return {k: v.dtype for k, v in model.state_dict().items()}


def assert_same_state(a: dict, b: dict) -> None:
    assert sorted(a) == sorted(b)
    for k in a:
        assert a[k].shape == b[k].shape, k
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def fake_hub_snapshot(cache: Path, repo_id: str) -> Path:
    """A snapshot folder in the Hugging Face cache layout (refs/main -> snapshots/<commit>), for offline loading."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    return snapshot


@contextmanager
def capture_messages(caplog):
    """Collects warning messages from both `warnings.warn` and `logging` (either is a valid way to warn)."""
    messages: list[str] = []
    with caplog.at_level(logging.WARNING), warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        yield messages
    messages.extend(str(w.message) for w in caught)
    messages.extend(r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING)


# ---------------------------------------------------------------------------------------------------------------
# Tiny model folders and the reference's gamma = 1/3 problem


def set_scheduler_gamma(folder: Path, gamma: float) -> Path:
    """Rewrite a model folder's block-noise gamma. With the shipped gamma = 1/3 the block-noise covariance is singular
    and the reference's fp32 Cholesky fails on CPU (ours falls back to float64); any other gamma exercises the same
    code in both, so tests that run the reference's pyramid pipelines use 0.25."""
    path = folder / "scheduler" / "scheduler_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), "gamma": gamma}))
    return folder


def allow_singular_block_noise(monkeypatch, gamma: float) -> None:
    """Let the reference run at gamma = 1/3: where its fp32 Cholesky of (1 + g) I - g 11^T + 1e-8 I fails (the
    jitter is lost in fp32 and LAPACK refuses the matrix), factor the float64 matrix, as helios.sampling.schedule does."""
    cholesky = torch.linalg.cholesky

    def fallback(a, *args, **kwargs):
        factor, info = torch.linalg.cholesky_ex(a)
        if int(info.max()) == 0:
            return factor
        eye = torch.eye(a.shape[-1], dtype=torch.float64)
        return cholesky(eye * (1 + gamma) - gamma + eye * 1e-8).to(a.device, a.dtype)

    monkeypatch.setattr(torch.linalg, "cholesky", fallback)


def contiguous_outputs(pipe):
    """The reference's CFG-Zero* calls .view() on the transformer output, which fails when it is not contiguous at
    tiny sizes; making it contiguous changes no value."""
    pipe.transformer.register_forward_hook(lambda module, args, out: tuple(o.contiguous() for o in out))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ---------------------------------------------------------------------------------------------------------------
# Video files


def write_video(path, frames: np.ndarray, codec: str = "libx264", fps: int = 24) -> Path:
    """Write uint8 frames [F, H, W, 3] with PyAV. "ffv1" is lossless (reading back gives the same pixels)."""
    pix_fmt = {"ffv1": "bgr0", "libx264rgb": "rgb24"}.get(codec, "yuv420p")
    with av.open(str(path), "w") as container:
        stream = container.add_stream(codec, rate=fps)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], pix_fmt
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(np.ascontiguousarray(frame), format="rgb24")))
        container.mux(stream.encode())
    return Path(path)
