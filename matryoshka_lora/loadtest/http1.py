"""A small HTTP/1.1 client for the open-loop load generator: asyncio streams and a keep-alive pool.

The load generator runs on the same cores as the server it measures, so its CPU per request is taken
from the server. httpx spends ~5.8 ms of CPU per short request on the development machine, this client
~1.2 ms (what made a flooding tenant's refusals look expensive; docs/performance.md, "Tenants").

    async with Http1Client("http://127.0.0.1:8000") as client:
        async with client.stream("POST", "/generate", json=body, headers={"authorization": ...}) as resp:
            resp.status, resp.headers["retry-after"]        # header names in lower case
            async for line in resp.aiter_lines(): ...       # or: await resp.aread()

Only what the load tests need: `http://` URLs, JSON request bodies, responses framed by Content-Length,
chunked transfer coding or the end of the connection; no redirects, compression or proxies. A
connection returns to the pool when its response was read to the end and neither side asked to close;
a pooled connection the server has closed meanwhile (uvicorn drops idle ones after 5 s) is dropped and
the request sent again, on the next pooled or a fresh connection, when it fails before any byte of the
answer (a fresh connection is never retried). Each request (connect, send, whole
answer) is bounded by `timeout_s`. Every failure to get a whole answer is an `HttpError`.
"""

from __future__ import annotations

import asyncio
import json as jsonlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from urllib.parse import urlsplit

from matryoshka_lora.errors import ConfigError

_READ_SIZE = 64 * 1024
_TRANSPORT_ERRORS = (OSError, EOFError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError)


class HttpError(Exception):
    """No usable HTTP answer: refused or reset connection, timeout, malformed or truncated response."""


class HttpStatusError(HttpError):
    """An answer with an unexpected status (raised by callers that expect success)."""

    def __init__(self, status: int, body: str):
        super().__init__(f"{status}: {body[:500]}")
        self.status, self.body = status, body


class _StaleConnection(Exception):
    """A pooled connection failed before the first byte of the answer: the server had closed it."""


class _Connection:
    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter):
        self.reader, self.writer = reader, writer

    def close(self) -> None:
        self.writer.close()


class Response:
    """Status and headers of an answer; its body is read once, with `aread()` or `aiter_lines()`."""

    def __init__(self, status: int, headers: dict[str, str], conn: _Connection, keep_alive: bool):
        self.status, self.headers = status, headers
        self._conn, self._keep_alive = conn, keep_alive
        self.complete = False  # the whole body has been read
        chunked = "chunked" in headers.get("transfer-encoding", "").lower()
        length = headers.get("content-length")
        self._length = None if chunked or length is None else int(length)
        self._chunked = chunked
        if not chunked and length is None:
            self._keep_alive = False  # framed by the end of the connection

    @property
    def reusable(self) -> bool:
        return self.complete and self._keep_alive

    async def aiter_bytes(self) -> AsyncIterator[bytes]:
        try:
            async for piece in self._pieces():
                yield piece
        except _TRANSPORT_ERRORS as exc:
            raise HttpError(f"reading the answer: {exc!r}") from exc
        self.complete = True

    async def _pieces(self) -> AsyncIterator[bytes]:
        reader = self._conn.reader
        if self._chunked:
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";", 1)[0], 16)
                if size == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers, up to the blank line
                        pass
                    return
                data = await reader.readexactly(size + 2)
                yield data[:-2]
        elif self._length is not None:
            left = self._length
            while left > 0:
                data = await reader.read(min(left, _READ_SIZE))
                if not data:
                    raise EOFError(f"connection closed with {left} of {self._length} body bytes unread")
                left -= len(data)
                yield data
        else:
            while data := await reader.read(_READ_SIZE):
                yield data

    async def aread(self) -> bytes:
        return b"".join([piece async for piece in self.aiter_bytes()])

    async def aiter_lines(self) -> AsyncIterator[str]:
        """The body's lines (UTF-8, without their `\\n` or `\\r\\n`), blank lines included."""
        pending = b""
        async for piece in self.aiter_bytes():
            pending += piece
            *lines, pending = pending.split(b"\n")
            for line in lines:
                yield line.removesuffix(b"\r").decode("utf-8", errors="replace")
        if pending:
            yield pending.removesuffix(b"\r").decode("utf-8", errors="replace")


