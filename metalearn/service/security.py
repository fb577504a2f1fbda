"""Token check and body-size limit, as one ASGI middleware in front of every route.

With a token, a request passes with ``Authorization: Bearer <token>`` or with the cookie that
``/?token=<token>`` sets (HttpOnly, SameSite=Strict): page navigation and EventSource cannot
send headers, so browsers use the cookie, as Jupyter does. Bodies above the limit are refused
with 413 before the application reads them.

Web pages of other sites must not drive a server on this machine: requests that change
something are refused when their ``Origin`` is another host, and without a token only loopback
``Host`` names are served (a DNS-rebinding page would arrive under its own name).
"""

from __future__ import annotations

import hmac
import json
from urllib.parse import parse_qs, urlsplit

from starlette.exceptions import HTTPException

from metalearn.service.errors import error_body

COOKIE = "maml_token"
LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")
SAFE_METHODS = ("GET", "HEAD", "OPTIONS")


def _respond(status: int, message: str, headers: list[tuple[bytes, bytes]] = ()):
    body = json.dumps(error_body(message)).encode()
    start = {
        "type": "http.response.start",
        "status": status,
        "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            *headers,
        ],
    }
    return start, {"type": "http.response.body", "body": body}


def _hostname(host: str) -> str:
    """``127.0.0.1:8000`` -> ``127.0.0.1``; ``[::1]:8000`` -> ``::1``."""
    return (urlsplit(f"//{host}").hostname or "").lower()


def _cookie(header: str, name: str) -> str | None:
    for part in header.split(";"):
        key, _, value = part.strip().partition("=")
        if key == name:
            return value
    return None


class Guard:
    """ASGI middleware: authentication (if a token is set) and the request body limit."""

    def __init__(self, app, token: str | None, max_body_bytes: int):
        self.app, self.token, self.max_body_bytes = app, token, max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        refusal = self._foreign(scope["method"], headers)
        if refusal is not None:
            await self._send(send, 403, refusal)
            return
        set_cookie = None
        if self.token is not None:
            query = parse_qs(scope.get("query_string", b"").decode("latin-1"))
            via_query = self._matches((query.get("token") or [None])[0])
            if not (via_query or self._authorized(headers)):
                await self._send(
                    send, 401, "missing or wrong token", [(b"www-authenticate", b"Bearer")]
                )
                return
            if via_query:
                set_cookie = f"{COOKIE}={self.token}; HttpOnly; SameSite=Strict; Path=/".encode()
        length = headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > self.max_body_bytes):
            await self._send(send, 413, f"request body larger than {self.max_body_bytes} bytes")
            return
        receive = self._limited(receive, send)
        if set_cookie is not None:
            send = self._with_cookie(send, set_cookie)
        await self.app(scope, receive, send)

    def _foreign(self, method: str, headers: dict[str, str]) -> str | None:
        """Why a request from another site (or host name) is refused, or None."""
        host = headers.get("host", "")
        if self.token is None and _hostname(host) not in LOOPBACK_NAMES:
            return f"host name {host[:100]!r} is not served without --token"
        origin = headers.get("origin")
        if method not in SAFE_METHODS and origin is not None and urlsplit(origin).netloc != host:
            return "cross-site requests may not change anything"
        return None

    def _matches(self, given: str | None) -> bool:
        return given is not None and hmac.compare_digest(given.encode(), self.token.encode())

    def _authorized(self, headers: dict[str, str]) -> bool:
        scheme, _, credential = headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and self._matches(credential.strip()):
            return True
        return self._matches(_cookie(headers.get("cookie", ""), COOKIE))

    async def _send(self, send, status: int, message: str, headers=()):
        start, body = _respond(status, message, list(headers))
        await send(start)
        await send(body)

    def _limited(self, receive, send):
        """``receive`` that stops a body without Content-Length once it passes the limit."""
        seen = 0
        limit = self.max_body_bytes

        async def limited():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise BodyTooLarge(limit)
            return message

        return limited

    @staticmethod
    def _with_cookie(send, cookie: bytes):
        async def sending(message):
            if message["type"] == "http.response.start":
                message = {**message, "headers": [*message["headers"], (b"set-cookie", cookie)]}
            await send(message)

        return sending


class BodyTooLarge(HTTPException):
    """A streamed request body passed the limit (an HTTPException, so FastAPI answers 413)."""

    def __init__(self, limit: int):
        super().__init__(413, f"request body larger than {limit} bytes")
