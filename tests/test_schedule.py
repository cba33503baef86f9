"""helios.sampling.schedule against the reference (diffusers 0.42.1 Helios schedulers and pipelines) and analytic formulas.

The sampling loop of one chunk, run end to end against the reference pipelines, is tested in test_denoise.py.
"""

import dataclasses
import inspect
import math
import types
import warnings

import numpy as np
import pytest
import torch
from diffusers import HeliosDMDScheduler, HeliosPyramidPipeline, HeliosScheduler
from diffusers.pipelines.helios import pipeline_helios_pyramid as ref_pyramid

from helpers import rel_err

from helios.sampling import schedule as S

# The reference's set_timesteps feeds a tensor to np.linspace, which numpy 2 flags; not our code.
pytestmark = pytest.mark.filterwarnings("ignore:__array_wrap__ must accept context:DeprecationWarning")

BASE_SIGMAS = np.linspace(0.999, 0.0, 51)[:-1]  # what HeliosPipeline passes to set_timesteps


def assert_same_schedule(ours: S.Schedule, ref_timesteps: torch.Tensor, ref_sigmas: torch.Tensor):
    assert ours.timesteps.dtype == ref_timesteps.dtype == torch.float64
    assert ours.sigmas.dtype == ref_sigmas.dtype
    torch.testing.assert_close(ours.timesteps, ref_timesteps, rtol=1e-12, atol=1e-9)
    torch.testing.assert_close(ours.sigmas, ref_sigmas, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------------------------------------ config


def test_config_fields_are_the_reference_arguments():
    ref_keys = set()
    for cls in (HeliosScheduler, HeliosDMDScheduler):
        ref_keys |= set(inspect.signature(cls.__init__).parameters) - {"self"}
    ours = {f.name for f in dataclasses.fields(S.SchedulerConfig)}
    # plus the dynamic-shift keys the pipelines read with config.get(key, default)
    assert ours - ref_keys == {"base_image_seq_len", "max_image_seq_len", "base_shift", "max_shift"}
    assert ref_keys <= ours
    ref = HeliosScheduler().config
    cfg = S.SchedulerConfig()
    for key in ref_keys - {"time_shift_type"}:  # same defaults (the DMD class differs only in time_shift_type)
        want = ref[key]
        want = tuple(want) if isinstance(want, list) else want
        assert getattr(cfg, key) == want, key


def test_config_from_dict():
    d = {
        "_class_name": "HeliosScheduler",
        "_diffusers_version": "0.36.0.dev0",
        "stages": 3,
        "stage_range": [0, 1 / 3, 2 / 3, 1],
        "use_dynamic_shifting": True,
        "disable_corrector": [],
    }
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # metadata keys are dropped silently
        cfg = S.SchedulerConfig.from_dict(d)
    assert cfg.use_dynamic_shifting and cfg.stage_range == (0.0, 1 / 3, 2 / 3, 1.0) and cfg.disable_corrector == ()
    hash(cfg)
    with pytest.warns(UserWarning, match="training_only_key"):
        S.SchedulerConfig.from_dict({**d, "training_only_key": 1})

    dmd = S.SchedulerConfig.from_dict({"_class_name": "HeliosDMDScheduler", "use_dynamic_shifting": True})
    assert dmd.scheduler_type == "dmd" and dmd.time_shift_type == "linear" and dmd.is_dmd
    explicit = S.SchedulerConfig.from_dict({"_class_name": "HeliosDMDScheduler", "time_shift_type": "exponential"})
    assert explicit.time_shift_type == "exponential"
    assert S.SchedulerConfig.from_dict({"scheduler_type": "dmd"}).time_shift_type == "exponential"


def test_config_rejects_what_is_not_implemented():
    for bad in ({"thresholding": True}, {"solver_order": 3}, {"predict_x0": False}, {"prediction_type": "epsilon"}):
        with pytest.raises(NotImplementedError):
            S.SchedulerConfig(**bad)
    with pytest.raises(ValueError):
        S.SchedulerConfig(scheduler_type="ddim")
    with pytest.raises(ValueError):
        S.SchedulerConfig(use_dynamic_shifting=True, shift=3.0)


# ------------------------------------------------------------------------------------------------ shifts


@pytest.mark.parametrize("tokens, mu", [(540, 0.5481), (2160, 0.8223), (8640, 1.9192)])
def test_mu_values(tokens, mu):
    cfg = S.SchedulerConfig()
    assert S.calculate_mu(tokens, cfg) == pytest.approx(mu, abs=1e-4)
    assert S.calculate_mu(tokens, cfg) == ref_pyramid.calculate_shift(tokens)


def test_image_seq_len():
    assert S.image_seq_len(9, 48, 80) == 8640
    assert S.image_seq_len(9, 24, 40) == 2160
    assert S.image_seq_len(9, 12, 20) == 540


@pytest.mark.parametrize("kind", ["exponential", "linear"])
def test_time_shift_analytic_and_reference(kind):
    sigmas = torch.tensor([0.999, 0.75, 0.5, 0.1, 0.000999, 0.0], dtype=torch.float64)
    mu = 0.8223
    s = sigmas.numpy()
    with np.errstate(divide="ignore"):
        k = math.exp(mu) if kind == "exponential" else mu
        want = np.where(s > 0, k / (k + (1 / s - 1)), 0.0)
    got = S.time_shift(sigmas, mu, kind)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-14, atol=0)
    assert got[-1] == 0
    ref = HeliosScheduler(time_shift_type=kind)
    assert torch.equal(got, ref.time_shift(mu, 1.0, sigmas))


