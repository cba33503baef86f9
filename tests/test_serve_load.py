"""Load: 8 concurrent clients, 24 jobs; create, poll, download, steer, cancel. Nothing fails, order is kept, and the
server's memory does not grow."""

import threading

import httpx
import pytest

from servers import FAST, ServerProcess, decode, wait_for

pytestmark = pytest.mark.slow  # the real server process

CLIENTS, JOBS_EACH = 8, 3


def _client(url, n, outcomes, lock):
    with httpx.Client(base_url=url, timeout=120) as client:
        for j in range(JOBS_EACH):
            video = client.post("/v1/videos", json={"prompt": f"client {n} job {j}", "seconds": 1, **FAST})
            assert video.status_code == 200, video.text
            video_id = video.json()["id"]
            if (n + j) % 4 == 0:  # cancel while it waits or runs
                status = client.delete(f"/v1/videos/{video_id}").json()["status"]
                with lock:
                    outcomes[video_id] = status
                continue
            if (n + j) % 4 == 1:
                client.post(f"/v1/videos/{video_id}/prompt", json={"prompt": f"client {n} steered"})
            final = wait_for(client, video_id)
            frames = decode(client.get(f"/v1/videos/{video_id}/content").content)
            assert frames.shape == (33, 64, 64, 3)
            with lock:
                outcomes[video_id] = final["status"]


def test_eight_clients_many_jobs(tmp_path):
    with ServerProcess(tmp_path / "serve", "--max-queue", "32") as server:
        with httpx.Client(base_url=server.url, timeout=120) as client:
            first = client.post("/v1/videos", json={"prompt": "warm up", "seconds": 1, **FAST}).json()
            wait_for(client, first["id"])
            rss_first = server.rss()
            outcomes, lock, errors = {}, threading.Lock(), []

            def run(n):
                try:
                    _client(server.url, n, outcomes, lock)
                except BaseException as err:  # reported below: a thread's failure must fail the test
                    errors.append(err)

            threads = [threading.Thread(target=run, args=(n,)) for n in range(CLIENTS)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(600)
            assert not errors, errors
            assert len(outcomes) == CLIENTS * JOBS_EACH
            assert set(outcomes.values()) <= {"completed", "cancelled"} and "cancelled" in outcomes.values()
            listing = client.get("/v1/videos", params={"order": "asc", "limit": 100}).json()["data"]
            assert all(v["status"] == "completed" for v in listing)
            started = [v["started_at"] for v in listing]  # first come, first served
            assert started == sorted(started) and len(listing) == 1 + list(outcomes.values()).count("completed")
            rss_after = server.rss()
        assert rss_after <= 1.10 * rss_first, (rss_first, rss_after)
        print(f"RSS after the first job {rss_first / 2**20:.0f} MiB, after {CLIENTS * JOBS_EACH} more "
              f"{rss_after / 2**20:.0f} MiB")
