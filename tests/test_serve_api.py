"""`helios serve`'s OpenAI-style /v1/videos API, against the real server process (one for the module)."""

import io
import time

import httpx
import numpy as np
import openai
import PIL.Image
import pytest

from servers import FAST, ServerProcess, decode, error_of, wait_for

pytestmark = pytest.mark.slow  # the real server process


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("serve"), "--max-seconds", "5", "--max-upload-mb", "1",
                       "--max-queue", "2") as proc:
        yield proc


@pytest.fixture
def client(server):
    with httpx.Client(base_url=server.url, timeout=60) as c:
        yield c


def test_the_official_openai_client_works_unchanged(server):
    client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused")
    video = client.videos.create_and_poll(prompt="a red fox running through fresh snow", seconds="1", size="64x64")
    assert video.status == "completed" and video.progress == 100 and video.object == "video"
    assert video.model == "helios-tiny" and video.size == "64x64" and video.seconds == "1"
    assert video.completed_at >= video.created_at
    assert client.videos.retrieve(video.id).id == video.id
    assert video.id in [v.id for v in client.videos.list()]
    frames = decode(client.videos.download_content(video.id).read())
    assert frames.shape == (33, 64, 64, 3)  # 1 s at 24 fps asks for 24 frames: one chunk of 33
    deleted = client.videos.delete(video.id)
    assert deleted.deleted and deleted.id == video.id
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)


def test_content_streams_the_growing_video_while_the_job_runs(client):
    video = client.post("/v1/videos", json={"prompt": "a cat", "num_frames": 99, "seed": 1, **FAST}).json()
    assert video["status"] == "queued" and video["chunks_total"] == 3
    pieces, statuses = [], []
    with client.stream("GET", f"/v1/videos/{video['id']}/content") as response:
        assert response.headers["content-type"] == "video/mp4" and response.headers["transfer-encoding"] == "chunked"
        for piece in response.iter_raw():
            pieces.append(piece)
            statuses.append(client.get(f"/v1/videos/{video['id']}").json()["status"])
    assert statuses[0] == "in_progress"  # the first bytes came before the video was done
    final = client.get(f"/v1/videos/{video['id']}/content")
    assert final.status_code == 200 and b"".join(pieces) == final.content
    streamed, whole = decode(b"".join(pieces)), decode(final.content)
    assert streamed.shape == (97, 64, 64, 3) and np.array_equal(streamed, whole)
    done = wait_for(client, video["id"])
    assert done["progress"] == 100 and done["chunks_done"] == 3 and done["frames_done"] == 97 and done["seed"] == 1


def test_list_is_newest_first_with_limit_and_after(client):
    ids = [client.post("/v1/videos", json={"prompt": f"a dog {i}", "seconds": 1, **FAST}).json()["id"]
           for i in range(2)]
    for video_id in ids:
        wait_for(client, video_id)
    page = client.get("/v1/videos", params={"limit": 1}).json()
    assert page["object"] == "list" and [v["id"] for v in page["data"]] == [ids[1]] and page["has_more"]
    rest = client.get("/v1/videos", params={"limit": 1, "after": ids[1]}).json()
    assert [v["id"] for v in rest["data"]] == [ids[0]]
    asc = [v["id"] for v in client.get("/v1/videos", params={"order": "asc", "limit": 100}).json()["data"]]
    assert asc.index(ids[0]) < asc.index(ids[1])


def test_multipart_image_and_video_references(client):
    png = io.BytesIO()
    PIL.Image.new("RGB", (64, 64), (220, 40, 40)).save(png, format="PNG")
    form = {k: str(v) if not isinstance(v, list) else " ".join(map(str, v)) for k, v in FAST.items()}
    i2v = client.post("/v1/videos", data={"prompt": "a red ball", "seconds": "1", "seed": "4", **form},
                      files={"input_reference": ("red.png", png.getvalue(), "image/png")}).json()
    done = wait_for(client, i2v["id"])
    assert done["status"] == "completed", done
    clip = client.get(f"/v1/videos/{i2v['id']}/content").content  # 33 frames: enough to continue
    v2v = client.post("/v1/videos", data={"prompt": "the ball rolls", "seconds": "1", **form},
                      files={"input_reference": ("clip.mp4", clip, "video/mp4")}).json()
    assert wait_for(client, v2v["id"])["status"] == "completed"
    t2v = client.post("/v1/videos", data={"prompt": "a red ball", "seconds": "1", "seed": "4", **form}).json()
    wait_for(client, t2v["id"])
    # the same request without the image makes another video (the tiny model's random VAE does not reproduce it)
    assert not np.array_equal(decode(clip), decode(client.get(f"/v1/videos/{t2v['id']}/content").content))


