"""pytest fixtures shared by the test files; the plain helpers are in helpers.py."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT / "src") not in sys.path:  # test the working tree even when the package is not installed
    sys.path.insert(0, str(ROOT / "src"))


@pytest.fixture(autouse=True)
def offline_hub(tmp_path_factory, monkeypatch):
    """No test may reach the network or the user's HF cache: offline mode and an empty cache directory.

    huggingface_hub reads these variables at import time, so its module constants are patched too.
    """
    import huggingface_hub.constants as hf_constants

    cache = tmp_path_factory.mktemp("hf_cache")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HUB_CACHE", str(cache))
    monkeypatch.setattr(hf_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.fixture(scope="session")
def tiny_folders(tmp_path_factory):
    """variant -> a tiny model folder (seed 0), built once per session; tests must not modify them."""
    from helios.pipeline.tiny import build_tiny_model

    root = tmp_path_factory.mktemp("tiny-models")
    return {v: build_tiny_model(root / v, variant=v, seed=0) for v in ("base", "mid", "distilled")}


@pytest.fixture(scope="session")
def tiny_folder(tiny_folders):
    """The distilled tiny model folder."""
    return tiny_folders["distilled"]
