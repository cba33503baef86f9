"""Writing video files (the `helios` command's and the server's): H.264 in fragmented MP4, one fragment per chunk,
written as chunks arrive.

Why fragments: a plain MP4 writes its index (`moov`) when it is closed, so a run that dies leaves an unplayable file.
A fragmented MP4 starts with an empty index and then appends self-describing `moof` + `mdat` fragments, so every
whole prefix of the file plays.

Why one encoder and muxer per chunk: FFmpeg's MP4 muxer writes a fragment only when the next one starts (or at close),
so with one long-lived muxer chunk k would reach the disk only once chunk k + 1 is generated. Each chunk is therefore
encoded and muxed on its own, in memory, and the muxer closed: that yields exactly one complete fragment per chunk,
starting on a keyframe, which is appended to the file and flushed. `frag_discont` with `avoid_negative_ts=disabled`
makes FFmpeg stamp each fragment with its absolute decode time and `fragment_index` numbers it, so the concatenation
(the first chunk's header + every chunk's fragment) is a regular fragmented MP4. Chunks never reference each other's
frames, so chunk k's bytes depend only on chunk k's frames.

Resuming copies the header and the first n fragments byte for byte from the partial file: the finished chunks are
kept exactly as they were encoded, not decoded and encoded again.
"""

from __future__ import annotations

import errno
import io
import os
import struct
import tempfile
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

SUFFIXES = (".mp4", ".m4v")
# An empty index up front; fragments that find their data from their own start; fragments only when asked, which
# with no asking means one at close (without frag_custom, empty_moov cuts a fragment every second); absolute fragment
# times (see the module docstring); no index at the end (the file is only ever appended to).
MUXER_OPTIONS = {
    "movflags": "empty_moov+default_base_moof+frag_custom+frag_discont+skip_trailer",
    "avoid_negative_ts": "disabled",
}
HEADER_BOXES = (b"ftyp", b"moov")
# Keyframes: the first frame of each chunk. A constant GOP length keeps the stream header (SPS) independent of the
# chunk's length, so every chunk's header is the same bytes and the header of a 1-frame probe equals them too.
GOP = 300


@dataclass(frozen=True)
class VideoSettings:
    width: int
    height: int
    fps: Fraction = Fraction(24)
    crf: int = 18  # x264 constant rate factor: 0 lossless (in YUV), 18 visually lossless, 23 x264's default
    lossless: bool = False  # exact 8-bit RGB (libx264rgb, crf 0); plays in ffmpeg / mpv / VLC, not in browsers

    @property
    def codec(self) -> str:
        return "libx264rgb" if self.lossless else "libx264"

    @property
    def pix_fmt(self) -> str:
        return "rgb24" if self.lossless else "yuv420p"


def partial_path(output: str | os.PathLike) -> Path:
    """Where a video grows until it is complete: `fox.mp4` -> `fox.partial.mp4` (playable, findable by --resume)."""
    output = Path(output)
    return output.with_name(f"{output.stem}.partial{output.suffix}")


def to_uint8(frames) -> np.ndarray:
    """float frames [F, H, W, 3] in [0, 1] (tensor or array) -> uint8, rounded to nearest.

    (The official scripts' export truncates, `(x * 255).astype(uint8)`, which darkens by half a level on average.)"""
    array = frames.numpy() if hasattr(frames, "numpy") else np.asarray(frames)
    return np.clip(np.rint(array * 255.0), 0, 255).astype(np.uint8)


