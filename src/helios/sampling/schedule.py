"""Sampling math for Helios: sigma schedules, UniPC / Euler / DMD steps, pyramid stages and guidance.

Everything here is a pure function of its arguments. Numerics follow the reference (diffusers 0.42.1
`HeliosScheduler`, `HeliosDMDScheduler` and the two Helios pipelines) operation by operation, because whole
generations are compared with it at 1e-4: sigmas and timesteps are float64 tensors, and a step multiplies the
fp32 latents by 0-dim float64 sigmas (which PyTorch casts to the latents' dtype, it does not upcast them).

Rectified flow: x_sigma = (1 - sigma) x0 + sigma eps; the model predicts v = eps - x0, so x0 = x - sigma v.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

SCHEDULER_TYPES = ("unipc", "euler", "dmd")
TIME_SHIFT_TYPES = ("exponential", "linear")


@dataclass(frozen=True)
class SchedulerConfig:
    """Keys of the published `scheduler/scheduler_config.json` (union of the HeliosScheduler and
    HeliosDMDScheduler arguments, plus the dynamic-shift keys the pipelines read with defaults)."""

    num_train_timesteps: int = 1000
    shift: float = 1.0
    stages: int = 3
    stage_range: tuple[float, ...] = (0.0, 1 / 3, 2 / 3, 1.0)
    gamma: float = 1 / 3
    thresholding: bool = False
    prediction_type: str = "flow_prediction"
    solver_order: int = 2
    predict_x0: bool = True
    solver_type: str = "bh2"
    lower_order_final: bool = True
    disable_corrector: tuple[int, ...] = ()
    solver_p: None = None
    use_flow_sigmas: bool = True
    scheduler_type: str = "unipc"
    use_dynamic_shifting: bool = False
    time_shift_type: str = "exponential"
    base_image_seq_len: int = 256
    max_image_seq_len: int = 4096
    base_shift: float = 0.5
    max_shift: float = 1.15

    def __post_init__(self):
        # JSON gives lists; tuples keep the config hashable (pyramid_stages caches on it).
        object.__setattr__(self, "stage_range", tuple(float(r) for r in self.stage_range))
        object.__setattr__(self, "disable_corrector", tuple(int(i) for i in self.disable_corrector))
        if self.solver_type in ("midpoint", "heun", "logrho"):  # the reference maps these to bh2 as well
            object.__setattr__(self, "solver_type", "bh2")
        if self.scheduler_type not in SCHEDULER_TYPES:
            raise ValueError(f"scheduler_type must be one of {SCHEDULER_TYPES}, got {self.scheduler_type!r}")
        if self.time_shift_type not in TIME_SHIFT_TYPES:
            raise ValueError(f"time_shift_type must be one of {TIME_SHIFT_TYPES}, got {self.time_shift_type!r}")
        # Only the first stages + 1 entries are read: a single-stage config may keep the 3-stage default range.
        if len(self.stage_range) < self.stages + 1:
            raise ValueError(f"stage_range needs stages + 1 = {self.stages + 1} entries, got {self.stage_range}")
        if self.use_dynamic_shifting and self.shift != 1.0:
            raise ValueError("use_dynamic_shifting requires shift == 1.0 (the reference asserts it)")
        # Only the flow-matching UniPC that Helios ships is implemented; refuse the rest instead of guessing.
        unsupported = {
            "prediction_type": self.prediction_type != "flow_prediction",
            "predict_x0": not self.predict_x0,
            "use_flow_sigmas": not self.use_flow_sigmas,
            "thresholding": self.thresholding,
            "solver_p": self.solver_p is not None,
            "solver_type": self.solver_type not in ("bh1", "bh2"),
            "solver_order": self.solver_order not in (1, 2),
        }
        bad = [k for k, is_bad in unsupported.items() if is_bad]
        if bad:
            raise NotImplementedError(f"unsupported scheduler settings: {', '.join(bad)}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> SchedulerConfig:
        d = dict(d)
        class_name = d.pop("_class_name", None)
        d.pop("_diffusers_version", None)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(k for k in d if k not in known)
        if unknown:
            warnings.warn(f"SchedulerConfig: ignoring unknown keys {unknown}", stacklevel=2)
        # HeliosDMDScheduler has no scheduler_type argument and defaults to the linear time shift.
        defaults = {"scheduler_type": "dmd", "time_shift_type": "linear"} if class_name == "HeliosDMDScheduler" else {}
        return cls(**{**defaults, **{k: v for k, v in d.items() if k in known}})

    @property
    def is_dmd(self) -> bool:
        return self.scheduler_type == "dmd"


# ------------------------------------------------------------------------------------------------ shifts


def image_seq_len(frames: int, height: int, width: int, patch_size: tuple[int, int, int] = (1, 2, 2)) -> int:
    """Tokens of the current latents [.., frames, height, width] (what the dynamic shift is keyed on)."""
    return frames * height * width // (patch_size[0] * patch_size[1] * patch_size[2])


def calculate_mu(seq_len: int, cfg: SchedulerConfig) -> float:
    """Linear in the token count through (base_image_seq_len, base_shift), (max_image_seq_len, max_shift).
    Not clamped: 8640 tokens (384x640 full res) give mu = 1.9192 > max_shift."""
    m = (cfg.max_shift - cfg.base_shift) / (cfg.max_image_seq_len - cfg.base_image_seq_len)
    b = cfg.base_shift - m * cfg.base_image_seq_len
    return seq_len * m + b


def time_shift(sigmas: torch.Tensor, mu: float, kind: str) -> torch.Tensor:
    """exponential: e^mu / (e^mu + 1/s - 1); linear: mu / (mu + 1/s - 1). sigma = 0 maps to 0 (1/0 = inf)."""
    if kind == "exponential":
        return math.exp(mu) / (math.exp(mu) + (1 / sigmas - 1))
    if kind == "linear":
        return mu / (mu + (1 / sigmas - 1))
    raise ValueError(f"time shift must be one of {TIME_SHIFT_TYPES}, got {kind!r}")


# ------------------------------------------------------------------------------------------------ schedules


@dataclass(frozen=True)
class Schedule:
    """One denoising pass: N model timesteps and N + 1 sigmas (the last is 0), both float64.

    Kept on the host, also when the latents are on a GPU: a step reads its sigmas as 0-dim host tensors, which enter
    device kernels as scalars without a sync; on the device every `float(sigma)` would wait for the GPU. Only the
    transformer's timestep input goes to the device, once per stage (denoise.model_timesteps)."""

    timesteps: torch.Tensor  # (N,)
    sigmas: torch.Tensor  # (N + 1,)

    def __len__(self) -> int:
        return self.timesteps.shape[0]

    def to(self, device: torch.device | str) -> Schedule:
        return Schedule(self.timesteps.to(device), self.sigmas.to(device))


