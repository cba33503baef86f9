"""Whole generations against the reference pipelines (diffusers 0.42.1) on tiny random model folders.

The folders are saved by the reference pipelines themselves, so loading them also checks that we read the published
layout. Same seed, same settings: latents within 1e-4 relative, frames within 1e-3, in fp32.
"""

import numpy as np
import PIL.Image
import pytest
import torch

diffusers = pytest.importorskip("diffusers")

from helpers import REFERENCE_CLASSES, contiguous_outputs, rel_err, set_scheduler_gamma  # noqa: E402

from helios import HeliosPipeline, SamplingOptions  # noqa: E402
from helios.pipeline.tiny import build_tiny_model  # noqa: E402

pytestmark = pytest.mark.slow  # whole generations against the reference

H, W = 64, 128  # pixels: the pyramid needs multiples of 64


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """variant -> a tiny model folder written by the reference pipeline's save_pretrained."""
    root = tmp_path_factory.mktemp("tiny")
    out = {}
    for variant, cls_name in REFERENCE_CLASSES.items():
        source = build_tiny_model(root / f"source-{variant}", variant=variant, seed=0)
        set_scheduler_gamma(source, 0.25)
        reference = getattr(diffusers, cls_name).from_pretrained(source)
        reference.save_pretrained(root / variant)
        out[variant] = root / variant
    return out


def reference_pipeline(folder, variant):
    return contiguous_outputs(getattr(diffusers, REFERENCE_CLASSES[variant]).from_pretrained(folder))


def still_image():
    rng = np.random.default_rng(1)
    return PIL.Image.fromarray(rng.integers(0, 256, (H, W, 3), dtype=np.uint8))


def moving_video(frames=40):
    rng = np.random.default_rng(2)
    base = rng.integers(0, 256, (H, W + frames, 3), dtype=np.uint8)
    return [PIL.Image.fromarray(np.ascontiguousarray(base[:, i : i + W])) for i in range(frames)]


# (name, variant, our options, reference kwargs beyond the shared ones, conditioning)
CASES = [
    ("base-t2v", "base", dict(num_frames=66, num_inference_steps=3, guidance_scale=5.0),
     dict(num_frames=66, num_inference_steps=3, guidance_scale=5.0), {}),
    ("mid-t2v", "mid", dict(num_frames=33, pyramid_num_inference_steps_list=(3, 2, 2), guidance_scale=5.0),
     dict(num_frames=33, pyramid_num_inference_steps_list=[3, 2, 2], guidance_scale=5.0), {}),
    ("distilled-t2v-amplified-3-chunks", "distilled",
     dict(num_frames=99, pyramid_num_inference_steps_list=(1, 1, 1), guidance_scale=1.0, is_amplify_first_chunk=True),
     dict(num_frames=99, pyramid_num_inference_steps_list=[1, 1, 1], guidance_scale=1.0, is_amplify_first_chunk=True), {}),
    ("distilled-i2v", "distilled",
     dict(num_frames=66, pyramid_num_inference_steps_list=(1, 1, 1), guidance_scale=1.0, is_amplify_first_chunk=False),
     dict(num_frames=66, pyramid_num_inference_steps_list=[1, 1, 1], guidance_scale=1.0), {"image": still_image}),
    ("mid-t2v-skip-first-chunk", "mid",
     dict(num_frames=66, pyramid_num_inference_steps_list=(3, 1, 1), guidance_scale=3.0, is_skip_first_chunk=True),
     dict(num_frames=66, pyramid_num_inference_steps_list=[3, 1, 1], guidance_scale=3.0, is_skip_first_chunk=True), {}),
    ("base-v2v", "base", dict(num_frames=33, num_inference_steps=2, guidance_scale=5.0),
     dict(num_frames=33, num_inference_steps=2, guidance_scale=5.0), {"video": moving_video}),
]


@pytest.mark.parametrize("name,variant,ours_opts,ref_kwargs,conditioning", CASES, ids=[c[0] for c in CASES])
def test_generation_matches_reference(folders, name, variant, ours_opts, ref_kwargs, conditioning):
    folder = folders[variant]
    inputs = {key: make() for key, make in conditioning.items()}
    prompt, negative, seed = "a red fox runs through the snow", "blurry, static", 42

    ours = HeliosPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu")
    video = ours.generate(prompt, SamplingOptions(height=H, width=W, seed=seed, **ours_opts),
                          negative_prompt=negative, **inputs)

    reference = reference_pipeline(folder, variant)
    shared = dict(prompt=prompt, negative_prompt=negative, height=H, width=W, **ref_kwargs, **inputs)
    ref_latents = reference(**shared, generator=torch.Generator().manual_seed(seed), output_type="latent").frames
    ref_frames = reference(**shared, generator=torch.Generator().manual_seed(seed), output_type="np").frames[0]

    generated = video.latents.shape[2]
    assert generated == 9 * -(-ours_opts["num_frames"] // 33)
    assert rel_err(video.latents, ref_latents[:, :, -generated:]) <= 1e-4
    assert rel_err(video.frames, ref_frames) <= 1e-3


def test_distilled_ignores_guidance_as_the_reference_says_but_does_not(folders):
    """The reference warns that guidance is ignored for the distilled model, then runs CFG anyway."""
    folder, prompt = folders["distilled"], "a red fox"
    opts = dict(height=H, width=W, num_frames=33, pyramid_num_inference_steps_list=(1, 1, 1), seed=3,
                is_amplify_first_chunk=False)
    ours = HeliosPipeline.from_pretrained(folder, torch_dtype=torch.float32, device="cpu")
    with pytest.warns(UserWarning, match="ignored"):
        guided = ours.generate(prompt, SamplingOptions(guidance_scale=5.0, **opts), negative_prompt="dark")
    plain = ours.generate(prompt, SamplingOptions(guidance_scale=1.0, **opts))
    assert torch.equal(guided.latents, plain.latents)

    reference = reference_pipeline(folder, "distilled")
    shared = dict(prompt=prompt, height=H, width=W, num_frames=33, pyramid_num_inference_steps_list=[1, 1, 1],
                  output_type="latent")
    ref_plain = reference(**shared, guidance_scale=1.0, generator=torch.Generator().manual_seed(3)).frames
    ref_guided = reference(**shared, guidance_scale=5.0, negative_prompt="dark",
                           generator=torch.Generator().manual_seed(3)).frames
    assert rel_err(plain.latents, ref_plain) <= 1e-4
    assert rel_err(ref_guided, ref_plain) > 1e-3  # the reference did apply guidance