class VideoWriter:
    """Appends one fragment per chunk to `<output>.partial.mp4`; `finish()` renames it to the output."""

    def __init__(self, output: Path, settings: VideoSettings, file, header: bytes | None, chunks: int, frames: int):
        self.output, self.partial, self.settings = output, partial_path(output), settings
        self._file, self.header = file, header
        self.chunks, self.frames = chunks, frames  # written so far

    @classmethod
    def create(cls, output, settings: VideoSettings) -> VideoWriter:
        output = Path(output)
        return cls(output, settings, open(partial_path(output), "wb", buffering=0), None, 0, 0)

    @classmethod
    def resume(cls, output, settings: VideoSettings, chunks: int) -> VideoWriter:
        """Continue `<output>.partial.mp4` after its first `chunks` chunks (anything after them is dropped)."""
        output = Path(output)
        partial = partial_path(output)
        if not partial.is_file():
            raise FileNotFoundError(f"{partial}: the partial video to resume is missing (give the same --output)")
        header, fragments = read_fragments(partial)
        if len(fragments) < chunks:
            raise ValueError(f"{partial} holds {len(fragments)} finished chunks, the state continues after {chunks}")
        if header != stream_header(settings):
            raise ValueError(f"{partial} was written with another size, fps or codec than this run's")
        # Copy the kept prefix to a new file, then swap it in: the partial file is whole at every moment.
        fd, tmp = tempfile.mkstemp(dir=partial.parent, prefix=f".{partial.name}.")
        file = os.fdopen(fd, "wb", buffering=0)
        try:
            os.chmod(tmp, partial.stat().st_mode & 0o777)  # mkstemp makes it private; keep the video's permissions
            _write_all(file, header)
            frames = 0
            with open(partial, "rb") as src:
                for offset, size, count in fragments[:chunks]:
                    src.seek(offset)
                    _write_all(file, src.read(size))
                    frames += count
            _flush(file)
            os.replace(tmp, partial)  # the open file follows the rename (POSIX)
        except BaseException:
            file.close()
            Path(tmp).unlink(missing_ok=True)
            raise
        return cls(output, settings, file, header, chunks, frames)

    def write(self, frames: np.ndarray) -> bytes:
        """Append one chunk: uint8 frames [F, H, W, 3]. On return the chunk is on disk and the file plays.

        Returns the bytes appended: the chunk's fragment, after the header for the first chunk of a new file (what
        a live stream sends, see serve/).

        If the write fails (a full disk, a quota) or is interrupted (Ctrl-C, SIGTERM), the torn fragment is cut off
        again, so the file still ends with its last whole chunk and plays to its end; the error is raised with the
        partial file as its `filename`.
        """
        data = encode_chunk(frames, self.frames, self.chunks, self.settings)
        header = _header(data)
        if self.header is not None:
            # Fragments from encoders with other stream parameters would not decode with the first header.
            assert header == self.header, "chunk encoded with other stream parameters than the first chunk"
            data = data[len(header) :]
        end = self._file.tell()  # where the last whole chunk ends
        try:
            _write_all(self._file, data)
            _flush(self._file)
        except BaseException as err:
            self._cut(end)
            if isinstance(err, OSError):
                err.filename = str(self.partial)
            raise
        self.header = header
        self.chunks, self.frames = self.chunks + 1, self.frames + len(frames)
        return data

    def _cut(self, size: int) -> None:
        try:
            self._file.truncate(size)  # frees space: works on a full disk
            self._file.seek(size)
            _flush(self._file)
        except OSError:  # nothing better to do; the reader still stops at the torn fragment (read_fragments)
            pass

    def finish(self) -> Path:
        """Close and move the finished video to the output path (replacing any file there)."""
        self._file.close()
        os.replace(self.partial, self.output)
        return self.output

    def close(self) -> None:
        """Close, keeping the partial file (an interrupted run); remove it if it holds no chunk."""
        self._file.close()
        if self.chunks == 0:
            self.partial.unlink(missing_ok=True)


def encode_chunk(frames, first_frame: int, index: int, settings: VideoSettings) -> bytes:
    """A whole fragmented MP4 (header + one fragment) of `frames`, timed from frame number `first_frame`."""
    buffer = io.BytesIO()
    options = {**MUXER_OPTIONS, "fragment_index": str(index + 1)}
    with av.open(buffer, "w", format="mp4", options=options) as container:
        # No B-frames: their negative first decode time would need an edit list in the header, which a per-chunk
        # fragment cannot carry. Chunks are one short GOP each anyway.
        crf = 0 if settings.lossless else settings.crf
        stream = container.add_stream(settings.codec, rate=settings.fps, options={"crf": str(crf), "bf": "0"})
        stream.width, stream.height, stream.pix_fmt = settings.width, settings.height, settings.pix_fmt
        stream.codec_context.gop_size = GOP
        if not settings.lossless:  # tag what the RGB -> YUV conversion below uses, so players convert back alike
            stream.codec_context.colorspace = stream.codec_context.color_primaries = stream.codec_context.color_trc = 1
            stream.codec_context.color_range = 1  # BT.709, limited ("MPEG") range
        for i, rgb in enumerate(frames):
            frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24")
            if not settings.lossless:
                frame = frame.reformat(format="yuv420p", dst_colorspace="ITU709", dst_color_range="MPEG")
            frame.pts = first_frame + i
            container.mux(stream.encode(frame))
        container.mux(stream.encode(None))
    return buffer.getvalue()


