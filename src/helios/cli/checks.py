"""Checks of `helios generate`'s flags that need no model: argument types with bounds, flag combinations, the output
file, the device. They run before the model folder is opened, so a mistake costs no model load.

The bounds are the library's (options.py), so the command and Python refuse the same values; here they are said in
the words of the flags.
"""

from __future__ import annotations

import argparse
import math
import signal
import threading

from ..sampling.options import MAX_FRAMES, SEED_RANGE


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text!r}")
    return value


def frame_count(text: str) -> int:
    """--num-frames: a positive integer, at most a day of video (options.MAX_FRAMES)."""
    value = positive_int(text)
    if value > MAX_FRAMES:
        raise argparse.ArgumentTypeError(f"must be at most {MAX_FRAMES} (a day of video at 24 fps), got {text!r}")
    return value


def seed(text: str) -> int:
    """--seed: an integer torch.Generator.manual_seed takes."""
    try:
        value = int(text)
    except ValueError:
        value = None
    if value is None or not SEED_RANGE[0] <= value < SEED_RANGE[1]:
        raise argparse.ArgumentTypeError(f"must be an integer in [-2**63, 2**64), got {text!r}")
    return value


def guidance(text: str) -> float:
    """--guidance: a finite number >= 0 (float() alone takes 'nan', 'inf' and negative numbers)."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not (math.isfinite(value) and value >= 0):
        raise argparse.ArgumentTypeError(f"must be a finite number >= 0 (1 = no guidance), got {text!r}")
    return value


def lora_spec(text: str) -> tuple[str, float]:
    """--lora PATH[:SCALE] -> (PATH, SCALE); a colon not followed by a number belongs to the path."""
    path, _, scale = text.rpartition(":")
    try:
        value = float(scale)
    except ValueError:
        return text, 1.0
    if not path or not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"must be PATH or PATH:SCALE with a finite SCALE, got {text!r}")
    return path, value


def check_flags(args) -> None:
    """Flag combinations and files, before anything is loaded (and before --resume fills in the arguments left out;
    check_output after it)."""
    if args.state is not None and args.resume is not None:
        raise ValueError(f"--state {args.state} and --resume {args.resume} together: a resumed run keeps saving its "
                         "state to the --resume file; give only --resume")
    for flag in ("resume", "image", "video", "prompt_schedule"):
        path = getattr(args, flag)
        if path is not None and path.is_dir():
            raise IsADirectoryError(f"--{flag.replace('_', '-')} {path} is a folder, not a file")


def check_output(args) -> None:
    """A new run does not replace an existing video, or an interrupted run's partial video, unless --overwrite.

    With --overwrite the old file stays until the new video is complete (it is written beside it, as
    NAME.partial.mp4, and renamed at the end). A resumed run continues a run that passed this check.
    """
    from ..pipeline.video_io import partial_path

    if args.resume is not None or args.overwrite:
        return
    partial = partial_path(args.output)
    if args.output.exists():
        raise FileExistsError(f"--output {args.output} exists; give --overwrite to replace it once the new video is "
                              "complete, or another name")
    if partial.exists():
        raise FileExistsError(f"--output {args.output}: {partial} exists, the video of an interrupted run; continue it "
                              "with --resume STATE, or give --overwrite to start again")


def device_and_dtype(args):
    """The torch device and dtype of --device and --dtype; an unusable device is bad input, said before loading."""
    import torch

    from ..pipeline.generate import check_device, default_dtype

    device = check_device(args.device if args.device != "auto" else "cuda" if torch.cuda.is_available() else "cpu",
                          name="--device")
    return device, default_dtype(device) if args.dtype == "auto" else getattr(torch, args.dtype)


def check_lora(args) -> None:
    """--lora files exist (or are repo ids), and go with the offload mode: said before the model loads."""
    from pathlib import Path

    from ..model.hub import is_repo_id

    for path, _ in args.lora:
        if not Path(path).expanduser().exists() and not is_repo_id(path):
            raise FileNotFoundError(f"--lora {path}: no such file or folder (a Hugging Face repo id is owner/name)")
    if args.lora and args.offload == "blocks":  # said now, not after loading (and quantizing) the model
        raise ValueError("--lora with --offload blocks: streamed blocks take no LoRA adapters; use --offload model")


def text_encoder_device(args):
    """--text-encoder-device as a torch device (checked before loading), or None: the text encoder goes with the rest."""
    from ..pipeline.generate import check_device

    if args.text_encoder_device is None:
        return None
    return check_device(args.text_encoder_device, name="--text-encoder-device")


class Terminated(KeyboardInterrupt):
    """SIGTERM (a `kill`, a job scheduler's time limit): ends the run as Ctrl-C does, keeping the finished chunks."""

    exit_code = 128 + signal.SIGTERM


def _terminate(signum, frame):
    raise Terminated()


def handle_sigterm():
    """Make SIGTERM raise Terminated; returns the handler it replaces, to put back (None off the main thread, where
    Python cannot handle signals)."""
    if threading.current_thread() is not threading.main_thread():
        return None
    return signal.signal(signal.SIGTERM, _terminate)