def base_schedule(cfg: SchedulerConfig, num_steps: int, mu: float | None = None) -> Schedule:
    """Single-stage schedule of HeliosPipeline (Base): sigmas = linspace(0.999, 0, N + 1)[:-1] ++ [0].

    The pipeline always passes these sigmas, so a static `shift` is never applied here (the reference only
    applies it when no sigmas are given)."""
    if cfg.is_dmd:
        raise ValueError("the DMD scheduler is only used with the pyramid (stages > 1)")
    sigmas = np.linspace(0.999, 0.0, num_steps + 1)[:-1]
    timesteps = torch.from_numpy(sigmas * cfg.num_train_timesteps)
    sigmas = torch.cat([torch.from_numpy(sigmas), torch.zeros(1, dtype=torch.float64)])
    if cfg.use_dynamic_shifting:
        if mu is None:
            raise ValueError("use_dynamic_shifting needs mu (see calculate_mu)")
        sigmas = time_shift(sigmas, mu, cfg.time_shift_type)
        timesteps = sigmas[:-1] * cfg.num_train_timesteps
    return Schedule(timesteps, sigmas)


@dataclass(frozen=True)
class PyramidStages:
    """Per-stage constants of the pyramid (the reference's `init_sigmas_for_each_stage`)."""

    ori_start_sigmas: tuple[float, ...]  # where each stage starts on the global sigma grid
    start_sigmas: tuple[float, ...]  # corrected for the renoise at the upsample (stage >= 1)
    end_sigmas: tuple[float, ...]
    windows: tuple[tuple[float, float], ...]  # (first, last) timestep of linspace(t_max, t_min, N + 1)[:-1]
    local_sigmas: tuple[float, float]  # (first, last) of linspace(0.999, 0, N + 1)[:-1], shared by all stages


