"""The realtime WebSocket /v1/realtime/video (vLLM-Omni's protocol), against the real server process."""

import base64
import io
import json
import time

import httpx
import numpy as np
import PIL.Image
import pytest
from websockets.exceptions import ConnectionClosed
from websockets.sync.client import connect

from servers import FAST, ServerProcess, decode, wait_for

pytestmark = pytest.mark.slow  # the real server process


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("serve")) as proc:
        yield proc


@pytest.fixture(scope="module")
def impatient_server(tmp_path_factory):
    """Closes sessions after 2 s without progress (60 s by default: too long to wait for in a test)."""
    with ServerProcess(tmp_path_factory.mktemp("serve"), "--session-timeout", "2") as proc:
        yield proc


def _ws(server):
    return connect(server.url.replace("http", "ws") + "/v1/realtime/video", max_size=2**26, open_timeout=30)


def _start(ws, **fields):
    ws.send(json.dumps({"type": "session.start", "format": "m4s", **fields}))
    start = json.loads(ws.recv(timeout=120))
    assert start["type"] == "video.start", start
    return start


def _until(ws, kind, timeout=120):
    """Messages up to and including the first of type `kind` (binary ones as bytes)."""
    seen = []
    while True:
        message = ws.recv(timeout=timeout)
        seen.append(message if isinstance(message, bytes) else json.loads(message))
        if isinstance(seen[-1], dict) and seen[-1]["type"] == kind:
            return seen


def test_a_session_streams_each_chunk_and_takes_steering_at_the_next_boundary(server):
    with _ws(server) as ws:
        start = _start(ws, prompt="a red cat", num_frames=99, seed=11, sampling_params={"pyramid_steps": [1, 1, 1]},
                       size="64x64", amplify_first_chunk=False)
        assert start["format"] == "m4s" and start["config"]["num_chunks"] == 3
        assert start["config"]["mime"].startswith('video/mp4; codecs="avc1.')
        first = _until(ws, "video.chunk_metadata")[-1]
        fragments = [ws.recv(timeout=60)]
        assert first["kind"] == "media" and first["byte_length"] == len(fragments[0]) and first["chunk_index"] == 0
        assert fragments[0][4:8] == b"ftyp"  # the first fragment carries the init segment
        ws.send(json.dumps({"type": "session.ping"}))
        ws.send(json.dumps({"type": "session.interaction",
                            "interaction": {"event_id": "e1", "event": {"prompt": "a blue dog"}, "transition_chunks": 0}}))
        rest = _until(ws, "session.done")
        kinds = [m["type"] if isinstance(m, dict) else "binary" for m in rest]
        assert "session.pong" in kinds and "session.interaction.queued" in kinds
        ack = kinds.index("session.interaction.queued")
        chunks = [m for m in rest if isinstance(m, dict) and m["type"] == "video.chunk_metadata"]
        fragments += [m for m in rest if isinstance(m, bytes)]
        assert [c["chunk_index"] for c in chunks] == [1, 2] and len(fragments) == 3
        assert rest[-1] == {"type": "session.done", "request_id": start["request_id"], "chunks": 3, "stopped": False}
        # The server used the new prompt from the next chunk on: the change starts at the chunk after the one being
        # made when it was acknowledged (chunks sent before the ack: `before`; the one being made: `before` or
        # `before + 1`, if it was done but not yet sent), and every chunk from there on has it.
        before = 1 + sum(1 for m in rest[:ack] if isinstance(m, dict) and m["type"] == "video.chunk_metadata")
        changed = next(c["chunk_index"] for c in chunks if c["prompt"]["prompt"] == "a blue dog")
        assert changed in (before, before + 1)
        assert [c["prompt"]["prompt"] for c in [first, *chunks]] == ["a red cat"] * changed + ["a blue dog"] * (3 - changed)
        assert chunks[changed - 1]["started_event_ids"] == ["e1"]
    streamed = decode(b"".join(fragments))
    assert streamed.shape == (97, 64, 64, 3)
    # A POST job with the same request and no steering: the same first chunk, then another video.
    with httpx.Client(base_url=server.url, timeout=60) as client:
        video = client.post("/v1/videos", json={"prompt": "a red cat", "num_frames": 99, "seed": 11, **FAST}).json()
        wait_for(client, video["id"])
        whole = decode(client.get(f"/v1/videos/{video['id']}/content").content)
    assert np.array_equal(streamed[:33], whole[:33]) and not np.array_equal(streamed[66:], whole[66:])


def test_stop_ends_the_session_and_the_server_goes_on(server):
    png = io.BytesIO()
    PIL.Image.new("RGB", (64, 64), (20, 200, 40)).save(png, format="PNG")
    image = "data:image/png;base64," + base64.b64encode(png.getvalue()).decode()
    with _ws(server) as ws:
        _start(ws, prompt="a cat", num_frames=99, image_reference=image, **FAST)  # image-to-video
        _until(ws, "video.chunk_metadata")
        ws.send(json.dumps({"type": "session.stop"}))
        done = _until(ws, "session.done")[-1]
        assert done["stopped"] is True and done["chunks"] < 3


