"""Reading conditioning inputs from objects and files."""

import av
import numpy as np
import PIL.Image
import pytest
import torch

from helios.media import load_image, load_video


def write_lossless_video(path, frames):
    """frames: uint8 [F, H, W, 3]. FFV1 is lossless, so reading back must give the same pixels."""
    with av.open(str(path), "w") as container:
        stream = container.add_stream("ffv1", rate=24)
        stream.width, stream.height, stream.pix_fmt = frames.shape[2], frames.shape[1], "bgr0"
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())


def frames(count=5, h=16, w=24):
    return np.random.default_rng(0).integers(0, 256, (count, h, w, 3), dtype=np.uint8)


def test_image_from_path_equals_the_image(tmp_path):
    array = frames(1)[0]
    PIL.Image.fromarray(array).save(tmp_path / "a.png")
    assert np.array_equal(np.asarray(load_image(tmp_path / "a.png")), array)
    assert np.array_equal(np.asarray(load_image(str(tmp_path / "a.png"))), array)


def test_image_modes_and_arrays():
    assert load_image(PIL.Image.new("RGBA", (4, 4))).mode == "RGB"
    array = frames(1)[0]
    assert load_image(array) is array
    with pytest.raises(ValueError, match=r"\[H, W, 3\]"):
        load_image(np.zeros((4, 4)))
    with pytest.raises(ValueError, match="image must be"):
        load_image(42)


def test_unreadable_files_name_the_path(tmp_path):
    (tmp_path / "x.png").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="x.png"):
        load_image(tmp_path / "x.png")
    with pytest.raises(ValueError, match="nope.png"):
        load_image(tmp_path / "nope.png")
    (tmp_path / "x.mp4").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="x.mp4"):
        load_video(tmp_path / "x.mp4")


def test_video_from_path_equals_its_frames(tmp_path):
    source = frames(7)
    write_lossless_video(tmp_path / "v.mkv", source)
    read = load_video(tmp_path / "v.mkv")
    assert len(read) == 7
    assert np.array_equal(np.stack([np.asarray(f) for f in read]), source)


def test_video_shapes_and_length():
    assert len(load_video(torch.zeros(3, 8, 8, 3))) == 3
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        load_video(np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match="video has 3 frames.*at least 33"):
        load_video(list(frames(3)), min_frames=33)