@functools.lru_cache(maxsize=8)
def pyramid_stages(cfg: SchedulerConfig) -> PyramidStages:
    """Split [0, 1000) into one timestep window per stage, proportional to each stage's sigma distance."""
    n = cfg.num_train_timesteps
    alphas = np.linspace(1, 1 / n, n + 1)
    grid = 1.0 - alphas
    grid = np.flip(cfg.shift * grid / (1 + (cfg.shift - 1) * grid))[:-1].copy()  # global sigmas, 0.999 .. 0
    grid_t = grid * n

    ori, start, end = [], [], []
    for s in range(cfg.stages):
        i0 = max(int(cfg.stage_range[s] * n), 0)
        i1 = min(int(cfg.stage_range[s + 1] * n), n)
        ori.append(float(grid[i0]))
        end.append(float(grid[i1]) if i1 < n else 0.0)
        o = 1 - ori[-1]  # signal coefficient at the stage start
        # After the upsample + renoise (see renoise_coefficients) the signal share is o / (sqrt(1 + 1/gamma)(1-o) + o).
        start.append(ori[-1] if s == 0 else 1 - (1 / (math.sqrt(1 + (1 / cfg.gamma)) * (1 - o) + o)) * o)

    distance = [a - b for a, b in zip(start, end)]
    total = sum(distance)
    windows = []
    for s in range(cfg.stages):
        r0 = 0.0 if s == 0 else sum(distance[:s]) / total
        r1 = 0.9999999999999999 if s == cfg.stages - 1 else sum(distance[: s + 1]) / total
        t_max = min(float(grid_t[int(r0 * n)]), 999.0)  # sic: the reference caps at 999, not n - 1
        t_min = float(grid_t[min(int(r1 * n), n - 1)])
        window = np.linspace(t_max, t_min, n + 1)[:-1]
        windows.append((float(window[0]), float(window[-1])))
    local = np.linspace(0.999, 0, n + 1)[:-1]
    return PyramidStages(tuple(ori), tuple(start), tuple(end), tuple(windows), (float(local[0]), float(local[-1])))


def stage_schedule(
    cfg: SchedulerConfig, num_steps: int, stage: int, mu: float | None = None, amplify: bool = False
) -> Schedule:
    """Schedule of one pyramid stage (the reference's `set_timesteps(num_steps, stage, mu=mu)`).

    DMD draws n + 1 points (2n + 1 when `amplify`, i.e. the first chunk with is_amplify_first_chunk), then drops
    the last timestep and the second-to-last sigma, so it takes n (2n) steps ending at sigma 0. `amplify` is
    ignored by the other samplers, as in the reference."""
    ps = pyramid_stages(cfg)
    count = (2 * num_steps + 1 if amplify else num_steps + 1) if cfg.is_dmd else num_steps
    (t_first, t_last), (s_first, s_last) = ps.windows[stage], ps.local_sigmas
    timesteps = torch.from_numpy(np.linspace(t_first, t_last, count))
    sigmas = torch.cat([torch.from_numpy(np.linspace(s_first, s_last, count)), torch.zeros(1, dtype=torch.float64)])
    if cfg.is_dmd:
        timesteps = timesteps[:-1]
        sigmas = torch.cat([sigmas[:-2], sigmas[-1:]])
    if cfg.use_dynamic_shifting:
        if mu is None:
            raise ValueError("use_dynamic_shifting needs mu (see pyramid_schedules)")
        sigmas = time_shift(sigmas, mu, cfg.time_shift_type)
        t_lo, t_hi = min(t_first, t_last), max(t_first, t_last)
        timesteps = t_lo + sigmas[:-1] * (t_hi - t_lo)
    return Schedule(timesteps, sigmas)


