"""`helios info`: what a model folder holds, and whether every component is present and loads.

Parameter counts and dtypes come from the safetensors headers, so they are exact and cost nothing even for the 14B
model. The check loads each component for real, one at a time on the CPU (so it needs as much memory as the largest
component); with `quick=True` it reads no weights: configs parse, weight files are complete (sizes match their
headers), and the transformer's tensor names and shapes match its config exactly, which is what strict loading checks.
"""

from __future__ import annotations

import json
import textwrap
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

from ..pipeline.folder import COMPONENTS, read_variant, safetensors_header


@dataclass
class Component:
    name: str
    params: int = 0
    dtypes: Counter = field(default_factory=Counter)  # dtype name -> parameters
    bytes: int = 0
    status: str = "OK"  # or the error


def describe(folder: Path, title: str, defaults: dict | None = None, quick: bool = False) -> tuple[list[str], bool]:
    """The report's lines and whether every component passed its check."""
    from ..model.config import HeliosConfig
    from ..sampling.options import VARIANT_DEFAULTS, SamplingOptions
    from ..sampling.plan import make_plan

    index = json.loads((folder / "model_index.json").read_text())
    variant = read_variant(folder)
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    plan = make_plan("", SamplingOptions(), variant, {**VARIANT_DEFAULTS[variant.name], **(defaults or {})})
    flags = ", ".join(f"{k}={index[k]}" for k in ("is_distilled", "is_cfg_zero_star") if k in index)
    cfg = variant.scheduler
    lines = [
        title,
        f"variant      {variant.name}",
        f"pipeline     {index.get('_class_name')}" + (f" ({flags})" if flags else ""),
        f"sampler      {scheduler.get('_class_name')}: {cfg.scheduler_type}, {cfg.stages} stage(s), "
        f"{'dynamic ' + cfg.time_shift_type + ' shift' if cfg.use_dynamic_shifting else f'shift {cfg.shift}'}, "
        f"gamma {cfg.gamma:.4g}",
        f"defaults     {_defaults(plan)}",
    ]
    components = [_component(folder, name, quick) for name in COMPONENTS]
    try:
        config = json.loads((folder / "transformer" / "config.json").read_text())
        known = {k: v for k, v in config.items() if k in HeliosConfig.__dataclass_fields__}
        lines += textwrap.wrap(", ".join(f"{k}={v}" for k, v in known.items()), 116,
                               initial_indent="transformer  ", subsequent_indent=" " * 13)
    except (OSError, ValueError) as err:
        lines.append(f"transformer  config unreadable: {err}")
    lines += _table(components)
    return lines, all(c.status == "OK" for c in components)


def _defaults(plan) -> str:
    opts = plan.opts
    steps = (f"pyramid steps {list(opts.pyramid_num_inference_steps_list)}" if plan.variant.is_pyramid
             else f"{opts.num_inference_steps} steps")
    amplify = ", amplified first chunk" if opts.is_amplify_first_chunk else ""
    return (f"{opts.height}x{opts.width}, {opts.num_frames} frames ({plan.num_chunks} chunks of "
            f"{opts.window_frames}), {steps}{amplify}, guidance {opts.guidance_scale:g}")


def _table(components: list[Component]) -> list[str]:
    rows = [f"{'component':<14}{'parameters':>14}  {'dtypes':<22}{'size':>11}  check"]
    for c in components:
        dtypes = ", ".join(sorted(c.dtypes, key=c.dtypes.get, reverse=True)) or "-"
        params = f"{c.params:,}" if c.params else "-"
        rows.append(f"{c.name:<14}{params:>14}  {dtypes:<22}{_size(c.bytes):>11}  {c.status}")
    total = sum(c.params for c in components), sum(c.bytes for c in components)
    rows.append(f"{'total':<14}{total[0]:>14,}  {'':<22}{_size(total[1]):>11}")
    return ["components   " + rows[0]] + [" " * 13 + r for r in rows[1:]]


def _component(folder: Path, name: str, quick: bool) -> Component:
    part = Component(name)
    directory = folder / name
    if not directory.is_dir():
        part.status = f"MISSING: no folder {directory}"
        return part
    part.bytes = sum(p.stat().st_size for p in directory.rglob("*") if p.is_file())  # stat follows hub symlinks
    try:
        headers = {path: safetensors_header(path) for path in sorted(directory.glob("*.safetensors"))}
        for header in headers.values():
            for info in header.values():
                count = _numel(info["shape"])
                part.params += count
                part.dtypes[_DTYPES.get(info["dtype"], info["dtype"])] += count
        _check(folder, name, headers, part.dtypes, quick)
    except Exception as err:  # the report shows any failure of any library, one line each
        part.status = "FAILED: " + " ".join(str(err).split())[:300]
    return part


def _check(folder: Path, name: str, headers: dict, dtypes: Counter, quick: bool) -> None:
    """Raise if the component does not load (quick: if its files are incomplete or do not fit its config)."""
    import torch

    dtype = getattr(torch, max(dtypes, key=dtypes.get)) if dtypes else torch.float32  # load as stored
    if name == "transformer":
        from ..model.transformer import HeliosTransformer3DModel

        if quick:
            _check_transformer_headers(folder / name, headers)
        else:
            HeliosTransformer3DModel.from_pretrained(folder, name, torch_dtype=dtype, device="cpu")
    elif name == "vae" and not quick:
        from ..pipeline.vae import VideoVAE

        VideoVAE.from_pretrained(folder / name)
    elif name == "text_encoder" and not quick:
        from transformers import UMT5EncoderModel

        UMT5EncoderModel.from_pretrained(folder / name, dtype=dtype)
    elif name == "tokenizer":
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(folder / name)
    elif name == "scheduler":
        from ..sampling.schedule import SchedulerConfig

        SchedulerConfig.from_dict(json.loads((folder / name / "scheduler_config.json").read_text()))
    elif quick:
        json.loads((folder / name / "config.json").read_text())
        if not headers:
            raise FileNotFoundError(f"{folder / name}: no *.safetensors weights")


def _check_transformer_headers(directory: Path, headers: dict) -> None:
    """The strict-loading check without reading a weight: names and shapes against a model built on `meta`."""
    import torch

    from ..model.transformer import HeliosTransformer3DModel
    from ..model.weights import read_config, weight_files

    listed = set(weight_files(directory))  # checks the index and that every shard it names exists
    with torch.device("meta"):
        model = HeliosTransformer3DModel(read_config(directory))
    expected = {k: list(v.shape) for k, v in model.state_dict().items()}
    found = {k: info["shape"] for path, header in headers.items() if path in listed for k, info in header.items()}
    missing, unexpected = sorted(set(expected) - set(found)), sorted(set(found) - set(expected))
    shapes = [f"{k} {found[k]} != {expected[k]}" for k in expected if k in found and found[k] != expected[k]]
    if missing or unexpected or shapes:
        raise ValueError(f"weights do not fit the config: missing {missing[:5]}, unexpected {unexpected[:5]}, "
                         f"shapes {shapes[:5]}")


_DTYPES = {"F32": "float32", "BF16": "bfloat16", "F16": "float16", "F64": "float64", "F8_E4M3": "float8_e4m3fn",
           "I64": "int64", "I32": "int32", "I8": "int8", "U8": "uint8", "BOOL": "bool"}


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= s
    return n


def _size(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return ""