# ------------------------------------------------------------------------------------------------ schedules


@pytest.mark.parametrize("dynamic", [True, False])
def test_base_schedule_matches_reference(dynamic):
    cfg = S.SchedulerConfig(stages=1, stage_range=(0, 1), use_dynamic_shifting=dynamic)
    mu = S.calculate_mu(8640, cfg)
    ref = HeliosScheduler(stages=1, stage_range=[0, 1], use_dynamic_shifting=dynamic)
    ref.set_timesteps(50, sigmas=BASE_SIGMAS, mu=mu)
    ours = S.base_schedule(cfg, 50, mu=mu)
    assert len(ours) == 50 and ours.sigmas.shape == (51,) and ours.sigmas[-1] == 0
    assert_same_schedule(ours, ref.timesteps, ref.sigmas)
    if dynamic:  # docs/design.md §4.2
        np.testing.assert_allclose(ours.timesteps[:3].numpy(), [999.85, 996.87, 993.77], atol=0.01)
        np.testing.assert_allclose(ours.timesteps[-3:].numpy(), [302.92, 220.99, 121.99], atol=0.01)
        assert ours.sigmas[-2].item() == pytest.approx(0.122, abs=5e-4)
    else:
        np.testing.assert_allclose(ours.timesteps.numpy(), 1000 * BASE_SIGMAS, rtol=1e-15)


def test_pyramid_stage_constants_match_reference():
    cfg = S.SchedulerConfig()
    ps = S.pyramid_stages(cfg)
    ref = HeliosScheduler()
    for s in range(3):
        assert ps.ori_start_sigmas[s] == ref.ori_start_sigmas[s]
        assert ps.start_sigmas[s] == ref.start_sigmas[s]
        assert ps.end_sigmas[s] == ref.end_sigmas[s]
        assert ps.windows[s] == (ref.timesteps_per_stage[s][0].item(), ref.timesteps_per_stage[s][-1].item())
    assert ps.local_sigmas == (ref.sigmas_per_stage[0][0].item(), ref.sigmas_per_stage[0][-1].item())
    # docs/design.md §4.3
    np.testing.assert_allclose(ps.ori_start_sigmas, [0.999, 0.666333, 0.333666], atol=1e-6)
    np.testing.assert_allclose(ps.start_sigmas, [0.999, 0.79976, 0.50037], atol=1e-5)
    np.testing.assert_allclose(
        np.array(ps.windows).ravel(), [999, 743.51, 743.26, 385.97, 385.61, 1.38], atol=0.01
    )


STAGE_CASES = [
    # (scheduler_type, time shift, dynamic, steps per stage, amplify)
    ("unipc", "exponential", True, (20, 20, 20), False),  # Mid
    ("unipc", "exponential", True, (10, 10, 10), False),
    ("unipc", "exponential", False, (17, 17, 17), False),
    ("dmd", "linear", True, (2, 2, 2), False),  # Distilled
    ("dmd", "linear", True, (2, 2, 2), True),  # Distilled, amplified first chunk
    ("dmd", "linear", True, (1, 1, 1), False),
    ("dmd", "linear", False, (2, 2, 2), True),
]


