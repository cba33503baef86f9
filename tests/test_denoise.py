"""One chunk's sampling (helios.sampling.denoise with plan.stage_schedules) against the reference pipelines' real __call__.

The reference pipelines run with a tiny deterministic stand-in for the transformer and an identity VAE; ours runs the
same stand-in through denoise_chunk and guided_velocity, the code generate.py runs. Latents must agree to 1e-6.
"""

import contextlib
import types

import pytest
import torch
from diffusers import HeliosDMDScheduler, HeliosPipeline, HeliosPyramidPipeline, HeliosScheduler
from helpers import rel_err

from helios.sampling import schedule as S
from helios.sampling.denoise import Cancelled, denoise_chunk, guided_velocity
from helios.sampling.options import SamplingOptions, Variant
from helios.sampling.plan import stage_schedules

pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")


class FakeTransformer(torch.nn.Module):
    """Deterministic stand-in for the transformer: a smooth function of latents, timestep and text."""

    def __init__(self, dtype: torch.dtype):
        super().__init__()
        self.config = types.SimpleNamespace(in_channels=4, patch_size=(1, 2, 2))
        self._dtype = dtype
        self.anchor = torch.nn.Parameter(torch.zeros(()))  # so the pipeline sees an nn.Module with a device

    @property
    def dtype(self):
        return self._dtype

    @property
    def device(self):
        return torch.device("cpu")

    @contextlib.contextmanager
    def cache_context(self, name):
        yield

    def forward(self, hidden_states, timestep, encoder_hidden_states, return_dict=False, **kwargs):
        x = hidden_states.float()
        t = timestep.float().view(-1, 1, 1, 1, 1) / 1000
        e = encoder_hidden_states.float().mean()
        v = torch.tanh(x) * (0.5 + t) + e * torch.cos(3 * x + t) + 0.1 * x.flip(-1)
        return (v.to(self._dtype).contiguous(),)


class FakeVAE(torch.nn.Module):
    def __init__(self):
        super().__init__()
        z = 4
        self.config = types.SimpleNamespace(
            latents_mean=[0.0] * z, latents_std=[1.0] * z, z_dim=z, scale_factor_temporal=4, scale_factor_spatial=8
        )
        self.anchor = torch.nn.Parameter(torch.zeros(()))

    @property
    def dtype(self):
        return torch.float32

    @property
    def device(self):
        return torch.device("cpu")

    def decode(self, z, return_dict=False):
        return (z,)


def _embeds():
    g = torch.Generator().manual_seed(14)
    return torch.randn(1, 8, 16, generator=g), torch.randn(1, 8, 16, generator=g)


def our_chunks(variant: Variant, opts: SamplingOptions, model, chunks: int, latent_hw, seed=42) -> torch.Tensor:
    """Our chunks: noise drawn as generate.py draws it, then denoise_chunk with the variant's guidance."""
    pe, ne = (e.to(model.dtype) for e in _embeds())
    velocity = guided_velocity(lambda x, t, text: model(x, t, text)[0], pe, ne, variant, opts)
    g, out = torch.Generator().manual_seed(seed), []
    for k in range(chunks):
        noise = torch.randn(1, 4, opts.num_latent_frames_per_chunk, *latent_hw, generator=g)
        schedules = stage_schedules(variant, opts, latent_hw, k == 0, (1, 2, 2))
        out.append(denoise_chunk(velocity, noise, schedules, variant, g, model.dtype))
    return torch.cat(out, dim=2).float()


# gamma = 0.25 because the reference pyramid pipeline cannot run on CPU at gamma = 1/3 (see helpers.set_scheduler_gamma)
PYRAMID_VARIANTS = {
    "mid": dict(
        scheduler=lambda: HeliosScheduler(use_dynamic_shifting=True, gamma=0.25),
        variant=Variant("mid", S.SchedulerConfig(use_dynamic_shifting=True, gamma=0.25), is_cfg_zero_star=True),
        steps=(3, 3, 3), guidance=5.0, chunks=1,
    ),
    "distilled": dict(
        scheduler=lambda: HeliosDMDScheduler(use_dynamic_shifting=True, gamma=0.25),
        variant=Variant("distilled", S.SchedulerConfig(scheduler_type="dmd", time_shift_type="linear",
                                                       use_dynamic_shifting=True, gamma=0.25), is_distilled=True),
        steps=(2, 2, 2), guidance=1.0, chunks=2,
    ),
}


