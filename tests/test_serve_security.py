"""`helios serve` security: the API key on every route but /health (the WebSocket too), loopback-only without one."""

import base64
import json
import subprocess
import sys

import httpx
import pytest
from websockets.exceptions import InvalidStatus
from websockets.sync.client import connect

from servers import FAST, ServerProcess, error_of, wait_for

pytestmark = pytest.mark.slow  # the real server process

KEY = "s3cret-key"


def basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with ServerProcess(tmp_path_factory.mktemp("serve"), env={"HELIOS_API_KEY": KEY}) as proc:
        yield proc


@pytest.mark.parametrize("method, path", [
    ("GET", "/"), ("GET", "/static/app.js"), ("GET", "/v1/videos"), ("POST", "/v1/videos"),
    ("GET", "/v1/videos/video_0123456789abcdef0123456789abcdef"),
    ("DELETE", "/v1/videos/video_0123456789abcdef0123456789abcdef"),
    ("GET", "/v1/videos/video_0123456789abcdef0123456789abcdef/content"),
    ("POST", "/v1/videos/video_0123456789abcdef0123456789abcdef/prompt"),
])
@pytest.mark.parametrize("header", [None, "Bearer wrong-key", f"Basic {KEY}", f"Bearer {KEY}x", basic(KEY, "x"),
                                    basic("helios", KEY + "x")])
def test_every_route_but_health_needs_the_key(server, method, path, header):
    headers = {"Authorization": header} if header else {}
    response = httpx.request(method, server.url + path, headers=headers, json={"prompt": "a cat", **FAST})
    assert response.status_code == 401 and error_of(response)["code"] == "invalid_api_key"
    # A browser that opens the page asks its user for the key (as a Basic password) instead of showing the JSON.
    assert response.headers["WWW-Authenticate"] == 'Basic realm="helios serve"'


def test_a_browser_sends_the_key_as_a_basic_password(server):
    """Browsers cannot send a bearer token when they open a page; Basic credentials with the key as the password
    (any user name) open every route, the WebSocket's handshake too (tests/test_serve_browser.py plays a video so)."""
    with httpx.Client(base_url=server.url, headers={"Authorization": basic("anyone", KEY)}, timeout=60) as client:
        assert client.get("/").status_code == 200 and client.get("/static/app.js").status_code == 200
        assert client.get("/v1/videos").status_code == 200
    url = server.url.replace("http", "ws") + "/v1/realtime/video"
    with connect(url, open_timeout=30, additional_headers={"Authorization": basic("", KEY)}) as ws:
        ws.send(json.dumps({"type": "session.ping"}))
        assert json.loads(ws.recv(timeout=30))["code"] == "session_not_started"


def test_with_the_key_everything_works_and_health_is_open(server):
    assert httpx.get(server.url + "/health").status_code == 200
    with httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {KEY}"}, timeout=60) as client:
        assert client.get("/").status_code == 200
        video = client.post("/v1/videos", json={"prompt": "a cat", "seconds": 1, **FAST}).json()
        assert wait_for(client, video["id"])["status"] == "completed"


def test_the_websocket_needs_the_key_too(server):
    url = server.url.replace("http", "ws") + "/v1/realtime/video"
    for headers in ({}, {"Authorization": "Bearer nope"}):
        with pytest.raises(InvalidStatus) as refused:
            connect(url, additional_headers=headers, open_timeout=30)
        assert refused.value.response.status_code == 403
    for kwargs in ({"additional_headers": {"Authorization": f"Bearer {KEY}"}},
                   {"subprotocols": [f"openai-insecure-api-key.{KEY}"]}):  # what a browser can send
        with connect(url, open_timeout=30, **kwargs) as ws:
            ws.send(json.dumps({"type": "session.ping"}))  # before session.start: an error, but an answer
            assert json.loads(ws.recv(timeout=30))["code"] == "session_not_started"


def test_a_public_address_needs_a_key_or_insecure(tmp_path):
    command = [sys.executable, "-m", "helios", "serve", "--model", "helios-tiny", "--host", "0.0.0.0",
               "--data-dir", str(tmp_path)]
    result = subprocess.run(command, capture_output=True, text=True, timeout=120,
                            env={k: v for k, v in __import__("os").environ.items() if k != "HELIOS_API_KEY"})
    assert result.returncode == 2 and "--insecure" in result.stderr and "Traceback" not in result.stderr