@pytest.mark.parametrize("kind, shift_type, dynamic, steps, amplify", STAGE_CASES)
def test_stage_schedules_match_reference(kind, shift_type, dynamic, steps, amplify):
    cfg = S.SchedulerConfig(scheduler_type=kind, time_shift_type=shift_type, use_dynamic_shifting=dynamic)
    refs = [HeliosScheduler(scheduler_type=kind, time_shift_type=shift_type, use_dynamic_shifting=dynamic)]
    if kind == "dmd":  # the diffusers pipeline uses its own DMD class; the official loader uses HeliosScheduler
        refs.append(HeliosDMDScheduler(time_shift_type=shift_type, use_dynamic_shifting=dynamic))
    for s, n in enumerate(steps):
        for tokens in (540, 2160, 8640):
            mu = S.calculate_mu(tokens, cfg)
            ours = S.stage_schedule(cfg, n, s, mu=mu, amplify=amplify)
            assert len(ours) == (2 * n if (amplify and kind == "dmd") else n)
            for ref in refs:
                ref.set_timesteps(n, s, mu=mu, is_amplify_first_chunk=amplify)
                assert_same_schedule(ours, ref.timesteps, ref.sigmas)


def test_distilled_schedule_spec_values():
    cfg = S.SchedulerConfig(scheduler_type="dmd", time_shift_type="linear", use_dynamic_shifting=True)
    mu = [S.calculate_mu(t, cfg) for t in (540, 2160, 8640)]
    want_t = [[998.53, 833.96], [742.82, 547.19], [385.41, 253.99]]
    want_s = [[0.9982, 0.3540, 0], [0.9988, 0.4512, 0], [0.9995, 0.6574, 0]]
    want_amp = [[998.53, 902.22, 833.96, 783.07], [742.82, 640.00, 547.19, 462.99], [385.41, 328.62, 253.99, 151.53]]
    for s in range(3):  # the spec evaluates stage s at its own resolution (540, 2160, 8640 tokens)
        sched = S.stage_schedule(cfg, 2, s, mu=mu[s])
        np.testing.assert_allclose(sched.timesteps.numpy(), want_t[s], atol=0.01)
        np.testing.assert_allclose(sched.sigmas.numpy(), want_s[s], atol=1e-4)
        amp = S.stage_schedule(cfg, 2, s, mu=mu[s], amplify=True)
        np.testing.assert_allclose(amp.timesteps.numpy(), want_amp[s], atol=0.01)


def test_mid_schedule_spec_values():
    cfg = S.SchedulerConfig(use_dynamic_shifting=True)
    want = [(998.85, 743.95), (743.10, 386.78), (385.56, 3.98)]
    for s, tokens in enumerate((540, 2160, 8640)):
        t = S.stage_schedule(cfg, 20, s, mu=S.calculate_mu(tokens, cfg)).timesteps
        np.testing.assert_allclose([t[0].item(), t[-1].item()], want[s], atol=0.01)


def test_pyramid_schedules_use_the_pre_upsample_token_count():
    # The reference pipeline computes mu before upsampling, so stages 0, 1, 2 use 540, 540, 2160 tokens at
    # 384x640; the end-to-end pipeline tests below check that this is what the reference does.
    cfg = S.SchedulerConfig(scheduler_type="dmd", time_shift_type="linear", use_dynamic_shifting=True)
    got = S.pyramid_schedules(cfg, [2, 2, 2], 9, 48, 80)
    for s, tokens in enumerate((540, 540, 2160)):
        want = S.stage_schedule(cfg, 2, s, mu=S.calculate_mu(tokens, cfg))
        assert torch.equal(got[s].timesteps, want.timesteps) and torch.equal(got[s].sigmas, want.sigmas)


# ------------------------------------------------------------------------------------------------ steps


def _velocity(x: torch.Tensor, g: torch.Generator, dtype: torch.dtype) -> torch.Tensor:
    # a stand-in model output: depends on x, plus fresh noise, so the multistep history matters
    return (0.8 * x + 0.5 * torch.randn(x.shape, generator=g)).to(dtype)