def pyramid_schedules(
    cfg: SchedulerConfig,
    steps: list[int] | tuple[int, ...],
    frames: int,
    height: int,
    width: int,
    amplify: bool = False,
    patch_size: tuple[int, int, int] = (1, 2, 2),
) -> list[Schedule]:
    """One Schedule per stage for a chunk whose full-resolution latents are [.., frames, height, width].

    Reference quirk kept on purpose: the pipeline computes mu from the latents *before* the stage's upsample,
    so stage s >= 1 is shifted with the token count of stage s - 1 (384x640: 540, 540, 2160 tokens)."""
    h0, w0 = height, width
    for _ in range(cfg.stages - 1):  # same integer halving as downsample_noise
        h0, w0 = h0 // 2, w0 // 2
    out = []
    for s, n in enumerate(steps):
        # stage s runs at (h0, w0) * 2^s (upsample_renoise doubles), but its mu is read before that upsample
        h, w = h0 << max(s - 1, 0), w0 << max(s - 1, 0)
        mu = calculate_mu(image_seq_len(frames, h, w, patch_size), cfg)
        out.append(stage_schedule(cfg, n, s, mu=mu, amplify=amplify))
    return out


# ------------------------------------------------------------------------------------------------ steps


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma: torch.Tensor, sigma_next: torch.Tensor) -> torch.Tensor:
    """x + (sigma_next - sigma) v, computed from fp32 x; the result takes v's dtype, as in the reference
    (so a bf16 model output makes the latents bf16)."""
    return (x.to(torch.float32) + (sigma_next - sigma) * v).to(v.dtype)


@dataclass(frozen=True)
class UniPCState:
    """The multistep memory of UniPC. Start every schedule (chunk, pyramid stage) from a fresh UniPCState()."""

    x0s: tuple[torch.Tensor, ...] = ()  # x0 predictions of the previous steps, oldest first (<= solver_order)
    last_sample: torch.Tensor | None = None  # x_{i-1} as it entered the previous predictor (after correction)
    last_order: int = 0  # order of the previous predictor; the corrector of this step reuses it


