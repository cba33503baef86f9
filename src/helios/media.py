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


def load_image(image):
    """A PIL image, an [H, W, 3] array or tensor, or a path to an image file (read with Pillow).

    Objects are checked and passed on as they are, so the VAE's preprocessing treats them as the reference does.
    """
    if isinstance(image, (str, os.PathLike)):
        path = Path(image)
        try:
            with PIL.Image.open(path) as img:
                return img.convert("RGB")
        except (OSError, ValueError) as err:  # missing, unreadable or not an image
            raise ValueError(f"image: cannot read {path}: {err}") from err
    if isinstance(image, PIL.Image.Image):
        return image.convert("RGB")
    if isinstance(image, (np.ndarray, torch.Tensor)):
        if image.ndim != 3 or image.shape[-1] != 3:
            raise ValueError(f"image array must be [H, W, 3], got shape {tuple(image.shape)}")
        return image
    raise ValueError(f"image must be a PIL image, an [H, W, 3] array or a path, got {type(image).__name__}")


def load_video(video, min_frames: int = 1) -> list:
    """A list of frames (each as load_image takes), an [F, H, W, 3] array, or a path to a video file (PyAV)."""
    if isinstance(video, (str, os.PathLike)):
        frames = _read_video_file(Path(video))
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


def _read_video_file(path: Path) -> list[PIL.Image.Image]:
    import av  # imported here: only V2V from a file needs PyAV

    try:
        frames, _ = read_video(path)
    except (OSError, ValueError, av.FFmpegError) as err:
        raise ValueError(f"video: cannot read {path}: {err}") from err
    # PIL images, not arrays: the VAE's preprocessing resizes images with Lanczos, like a frame list from the user.
    return [PIL.Image.fromarray(frame) for frame in frames]


def read_video(path: str | os.PathLike) -> tuple[np.ndarray, Fraction]:
    """(uint8 frames [F, H, W, 3], fps) of a video file, decoded with PyAV."""
    import av

    with av.open(str(path)) as container:
        if not container.streams.video:
            raise ValueError("no video stream")
        stream = container.streams.video[0]
        frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
        if not frames:
            raise ValueError("no frames")
        return np.stack(frames), Fraction(stream.average_rate)