def test_steering_a_post_job_changes_the_prompt_from_the_next_chunk(client):
    video = client.post("/v1/videos", json={"prompt": "a cat", "num_frames": 99, **FAST}).json()
    while client.get(f"/v1/videos/{video['id']}").json()["chunks_done"] < 1:
        time.sleep(0.05)
    answer = client.post(f"/v1/videos/{video['id']}/prompt", json={"prompt": "a dog", "transition_chunks": 0})
    assert answer.status_code == 200 and answer.json()["status"] == "queued"
    done = wait_for(client, video["id"])
    assert done["status"] == "completed" and done["prompt_in_effect"]["prompt"] == "a dog"
    assert done["prompt_in_effect"]["change"]["chunk"] in (1, 2)  # the chunk after the one running at the time
    late = client.post(f"/v1/videos/{video['id']}/prompt", json={"prompt": "a bird"})
    assert late.status_code == 409 and error_of(late)["code"] == "not_running"
    assert error_of(client.post(f"/v1/videos/{video['id']}/prompt", json={"prompt": "x", "transition_chunks": -1}))[
        "param"] == "transition_chunks"


def test_delete_cancels_a_running_job_within_a_step_and_removes_its_files(client, server):
    video = client.post("/v1/videos", json={"prompt": "a long cat", "num_frames": 99, **FAST}).json()
    wait_for(client, video["id"], statuses=("in_progress",))
    folder = server.data_dir / "data" / "videos" / video["id"]
    assert folder.is_dir()
    answer = client.delete(f"/v1/videos/{video['id']}")
    assert answer.json() == {"id": video["id"], "object": "video.deleted", "deleted": True, "status": "cancelled"}
    assert not folder.exists() and client.get(f"/v1/videos/{video['id']}").status_code == 404


def test_a_full_queue_answers_429(client):
    ids = []
    try:
        for _ in range(3):  # one runs, two wait (--max-queue 2)
            ids.append(client.post("/v1/videos", json={"prompt": "a cat", "num_frames": 99, **FAST}).json()["id"])
            if len(ids) == 1:
                wait_for(client, ids[0], statuses=("in_progress",))
        full = client.post("/v1/videos", json={"prompt": "one too many", **FAST})
        assert full.status_code == 429 and error_of(full)["code"] == "queue_full"
    finally:
        for video_id in ids:
            client.delete(f"/v1/videos/{video_id}")


LONG_PROMPT = " ".join(["cat"] * 600)


@pytest.mark.parametrize("body, param", [
    ({"prompt": "a cat", "size": "80x64"}, "size"),  # the tiny distilled model takes multiples of 64
    ({"prompt": "a cat", "size": "big"}, "size"),
    ({"prompt": "a cat", "width": 64, "height": 100}, "height"),
    ({"prompt": "a cat", "seconds": "6"}, "seconds"),  # --max-seconds 5
    ({"prompt": "a cat", "num_frames": 500}, "num_frames"),
    ({"prompt": "a cat", "seconds": "four"}, "seconds"),
    ({"prompt": "a cat", "colour": "red"}, "colour"),
    ({"prompt": "a cat", "seed": "7"}, "seed"),  # JSON: a string is not an integer
    ({"prompt": "a cat", "seed": -1}, "seed"),
    ({"prompt": "a cat", "pyramid_steps": [1, 1]}, "pyramid_steps"),
    ({"prompt": "a cat", "model": "sora-2"}, "model"),
    ({"prompt": LONG_PROMPT}, "prompt"),
    ({"prompt": ""}, "prompt"),
    ({"size": "64x64"}, "prompt"),
    ({"prompt": "a cat", "input_reference": {"image_url": "https://example.com/cat.png"}}, "input_reference"),
])
def test_bad_requests_get_a_400_naming_the_field(client, body, param):
    error = error_of(client.post("/v1/videos", json=body))
    assert error["param"] == param and param in error["message"], error


def test_bad_uploads_bodies_and_ids(client):
    text = client.post("/v1/videos", data={"prompt": "a cat", **{"size": "64x64"}},
                       files={"input_reference": ("notes.txt", b"just some text", "text/plain")})
    assert error_of(text)["param"] == "input_reference" and text.status_code == 400
    big = client.post("/v1/videos", data={"prompt": "a cat"},
                      files={"input_reference": ("big.png", b"\0" * (3 * 2**20), "image/png")})
    assert big.status_code == 413 and error_of(big)["code"] == "body_too_large"
    assert error_of(client.post("/v1/videos", content=b"{not json", headers={"content-type": "application/json"}))[
        "code"] == "invalid_json"
    for path in ("/v1/videos/video_0123", "/v1/videos/..%2F..%2Fetc%2Fpasswd", "/v1/videos/video_x/content"):
        response = client.get(path)
        assert response.status_code == 404 and error_of(response)["code"] == "not_found"
    assert error_of(client.get("/v1/videos", params={"limit": "0"}))["param"] == "limit"
    assert error_of(client.get("/v1/videos", params={"after": "video_nope"}))["param"] == "after"
    assert client.get("/health").json()["status"] == "ok"  # none of it hurt the server