@pytest.mark.parametrize("v_dtype", [torch.float32, torch.bfloat16])
def test_unipc_base_trajectory_matches_reference(v_dtype):
    cfg = S.SchedulerConfig(stages=1, stage_range=(0, 1), use_dynamic_shifting=True)
    mu = S.calculate_mu(8640, cfg)
    ref = HeliosScheduler(stages=1, stage_range=[0, 1], use_dynamic_shifting=True)
    ref.set_timesteps(50, sigmas=BASE_SIGMAS, mu=mu)
    sched = S.base_schedule(cfg, 50, mu=mu)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1, 4, 3, 8, 8, generator=g)
    x_ref, state = x.clone(), S.UniPCState()
    for i, t in enumerate(ref.timesteps):
        v = _velocity(x_ref, g, v_dtype)
        x_ref = ref.step(v, t, x_ref, return_dict=False)[0]
        x, state = S.unipc_step(x, v, sched.sigmas, i, state, cfg)
        assert x.dtype == x_ref.dtype == torch.float32
        assert rel_err(x, x_ref) <= 1e-6, f"step {i}"
    assert x.abs().max() < 100  # the trajectory stayed sane (so the comparison was meaningful)


def test_unipc_pyramid_stage_resets_match_reference():
    cfg = S.SchedulerConfig(use_dynamic_shifting=True)
    ref = HeliosScheduler(use_dynamic_shifting=True)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 3, 8, 8, generator=g)
    x_ref = x.clone()
    for s, sched in enumerate(S.pyramid_schedules(cfg, [20, 20, 20], 9, 48, 80)):
        mu = S.calculate_mu((540, 540, 2160)[s], cfg)
        ref.set_timesteps(20, s, mu=mu)  # resets the reference's multistep history
        state = S.UniPCState()
        for i, t in enumerate(ref.timesteps):
            v = _velocity(x_ref, g, torch.bfloat16)
            x_ref = ref.step(v, t, x_ref, return_dict=False)[0]
            x, state = S.unipc_step(x, v, sched.sigmas, i, state, cfg)
            assert rel_err(x, x_ref) <= 1e-6, f"stage {s} step {i}"


@pytest.mark.parametrize(
    "options",
    [
        {"solver_order": 1},
        {"solver_type": "bh1"},
        {"lower_order_final": False},
        {"disable_corrector": [0, 3]},
    ],
)
def test_unipc_options_match_reference(options):
    cfg = S.SchedulerConfig(stages=1, stage_range=(0, 1), **options)
    ref = HeliosScheduler(stages=1, stage_range=[0, 1], **options)
    sigmas = np.linspace(0.999, 0.0, 9)[:-1]
    ref.set_timesteps(8, sigmas=sigmas)
    sched = S.base_schedule(cfg, 8)
    g = torch.Generator().manual_seed(2)
    x = torch.randn(2, 4, 2, 4, 4, generator=g)
    x_ref, state = x.clone(), S.UniPCState()
    for i, t in enumerate(ref.timesteps):
        v = _velocity(x_ref, g, torch.float32)
        x_ref = ref.step(v, t, x_ref, return_dict=False)[0]
        x, state = S.unipc_step(x, v, sched.sigmas, i, state, cfg)
        assert rel_err(x, x_ref) <= 1e-6, f"step {i}"


def test_unipc_first_step_is_analytic_and_state_is_explicit():
    # step 0 is a first-order DPM-Solver++ step: x1 = (s1/s0) x0_ - a1 expm1(-h) m0 with m0 = x - s0 v
    cfg = S.SchedulerConfig(stages=1)
    sigmas = torch.tensor([0.9, 0.6, 0.3, 0.0], dtype=torch.float64)
    x = torch.randn(1, 2, 1, 3, 3, generator=torch.Generator().manual_seed(3))
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    x1, state = S.unipc_step(x, v, sigmas, 0, S.UniPCState(), cfg)
    s0, s1 = 0.9, 0.6
    h = math.log((1 - s1) / s1) - math.log((1 - s0) / s0)
    m0 = x.double() - s0 * v.double()
    want = (s1 / s0) * x.double() - (1 - s1) * math.expm1(-h) * m0
    assert rel_err(x1, want) <= 1e-6
    assert state.last_order == 1 and len(state.x0s) == 1 and torch.equal(state.last_sample, x)
    # the same state value replayed gives the same next step (no hidden mutation)
    a, _ = S.unipc_step(x1, v, sigmas, 1, state, cfg)
    b, _ = S.unipc_step(x1, v, sigmas, 1, state, cfg)
    assert torch.equal(a, b)