@pytest.mark.parametrize("name", list(PYRAMID_VARIANTS))
def test_pyramid_chunks_match_the_reference_pipeline(name):
    p = PYRAMID_VARIANTS[name]
    variant, model = p["variant"], FakeTransformer(torch.bfloat16)
    pipe = HeliosPyramidPipeline(
        tokenizer=None, text_encoder=None, vae=FakeVAE(), scheduler=p["scheduler"](), transformer=model,
        is_cfg_zero_star=variant.is_cfg_zero_star, is_distilled=variant.is_distilled,
    )
    pipe.set_progress_bar_config(disable=True)
    pe, ne = _embeds()
    ref = pipe(
        prompt_embeds=pe, negative_prompt_embeds=ne, height=128, width=192, num_frames=33 * p["chunks"],
        guidance_scale=p["guidance"], generator=torch.Generator().manual_seed(42), output_type="latent",
        pyramid_num_inference_steps_list=list(p["steps"]), use_zero_init=True, zero_steps=1,
        is_amplify_first_chunk=variant.is_distilled,
    ).frames

    opts = SamplingOptions(guidance_scale=p["guidance"], pyramid_num_inference_steps_list=p["steps"],
                           is_amplify_first_chunk=variant.is_distilled)
    ours = our_chunks(variant, opts, model, p["chunks"], (16, 24))
    assert rel_err(ours, ref) <= 1e-6


def test_base_chunk_matches_the_reference_pipeline():
    model = FakeTransformer(torch.bfloat16)
    pipe = HeliosPipeline(tokenizer=None, text_encoder=None, vae=FakeVAE(), transformer=model,
                          scheduler=HeliosScheduler(stages=1, stage_range=[0, 1], use_dynamic_shifting=True))
    pipe.set_progress_bar_config(disable=True)
    pe, ne = _embeds()
    ref = pipe(
        prompt_embeds=pe, negative_prompt_embeds=ne, height=64, width=96, num_frames=33, num_inference_steps=12,
        guidance_scale=5.0, generator=torch.Generator().manual_seed(42), output_type="latent",
    ).frames

    variant = Variant("base", S.SchedulerConfig(stages=1, stage_range=(0, 1), use_dynamic_shifting=True))
    opts = SamplingOptions(guidance_scale=5.0, num_inference_steps=12)
    assert rel_err(our_chunks(variant, opts, model, 1, (8, 12)), ref) <= 1e-6


def test_on_step_is_called_after_every_step_and_can_cancel():
    variant = PYRAMID_VARIANTS["distilled"]["variant"]
    opts = SamplingOptions(guidance_scale=1.0, pyramid_num_inference_steps_list=(2, 1, 1))
    model = FakeTransformer(torch.float32)
    velocity = guided_velocity(lambda x, t, text: model(x, t, text)[0], _embeds()[0], None, variant, opts)
    schedules = stage_schedules(variant, opts, (16, 24), False, (1, 2, 2))
    noise = torch.randn(1, 4, 9, 16, 24, generator=torch.Generator().manual_seed(0))
    calls = []
    denoise_chunk(velocity, noise, schedules, variant, torch.Generator().manual_seed(1), torch.float32,
                  lambda: calls.append(1) and False)
    assert len(calls) == sum(len(s) for s in schedules) == 4
    with pytest.raises(Cancelled):
        denoise_chunk(velocity, noise, schedules, variant, torch.Generator().manual_seed(1), torch.float32,
                      lambda: len(calls.append(1) or calls) >= 6)
    assert len(calls) == 6  # stopped after the second step of the second run
