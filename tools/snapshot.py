"""Save a fixed set of outputs, or check them against a saved set bitwise: the proof that a change of structure
changed no behaviour.

    python tools/snapshot.py save DIR    # before the change
    python tools/snapshot.py check DIR   # after it: every output bitwise equal, or a list of those that differ

It uses the public surface only (`from helios import ...`, `python -m helios generate`, `helios serve` over HTTP),
so the same file runs on both sides of a move of modules. CPU, about two minutes on 2 cores.
"""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

from helios import HeliosPipeline, HeliosTransformer3DModel, SamplingOptions

TINY = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16, in_channels=16, out_channels=16,
            text_dim=32, freq_dim=32, ffn_dim=64, num_layers=2, rope_dim=(4, 6, 6))
CONFIGS = {
    "default": {},
    "amplify": {"is_amplify_history": True},
    "no_guidance_cross_attn": {"guidance_cross_attn": False, "zero_history_timestep": False},
    "added_kv": {"added_kv_proj_dim": 24, "cross_attn_norm": False},
}
FAST = dict(height=64, width=64, seed=7)


def transformer_outputs() -> dict[str, torch.Tensor]:
    out = {}
    for name, overrides in CONFIGS.items():
        torch.manual_seed(0)
        model = HeliosTransformer3DModel(**TINY, **overrides).eval()
        gen = torch.Generator().manual_seed(1)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=gen) * 0.2)
        for dtype in (torch.float32, torch.bfloat16):
            model = model.to(dtype)
            for layout, (h, w, batch) in {"full": (8, 8, 1), "stage": (4, 4, 2)}.items():
                inputs = _inputs(gen, h, w, batch, dtype)
                with torch.inference_mode():
                    out[f"forward/{name}/{str(dtype)[6:]}/{layout}"] = model(**inputs).sample
    return out


def _inputs(gen, h, w, batch, dtype) -> dict:
    r = lambda *s: torch.randn(*s, generator=gen).to(dtype)  # noqa: E731
    full = (8, 8)  # the memory terms are always at full resolution
    return dict(
        hidden_states=r(batch, 16, 3, h, w), timestep=torch.tensor([500.0] * batch),
        encoder_hidden_states=r(batch, 7, 32),
        indices_hidden_states=torch.arange(20, 23)[None].repeat(batch, 1),
        indices_latents_history_short=torch.tensor([[0, 19]]).repeat(batch, 1),
        indices_latents_history_mid=torch.tensor([[17, 18]]).repeat(batch, 1),
        indices_latents_history_long=torch.arange(1, 17)[None].repeat(batch, 1),
        latents_history_short=r(batch, 16, 2, *full), latents_history_mid=r(batch, 16, 2, *full),
        latents_history_long=r(batch, 16, 16, *full))


def video_outputs() -> dict[str, torch.Tensor]:
    frames = torch.rand(40, 64, 64, 3, generator=torch.Generator().manual_seed(3)).numpy()
    out = {}
    for model in ("helios-tiny", "helios-tiny-mid", "helios-tiny-base"):
        steps = {"helios-tiny-base": dict(num_inference_steps=2)}.get(model, dict(pyramid_num_inference_steps_list=(1, 1, 1)))
        pipe = HeliosPipeline.from_pretrained(model)
        opts = SamplingOptions(num_frames=66, **FAST, **steps)
        for mode, extra in {"t2v": {}, "i2v": {"image": frames[0]}, "v2v": {"video": frames[:33]}}.items():
            video = pipe.generate("a red fox running through fresh snow", opts, **extra)
            out[f"video/{model}/{mode}/frames"] = torch.as_tensor(video.frames)
            out[f"video/{model}/{mode}/latents"] = video.latents
        schedule = [("a fox sleeps", 1), ("the fox wakes up", 2)]
        out[f"video/{model}/schedule/frames"] = torch.as_tensor(pipe.generate(schedule, opts).frames)
    for offload in ("model", "blocks"):
        pipe = HeliosPipeline.from_pretrained("helios-tiny", offload=offload)
        video = pipe.generate("a red fox", SamplingOptions(num_frames=33, **FAST))
        out[f"video/offload-{offload}/frames"] = torch.as_tensor(video.frames)
    pipe = HeliosPipeline.from_pretrained("helios-tiny", quantize="int8")
    out["video/int8/frames"] = torch.as_tensor(pipe.generate("a red fox", SamplingOptions(num_frames=33, **FAST)).frames)
    return out


def cli_file(work: Path) -> bytes:
    out = work / "cli.mp4"
    subprocess.run([sys.executable, "-m", "helios", "generate", "--model", "helios-tiny", "--prompt", "a red fox",
                    "--num-frames", "66", "--height", "64", "--width", "64", "--seed", "5", "--pyramid-steps", "1",
                    "1", "1", "--state", str(work / "cli.state"), "--output", str(out), "--quiet"], check=True)
    return out.read_bytes()


def served_file(work: Path) -> bytes:
    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen([sys.executable, "-m", "helios", "serve", "--model", "helios-tiny", "--port", str(port),
                             "--data-dir", str(work / "data")], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait(lambda: httpx.get(f"{url}/health", timeout=2).status_code == 200, proc)
        body = {"prompt": "a red fox", "size": "64x64", "num_frames": 66, "seed": 9, "pyramid_steps": [1, 1, 1]}
        video_id = httpx.post(f"{url}/v1/videos", json=body, timeout=30).json()["id"]
        _wait(lambda: httpx.get(f"{url}/v1/videos/{video_id}").json()["status"] == "completed", proc)
        return httpx.get(f"{url}/v1/videos/{video_id}/content", timeout=60).content
    finally:
        proc.terminate()
        proc.wait(30)


def _wait(ready, proc, timeout=300) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"helios serve exited with {proc.returncode}")
        try:
            if ready():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.2)
    raise TimeoutError("helios serve did not get there in time")


def collect() -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    tensors = {**transformer_outputs(), **video_outputs()}
    with tempfile.TemporaryDirectory() as work:
        files = {"cli.mp4": cli_file(Path(work)), "served.mp4": served_file(Path(work))}
    return tensors, {name: hashlib.sha256(data).hexdigest() for name, data in files.items()}


def main(argv: list[str]) -> int:
    if len(argv) != 2 or argv[0] not in ("save", "check"):
        print(__doc__, file=sys.stderr)
        return 2
    directory = Path(argv[1])
    tensors, digests = collect()
    if argv[0] == "save":
        directory.mkdir(parents=True, exist_ok=True)
        torch.save(tensors, directory / "tensors.pt")
        (directory / "files.json").write_text(json.dumps(digests, indent=2) + "\n")
        print(f"saved {len(tensors)} tensors and {len(digests)} files' digests in {directory}")
        return 0
    saved = torch.load(directory / "tensors.pt")
    differ = [k for k in saved if k not in tensors or not _bitwise(saved[k], tensors[k])]
    differ += [k for k, v in json.loads((directory / "files.json").read_text()).items() if digests.get(k) != v]
    print(f"{len(saved) + len(digests) - len(differ)} of {len(saved) + len(digests)} outputs bitwise equal")
    for k in differ:
        print(f"  differs: {k}")
    return 1 if differ else 0


def _bitwise(a: torch.Tensor, b: torch.Tensor) -> bool:
    as_bytes = lambda t: t.contiguous().view(torch.uint8)  # noqa: E731 - NaNs and -0.0 compared as stored
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(as_bytes(a), as_bytes(b))

if __name__ == "__main__":
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    sys.exit(main(sys.argv[1:]))
