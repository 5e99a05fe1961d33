"""API keys, ownership and request limits of `rxt serve`.

- **API keys** (optional): clients send `Authorization: Bearer KEY`. The server keeps only sha256 hashes of
  the keys it accepts; a conversation's `owner` is the hash of the key that created it.
- **Ownership**: another key gets **404**, exactly as for an id that does not exist, so a key can neither
  read, write nor delete a foreign conversation, nor learn that it exists (a 403 would confirm the id).
  Without API keys the server is open: there is no owner and every conversation is reachable by its id.
  One exception: a state written by another model is refused before its owner can be read, so any key gets
  409 `incompatible_memory` for such an id (ids are random 128-bit values, so this reveals nothing
  guessable), and with keys it cannot be deleted over the API (it expires with `--ttl-seconds`).
  `/`, `/healthz` and `/metrics` need no key (they show no conversation data).
- **Limits**, each answered with a JSON error (`{"error": {"message", "type", "code"}}`):
  request body size (413), concurrent requests per key (429, with `Retry-After`); the query length in
  tokens (422) is checked by the server with the tokenizer.

The middlewares here are plain ASGI (no framework import), wrapped around the FastAPI app by the server.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import threading
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

Scope = dict[str, Any]
Receive = Callable[[], Awaitable[dict]]
Send = Callable[[dict], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]

KEY_HASH_PREFIX = "sha256:"
MIN_KEY_LENGTH = 8


class ApiError(Exception):
    """An error answered to the client as `status` + `{"error": {"message", "type", "code"}}`."""

    def __init__(self, status: int, code: str, message: str, headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.status, self.code, self.message)


def error_body(status: int, code: str, message: str) -> dict[str, Any]:
    return {"error": {"message": message, "type": code, "code": status}}


# ------------------------------------------------------------------------------------------------------
# API keys


def hash_api_key(key: str) -> str:
    """The owner id stored for conversations created with `key` (never the key itself)."""
    return KEY_HASH_PREFIX + hashlib.sha256(key.encode("utf-8")).hexdigest()


def read_api_keys(keys: Iterable[str] = (), keys_file: str | Path | None = None) -> list[str]:
    """The accepted keys: `keys` plus one key per line of `keys_file` (blank lines and `#` comments skipped)."""
    found: list[tuple[str, str]] = [(key, "--api-key") for key in keys]
    if keys_file is not None:
        path = Path(keys_file)
        if not path.is_file():
            raise ValueError(f"api_keys_file={str(keys_file)!r} does not exist: pass a file with one API key per line.")
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            line = line.strip()
            if line and not line.startswith("#"):
                found.append((line, f"{path}:{number}"))
    for key, origin in found:
        if len(key) < MIN_KEY_LENGTH or any(char.isspace() for char in key) or not key.isprintable():
            raise ValueError(
                f"The API key from {origin} is invalid (length {len(key)}): use at least {MIN_KEY_LENGTH} printable "
                "characters without spaces, e.g. `python -c 'import secrets; print(secrets.token_urlsafe(32))'`."
            )
    return [key for key, _ in found]


class ApiKeys:
    """The accepted API keys (as hashes). Empty: the server is open and `authenticate` returns None."""

    def __init__(self, keys: Iterable[str] = ()):
        self._hashes = {hash_api_key(key) for key in keys}

    @property
    def enabled(self) -> bool:
        return bool(self._hashes)

    def __len__(self) -> int:
        return len(self._hashes)

    def authenticate(self, authorization: str | None) -> str | None:
        """The owner id of a request from its `Authorization` header; ApiError(401) when keys are required and
        the header is missing, malformed or carries an unknown key. None when the server has no keys."""
        if not self.enabled:
            return None
        challenge = {"WWW-Authenticate": "Bearer"}
        if not authorization:
            raise ApiError(401, "missing_api_key", "This server needs an API key: send 'Authorization: Bearer KEY'.", challenge)
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            raise ApiError(
                401, "invalid_authorization", "Malformed Authorization header: send 'Authorization: Bearer KEY'.", challenge
            )
        candidate = hash_api_key(token)
        if not any(hmac.compare_digest(candidate, known) for known in self._hashes):
            raise ApiError(401, "invalid_api_key", "Unknown API key: check the key you send.", challenge)
        return candidate

    def may_access(self, owner: str | None, conversation_owner: str | None) -> bool:
        """Whether the request's owner may touch a conversation (always, on an open server)."""
        if not self.enabled:
            return True
        return conversation_owner is not None and owner is not None and hmac.compare_digest(owner, conversation_owner)