class Http1Client:
    """Keep-alive HTTP/1.1 connections to one `http://host:port` (see the module docstring)."""

    def __init__(self, base_url: str, timeout_s: float = 600.0, connect_timeout_s: float = 10.0):
        url = urlsplit(base_url)
        if url.scheme != "http" or not url.hostname:
            raise ConfigError("load-test URL", base_url, "http://HOST[:PORT]")
        self.host, self.port = url.hostname, url.port or 80
        self._host_header = url.netloc
        self._base_path = url.path.rstrip("/")
        self.timeout_s, self.connect_timeout_s = timeout_s, connect_timeout_s
        self._idle: list[_Connection] = []
        self.num_connects = 0  # connections opened (tests check the reuse)

    @property
    def num_idle(self) -> int:
        """Kept-alive connections waiting in the pool."""
        return len(self._idle)

    async def __aenter__(self) -> Http1Client:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        while self._idle:
            self._idle.pop().close()

    async def _connect(self) -> _Connection:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(self.host, self.port), self.connect_timeout_s)
        self.num_connects += 1
        return _Connection(reader, writer)

    def _request_bytes(self, method: str, path: str, json, headers: dict[str, str] | None) -> bytes:
        body = b"" if json is None else jsonlib.dumps(json, separators=(",", ":")).encode()
        lines = [f"{method} {self._base_path}{path} HTTP/1.1", f"host: {self._host_header}"]
        if json is not None:
            lines.append("content-type: application/json")
        if body or method in ("POST", "PUT", "PATCH"):
            lines.append(f"content-length: {len(body)}")
        lines += [f"{name}: {value}" for name, value in (headers or {}).items()]
        return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body

    async def _exchange(self, conn: _Connection, request: bytes, reused: bool) -> Response:
        """Send the request, read the status line and headers."""
        try:
            conn.writer.write(request)
            await conn.writer.drain()
            head = await conn.reader.readuntil(b"\r\n\r\n")
        except (ConnectionError, asyncio.IncompleteReadError) as exc:
            partial = getattr(exc, "partial", b"")
            if reused and not partial:
                raise _StaleConnection from exc
            raise
        status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
        version, status = status_line.split(" ", 2)[:2]
        headers = {}
        for line in header_lines:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        keep_alive = version == "HTTP/1.1" and headers.get("connection", "").lower() != "close"
        return Response(int(status), headers, conn, keep_alive)

    @asynccontextmanager
    async def stream(
        self, method: str, path: str, json=None, headers: dict[str, str] | None = None
    ) -> AsyncIterator[Response]:
        """One request; the answer's body is read inside the block. Raises HttpError (never for a status)."""
        request = self._request_bytes(method, path, json, headers)
        response = None
        try:
            async with asyncio.timeout(self.timeout_s):
                try:
                    response = await self._open(request)
                except _TRANSPORT_ERRORS as exc:
                    raise HttpError(f"{method} {path}: {exc!r}") from exc
                yield response
        except TimeoutError as exc:
            raise HttpError(f"{method} {path}: no whole answer within {self.timeout_s:g} s") from exc
        finally:
            if response is not None:
                if response.reusable:
                    self._idle.append(response._conn)
                else:
                    response._conn.close()

    async def _open(self, request: bytes) -> Response:
        while self._idle:
            conn = self._idle.pop()
            if conn.reader.at_eof():
                conn.close()
                continue
            try:
                return await self._exchange(conn, request, reused=True)
            except _StaleConnection:
                conn.close()
            except BaseException:
                conn.close()
                raise
        conn = await self._connect()
        try:
            return await self._exchange(conn, request, reused=False)
        except BaseException:
            conn.close()
            raise
