"""Who may talk to the server, and how much they may send.

- An API key (--api-key or HELIOS_API_KEY) guards every route but GET /health: `Authorization: Bearer KEY`, for the
  WebSocket too (browsers cannot set that header on a WebSocket, so it also takes OpenAI's subprotocol form
  `openai-insecure-api-key.KEY`). A browser opening the page cannot send a bearer token either: a 401 asks it for
  HTTP Basic credentials (any user name, the key as the password), which it then sends with the page's requests
  and its WebSocket. Keys are compared in constant time.
- Without a key the server binds loopback addresses only, unless --insecure says otherwise (cli/serve.py).
- Request bodies are bounded: a declared Content-Length over the limit is refused before it is read, and a body
  without one is counted as it arrives.
"""

from __future__ import annotations

import base64
import binascii
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
    scheme, _, credentials = given.partition(" ")
    candidates = [credentials] if scheme.lower() == "bearer" else []
    if scheme.lower() == "basic":  # a browser's: user:KEY, any user name
        candidates += [_basic_password(credentials)]
    candidates += [p[len(KEY_SUBPROTOCOL):] for p in subprotocols if p.startswith(KEY_SUBPROTOCOL)]
    # compare_digest on bytes: constant time in the key's content (a str must be ASCII)
    return any(hmac.compare_digest(c.encode(), expected.encode()) for c in candidates)


def _basic_password(credentials: str) -> str:
    try:
        return base64.b64decode(credentials.strip(), validate=True).decode().partition(":")[2]
    except (binascii.Error, UnicodeDecodeError):
        return ""


def unauthorized() -> ApiError:
    # The Basic challenge lets a browser ask its user for the key (as the password); API clients send a bearer token.
    return ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer KEY'", None,
                    "invalid_api_key", "authentication_error", {"WWW-Authenticate": 'Basic realm="helios serve"'})


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
