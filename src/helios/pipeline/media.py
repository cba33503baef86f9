"""Reading inputs: an image (I2V) or a video (V2V), given as objects or as file paths, and video files.

Images are read with Pillow, videos with PyAV. Files come back as RGB PIL images; objects are checked and passed
on. The VAE's preprocessing resizes either to the generation size.
"""

from __future__ import annotations

import os
from fractions import Fraction
from pathlib import Path

import numpy as np
import PIL.Image
import torch


def load_image(image, name: str = "image"):
    """A PIL image, an [H, W, 3] array or tensor, or a path to an image file (read with Pillow).

    Objects are checked and passed on as they are, so the VAE's preprocessing treats them as the reference does.
    Errors name the image as `name` (the `helios` command says "--image").
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        if path.is_dir():
            raise IsADirectoryError(f"{name} {path} is a folder, not an image file")
        try:
            with PIL.Image.open(path) as img:
                return to_rgb(img)
        except PIL.Image.DecompressionBombError as err:  # Pillow refuses images it could not hold in memory
            raise ValueError(f"{name} {path} is too large to read ({err}); scale it down first: it is resized to "
                             "the video's size anyway") from None
        except (OSError, ValueError) as err:  # missing, unreadable or not an image
            raise ValueError(f"{name}: cannot read {path}: {err}") from err
    if isinstance(image, PIL.Image.Image):
        return to_rgb(image)
    if isinstance(image, (np.ndarray, torch.Tensor)):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"{name} array must be [H, W, 3], got shape {tuple(image.shape)}")
        return image
    raise ValueError(f"{name} must be a PIL image, an [H, W, 3] array or a path, got {type(image).__name__}")


def to_rgb(img: PIL.Image.Image) -> PIL.Image.Image:
    """An 8-bit RGB image of any Pillow image, scaling deeper pixels instead of clipping them.

    Pillow's convert("RGB") clips 16-bit grayscale ("I;16", or "I" in older Pillow versions) at 255, so a 16-bit PNG
    turns almost white; here it is scaled, 65535 -> 255, and floats ("F") are read as [0, 1]. 16-bit RGB PNGs already
    open as 8-bit RGB (Pillow keeps each sample's high byte).
    """
    full = 65535.0 if img.mode == "I" or img.mode.startswith("I;16") else 1.0 if img.mode == "F" else None
    if full is not None:
        levels = np.rint(np.asarray(img, dtype=np.float64) * (255.0 / full))
        img = PIL.Image.fromarray(np.clip(levels, 0, 255).astype(np.uint8))  # mode "L"
    return img.convert("RGB")


def load_video(video, min_frames: int = 1, name: str = "video") -> list:
    """A list of frames (each as load_image takes), an [F, H, W, 3] array, or a path to a video file (PyAV)."""
    if isinstance(video, (str, os.PathLike)):
        frames = _read_video_file(Path(video), name)
    elif isinstance(video, (np.ndarray, torch.Tensor)):
        if video.ndim != 4 or video.shape[-1] != 3:
            raise ValueError(f"video array must be [F, H, W, 3], got shape {tuple(video.shape)}")
        frames = list(video)
    elif isinstance(video, (list, tuple)):
        frames = [load_image(f) for f in video]
    else:
        raise ValueError(f"video must be a list of frames, an [F, H, W, 3] array or a path, got {type(video).__name__}")
    if len(frames) < min_frames:
        raise ValueError(
            f"video has {len(frames)} frames; video-to-video needs at least {min_frames}, because the video is "
            f"encoded as whole {min_frames}-frame chunks (the frames before the last whole chunk are dropped)"
        )
    return frames


def _read_video_file(path: Path, name: str) -> list[PIL.Image.Image]:
    import av  # imported here: only V2V from a file needs PyAV

    if path.is_dir():
        raise IsADirectoryError(f"{name} {path} is a folder, not a video file")
    try:
        frames, _ = read_video(path)
    except (OSError, ValueError, av.FFmpegError) as err:
        raise ValueError(f"{name}: cannot read {path}: {err}") from err
    # PIL images, not arrays: the VAE's preprocessing resizes images with Lanczos, like a frame list from the user.
    return [PIL.Image.fromarray(frame) for frame in frames]


BROKEN_HEAD = "damaged or truncated before its first frame"


def read_video(path: str | os.PathLike) -> tuple[np.ndarray, Fraction]:
    """(uint8 frames [F, H, W, 3], fps) of a video file, decoded with PyAV. A file that breaks off is a ValueError
    that says where, in our words (PyAV says "Invalid data found when processing input: 'avcodec_send_packet()'")."""
    import av

    try:
        container = av.open(str(path))
    except av.InvalidDataError:
        raise ValueError(f"not a video file, or {BROKEN_HEAD}") from None
    with container:
        if not container.streams.video:
            raise ValueError(f"no video stream: not a video file, or {BROKEN_HEAD}")
        stream, frames = container.streams.video[0], []
        try:
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24"))
        except av.InvalidDataError:
            raise ValueError(f"the file is damaged or truncated at frame {len(frames) + 1} ({len(frames)} frames "
                             "could be read)") from None
        if not frames:
            raise ValueError("no frames")
        return np.stack(frames), Fraction(stream.average_rate)
