"""Request bodies -> a checked request -> the generation plan (plan.make_plan, as the `helios` command does).

One table of fields serves POST /v1/videos (JSON, or multipart where every value is a string) and the realtime
session.start message. The checked request is plain JSON, saved with the job, so that a restarted server makes the
same plan again. Every error is a 400 naming the field.
"""

from __future__ import annotations

import math
import random
import re

from ..pipeline.text import clean_prompt
from ..sampling.options import SamplingOptions
from ..sampling.plan import GenerationPlan, make_plan
from .errors import bad_field

DEFAULT_FPS = 24  # OpenAI's and vLLM-Omni's
MAX_PROMPT_CHARS = 20_000  # checked before tokenizing, so that a huge prompt costs nothing


def _text(name, value, form):
    if not isinstance(value, str):
        raise bad_field(name, f"{name} must be a string, got {type(value).__name__}")
    return value


def _int(name, value, form):
    if form and isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
        value = int(value)
    if not isinstance(value, int) or isinstance(value, bool):
        raise bad_field(name, f"{name} must be an integer, got {value!r}")
    return value


def _positive_int(name, value, form):
    value = _int(name, value, form)
    if value < 1:
        raise bad_field(name, f"{name} must be a positive integer, got {value}")
    return value


def _number(name, value, form):
    if isinstance(value, str) and (form or name == "seconds"):  # OpenAI sends seconds as a string
        try:
            value = float(value)
        except ValueError:
            pass
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value) or value <= 0:
        raise bad_field(name, f"{name} must be a positive number, got {value!r}")
    return value


def _seed(name, value, form):
    value = _int(name, value, form)
    if not 0 <= value < 2**63:
        raise bad_field(name, f"{name} must be an integer in [0, 2^63), got {value}")
    return value


def _flag(name, value, form):
    if form and isinstance(value, str) and value.lower() in ("true", "false"):
        value = value.lower() == "true"
    if not isinstance(value, bool):
        raise bad_field(name, f"{name} must be true or false, got {value!r}")
    return value


def _steps_list(name, value, form):
    if form and isinstance(value, str):
        value = [int(v) if v.isdigit() else v for v in re.split(r"[\s,]+", value.strip(" []"))]
    if not isinstance(value, list) or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0 for v in value):
        raise bad_field(name, f"{name} must be a list of positive integers (steps per pyramid stage), got {value!r}")
    return value


def _size(name, value, form):
    match = re.fullmatch(r"(\d{1,5})x(\d{1,5})", value) if isinstance(value, str) else None
    if not match:
        raise bad_field(name, f"{name} must be WIDTHxHEIGHT, such as 640x384, got {value!r}")
    return int(match[1]), int(match[2])


def _schedule(name, value, form):
    if form and isinstance(value, str):
        import json

        try:
            value = json.loads(value)
        except ValueError:
            raise bad_field(name, f"{name} must be a JSON list of [prompt, n_chunks]") from None
    ok = isinstance(value, list) and value and all(
        isinstance(e, list) and len(e) == 2 and isinstance(e[0], str) and isinstance(e[1], int)
        and not isinstance(e[1], bool) and e[1] > 0 for e in value)
    if not ok:
        raise bad_field(name, f"{name} must be a non-empty list of [prompt, n_chunks] with n_chunks > 0")
    return [list(e) for e in value]


# field -> checker. The sampler fields are the `helios generate` flags'.
FIELDS = {
    "prompt": _text, "model": _text, "negative_prompt": _text, "user": _text,
    "seconds": _number, "num_frames": _positive_int, "fps": _number,
    "size": _size, "width": _positive_int, "height": _positive_int, "seed": _seed,
    "num_inference_steps": _positive_int, "pyramid_steps": _steps_list, "guidance_scale": _number,
    "amplify_first_chunk": _flag, "interpolation_steps": _positive_int, "prompt_schedule": _schedule,
}


def check_fields(body: dict, form: bool, extra: tuple[str, ...] = ()) -> dict:
    """Each known field checked and converted; an unknown field is an error naming it."""
    checked = {}
    for name, value in body.items():
        if name in extra:
            continue
        if name not in FIELDS:
            raise bad_field(name, f"unknown field {name!r}; known fields: {', '.join(FIELDS)}")
        if value is None or (form and value == "" and name != "prompt"):
            continue
        checked[name] = FIELDS[name](name, value, form)
    return checked


