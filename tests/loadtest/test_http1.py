"""http1, the load generator's HTTP/1.1 client, against a scripted asyncio server: framing (length,
chunked, end of connection), keep-alive reuse, a stale pooled connection dropped and the request sent
again, and every failure an HttpError. (The real server's streams: test_openloop.py, against a `serve`
subprocess.)"""

from __future__ import annotations

import asyncio
import json

import pytest

from matryoshka_lora.errors import ConfigError
from matryoshka_lora.loadtest.http1 import Http1Client, HttpError

OK_12 = b"HTTP/1.1 200 OK\r\ncontent-length: 12\r\n\r\nhello world!"


def chunked(*pieces: bytes) -> bytes:
    body = b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in pieces)
    return b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n" + body + b"0\r\nx-trailer: 1\r\n\r\n"


CHUNKED_SSE = chunked(b"data: 1", b"\n\nd", b"ata: 2\r\n\r\n", b"data:")  # lines split across chunks
UNTIL_CLOSE = b"HTTP/1.1 200 OK\r\n\r\nall of it"
CLOSE_HEADER = b"HTTP/1.1 429 Too Many Requests\r\nretry-after: 1\r\nconnection: close\r\ncontent-length: 2\r\n\r\n{}"
TRUNCATED = b"HTTP/1.1 200 OK\r\ncontent-length: 10\r\n\r\nhalf"
CLOSE, HANG = "close", "hang"  # after reading a request: drop the connection unanswered / never answer


class ScriptedServer:
    """Connection i answers its requests with script[i] in turn (bytes, CLOSE or HANG); a bytes answer
    without a length header is followed by closing the connection. Keeps every request it read."""

    def __init__(self, script: list[list]):
        self.script, self.requests, self.num_connections = script, [], 0

    async def __aenter__(self) -> str:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def __aexit__(self, *exc) -> None:
        self.server.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        answers = self.script[self.num_connections]
        self.num_connections += 1
        try:
            for answer in answers:
                head = await reader.readuntil(b"\r\n\r\n")
                length = next(
                    (
                        int(line.split(b":")[1])
                        for line in head.split(b"\r\n")
                        if line.lower().startswith(b"content-length:")
                    ),
                    0,
                )
                self.requests.append((head, await reader.readexactly(length)))
                if answer == HANG:
                    await asyncio.sleep(3600)
                if answer == CLOSE:
                    break
                writer.write(answer)
                await writer.drain()
                if b"content-length" not in answer and b"chunked" not in answer:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


def run(coro):
    return asyncio.run(asyncio.wait_for(coro, 30))


async def fetch(client: Http1Client, path: str = "/x") -> tuple[int, dict, bytes]:
    async with client.stream("POST", path, json={"a": 1}) as resp:
        return resp.status, resp.headers, await resp.aread()


@pytest.mark.parametrize(
    "answer, status, body, reused",
    [
        (OK_12, 200, b"hello world!", True),
        (CHUNKED_SSE, 200, b"data: 1\n\ndata: 2\r\n\r\ndata:", True),
        (UNTIL_CLOSE, 200, b"all of it", False),  # framed by the end of the connection
        (CLOSE_HEADER, 429, b"{}", False),  # the server asked to close
    ],
    ids=["content-length", "chunked", "until-close", "connection-close"],
)
def test_framing_and_keep_alive(answer, status, body, reused):
    async def go():
        server = ScriptedServer([[answer, answer], [answer, answer]])
        async with server as url, Http1Client(url) as client:
            first = await fetch(client)
            pooled = client.num_idle
            second = await fetch(client)
        return first, pooled, second, client.num_connects

    first, pooled, second, num_connects = run(go())
    assert first[0] == second[0] == status and first[2] == second[2] == body
    assert (pooled, num_connects) == ((1, 1) if reused else (0, 2))


def test_lines_of_a_chunked_stream_split_anywhere():
    async def go():
        async with ScriptedServer([[CHUNKED_SSE]]) as url, Http1Client(url) as client:
            async with client.stream("GET", "/s") as resp:
                return [line async for line in resp.aiter_lines()]

    assert run(go()) == ["data: 1", "", "data: 2", "", "data:"]


def test_the_request_carries_method_path_headers_and_json():
    async def go():
        server = ScriptedServer([[OK_12]])
        async with server as url, Http1Client(url + "/api/") as client:
            async with client.stream(
                "POST", "/generate", json={"prompt": "hi", "rank": 8}, headers={"authorization": "Bearer k"}
            ) as resp:
                await resp.aread()
        return url, server.requests

    url, [(head, body)] = run(go())
    lines = head.decode().split("\r\n")
    assert lines[0] == "POST /api/generate HTTP/1.1"
    assert {
        "host: " + url.removeprefix("http://"),
        "content-type: application/json",
        f"content-length: {len(body)}",
        "authorization: Bearer k",
    } <= set(lines)
    assert json.loads(body) == {"prompt": "hi", "rank": 8}


def test_a_pooled_connection_the_server_dropped_is_replaced_once():
    """The server reads the second request on the kept-alive connection and drops it unanswered (it had
    timed the connection out): the request goes again on a fresh one."""

    async def go():
        server = ScriptedServer([[OK_12, CLOSE], [OK_12]])
        async with server as url, Http1Client(url) as client:
            answers = [await fetch(client), await fetch(client)]
        return answers, client.num_connects, len(server.requests)

    answers, num_connects, num_requests = run(go())
    assert [a[2] for a in answers] == [b"hello world!"] * 2
    assert num_connects == 2 and num_requests == 3


@pytest.mark.parametrize(
    "script, timeout_s, match",
    [
        ([[CLOSE]], 10.0, "IncompleteReadError"),  # a fresh connection dropped: no retry
        ([[TRUNCATED]], 10.0, "4 of 10 body bytes|reading the answer"),
        ([[HANG]], 0.3, "no whole answer within 0.3 s"),
    ],
    ids=["dropped", "truncated", "timeout"],
)
def test_failures_are_http_errors(script, timeout_s, match):
    async def go():
        async with ScriptedServer(script) as url, Http1Client(url, timeout_s=timeout_s) as client:
            await fetch(client)

    with pytest.raises(HttpError, match=match):
        run(go())


def test_a_refused_connection_is_an_http_error():
    async def go():
        server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        server.close()
        await server.wait_closed()
        async with Http1Client(f"http://127.0.0.1:{port}") as client:
            await fetch(client)

    with pytest.raises(HttpError, match="Connect|refused"):
        run(go())


def test_an_answer_left_unread_closes_its_connection():
    async def go():
        server = ScriptedServer([[OK_12, OK_12], [OK_12]])
        async with server as url, Http1Client(url) as client:
            async with client.stream("GET", "/x") as resp:
                status = resp.status  # the body is never read
            await fetch(client)
        return status, client.num_connects

    assert run(go()) == (200, 2)


@pytest.mark.parametrize("url", ["https://example.com", "127.0.0.1:8000", "http://"])
def test_only_plain_http_urls(url):
    with pytest.raises(ConfigError):
        Http1Client(url)