@pytest.mark.parametrize("v_dtype", [torch.float32, torch.bfloat16])
def test_euler_matches_reference_and_formula(v_dtype):
    cfg = S.SchedulerConfig(stages=1, stage_range=(0, 1), scheduler_type="euler", use_dynamic_shifting=True)
    mu = S.calculate_mu(2160, cfg)
    ref = HeliosScheduler(stages=1, stage_range=[0, 1], scheduler_type="euler", use_dynamic_shifting=True)
    ref.set_timesteps(10, sigmas=np.linspace(0.999, 0.0, 11)[:-1], mu=mu)
    sched = S.base_schedule(cfg, 10, mu=mu)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(1, 4, 2, 4, 4, generator=g)
    x_ref = x.clone()
    for i, t in enumerate(ref.timesteps):
        v = _velocity(x_ref.float(), g, v_dtype)
        want = x.double() + (sched.sigmas[i + 1] - sched.sigmas[i]) * v.double()
        x_ref = ref.step(v, t, x_ref, return_dict=False)[0]
        x, _ = S.sampler_step(cfg, x, v, sched, i)
        assert x.dtype == x_ref.dtype == v_dtype
        assert rel_err(x, x_ref) <= 1e-6
        assert rel_err(x, want) <= (1e-6 if v_dtype == torch.float32 else 1e-2)


@pytest.mark.parametrize("amplify", [False, True])
def test_dmd_steps_match_reference(amplify):
    cfg = S.SchedulerConfig(scheduler_type="dmd", time_shift_type="linear", use_dynamic_shifting=True)
    ref = HeliosDMDScheduler(use_dynamic_shifting=True)
    g = torch.Generator().manual_seed(6)
    x = torch.randn(1, 4, 3, 4, 4, generator=g)
    x_ref = x.clone()
    for s, sched in enumerate(S.pyramid_schedules(cfg, [2, 2, 2], 9, 48, 80, amplify=amplify)):
        ref.set_timesteps(2, s, mu=S.calculate_mu((540, 540, 2160)[s], cfg), is_amplify_first_chunk=amplify)
        if s > 0:  # from stage 1 on the start point is bf16, as after the reference's renoise
            x = x_ref = (0.7 * x_ref + 0.5 * torch.randn(x.shape, generator=g)).to(torch.bfloat16)
        start = x
        for i, t in enumerate(ref.timesteps):
            v = _velocity(x_ref.float(), g, torch.bfloat16)
            x_ref = ref.step(
                v, t, x_ref, cur_sampling_step=i, dmd_noisy_tensor=start,
                dmd_sigmas=ref.sigmas, dmd_timesteps=ref.timesteps, all_timesteps=ref.timesteps,
            )[0]
            sigma = sched.sigmas[i].item()
            x0 = (x.double() - sigma * v.double()).to(v.dtype)
            x, _ = S.sampler_step(cfg, x, v, sched, i, start_point=start)
            assert x.dtype == x_ref.dtype
            assert rel_err(x, x_ref) <= 1e-6, f"stage {s} step {i}"
            if i == len(sched) - 1:  # the last step returns x0 itself
                assert torch.equal(x, x0)
            else:  # re-noised with the stage's start point, not fresh noise
                s1 = sched.sigmas[i + 1].item()
                assert rel_err(x, (1 - s1) * x0.double() + s1 * start.double()) <= 1e-2


def test_dmd_step_is_float64_inside():
    # x0 = x - sigma v is formed in float64 and rounded once; in fp32 it would differ in the last bit, which
    # no tolerance-based comparison sees, so this one compares bits with the reference.
    cfg = S.SchedulerConfig(scheduler_type="dmd", time_shift_type="linear", use_dynamic_shifting=True)
    ref = HeliosDMDScheduler(use_dynamic_shifting=True)
    mu = S.calculate_mu(540, cfg)
    ref.set_timesteps(4, 0, mu=mu)
    sched = S.stage_schedule(cfg, 4, 0, mu=mu)
    g = torch.Generator().manual_seed(15)
    start = x = torch.randn(1, 4, 3, 16, 16, generator=g)
    for i, t in enumerate(ref.timesteps):
        v = torch.randn(x.shape, generator=g) * 1.7
        want = ref.step(
            v, t, x, cur_sampling_step=i, dmd_noisy_tensor=start,
            dmd_sigmas=ref.sigmas, dmd_timesteps=ref.timesteps, all_timesteps=ref.timesteps,
        )[0]
        x = S.dmd_step(x, v, sched, i, start)
        assert torch.equal(x, want), f"step {i}"