def make_request(body: dict, server, form: bool = False, extra: tuple[str, ...] = ()) -> dict:
    """The checked request (plain JSON) of a create body; `server` gives the model and the limits."""
    fields = check_fields(body, form, extra)
    if "model" in fields and fields["model"] != server.model_name:
        raise bad_field("model", f"model {fields['model']!r} is not served here; this server serves "
                        f"{server.model_name!r}")
    if ("prompt" in fields) == ("prompt_schedule" in fields):
        raise bad_field("prompt", "give a prompt (or a prompt_schedule, not both)")
    for text in [fields.get("prompt")] + [p for p, _ in fields.get("prompt_schedule", [])]:
        if text is not None:
            check_prompt(text, server, "prompt" if "prompt" in fields else "prompt_schedule")
    if "size" in fields and ("width" in fields or "height" in fields):
        raise bad_field("size", "give size or width and height, not both")
    if "seconds" in fields and "num_frames" in fields:
        raise bad_field("seconds", "give the length as seconds or as num_frames, not both")
    if "negative_prompt" in fields:
        check_prompt(fields["negative_prompt"], server, "negative_prompt")
    width, height = fields.pop("size", (fields.pop("width", None), fields.pop("height", None)))
    request = {**fields, "width": width, "height": height, "fps": fields.get("fps", DEFAULT_FPS),
               "size_given": "size" in body, "seed": fields.get("seed", random.SystemRandom().randrange(2**31))}
    plan = plan_of(request, server.model)
    seconds = plan.num_frames / request["fps"]
    if seconds > server.max_seconds:
        param = "num_frames" if "num_frames" in fields else "seconds"
        raise bad_field(param, f"{param}: the video would be {seconds:.3g} s ({plan.num_frames} frames at "
                        f"{request['fps']:g} fps), over this server's limit of {server.max_seconds:g} s")
    return request


def check_prompt(text: str, server, param: str) -> None:
    if not text.strip() and param != "negative_prompt":
        raise bad_field(param, f"{param} is empty")
    if len(text) > MAX_PROMPT_CHARS:
        raise bad_field(param, f"{param} is {len(text)} characters long, over the limit of {MAX_PROMPT_CHARS}")
    tokens = len(server.tokenizer(clean_prompt(text)).input_ids)
    limit = SamplingOptions().max_sequence_length
    if tokens > limit:
        raise bad_field(param, f"{param} is {tokens} tokens long, over the text encoder's limit of {limit}")


_OPTION_FIELDS = {"height": "size", "width": "size", "num_frames": "num_frames", "seconds": "seconds",
                  "pyramid_num_inference_steps_list": "pyramid_steps", "num_inference_steps": "num_inference_steps",
                  "interpolation_steps": "interpolation_steps", "prompt": "prompt_schedule", "opts": "prompt"}


def plan_of(request: dict, model) -> GenerationPlan:
    """The generation plan of a checked request, for a model folder (folder.ModelFolder)."""
    given = dict(height=request["height"], width=request["width"], num_frames=request.get("num_frames"),
                 num_inference_steps=request.get("num_inference_steps"),
                 guidance_scale=request.get("guidance_scale"), is_amplify_first_chunk=request.get("amplify_first_chunk"),
                 pyramid_num_inference_steps_list=tuple(request["pyramid_steps"]) if "pyramid_steps" in request else None,
                 interpolation_steps=request.get("interpolation_steps"), seed=request["seed"])
    opts = SamplingOptions(**{k: v for k, v in given.items() if v is not None})
    prompt = request.get("prompt") or [tuple(e) for e in request["prompt_schedule"]]
    try:
        return make_plan(prompt, opts, model.variant, model.defaults, seconds=request.get("seconds"),
                         fps=request["fps"], patch_size=model.patch_size)
    except ValueError as err:
        name = str(err).split()[0].rstrip(":")
        param = _OPTION_FIELDS.get(name, "prompt")
        if param == "size" and not request.get("size_given", True):
            param = name
        raise bad_field(param, str(err)) from None


def decode_data_url(param: str, value) -> bytes:
    """An input given inside JSON: a base64 data URL, or {"image_url": data URL} as OpenAI's input_reference object.
    The server fetches nothing from the network."""
    import base64
    import binascii

    if isinstance(value, dict) and isinstance(value.get("image_url"), str):
        value = value["image_url"]
    match = re.fullmatch(r"data:[\w.+/-]*(;[\w=.-]+)*;base64,(.*)", value, re.S) if isinstance(value, str) else None
    if not match:
        raise bad_field(param, f"{param} must be a base64 data URL (data:image/png;base64,...) or an uploaded file")
    try:
        return base64.b64decode(match[2], validate=True)
    except (binascii.Error, ValueError):
        raise bad_field(param, f"{param}: the data URL is not valid base64") from None


def save_input(folder, data: bytes, param: str, min_video_frames: int, max_bytes: int) -> dict:
    """Keep an uploaded image or video in the job's folder; 400 unless it reads as one."""
    from ..pipeline.media import load_image, load_video

    if len(data) > max_bytes:
        from .errors import ApiError

        raise ApiError(413, f"{param} is {len(data) / 2**20:.3g} MiB, over this server's limit of "
                       f"{max_bytes / 2**20:.3g} MiB (--max-upload-mb)", param, "file_too_large")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "input"
    path.write_bytes(data)
    try:
        load_image(path)
        return {"kind": "image", "file": path.name}
    except Exception:  # PIL raises many classes for what is not an image; then it may be a video
        pass
    try:
        load_video(path, min_frames=min_video_frames)
        return {"kind": "video", "file": path.name}
    except ValueError as err:
        reason = str(err) if "at least" in str(err) else "not an image or a video file"
        raise bad_field(param, f"{param}: {reason}") from None
