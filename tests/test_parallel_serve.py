"""`helios serve` under torchrun: rank 0 serves, the other rank runs each of its streams with it (mirror.py).

One real launch (`torchrun --nproc-per-node 2 -m helios serve --model helios-tiny`, gloo on this CPU) takes, in
order: a job steered to another prompt after its first chunk, a job deleted while it runs, and a plain job whose
latents (the saved state's memory) must equal the single process's. The last one only comes out right if the two
ranks stayed in step through the steering and the cancellation. Then Ctrl-C ends every process.
"""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
from servers import FAST, free_port, wait_for

from helios import HeliosPipeline, SamplingOptions
from helios.pipeline.state import GenerationState

pytestmark = pytest.mark.slow  # real processes

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), os.environ.get("PYTHONPATH", "")]),
       "OMP_NUM_THREADS": "1"}


def test_a_server_on_two_processes_keeps_them_in_step(tmp_path):
    port = free_port()
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m", "helios",
               "serve", "--model", "helios-tiny", "--port", str(port), "--data-dir", str(tmp_path / "data")]
    log = tmp_path / "server.log"
    with open(log, "wb") as out:
        proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT, env=ENV)
    try:
        opts = SamplingOptions(height=64, width=64, pyramid_num_inference_steps_list=(1, 1, 1),
                               is_amplify_first_chunk=False, seed=5, num_frames=66)
        expected = HeliosPipeline.from_pretrained("helios-tiny").generate("a red fox", opts).latents  # meanwhile
        client = httpx.Client(base_url=f"http://127.0.0.1:{port}", timeout=30)
        _wait_until_serving(client, proc, log)

        steered = client.post("/v1/videos", json={"prompt": "a cat", "num_frames": 99, "seed": 1, **FAST}).json()
        while client.get(f"/v1/videos/{steered['id']}").json()["chunks_done"] < 1:
            time.sleep(0.05)
        client.post(f"/v1/videos/{steered['id']}/prompt", json={"prompt": "a dog", "transition_chunks": 0})
        done = wait_for(client, steered["id"])
        assert done["status"] == "completed" and done["prompt_in_effect"]["prompt"] == "a dog", done

        cancelled = client.post("/v1/videos", json={"prompt": "a long cat", "num_frames": 99, **FAST}).json()
        wait_for(client, cancelled["id"], statuses=("in_progress",))
        time.sleep(0.3)  # inside a chunk: both ranks must stop at the same step
        assert client.delete(f"/v1/videos/{cancelled['id']}").json()["status"] == "cancelled"

        plain = client.post("/v1/videos", json={"prompt": "a red fox", "num_frames": 66, "seed": 5, **FAST}).json()
        assert wait_for(client, plain["id"])["status"] == "completed"
        state = GenerationState.load(tmp_path / "data" / "videos" / plain["id"] / "state.pt")
        got = state.history.latents[:, :, -expected.shape[2]:]
        assert ((got - expected).abs().max() / expected.abs().max()).item() <= 1e-5
    finally:
        proc.send_signal(signal.SIGINT)  # Ctrl-C: torchrun ends its processes, rank 0 tells rank 1 first
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
    assert "helios (rank 1)" not in log.read_text()  # rank 1 never failed a stream


def _wait_until_serving(client: httpx.Client, proc: subprocess.Popen, log: Path, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, log.read_text()
        try:
            if client.get("/health").status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    raise TimeoutError(log.read_text())
