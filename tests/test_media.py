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


def _fragmented_mp4(path, count: int) -> bytes:
    """A fragmented MP4 (as helios writes: a fragment every 8 frames), so that a cut file still opens."""
    import av

    with av.open(str(path), "w", options={"movflags": "frag_keyframe+empty_moov+default_base_moof"}) as container:
        stream = container.add_stream("libx264", rate=24, options={"g": "8"})
        stream.width, stream.height, stream.pix_fmt = 64, 64, "yuv420p"
        for frame in np.random.default_rng(0).integers(0, 255, (count, 64, 64, 3), dtype=np.uint8):
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return path.read_bytes()


def test_a_truncated_video_is_said_to_be_so_at_its_frame(tmp_path, capsys):
    data = _fragmented_mp4(tmp_path / "whole.mp4", 40)
    cut = tmp_path / "cut.mp4"
    cut.write_bytes(data[: len(data) * 6 // 10])
    with pytest.raises(ValueError) as err:
        load_video(cut, name="--video")
    message = str(err.value)
    assert message.startswith(f"--video: cannot read {cut}: the file is damaged or truncated at frame ")
    assert "Errno" not in message and "avcodec" not in message
    frame = int(message.split("at frame ")[1].split()[0])
    assert 1 < frame < 40
    (tmp_path / "head.mp4").write_bytes(data[:100])  # cut inside the header
    with pytest.raises(ValueError, match="damaged or truncated before its first frame"):
        load_video(tmp_path / "head.mp4", name="--video")
    from helios.cli import main

    assert main(["generate", "--model", "helios-tiny", "--prompt", "a fox", "--video", str(cut),
                 "--output", str(tmp_path / "out.mp4")]) == 2
    assert "damaged or truncated at frame" in capsys.readouterr().err
