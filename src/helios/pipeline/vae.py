"""The Wan 2.1 video VAE (diffusers `AutoencoderKLWan`) and the pixel conversions around it.

Helios uses the Wan VAE unchanged: 4x temporal and 8x spatial compression to 16 latent channels, with the per-channel
`latents_mean` / `latents_std` of its config. The transformer sees normalised latents `(z - mean) / std`. Pixels are
[B, 3, F, H, W] in [-1, 1]; latents are [B, 16, T, h, w] with T = (F - 1) / 4 + 1 and h, w = H / 8, W / 8.

Only files named *vae* / *video* may import diffusers; this one uses it for the VAE architecture only.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import PIL.Image
import torch
import torch.nn.functional as F
from diffusers import AutoencoderKLWan

# A VAE small enough for tests and the built-in "helios-tiny" model. z_dim stays 16 (the transformer's in_channels and
# the 16 latents_mean / latents_std entries); three spatial and two temporal downsamples keep the 8x / 4x factors.
# 4 channels (2 after each upsampling, as the Wan 2.1 decoder halves them): decoding is most of a tiny run's time, and
# at so few channels torch runs these 3D convolutions on its slow reference kernel, not oneDNN (docs/benchmarks.md).
TINY_VAE_CONFIG = {
    "base_dim": 4,
    "z_dim": 16,
    "dim_mult": [1, 1, 1, 1],
    "num_res_blocks": 1,
    "attn_scales": [],
    "temperal_downsample": [False, True, True],
}


class VideoVAE:
    """AutoencoderKLWan plus the latent normalisation, done with the reference pipelines' exact float ops."""

    def __init__(self, vae: AutoencoderKLWan):
        self.vae = vae.eval().requires_grad_(False)
        cfg = vae.config
        dtype, device = vae.dtype, vae.device
        shape = (1, cfg.z_dim, 1, 1, 1)
        # The reference keeps 1/std (computed in the VAE dtype), multiplies by it on encode and divides by it on
        # decode. `z / (1/std)` is not always bit-equal to `z * std`, so the same ops are repeated here.
        self.latents_mean = torch.tensor(cfg.latents_mean, dtype=torch.float32).view(shape).to(device, dtype)
        self.inv_latents_std = 1.0 / torch.tensor(cfg.latents_std, dtype=torch.float32).view(shape).to(device, dtype)

    @classmethod
    def from_pretrained(cls, folder: str | Path, dtype: torch.dtype = torch.float32, device="cpu") -> VideoVAE:
        """Load a VAE folder (a model folder's vae/). fp32 like every official script."""
        return cls(AutoencoderKLWan.from_pretrained(Path(folder), torch_dtype=dtype).to(device))

    @property
    def dtype(self) -> torch.dtype:
        return self.vae.dtype

    @property
    def device(self) -> torch.device:
        return self.vae.device

    @property
    def scale_factor_temporal(self) -> int:
        return self.vae.config.scale_factor_temporal

    @property
    def scale_factor_spatial(self) -> int:
        return self.vae.config.scale_factor_spatial

    @torch.no_grad()
    def encode(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B, 3, F, H, W] in [-1, 1] -> normalised latents [B, 16, T, h, w] in fp32.

        Draws a posterior sample (not the mode) from `generator`, as the reference's image / video encodes do; the
        generator is the pipeline's, so the order of encodes is part of the seed's meaning.
        """
        pixels = pixels.to(self.device, self.dtype)
        z = self.vae.encode(pixels).latent_dist.sample(generator=generator)
        mean, inv_std = self._normalisation(z.device)
        return ((z - mean) * inv_std).float()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """Normalised latents [B, 16, T, h, w] -> pixels [B, 3, 4(T-1)+1, 8h, 8w] in [-1, 1], in the VAE dtype."""
        mean, inv_std = self._normalisation(self.device)
        z = latents.to(self.device, self.dtype) / inv_std + mean
        return self.vae.decode(z, return_dict=False)[0]

    def _normalisation(self, device) -> tuple[torch.Tensor, torch.Tensor]:
        # Where the VAE runs now: with offload (offload.py) it visits the device only for its encodes and decodes.
        return self.latents_mean.to(device), self.inv_latents_std.to(device)

    def preprocess(self, media, height: int, width: int) -> torch.Tensor:
        """An image, or a list of frames / an [F, H, W, 3] array -> pixels [1, 3, F, height, width] in [-1, 1], fp32.

        A frame is a PIL image or an [H, W, 3] array / tensor (uint8, or float in [0, 1]). Values equal diffusers'
        VideoProcessor.preprocess(_video) on the inputs it handles: PIL images are resized with Lanczos, arrays with
        nearest-neighbour interpolation, then `2x - 1`. An image gives a one-frame video.
        """
        s = self.scale_factor_spatial
        if height % s or width % s:
            raise ValueError(f"height and width must be multiples of {s}, got {height}x{width}")
        frames = media if isinstance(media, (list, tuple)) or getattr(media, "ndim", 0) == 4 else [media]
        video = torch.stack([_frame_to_unit(frame, height, width) for frame in frames], dim=1)  # [3, F, H, W]
        return (2.0 * video - 1.0).float().unsqueeze(0)

    @staticmethod
    def postprocess(pixels: torch.Tensor) -> torch.Tensor:
        """Decoded pixels [1, 3, F, H, W] (or [3, F, H, W]) in [-1, 1] -> frames [F, H, W, 3] in [0, 1], fp32 on CPU.

        Same values as the reference's `postprocess_video(output_type="np")[0]`: rescale and clamp in the pixels'
        dtype, then cast to fp32.
        """
        if pixels.ndim == 5:
            if pixels.shape[0] != 1:
                raise ValueError(f"postprocess takes one video, got a batch of {pixels.shape[0]}")
            pixels = pixels[0]
        unit = (pixels * 0.5 + 0.5).clamp(0, 1)
        return unit.permute(1, 2, 3, 0).cpu().float().contiguous()


def build_vae(config: dict | None = None) -> AutoencoderKLWan:
    """A freshly initialised AutoencoderKLWan (default: the tiny one); the caller seeds or overwrites its weights."""
    return AutoencoderKLWan(**(TINY_VAE_CONFIG if config is None else config))


def _frame_to_unit(frame, height: int, width: int) -> torch.Tensor:
    """One frame -> [3, height, width] in [0, 1] (fp32 for images, the array's float dtype for arrays)."""
    if isinstance(frame, PIL.Image.Image):
        # The reference skips this conversion and would hand 4 (RGBA) or 1 (L) channels to the VAE.
        if frame.mode != "RGB":
            frame = frame.convert("RGB")
        frame = frame.resize((width, height), resample=PIL.Image.Resampling.LANCZOS)
        return torch.from_numpy(np.asarray(frame).astype(np.float32) / 255.0).permute(2, 0, 1)
    if isinstance(frame, torch.Tensor):
        frame = frame.detach().cpu()
        frame = frame.float() if frame.dtype in (torch.float16, torch.bfloat16) else frame  # numpy has no bf16
    array = np.asarray(frame)
    if array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected a PIL image or an [H, W, 3] array per frame, got shape {array.shape}")
    if array.dtype == np.uint8:
        # The reference takes uint8 arrays as they are (values up to 255); we read them as the 8-bit images they are.
        array = array.astype(np.float32) / 255.0
    elif not np.issubdtype(array.dtype, np.floating):
        raise ValueError(f"expected uint8 or float frames, got {array.dtype}")
    elif array.min() < 0 or array.max() > 1:
        # The reference would silently skip the `2x - 1` for inputs below 0 (assuming [-1, 1] already).
        raise ValueError("float frames must be in [0, 1]")
    # Nearest-neighbour (F.interpolate's default), as the reference resizes arrays; kept in the array's dtype so
    # that `2x - 1` rounds like the reference's before the cast to fp32.
    chw = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1).unsqueeze(0)
    return F.interpolate(chw, size=(height, width))[0]




