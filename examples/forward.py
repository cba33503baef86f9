"""One forward pass of the Helios transformer at Helios's real token layout, on CPU, with a tiny random model.

The tiny model is saved to a folder and loaded back the way a published checkpoint is, so this exercises the same
code path as `HeliosTransformer3DModel.from_pretrained("BestWishYsh/Helios-Distilled", subfolder="transformer")`.
Run:  python examples/forward.py [--folder DIR]
"""

import argparse
import tempfile
import time

import torch

from helios import HeliosConfig, HeliosTransformer3DModel

TINY = HeliosConfig(num_attention_heads=4, attention_head_dim=32, text_dim=64, ffn_dim=256, num_layers=2, rope_dim=(12, 10, 10))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--folder", help="where to save the tiny model (default: a temporary folder)")
    args = parser.parse_args()
    folder = args.folder or tempfile.mkdtemp(prefix="helios-tiny-")

    torch.manual_seed(0)
    HeliosTransformer3DModel(TINY).save_pretrained(folder)
    model = HeliosTransformer3DModel.from_pretrained(folder, torch_dtype=torch.float32)
    print(f"loaded {sum(p.numel() for p in model.parameters()):,} parameters from {folder}")

    # One 33-frame chunk at 192x320 pixels = 9 latent frames of 24x40, with the 16/2/1 memory (spec 2.2).
    b, c, h, w = 1, 16, 24, 40
    with torch.inference_mode():
        start = time.perf_counter()
        v = model(
            hidden_states=torch.randn(b, c, 9, h, w),
            timestep=torch.tensor([999.0]),
            encoder_hidden_states=torch.randn(b, 512, TINY.text_dim),
            indices_hidden_states=torch.arange(20, 29)[None],
            indices_latents_history_short=torch.tensor([[0, 19]]),
            indices_latents_history_mid=torch.tensor([[17, 18]]),
            indices_latents_history_long=torch.arange(1, 17)[None],
            latents_history_short=torch.zeros(b, c, 2, h, w),
            latents_history_mid=torch.zeros(b, c, 2, h, w),
            latents_history_long=torch.zeros(b, c, 16, h, w),
        ).sample
    print(f"flow prediction {tuple(v.shape)} in {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
