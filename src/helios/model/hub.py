"""Where a checkpoint is: a local folder, or a Hugging Face hub repo id resolved through huggingface_hub.

The one place a name becomes a path, for the transformer's loader, the model folders and the LoRA files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")
FILE_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".json")


def is_repo_id(name) -> bool:
    """Whether a name that is not a local path is to be asked of the hub: `owner/name`, and not shaped like a file
    path (no ./ ../ ~ or / at the start, no file suffix), so that a missing local file fails at once instead of
    waiting for the hub."""
    text = str(name)
    looks_local = text.startswith((".", "~", "/")) or text.lower().endswith(FILE_SUFFIXES)
    return bool(REPO_ID.match(text)) and not looks_local


def resolve_directory(path_or_repo_id: str | os.PathLike, subfolder: str | None = None) -> Path:
    """A local folder, or a hub repo id resolved through huggingface_hub (cache first; HF_HUB_OFFLINE respected)."""
    path = Path(path_or_repo_id).expanduser()
    if not path.exists() and is_repo_id(path_or_repo_id):
        from huggingface_hub import snapshot_download

        patterns = [f"{subfolder}/*"] if subfolder else None
        try:
            path = Path(snapshot_download(str(path_or_repo_id), allow_patterns=patterns))
        except Exception as err:  # hub errors are many classes; the message is what the user needs
            raise FileNotFoundError(
                f"{path_or_repo_id}: not a local folder, and the Hugging Face hub could not provide it: {err}"
            ) from err
    directory = path / subfolder if subfolder else path
    if not directory.is_dir():
        raise FileNotFoundError(f"{directory}: no such model folder")
    return directory