def stream_header(settings: VideoSettings) -> bytes:
    """The header (init segment) every chunk of a video with these settings starts with, from a 1-frame probe."""
    return _header(encode_chunk([np.zeros((settings.height, settings.width, 3), np.uint8)], 0, 0, settings))


def codec_string(header: bytes) -> str:
    """The RFC 6381 codecs value of an H.264 header (`avc1.PPCCLL` from its avcC box), as MediaSource wants it."""
    at = header.find(b"avcC")
    if at < 0:
        raise ValueError("no avcC box in the header: not H.264")
    profile, constraints, level = header[at + 5 : at + 8]  # after configurationVersion
    return f"avc1.{profile:02X}{constraints:02X}{level:02X}"


def read_fragments(path: Path) -> tuple[bytes, list[tuple[int, int, int]]]:
    """(header bytes, [(offset, size, frames)] of each whole moof + mdat fragment); a torn tail is ignored."""
    size = path.stat().st_size
    header, fragments, moof = b"", [], None
    with open(path, "rb") as f:
        offset = 0
        while offset + 8 <= size:
            f.seek(offset)
            length, kind = struct.unpack(">I4s", f.read(8))
            if length == 1:  # 64-bit size follows
                length = struct.unpack(">Q", f.read(8))[0]
            if length < 8 or offset + length > size:
                break  # torn by a crash mid-write
            if kind in HEADER_BOXES and not fragments and moof is None:
                f.seek(offset)
                header += f.read(length)
            elif kind == b"moof":
                f.seek(offset)
                moof = (offset, _sample_count(f.read(length)))
            elif kind == b"mdat" and moof is not None:
                fragments.append((moof[0], offset + length - moof[0], moof[1]))
                moof = None
            offset += length
    if not header:
        raise ValueError(f"{path}: not a fragmented MP4 written by helios")
    return header, fragments


def _header(data: bytes) -> bytes:
    """The leading ftyp + moov boxes of an encoded chunk."""
    end = 0
    while data[end + 4 : end + 8] in HEADER_BOXES:
        end += struct.unpack(">I", data[end : end + 4])[0]
    return data[:end]


def _sample_count(moof: bytes) -> int:
    """Frames in a moof box: the sample counts of its moof > traf > trun boxes."""
    return sum(
        struct.unpack(">I", trun[12:16])[0]  # trun: size, type, version/flags, then sample_count
        for traf in _children(moof, b"traf")
        for trun in _children(traf, b"trun")
    )


def _children(box: bytes, kind: bytes) -> list[bytes]:
    """The child boxes (header included) of type `kind` of a container box (header included)."""
    found, i = [], 8
    while i + 8 <= len(box):
        length = struct.unpack(">I", box[i : i + 4])[0]
        if length < 8:
            break
        if box[i + 4 : i + 8] == kind:
            found.append(box[i : i + length])
        i += length
    return found


def _write_all(file, data: bytes) -> None:
    """Write all of `data` to an unbuffered file (a raw write may write less, e.g. just before the disk is full).

    Unbuffered, so that after a failed write no bytes are left in a buffer to land after the cut (see write)."""
    view = memoryview(data)
    while view:
        written = file.write(view)
        if not written:  # not seen from a regular file, but a loop that cannot end must not be written
            raise OSError(errno.EIO, "the write wrote nothing")
        view = view[written:]


def _flush(file) -> None:
    file.flush()
    os.fsync(file.fileno())  # one sync per chunk: the chunk survives a crash of the machine, not only the process
