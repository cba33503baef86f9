"""Text encoder, VAE, pixel conversions and the tiny model folder, against the reference pipelines (diffusers 0.42.1).

Everything runs on one tiny model folder built in-process; the reference pipeline loaded from it is the oracle for the
prompt embeddings, the VAE encodes (values and generator consumption), the decode and the pixel pre/post-processing.
"""

from __future__ import annotations

import diffusers
import numpy as np
import PIL.Image
import pytest
import torch
from diffusers.pipelines.helios.pipeline_helios_pyramid import prompt_clean as reference_prompt_clean

from helpers import REFERENCE_CLASSES, allow_singular_block_noise, contiguous_outputs

from helios import HeliosTransformer3DModel
from helios.pipeline.text import TextEncoder, clean_prompt
from helios.pipeline.tiny import TINY_UMT5, WORDS, build_tiny_model
from helios.pipeline.vae import VideoVAE

H, W = 32, 48  # pixels for the VAE tests: multiples of 8, not square
MESSY = [
    "  A cat &amp;amp; a dog\n\tbaking a   cake &lt;3 ",  # doubly escaped entities, tabs, newlines, runs of spaces
    "cafÃ© on the beach\u3000at night\xa0. ",  # mojibake, ideographic and no-break spaces
    "the sun\x1cover the sea &#28; and &amp;#28; red",  # C0 separators, raw and escaped
    "",
]


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The tiny models run thousands of small ops; with 2 OpenMP threads on a busy 2-core machine every op waits on
    a descheduled thread and a chunk takes 1-15 s instead of 0.8 s. One thread is both faster and steady here."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def folder(tiny_folder):
    return tiny_folder


@pytest.fixture(scope="module")
def reference(folder):
    pipe = diffusers.HeliosPyramidPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def vae(folder):
    return VideoVAE.from_pretrained(folder / "vae")


def reference_normalisation(pipe):
    """latents_mean and 1/latents_std, built as the reference __call__ builds them."""
    cfg, dtype = pipe.vae.config, pipe.vae.dtype
    mean = torch.tensor(cfg.latents_mean).view(1, cfg.z_dim, 1, 1, 1).to("cpu", dtype)
    inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, cfg.z_dim, 1, 1, 1).to("cpu", dtype)
    return mean, inv_std


def random_image(height, width, seed=0, mode="RGB"):
    rng = np.random.default_rng(seed)
    image = PIL.Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))
    return image.convert(mode)


def moving_frames(count, height=H, width=W, seed=1):
    """A horizontally scrolling random texture, as PIL frames."""
    base = np.random.default_rng(seed).integers(0, 256, (height, width + count, 3), dtype=np.uint8)
    return [PIL.Image.fromarray(np.ascontiguousarray(base[:, i : i + width])) for i in range(count)]


# ------------------------------------------------------------------------------------------------ text


@pytest.mark.parametrize("text", MESSY + ["plain words", "Ünïcödé  ﬁ ligature", "&amp;amp;amp;"])
def test_prompt_cleaning_matches_reference(text):
    assert clean_prompt(text) == reference_prompt_clean(text)


def test_text_embeddings_match_reference(folder, reference):
    encoder = TextEncoder.from_pretrained(folder / "text_encoder", folder / "tokenizer")
    long = " ".join(WORDS[2:] * 6)  # > 512 words: truncated, keeping the closing </s>
    prompts = ["A cat and a dog baking a cake together in a kitchen.", *MESSY, long]
    assert len(long.split()) > 512

    ours = encoder.encode(prompts)
    # no_grad as in the reference __call__: with autograd on, SDPA takes another CPU kernel (differences ~2e-6).
    with torch.no_grad():
        want, mask = reference._get_t5_prompt_embeds(prompts, max_sequence_length=512)
    assert ours.shape == (len(prompts), 512, TINY_UMT5["d_model"]) and ours.dtype == torch.float32
    assert torch.equal(ours, want)
    # Padding rows are exact zeros, real rows are not; the long prompt fills all 512 rows.
    lengths = mask.sum(1)
    assert lengths[-1] == 512 and (lengths[:-1] < 512).all()
    for row, n in zip(ours, lengths):
        assert (row[n:] == 0).all() and (row[:n].abs().sum(-1) > 0).all()

    # encode_prompt (the path __call__ takes) with a negative prompt, at a shorter length.
    with torch.no_grad():
        pos, neg = reference.encode_prompt(prompts[:2], negative_prompt=["", "blurry, low quality"],
                                           max_sequence_length=16)
    assert torch.equal(encoder.encode(prompts[:2], max_sequence_length=16), pos)
    assert torch.equal(encoder.encode(["", "blurry, low quality"], max_sequence_length=16), neg)


def test_text_encoder_rejects_a_bare_string(folder):
    with pytest.raises(TypeError):
        TextEncoder.from_pretrained(folder / "text_encoder", folder / "tokenizer").encode("a cat")


# ------------------------------------------------------------------------------------------------ VAE


