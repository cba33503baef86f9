"""Starting the real `helios serve` process for the server tests, and reading back what it streams."""

from __future__ import annotations

import io
import os
import signal
import socket
import subprocess
import sys
import time

import av
import httpx
import numpy as np

# The fastest videos the tiny model makes: its smallest size, one step per pyramid stage.
FAST = {"size": "64x64", "pyramid_steps": [1, 1, 1], "amplify_first_chunk": False}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ServerProcess:
    """`python -m helios serve --model helios-tiny` on a free loopback port, with its own data dir."""

    def __init__(self, data_dir, *args: str, env: dict | None = None):
        self.data_dir, self.args, self.env = data_dir, list(args), env
        self.port, self.proc, self.log = free_port(), None, data_dir / "server.log"

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 240) -> ServerProcess:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "helios", "serve", "--model", "helios-tiny", "--port", str(self.port),
               "--data-dir", str(self.data_dir / "data"), *self.args]
        with open(self.log, "ab") as log:
            self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env={**os.environ, **(self.env or {})})
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"helios serve exited with {self.proc.returncode}:\n{self.log.read_text()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.25)
        self.stop()
        raise RuntimeError(f"helios serve did not answer within {timeout} s:\n{self.log.read_text()}")

    def __enter__(self) -> ServerProcess:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def rss(self) -> int:
        """Resident memory of the server process, in bytes."""
        with open(f"/proc/{self.proc.pid}/status") as f:
            line = next(line for line in f if line.startswith("VmRSS:"))
        return int(line.split()[1]) * 1024

    def output(self) -> str:
        return self.log.read_text()


def wait_for(client: httpx.Client, video_id: str, statuses=("completed", "failed", "cancelled"), timeout=300) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        video = client.get(f"/v1/videos/{video_id}").json()
        if video["status"] in statuses:
            return video
        time.sleep(0.1)
    raise TimeoutError(f"{video_id} still {video['status']} after {timeout} s")


def decode(data: bytes) -> np.ndarray:
    """Every frame of an MP4 (bytes) as uint8 RGB [F, H, W, 3]."""
    with av.open(io.BytesIO(data)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


def error_of(response: httpx.Response) -> dict:
    """The OpenAI-shaped error of a 4xx response (fails the test on anything else)."""
    assert 400 <= response.status_code < 500, (response.status_code, response.text)
    body = response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    return body["error"]
