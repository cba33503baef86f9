"""Who may talk to the server, and how much they may send.

- An API key (--api-key or HELIOS_API_KEY) guards every route but GET /health: `Authorization: Bearer KEY`, for the
  WebSocket too (browsers cannot set that header on a WebSocket, so it also takes OpenAI's subprotocol form
  `openai-insecure-api-key.KEY`). Keys are compared in constant time.
- Without a key the server binds loopback addresses only, unless --insecure says otherwise (cli/serve.py).
- Request bodies are bounded: a declared Content-Length over the limit is refused before it is read, and a body
  without one is counted as it arrives.
"""

from __future__ import annotations

import hmac
import ipaddress

from .errors import ApiError

KEY_SUBPROTOCOL = "openai-insecure-api-key."


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name that could resolve anywhere


def key_matches(expected: str | None, headers, subprotocols=()) -> bool:
    if not expected:
        return True
    given = headers.get("authorization", "")
    candidates = [given[7:]] if given[:7].lower() == "bearer " else []
    candidates += [p[len(KEY_SUBPROTOCOL):] for p in subprotocols if p.startswith(KEY_SUBPROTOCOL)]
    # compare_digest on bytes: constant time in the key's content (a str must be ASCII)
    return any(hmac.compare_digest(c.encode(), expected.encode()) for c in candidates)


def unauthorized() -> ApiError:
    return ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'", None,
                    "invalid_api_key", "authentication_error")


class BodyLimit:
    """ASGI middleware: 413 for an HTTP request body over `limit` bytes."""

    def __init__(self, app, limit: int):
        self.app, self.limit = app, limit

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.limit):
            return await too_large(self.limit).response()(scope, receive, send)
        seen = 0

        async def counted():
            nonlocal seen
            message = await receive()
            seen += len(message.get("body", b""))
            if seen > self.limit:
                raise too_large(self.limit)  # turned into a 413 by the app's handler
            return message

        return await self.app(scope, counted, send)


def too_large(limit: int) -> ApiError:
    return ApiError(413, f"request body over this server's limit of {limit / 2**20:.3g} MiB (--max-upload-mb)",
                    None, "body_too_large")