def test_normalisation_constants_match_reference(vae, reference):
    mean, inv_std = reference_normalisation(reference)
    assert torch.equal(vae.latents_mean, mean) and torch.equal(vae.inv_latents_std, inv_std)
    assert (vae.scale_factor_temporal, vae.scale_factor_spatial) == (4, 8)
    assert (reference.vae_scale_factor_temporal, reference.vae_scale_factor_spatial) == (4, 8)


def test_image_encode_matches_reference(vae, reference):
    """prepare_image_latents: the image as one frame, then a still clip of it; both posterior samples."""
    image, chunk = random_image(40, 56), 3  # 3 latent frames -> a 9-frame still clip
    mean, inv_std = reference_normalisation(reference)
    g_ref, g_ours = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    pixels_ref = reference.video_processor.preprocess(image, height=H, width=W)
    want_anchor, want_fake = reference.prepare_image_latents(
        pixels_ref, mean, inv_std, chunk, dtype=torch.float32, device="cpu", generator=g_ref
    )

    pixels = vae.preprocess(image, H, W)  # [1, 3, 1, H, W]
    assert torch.equal(pixels[:, :, 0], pixels_ref)
    anchor = vae.encode(pixels, g_ours)
    fake = vae.encode(pixels.repeat(1, 1, (chunk - 1) * 4 + 1, 1, 1), g_ours)[:, :, -1:]
    assert anchor.shape == (1, 16, 1, H // 8, W // 8) and anchor.dtype == torch.float32
    assert torch.equal(anchor, want_anchor) and torch.equal(fake, want_fake)
    assert torch.equal(g_ours.get_state(), g_ref.get_state())
    # A posterior sample, not the mode: another seed gives other latents.
    assert not torch.equal(vae.encode(pixels, torch.Generator().manual_seed(6)), anchor)


def test_video_encode_matches_reference(vae, reference):
    """prepare_video_latents: first frame, then the last whole windows of the video, encoded one by one."""
    frames, chunk = moving_frames(12), 2  # windows of 5 frames: frames 2..6 and 7..11
    mean, inv_std = reference_normalisation(reference)
    g_ref, g_ours = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    video_ref = reference.video_processor.preprocess_video(frames, height=H, width=W)
    want_first, want_latents = reference.prepare_video_latents(
        video_ref, mean, inv_std, chunk, dtype=torch.float32, device="cpu", generator=g_ref
    )

    pixels = vae.preprocess(frames, H, W)
    assert torch.equal(pixels, video_ref)
    first = vae.encode(pixels[:, :, :1], g_ours)
    pieces = [vae.encode(pixels[:, :, start : start + 5], g_ours) for start in (2, 7)]
    assert torch.equal(first, want_first) and torch.equal(torch.cat(pieces, dim=2), want_latents)
    assert torch.equal(g_ours.get_state(), g_ref.get_state())


def test_decode_and_postprocess_match_reference(vae, reference):
    latents = torch.randn(1, 16, 3, H // 8, W // 8, generator=torch.Generator().manual_seed(3))
    mean, inv_std = reference_normalisation(reference)
    # The pipeline's per-chunk decode, then its final postprocess.
    with torch.no_grad():
        want_pixels = reference.vae.decode(latents / inv_std + mean, return_dict=False)[0]
    want = reference.video_processor.postprocess_video(want_pixels, output_type="np")

    pixels = vae.decode(latents)
    assert pixels.shape == (1, 3, 9, H, W) and torch.equal(pixels, want_pixels)
    frames = vae.postprocess(pixels)
    assert frames.shape == (9, H, W, 3) and frames.dtype == torch.float32
    assert torch.equal(frames, torch.from_numpy(want[0]))
    # The tiny VAE decodes to an image with structure, not to a saturated or constant one.
    assert frames.std() > 0.05 and ((frames == 0) | (frames == 1)).float().mean() < 0.5


def test_decode_undoes_encode_normalisation(vae):
    """decode divides by the stored 1/std and adds the mean: exactly the inverse ops of encode's normalisation."""
    z = torch.randn(1, 16, 2, 3, 5, generator=torch.Generator().manual_seed(9))
    normalised = (z - vae.latents_mean) * vae.inv_latents_std
    assert torch.allclose(normalised / vae.inv_latents_std + vae.latents_mean, z, atol=1e-6)


# ------------------------------------------------------------------------------------------------ pixels


def test_preprocess_matches_reference_video_processor(vae, reference):
    proc = reference.video_processor
    image = random_image(50, 70)  # resized (Lanczos) to H x W
    assert torch.equal(vae.preprocess(image, H, W)[:, :, 0], proc.preprocess(image, height=H, width=W))

    rng = np.random.default_rng(4)
    for dtype in (np.float32, np.float64):  # arrays are resized nearest-neighbour, in their own dtype
        array = rng.random((20, 30, 3)).astype(dtype)
        want = proc.preprocess(array, height=H, width=W).float()
        assert torch.equal(vae.preprocess(array, H, W)[:, :, 0], want)
    # uint8 arrays are 8-bit images (the reference would take 0..255 as they are).
    array = rng.integers(0, 256, (20, 30, 3), dtype=np.uint8)
    want = proc.preprocess(array.astype(np.float32) / 255.0, height=H, width=W)
    assert torch.equal(vae.preprocess(array, H, W)[:, :, 0], want)
    assert torch.equal(vae.preprocess(torch.from_numpy(array), H, W)[:, :, 0], want)

    # Videos: a list of PIL frames and an [F, H, W, 3] array.
    frames = moving_frames(5, 24, 40)
    assert torch.equal(vae.preprocess(frames, H, W), proc.preprocess_video(frames, height=H, width=W))
    clip = rng.random((5, 24, 40, 3)).astype(np.float32)
    assert torch.equal(vae.preprocess(clip, H, W), proc.preprocess_video(clip, height=H, width=W))

    # Non-RGB images are converted (the reference would pass 4 or 1 channels on to the VAE).
    rgba = random_image(H, W, mode="RGBA")
    assert torch.equal(vae.preprocess(rgba, H, W), vae.preprocess(rgba.convert("RGB"), H, W))


def test_preprocess_rejects_bad_inputs(vae):
    with pytest.raises(ValueError, match="multiples of 8"):
        vae.preprocess(random_image(H, W), 36, W)
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        vae.preprocess(np.full((H, W, 3), -0.5, dtype=np.float32), H, W)
    with pytest.raises(ValueError, match="shape"):
        vae.preprocess(np.zeros((H, W), dtype=np.float32), H, W)


def test_postprocess_takes_one_video(vae):
    pixels = torch.linspace(-1.5, 1.5, 3 * 2 * 8 * 8).view(1, 3, 2, 8, 8).repeat(2, 1, 1, 1, 1)
    assert vae.postprocess(pixels[0]).shape == (2, 8, 8, 3)
    assert torch.equal(vae.postprocess(pixels[:1]), vae.postprocess(pixels[0]))
    assert vae.postprocess(pixels[0]).min() == 0 and vae.postprocess(pixels[0]).max() == 1
    with pytest.raises(ValueError, match="one video"):
        vae.postprocess(pixels)


# ------------------------------------------------------------------------------------------------ tiny model


def test_build_tiny_model_is_deterministic(tmp_path, folder):
    rng_before = torch.get_rng_state()
    again = build_tiny_model(tmp_path / "again", variant="distilled", seed=0)
    assert torch.equal(torch.get_rng_state(), rng_before)  # building leaves the global RNG alone
    files = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    assert files == sorted(p.relative_to(again) for p in again.rglob("*") if p.is_file())
    assert any(p.suffix == ".safetensors" for p in files)
    for name in files:
        assert (folder / name).read_bytes() == (again / name).read_bytes(), name

    other = build_tiny_model(tmp_path / "other", variant="distilled", seed=1)
    for name in files:
        if name.suffix == ".safetensors":
            assert (folder / name).read_bytes() != (other / name).read_bytes(), name


def test_tiny_weights_have_no_constant_tensors(folder):
    model = HeliosTransformer3DModel.from_pretrained(folder / "transformer")
    constant = [n for n, p in model.named_parameters() if p.numel() > 1 and p.min() == p.max()]
    assert not constant


@pytest.mark.parametrize("variant", ["base", "mid", "distilled"])
def test_variant_folder_runs_in_reference_pipeline(tmp_path, monkeypatch, variant):
    folder = build_tiny_model(tmp_path / variant, variant=variant)
    pipe = getattr(diffusers, REFERENCE_CLASSES[variant]).from_pretrained(folder)
    scheduler = pipe.scheduler.config
    expected = {
        "base": ("HeliosScheduler", 1, "exponential", None, None),
        "mid": ("HeliosScheduler", 3, "exponential", True, False),
        "distilled": ("HeliosDMDScheduler", 3, "linear", False, True),
    }[variant]
    flags = (pipe.config.get("is_cfg_zero_star"), pipe.config.get("is_distilled"))
    assert (type(pipe.scheduler).__name__, scheduler.stages, scheduler.time_shift_type, *flags) == expected
    assert scheduler.use_dynamic_shifting and scheduler.shift == 1.0 and scheduler.gamma == pytest.approx(1 / 3)

    allow_singular_block_noise(monkeypatch, scheduler.gamma)
    contiguous_outputs(pipe)
    steps = {"num_inference_steps": 2} if variant == "base" else {"pyramid_num_inference_steps_list": [1, 1, 1]}
    frames = pipe("a cat", height=64, width=128, num_frames=33, generator=torch.Generator().manual_seed(0),
                  output_type="np", **steps).frames
    assert frames.shape == (1, 33, 64, 128, 3) and np.isfinite(frames).all() and frames.std() > 0.01

    # And our loaders read the same folder.
    assert HeliosTransformer3DModel.from_pretrained(folder / "transformer").config.text_dim == TINY_UMT5["d_model"]
    assert TextEncoder.from_pretrained(folder / "text_encoder", folder / "tokenizer").dim == TINY_UMT5["d_model"]
    assert VideoVAE.from_pretrained(folder / "vae").vae.config.z_dim == 16