def test_bad_messages_get_errors_and_the_session_goes_on(server):
    with _ws(server) as ws:
        _start(ws, prompt="a cat", num_frames=66, seed=2, **FAST)
        ws.send("{not json")
        ws.send(json.dumps({"type": "session.interaction", "interaction": {"event": {"prompt": "x" * 200_000}}}))
        ws.send(json.dumps({"type": "session.start", "prompt": "again"}))
        ws.send(json.dumps({"type": "session.dance"}))
        ws.send(json.dumps({"type": "session.interaction", "interaction": {"event": {"prompt": "a dog"},
                                                                           "transition_chunks": -2}}))
        ws.send(json.dumps({"type": "session.interaction", "interaction": {"event": {"negative_prompt": "blur"}}}))
        messages = _until(ws, "session.done")
    codes = [m["code"] for m in messages if isinstance(m, dict) and m["type"] == "error"]
    assert codes == ["invalid_json", "message_too_large", "session_already_started", "unknown_type", "invalid_value",
                     "unsupported"]
    assert messages[-1]["chunks"] == 2 and messages[-1]["stopped"] is False
    # What was streamed decodes to the frames of the MP4 a POST job makes of the same request.
    streamed = decode(b"".join(m for m in messages if isinstance(m, bytes)))
    with httpx.Client(base_url=server.url, timeout=60) as client:
        video = client.post("/v1/videos", json={"prompt": "a cat", "num_frames": 66, "seed": 2, **FAST}).json()
        wait_for(client, video["id"])
        whole = decode(client.get(f"/v1/videos/{video['id']}/content").content)
    assert streamed.shape == (65, 64, 64, 3) and np.array_equal(streamed, whole)


@pytest.mark.parametrize("first, code", [
    ({"type": "session.interaction", "interaction": {"event": {"prompt": "a dog"}}}, "session_not_started"),
    ({"type": "session.start", "prompt": "a cat", "size": "80x64"}, "invalid_value"),
    ({"type": "session.start", "prompt": "a cat", "format": "webm"}, "invalid_value"),
    ({"type": "session.start", "prompt": "a cat", "image_reference": "data:image/png;base64,bm90IGFuIGltYWdl"},
     "invalid_value"),
])
def test_a_bad_or_out_of_order_start_is_an_error_and_closes(server, first, code):
    with _ws(server) as ws:
        ws.send(json.dumps(first))
        error = json.loads(ws.recv(timeout=30))
        assert error["type"] == "error" and error["code"] == code, error
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=30)


def test_a_session_that_never_starts_is_closed(server):
    with _ws(server) as ws:
        error = json.loads(ws.recv(timeout=30))
        assert error["type"] == "error" and error["code"] == "start_timeout"
        with pytest.raises(ConnectionClosed):
            ws.recv(timeout=30)


def test_a_stalled_session_is_closed_without_harming_other_jobs(impatient_server):
    with httpx.Client(base_url=impatient_server.url, timeout=60) as client:
        # Long enough (40 chunks) to outlast the 2 s stall limit on a fast idle machine; deleted at the end.
        video = client.post("/v1/videos", json={"prompt": "a long job", "num_frames": 33 * 40, **FAST}).json()
        wait_for(client, video["id"], statuses=("in_progress",))
        with _ws(impatient_server) as ws:  # queued behind the long job: no progress and no ping for 2 s
            _start(ws, prompt="waiting", **FAST)
            error = json.loads(ws.recv(timeout=60))
            assert error["type"] == "error" and error["code"] == "stall_timeout"
            with pytest.raises(ConnectionClosed):
                ws.recv(timeout=30)
        assert client.get(f"/v1/videos/{video['id']}").json()["status"] == "in_progress"
        assert client.get("/health").json()["live_sessions"] == 0
        client.delete(f"/v1/videos/{video['id']}")


def test_a_disconnected_session_is_cancelled_without_harming_other_jobs(server):
    with httpx.Client(base_url=server.url, timeout=60) as client:
        # 15 chunks: still running after the session's cancellation, also on a fast idle machine
        video = client.post("/v1/videos", json={"prompt": "a long job", "num_frames": 33 * 15, **FAST}).json()
        wait_for(client, video["id"], statuses=("in_progress",))
        with _ws(server) as ws:
            _start(ws, prompt="gone soon", num_frames=99, **FAST)
            assert client.get("/health").json()["live_sessions"] == 1
        # the client went away: its session is cancelled while the long job still runs
        deadline = time.monotonic() + 20
        while client.get("/health").json()["live_sessions"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert client.get("/health").json() | {"live_sessions": 0, "queued": 0} == client.get("/health").json()
        assert client.get(f"/v1/videos/{video['id']}").json()["status"] == "in_progress"
        assert wait_for(client, video["id"])["status"] == "completed"