def _flow_lambda(sigma: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """alpha = 1 - sigma, sigma clamped >= 1e-8 (sigma = 0 at the last step), log-SNR lambda = ln alpha - ln sigma."""
    alpha = 1 - sigma
    sigma = torch.clamp(sigma, min=1e-8)
    return alpha, sigma, torch.log(alpha) - torch.log(sigma)


def _bh_terms(h: torch.Tensor, solver_type: str):
    """h*phi_1(-h) = expm1(-h), B(-h), and the right-hand side b of the order-2 UniC system (x0-prediction)."""
    hh = -h
    h_phi_1 = torch.expm1(hh)
    b_h = torch.expm1(hh) if solver_type == "bh2" else hh
    h_phi_k = h_phi_1 / hh - 1
    b1 = h_phi_k * 1 / b_h
    h_phi_k = h_phi_k / hh - 1 / 2
    b2 = h_phi_k * 2 / b_h
    return h_phi_1, b_h, (b1, b2)


def _unipc_predict(x, x0s, sigmas, i, order, solver_type) -> torch.Tensor:
    """UniP: x_i -> x_{i+1} from the x0 predictions m_i (and m_{i-1} at order 2)."""
    alpha_t, sigma_t, lam_t = _flow_lambda(sigmas[i + 1])
    _, sigma_0, lam_0 = _flow_lambda(sigmas[i])
    h = lam_t - lam_0
    h_phi_1, b_h, _ = _bh_terms(h, solver_type)
    m0 = x0s[-1]
    x_next = sigma_t / sigma_0 * x - alpha_t * h_phi_1 * m0
    if order == 2:
        rk = (_flow_lambda(sigmas[i - 1])[2] - lam_0) / h
        d1 = (x0s[-2] - m0) / rk
        x_next = x_next - alpha_t * b_h * (d1 * 0.5)  # rho_p = 1/2: the reference's fixed order-2 coefficient
    return x_next.to(x.dtype)


def _unipc_correct(x_prev, x0s, x0, sigmas, i, order, solver_type) -> torch.Tensor:
    """UniC: redo x_{i-1} -> x_i now that m_i = x0 is known (order = that of the predictor being corrected)."""
    alpha_t, sigma_t, lam_t = _flow_lambda(sigmas[i])
    _, sigma_0, lam_0 = _flow_lambda(sigmas[i - 1])
    h = lam_t - lam_0
    h_phi_1, b_h, b = _bh_terms(h, solver_type)
    m0 = x0s[-1]
    x_t = sigma_t / sigma_0 * x_prev - alpha_t * h_phi_1 * m0
    d1_t = x0 - m0
    if order == 1:
        corr = 0.5 * d1_t  # rho_c = 1/2 at order 1
    else:
        rk = (_flow_lambda(sigmas[i - 2])[2] - lam_0) / h
        d1 = (x0s[-2] - m0) / rk
        # rows are rk^0 and rk^1 for (r_{i-2}, 1); solved in float64, then cast like the reference
        # rk and b come from the host sigmas (see Schedule), so .item() and the solve read no device tensor; rho
        # stays on the host too: its 0-dim entries enter the device kernels as scalars, where moving it to the
        # device would be a blocking copy at every step.
        r = torch.tensor([[1.0, 1.0], [rk.item(), 1.0]], dtype=torch.float64)
        rho = torch.linalg.solve(r, torch.stack(b).cpu()).to(dtype=x_prev.dtype)
        corr = rho[0] * d1 + rho[1] * d1_t
    return (x_t - alpha_t * b_h * corr).to(x_prev.dtype)


def unipc_step(
    x: torch.Tensor,
    v: torch.Tensor,
    sigmas: torch.Tensor,
    i: int,
    state: UniPCState,
    cfg: SchedulerConfig = SchedulerConfig(),
) -> tuple[torch.Tensor, UniPCState]:
    """Step i of UniPC-bh2 (x0-prediction, flow sigmas, lower_order_final) over `sigmas` (N + 1 values):
    convert v to m_i = x - sigma_i v, correct x_i with it (UniC, from step 1 on), then predict x_{i+1} (UniP).
    Returns x_{i+1} and the new state; equals diffusers' HeliosScheduler.step_unipc."""
    n = sigmas.shape[0] - 1
    x0 = x - sigmas[i] * v
    if i > 0 and state.last_sample is not None and (i - 1) not in cfg.disable_corrector:
        x = _unipc_correct(state.last_sample, state.x0s, x0, sigmas, i, state.last_order, cfg.solver_type)
    x0s = (state.x0s + (x0,))[-cfg.solver_order :]
    order = min(cfg.solver_order, n - i) if cfg.lower_order_final else cfg.solver_order
    order = min(order, len(state.x0s) + 1)  # warm-up: no more history than the steps taken so far
    x_next = _unipc_predict(x, x0s, sigmas, i, order, cfg.solver_type)
    return x_next, UniPCState(x0s=x0s, last_sample=x, last_order=order)


def _dmd_sigma(schedule: Schedule, t: torch.Tensor) -> torch.Tensor:
    # The reference looks sigmas up by timestep: t truncated to int64, nearest entry of the float timesteps.
    index = torch.argmin((schedule.timesteps - math.trunc(float(t))).abs())
    return schedule.sigmas[index]


def dmd_step(
    x: torch.Tensor, v: torch.Tensor, schedule: Schedule, i: int, start_point: torch.Tensor
) -> torch.Tensor:
    """Step i of the DMD sampler: x0 = x - sigma_i v (float64, cast to v's dtype); then, except at the last
    step, re-noise x0 to sigma_{i+1} with the stage's own start point (not fresh noise), in float64, cast to
    start_point's dtype. The last step returns x0 itself."""
    sigma = _dmd_sigma(schedule, schedule.timesteps[i]).double()
    x0 = (x.double() - sigma * v.double()).to(v.dtype)
    if i >= len(schedule) - 1:
        return x0
    sigma_next = _dmd_sigma(schedule, schedule.timesteps[i + 1]).double()
    return ((1 - sigma_next) * x0.double() + sigma_next * start_point.double()).to(start_point.dtype)


def sampler_step(
    cfg: SchedulerConfig,
    x: torch.Tensor,
    v: torch.Tensor,
    schedule: Schedule,
    i: int,
    state: UniPCState | None = None,
    start_point: torch.Tensor | None = None,
) -> tuple[torch.Tensor, UniPCState | None]:
    """Step i with the sampler the config names, so the denoising loop has one code path.
    `state` is the UniPC memory (None = fresh); `start_point` is the DMD stage start (x before its first step)."""
    if cfg.scheduler_type == "unipc":
        return unipc_step(x, v, schedule.sigmas, i, state or UniPCState(), cfg)
    if cfg.scheduler_type == "euler":
        return euler_step(x, v, schedule.sigmas[i], schedule.sigmas[i + 1]), state
    if start_point is None:
        raise ValueError("the DMD step needs the stage's start point")
    return dmd_step(x, v, schedule, i, start_point), state


# ------------------------------------------------------------------------------------------------ pyramid


def _per_frame(x: torch.Tensor, fn) -> torch.Tensor:
    """Apply a 2-D op to every frame of [B, C, T, H, W] (frames folded into the batch)."""
    b, c, t, h, w = x.shape
    y = fn(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))
    return y.reshape(b, t, c, y.shape[-2], y.shape[-1]).permute(0, 2, 1, 3, 4)