def test_dmd_sigma_lookup_truncates_timesteps():
    # The reference finds sigma by int64(t), nearest float timestep. With timesteps < 1 apart (dense schedule)
    # that is not always sigmas[i]; the DMD step must pick the same entry.
    cfg = S.SchedulerConfig(scheduler_type="dmd", time_shift_type="linear", use_dynamic_shifting=True)
    ref = HeliosDMDScheduler(use_dynamic_shifting=True)
    ref.set_timesteps(400, 0, mu=0.5481)
    sched = S.stage_schedule(cfg, 400, 0, mu=0.5481)
    g = torch.Generator().manual_seed(16)
    x, start, v = (torch.randn(1, 2, 1, 4, 4, generator=g) for _ in range(3))
    picked_other = 0
    for i in range(0, 400, 7):
        want = ref.step(
            v, ref.timesteps[i], x, cur_sampling_step=i, dmd_noisy_tensor=start,
            dmd_sigmas=ref.sigmas, dmd_timesteps=ref.timesteps, all_timesteps=ref.timesteps,
        )[0]
        assert torch.equal(S.dmd_step(x, v, sched, i, start), want), f"step {i}"
        picked_other += int(torch.argmin((ref.timesteps - ref.timesteps[i].long()).abs())) != i
    assert picked_other > 0  # the case is dense enough for the truncation to matter


# ------------------------------------------------------------------------------------------------ pyramid


def test_downsample_noise_is_scaled_block_mean():
    noise = torch.randn(2, 3, 4, 16, 24, generator=torch.Generator().manual_seed(7))
    got = S.downsample_noise(noise, 3)
    # bilinear x0.5 (align_corners=False) is the 2x2 block mean; twice, times 2 twice = 4 * 4x4 block mean
    want = noise.reshape(2, 3, 4, 4, 4, 6, 4).mean(dim=(-1, -3)) * 4
    assert got.shape == (2, 3, 4, 4, 6)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    assert S.downsample_noise(noise, 1).shape == noise.shape


def test_renoise_coefficients_spec_values():
    cfg = S.SchedulerConfig()
    np.testing.assert_allclose(S.renoise_coefficients(cfg, 1), (0.600120, 0.692612), atol=1e-6)
    np.testing.assert_allclose(S.renoise_coefficients(cfg, 2), (0.749813, 0.433337), atol=1e-6)


def _reference_block_noise(shape, gamma, generator):
    dummy = types.SimpleNamespace(scheduler=types.SimpleNamespace(config=types.SimpleNamespace(gamma=gamma)))
    return HeliosPyramidPipeline.sample_block_noise(dummy, *shape, (1, 2, 2), torch.device("cpu"), generator)


@pytest.mark.parametrize("gamma", [0.25, 0.3])
def test_block_noise_matches_reference(gamma):
    shape = (1, 3, 2, 6, 10)
    g_ref, g_ours = torch.Generator().manual_seed(8), torch.Generator().manual_seed(8)
    want = _reference_block_noise(shape, gamma, g_ref)
    got = S.block_noise(shape, gamma, g_ours)
    assert got.shape == shape and got.dtype == torch.float32
    assert torch.equal(got, want)
    assert torch.equal(torch.randn(3, generator=g_ref), torch.randn(3, generator=g_ours))  # same RNG use


