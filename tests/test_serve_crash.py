"""Crash safety: SIGKILL the server in the middle of a job, start it again with the same --data-dir."""

import httpx
import pytest

from servers import FAST, ServerProcess, decode, wait_for

pytestmark = pytest.mark.slow  # the real server process


def test_a_killed_server_resumes_its_jobs_and_makes_the_same_video(tmp_path):
    server = ServerProcess(tmp_path / "serve").start()
    request = {"prompt": "a red fox", "num_frames": 132, "seed": 5, **FAST}  # 4 chunks
    try:
        with httpx.Client(base_url=server.url, timeout=60) as client:
            finished = client.post("/v1/videos", json={"prompt": "done before", "seconds": 1, **FAST}).json()
            wait_for(client, finished["id"])
            video = client.post("/v1/videos", json=request).json()
            while (now := client.get(f"/v1/videos/{video['id']}").json())["chunks_done"] < 1:
                pass
            server.kill()
        assert now["status"] == "in_progress" and now["chunks_done"] < 4
        server.start()
        assert "1 unfinished jobs resumed" in server.output()
        with httpx.Client(base_url=server.url, timeout=60) as client:
            resumed = wait_for(client, video["id"])
            assert resumed["status"] == "completed" and resumed["chunks_done"] == 4
            listed = {v["id"]: v["status"] for v in client.get("/v1/videos").json()["data"]}
            assert listed == {finished["id"]: "completed", video["id"]: "completed"}
            assert client.get(f"/v1/videos/{finished['id']}/content").status_code == 200
            got = decode(client.get(f"/v1/videos/{video['id']}/content").content)
            again = client.post("/v1/videos", json=request).json()  # the same request, uninterrupted
            wait_for(client, again["id"])
            expected = decode(client.get(f"/v1/videos/{again['id']}/content").content)
        assert got.shape == expected.shape == (129, 64, 64, 3) and (got == expected).all()
    finally:
        server.stop()
