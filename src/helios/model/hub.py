"""Where a checkpoint is: a local folder, or a Hugging Face hub repo id resolved through huggingface_hub.

The one place a name becomes a path, for the transformer's loader, the model folders and the LoRA files.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

REPO_ID = re.compile(r"^[\w.\-]+/[\w.\-]+$")


def resolve_directory(path_or_repo_id: str | os.PathLike, subfolder: str | None = None) -> Path:
    """A local folder, or a hub repo id resolved through huggingface_hub (cache first; HF_HUB_OFFLINE respected)."""
    path = Path(path_or_repo_id).expanduser()
    if not path.exists() and REPO_ID.match(str(path_or_repo_id)):
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