def test_block_noise_at_gamma_one_third():
    # The shipped gamma = 1/3 makes the fp32 covariance indefinite (smallest eigenvalue -3e-8): the
    # reference's Cholesky raises on CPU. Ours falls back to float64 and still has the intended statistics.
    shape = (2, 16, 4, 32, 32)
    with pytest.raises(torch.linalg.LinAlgError):
        _reference_block_noise(shape, 1 / 3, torch.Generator().manual_seed(9))
    noise = S.block_noise(shape, 1 / 3, torch.Generator().manual_seed(9))
    assert torch.isfinite(noise).all()
    blocks = noise.reshape(-1, 16, 2, 16, 2).permute(0, 1, 3, 2, 4).reshape(-1, 4).double()
    cov = blocks.T @ blocks / blocks.shape[0]
    want = (1 + 1 / 3) * torch.eye(4, dtype=torch.float64) - 1 / 3
    torch.testing.assert_close(cov, want, atol=0.02, rtol=0)
    assert blocks.sum(dim=1).abs().max() < 5e-3  # zero-sum blocks


def test_upsample_renoise_formula():
    cfg = S.SchedulerConfig(gamma=0.25)
    x = torch.randn(1, 2, 3, 4, 5, generator=torch.Generator().manual_seed(10))
    got = S.upsample_renoise(x, cfg, 1, torch.Generator().manual_seed(11), noise_dtype=torch.bfloat16)
    alpha, beta = S.renoise_coefficients(cfg, 1)
    up = x.repeat_interleave(2, dim=-2).repeat_interleave(2, dim=-1)
    noise = S.block_noise((1, 2, 3, 8, 10), 0.25, torch.Generator().manual_seed(11)).to(torch.bfloat16)
    assert got.dtype == torch.float32
    # beta * noise is rounded to bf16 before the fp32 add, exactly as in the reference pipeline
    torch.testing.assert_close(got, alpha * up + (beta * noise).float(), rtol=1e-6, atol=1e-6)
    assert (got - (alpha * up + beta * noise.float())).abs().max() > 1e-4  # ... which is visible


# ------------------------------------------------------------------------------------------------ guidance


def _reference_cfg_zero_star(v_c, v_u, scale):  # the pyramid pipeline's code path (needs contiguous inputs)
    b = v_c.shape[0]
    alpha = ref_pyramid.optimized_scale(v_c.view(b, -1), v_u.view(b, -1))
    alpha = alpha.view(b, *([1] * (v_c.dim() - 1))).to(v_c.dtype)
    return v_u * alpha + scale * (v_c - v_u * alpha)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cfg_zero_star_matches_reference(dtype):
    g = torch.Generator().manual_seed(12)
    v_c = torch.randn(2, 4, 3, 6, 5, generator=g).to(dtype)
    v_u = (0.6 * v_c.float() + 0.4 * torch.randn(v_c.shape, generator=g)).to(dtype)
    want = _reference_cfg_zero_star(v_c, v_u, 5.0)
    got = S.cfg_zero_star(v_c, v_u, 5.0)
    assert got.dtype == dtype and torch.equal(got, want)
    # analytic s* per sample
    c, u = v_c.double().flatten(1), v_u.double().flatten(1)
    s = ((c * u).sum(1) / ((u * u).sum(1) + 1e-8)).view(2, 1, 1, 1, 1)
    assert rel_err(got, s * v_u.double() + 5.0 * (v_c.double() - s * v_u.double())) <= 3e-2
    # strided inputs, on which the reference's .view() would raise, give the same numbers
    perm = (0, 2, 1, 3, 4)
    v_c_strided, v_u_strided = (v.permute(perm).contiguous().permute(perm) for v in (v_c, v_u))
    assert not v_c_strided.is_contiguous()
    assert torch.equal(S.cfg_zero_star(v_c_strided, v_u_strided, 5.0), want)


def test_cfg_and_zero_init():
    g = torch.Generator().manual_seed(13)
    v_c, v_u = torch.randn(1, 2, 3, 4, 4, generator=g), torch.randn(1, 2, 3, 4, 4, generator=g)
    torch.testing.assert_close(S.cfg_combine(v_c, v_u, 5.0), 5.0 * v_c - 4.0 * v_u)
    assert torch.equal(S.cfg_zero_star(v_c, v_u, 5.0, zero_init=True), torch.zeros_like(v_c))
    # zero_steps = 1 zeroes steps 0 and 1 of stage 0 only
    assert [S.zero_init_applies(0, i, 1) for i in range(4)] == [True, True, False, False]
    assert not S.zero_init_applies(1, 0, 1) and not S.zero_init_applies(0, 0, 1, use_zero_init=False)
