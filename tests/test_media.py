"""Reading conditioning inputs from objects and files."""

import numpy as np
import PIL.Image
import pytest
import torch

from helpers import write_video

from helios.pipeline.media import load_image, load_video


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
    write_video(tmp_path / "v.mkv", source, codec="ffv1")
    read = load_video(tmp_path / "v.mkv")
    assert len(read) == 7
    assert np.array_equal(np.stack([np.asarray(f) for f in read]), source)


def test_video_shapes_and_length():
    assert len(load_video(torch.zeros(3, 8, 8, 3))) == 3
    with pytest.raises(ValueError, match=r"\[F, H, W, 3\]"):
        load_video(np.zeros((3, 8, 8)))
    with pytest.raises(ValueError, match="video has 3 frames.*at least 33"):
        load_video(list(frames(3)), min_frames=33)
