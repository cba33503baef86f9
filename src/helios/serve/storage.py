"""Where jobs live on disk: one folder per video under `<data-dir>/videos/`, so that a restarted server finds them.

    videos/<id>/job.json         the video object and the request it was made from (rewritten atomically)
    videos/<id>/video.mp4        the finished video; video.partial.mp4 while it grows (video_io.py)
    videos/<id>/state.pt         the resumable generation state after the last finished chunk (state.py)
    videos/<id>/input.<ext>      the uploaded image or video, if any

Ids are made here (`video_` + 32 hex digits) and checked against that pattern before any path is built from one, so
an id can never name a file outside its folder.
"""

from __future__ import annotations

import json
import os
import re
import secrets
import shutil
import tempfile
from pathlib import Path

ID = re.compile(r"video_[0-9a-f]{32}")
SESSION_PREFIX = "session_"  # realtime sessions' folders: scratch space, removed when the session ends


def new_id() -> str:
    return f"video_{secrets.token_hex(16)}"


def valid_id(video_id: str) -> bool:
    return isinstance(video_id, str) and ID.fullmatch(video_id) is not None


class Store:
    def __init__(self, data_dir: str | os.PathLike):
        self.root = Path(data_dir) / "videos"
        self.root.mkdir(parents=True, exist_ok=True)

    def folder(self, video_id: str) -> Path:
        if not (valid_id(video_id) or video_id.startswith(SESSION_PREFIX) and valid_id(video_id[len(SESSION_PREFIX):])):
            raise KeyError(video_id)
        return self.root / video_id

    def video(self, video_id: str) -> Path:
        return self.folder(video_id) / "video.mp4"

    def state(self, video_id: str) -> Path:
        return self.folder(video_id) / "state.pt"

    def save(self, video_id: str, record: dict) -> None:
        """Write job.json atomically: a crash leaves the previous record, never half of one."""
        folder = self.folder(video_id)
        folder.mkdir(exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".job.json.")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(record, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, folder / "job.json")
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    def load_all(self) -> list[dict]:
        """Every saved job, oldest first; leftover realtime sessions and folders without a record are removed."""
        records = []
        for folder in self.root.iterdir():
            path = folder / "job.json"
            if folder.name.startswith(SESSION_PREFIX) or not path.is_file():
                shutil.rmtree(folder, ignore_errors=True)
                continue
            try:
                records.append(json.loads(path.read_text()))
            except (OSError, json.JSONDecodeError):
                continue  # job.json is written atomically; anything else is not ours
        return sorted(records, key=lambda r: r["seq"])  # the order they arrived in

    def remove(self, video_id: str) -> None:
        shutil.rmtree(self.folder(video_id), ignore_errors=True)