# ------------------------------------------------------------------------------------------------------
# ASGI helpers and middlewares


async def send_json(send: Send, status: int, payload: dict[str, Any], headers: dict[str, str] | None = None) -> None:
    """Answer a whole JSON response through a raw ASGI `send`."""
    body = json.dumps(payload).encode("utf-8")
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(name.lower().encode(), value.encode()) for name, value in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


def header(scope: Scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", []):
        if key == name:
            return value.decode("latin-1")
    return None


class BodyTooLarge(Exception):
    """Raised from `receive` when a body without Content-Length grows past the limit."""

    def __init__(self, limit: int):
        super().__init__(f"The request body is larger than {limit} bytes (max_body_bytes): send a smaller body.")
        self.limit = limit


class BodySizeLimit:
    """413 for request bodies over `max_bytes`: by Content-Length before reading, or while streaming in.

    `oversize(limit)` builds the exception raised inside `receive` for bodies without Content-Length; pass
    one the framework answers itself (the server passes an HTTPException with status 413).
    """

    def __init__(self, app: ASGIApp, max_bytes: int, oversize: Callable[[int], Exception] = BodyTooLarge):
        self.app = app
        self.max_bytes = max_bytes
        self.oversize = oversize

    def message(self, size: int | None = None) -> str:
        found = f"The request body has {size} bytes" if size is not None else "The request body is too large"
        return f"{found}, more than max_body_bytes={self.max_bytes}: send a smaller body (shorter message)."

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = header(scope, b"content-length")
        if declared is not None:
            try:
                size = int(declared)
            except ValueError:
                return await send_json(send, 400, error_body(400, "invalid_content_length", f"Bad Content-Length {declared!r}."))
            if size > self.max_bytes:
                return await send_json(send, 413, error_body(413, "body_too_large", self.message(size)))
        received = 0

        async def counting_receive() -> dict:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.max_bytes:
                    raise self.oversize(self.max_bytes)
            return message

        return await self.app(scope, counting_receive, send)


class InFlightRequests:
    """Requests in progress per key (thread-safe); shared by `ConcurrencyLimit` and the server's metrics."""

    def __init__(self):
        self._active: dict[str, int] = {}
        self._lock = threading.Lock()

    def try_acquire(self, key: str, limit: int) -> int | None:
        """Count one more request of `key`; None (nothing counted) if `key` already has `limit` in progress."""
        with self._lock:
            count = self._active.get(key, 0)
            if count >= limit:
                return None
            self._active[key] = count + 1
            return count + 1

    def release(self, key: str) -> None:
        with self._lock:
            remaining = self._active[key] - 1
            if remaining:
                self._active[key] = remaining
            else:
                del self._active[key]

    def of(self, key: str) -> int:
        with self._lock:
            return self._active.get(key, 0)

    def total(self) -> int:
        with self._lock:
            return sum(self._active.values())


class ConcurrencyLimit:
    """429 when a key already has `max_per_key` requests in progress (a streamed answer counts until its
    stream ends). Requests are grouped by their bearer token's hash, or by client address without one.

    Only paths starting with one of `prefixes` are limited (the API, not the page or health checks).
    """

    def __init__(
        self,
        app: ASGIApp,
        max_per_key: int,
        in_flight: InFlightRequests | None = None,
        prefixes: tuple[str, ...] = ("/v1/",),
    ):
        self.app = app
        self.max_per_key = max_per_key
        self.in_flight = in_flight if in_flight is not None else InFlightRequests()
        self.prefixes = prefixes

    @staticmethod
    def client_key(scope: Scope) -> str:
        authorization = header(scope, b"authorization")
        if authorization:
            return hash_api_key(authorization.strip().partition(" ")[2].strip())
        client = scope.get("client") or ("unknown", 0)
        return f"address:{client[0]}"

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(self.prefixes):
            return await self.app(scope, receive, send)
        key = self.client_key(scope)
        if self.in_flight.try_acquire(key, self.max_per_key) is None:
            message = (
                f"Too many concurrent requests for this API key ({self.in_flight.of(key)} in progress, "
                f"max_concurrent_requests={self.max_per_key}): wait for one to finish, then retry."
            )
            return await send_json(send, 429, error_body(429, "too_many_requests", message), {"Retry-After": "1"})
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight.release(key)