def downsample_noise(noise: torch.Tensor, num_stages: int) -> torch.Tensor:
    """Full-res noise [B, C, T, H, W] -> the stage-0 noise [B, C, T, H/2^(S-1), W/2^(S-1)].

    Bilinear x0.5 averages 2x2 blocks (variance 1/4), so each halving is multiplied by 2 to stay N(0, I)."""
    h, w = noise.shape[-2:]
    for _ in range(num_stages - 1):
        h, w = h // 2, w // 2
        noise = _per_frame(noise, lambda y, size=(h, w): F.interpolate(y, size=size, mode="bilinear") * 2)
    return noise.contiguous()


def renoise_coefficients(cfg: SchedulerConfig, stage: int) -> tuple[float, float]:
    """(alpha, beta) of x <- alpha * upsample(x) + beta * block_noise before stage >= 1 (PyramidFlow).
    384x640 defaults: stage 1 (0.600120, 0.692612), stage 2 (0.749813, 0.433337)."""
    o = 1 - pyramid_stages(cfg).ori_start_sigmas[stage]  # signal coefficient where the stage starts
    alpha = 1 / (math.sqrt(1 + (1 / cfg.gamma)) * (1 - o) + o)
    beta = alpha * (1 - o) / math.sqrt(cfg.gamma)
    return alpha, beta


def _block_cholesky(k: int, gamma: float, device) -> torch.Tensor:
    """The factor below, made once per (k, gamma, device): its check of `info` reads a device value (a sync) and
    it is the same at every stage transition. Callers must not modify it."""
    return _cached_cholesky(k, float(gamma), None if device is None else torch.device(device))


@functools.lru_cache(maxsize=16)
def _cached_cholesky(k: int, gamma: float, device) -> torch.Tensor:
    """Cholesky factor (fp32) of (1 + gamma) I - gamma 11^T + 1e-8 I, built exactly as the reference does.

    At gamma = 1/3 with k = 4 the matrix is singular (zero-sum blocks), and in fp32 the 1e-8 jitter is lost
    (1 + 1e-8 == 1), so the smallest eigenvalue rounds to -3e-8 and the reference's fp32 Cholesky fails on CPU
    (LAPACK). When that happens, factor the float64 matrix instead, where the jitter survives (L[-1, -1] ~ 2e-4)."""
    cov = torch.eye(k, device=device) * (1 + gamma) - torch.ones(k, k, device=device) * gamma
    cov = (cov + torch.eye(k, device=device) * 1e-8).float()
    chol, info = torch.linalg.cholesky_ex(cov)
    if int(info) == 0:
        return chol
    cov64 = torch.eye(k, dtype=torch.float64) * (1 + gamma) - gamma + torch.eye(k, dtype=torch.float64) * 1e-8
    return torch.linalg.cholesky(cov64).to(device=device, dtype=torch.float32)