def compare_decode_dtypes(vae: VideoVAE, latents: torch.Tensor, dtype: torch.dtype = torch.bfloat16,
                          repeats: int = 1) -> dict[str, float]:
    """Decode the same latents with `vae` (its own dtype, float32 as shipped) and with a copy in `dtype`: seconds
    per decode of each (the best of `repeats`, after one warm-up each) and the PSNR in dB of the `dtype` frames
    against the reference frames, both postprocessed to [0, 1] as a chunk's frames are. For deciding vae_dtype=."""
    import copy
    import time

    if not isinstance(repeats, int) or repeats < 1:
        raise ValueError(f"repeats must be an integer >= 1, got {repeats!r}")
    other = VideoVAE(copy.deepcopy(vae.vae).to(dtype))
    out: dict[str, float] = {}
    frames = {}
    for name, model in (("reference", vae), ("other", other)):
        frames[name] = model.postprocess(model.decode(latents))  # warm-up, and the frames compared
        times = []
        for _ in range(repeats):
            if model.device.type == "cuda":
                torch.cuda.synchronize(model.device)
            start = time.perf_counter()
            model.postprocess(model.decode(latents))  # to the host: the time includes the device's work
            times.append(time.perf_counter() - start)
        out[f"{name}_s"] = min(times)
    mse = torch.mean((frames["reference"].double() - frames["other"].double()) ** 2).item()
    out["psnr_db"] = float("inf") if mse == 0 else float(10 * np.log10(1.0 / mse))
    out["max_abs"] = (frames["reference"] - frames["other"]).abs().max().item()
    return out
