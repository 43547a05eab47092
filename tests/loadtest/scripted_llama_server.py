"""A scripted stand-in for llama.cpp's llama-server (the flags the peer passes, GET /health, streamed
POST /v1/completions with a final usage chunk), for testing loadtest/llama_cpp.py without the build.

Each request body is appended as one JSON line to $SCRIPTED_LLAMA_LOG; its argv to $SCRIPTED_LLAMA_LOG.argv.
"""

from __future__ import annotations

import argparse
import json
import os
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args) -> None:
        pass

    def do_GET(self) -> None:
        body = b'{"status":"ok"}'
        self.send_response(200 if self.path == "/health" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _chunk(self, data: bytes) -> None:
        self.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")

    def do_POST(self) -> None:
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        with open(os.environ["SCRIPTED_LLAMA_LOG"], "a", encoding="utf-8") as f:
            f.write(json.dumps(body) + "\n")
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for _ in range(body["max_tokens"]):
            self._chunk(b'data: {"choices":[{"text":"x","index":0}]}\n\n')
        usage = {"prompt_tokens": 128, "completion_tokens": body["max_tokens"]}
        self._chunk(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        self._chunk(b"data: [DONE]\n\n")
        self._chunk(b"")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--host", default="127.0.0.1")
    args, _ = parser.parse_known_args()
    with open(os.environ["SCRIPTED_LLAMA_LOG"] + ".argv", "w", encoding="utf-8") as f:
        json.dump(os.sys.argv[1:], f)
    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()


if __name__ == "__main__":
    main()