def block_noise(
    shape: tuple[int, int, int, int, int],
    gamma: float,
    generator: torch.Generator,
    patch: tuple[int, int] = (2, 2),
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Noise [B, C, T, H, W] whose ph x pw spatial blocks have covariance (1 + gamma) I - gamma 11^T
    (unit variance, zero-sum blocks at gamma = 1/3): it cancels the blockiness of the nearest upsample.

    Drawn as z ~ N(0, I) of shape [B*C*T*(H/ph)*(W/pw), ph*pw] in fp32 on the generator's device, times L^T
    (L = Cholesky in fp32): the reference's draw, so the same generator gives the same noise."""
    b, c, t, h, w = shape
    ph, pw = patch
    k = ph * pw
    chol = _block_cholesky(k, gamma, device)
    z = torch.randn(b * c * t * (h // ph) * (w // pw), k, generator=generator, device=generator.device)
    noise = to_device_async(z, device) @ chol.T
    noise = noise.reshape(b, c, t, h // ph, w // pw, ph, pw).permute(0, 1, 2, 3, 5, 4, 6)
    return noise.reshape(b, c, t, h, w)


def to_device_async(tensor: torch.Tensor, device) -> torch.Tensor:
    """`tensor` on `device` (None: where it is) without a host sync. From host memory to CUDA a plain .to() waits
    for the stream's queued work (a pageable copy is synchronous); through pinned memory with non_blocking it is
    queued like a kernel (torch's pinned allocator keeps the buffer until the copy is done). Same values."""
    device = tensor.device if device is None else torch.device(device)
    if device.type != "cuda" or tensor.device.type != "cpu":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def upsample_renoise(
    x: torch.Tensor,
    cfg: SchedulerConfig,
    stage: int,
    generator: torch.Generator,
    noise_dtype: torch.dtype,
    patch: tuple[int, int] = (2, 2),
) -> torch.Tensor:
    """Stage transition before `stage` >= 1: nearest x2 upsample per frame, then alpha x + beta block_noise.

    The block noise is cast to `noise_dtype` (the transformer dtype in the reference) before mixing; the
    result keeps x's dtype when x is the wider type. Consumes one block-noise draw from `generator`."""
    h, w = x.shape[-2:]
    up = _per_frame(x, lambda y: F.interpolate(y, size=(2 * h, 2 * w), mode="nearest"))
    alpha, beta = renoise_coefficients(cfg, stage)
    noise = block_noise(tuple(up.shape), cfg.gamma, generator, patch, device=x.device).to(noise_dtype)
    return alpha * up + beta * noise


# ------------------------------------------------------------------------------------------------ guidance


def cfg_combine(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float) -> torch.Tensor:
    """Classifier-free guidance: v_u + w (v_c - v_u)."""
    return v_uncond + scale * (v_cond - v_uncond)


def zero_init_applies(stage: int, i: int, zero_steps: int, use_zero_init: bool = True) -> bool:
    """CFG-Zero* zero-init zeroes steps 0..zero_steps (inclusive, so zero_steps = 1 zeroes two) of stage 0."""
    return use_zero_init and stage == 0 and i <= zero_steps


def cfg_zero_star(v_cond: torch.Tensor, v_uncond: torch.Tensor, scale: float, zero_init: bool = False) -> torch.Tensor:
    """CFG-Zero*: s* = <v_c, v_u> / (|v_u|^2 + 1e-8) per sample, in fp32 over all elements, cast back to v's
    dtype; v = s* v_u + w (v_c - s* v_u). With `zero_init` (see zero_init_applies) the velocity is zero."""
    if zero_init:
        return v_cond * 0.0
    b = v_cond.shape[0]
    pos = v_cond.reshape(b, -1).float()  # reshape, not view: the reference's .view fails on strided inputs
    neg = v_uncond.reshape(b, -1).float()
    s = torch.sum(pos * neg, dim=1, keepdim=True) / (torch.sum(neg**2, dim=1, keepdim=True) + 1e-8)
    s = s.reshape(b, *([1] * (v_cond.dim() - 1))).to(v_cond.dtype)
    return v_uncond * s + scale * (v_cond - v_uncond * s)
