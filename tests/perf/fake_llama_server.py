"""A stand-in for llama.cpp's `llama-server` (its flags, /health, /v1/models, streamed completions).

The `--peer llama.cpp` tests run it through `--peer-binary`: it records its argv and every request
body as JSON lines in $FAKE_LLAMA_LOG, answers `--version` like the real one, and streams
`max_tokens` one-token chunks with a usage chunk at the end.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

ALLOC = bytearray(8 << 20)  # resident memory the bench can see (8 MiB, touched below)


def _record(entry: dict[str, Any]) -> None:
    path = os.environ.get("FAKE_LLAMA_LOG")
    if path:
        with open(path, "a", encoding="utf-8") as out:
            out.write(json.dumps(entry) + "\n")


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
        pass

    def _json(self, status: int, payload: dict[str, Any]) -> None:
        body = json.dumps(payload).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self) -> None:  # noqa: N802 - http.server's name
        if self.path == "/health":
            self._json(200, {"status": "ok"})
        elif self.path == "/v1/models":
            self._json(200, {"object": "list", "data": [{"id": "fake-llama.gguf"}]})
        else:
            self._json(404, {"error": {"message": "not found"}})

    def do_POST(self) -> None:  # noqa: N802 - http.server's name
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length", "0"))))
        _record({"path": self.path, "body": body})
        n = int(body.get("n_predict") or body.get("max_tokens") or 4)
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream")
        self.send_header("Connection", "close")
        self.end_headers()
        for _ in range(n):
            time.sleep(0.002)
            chunk = {"choices": [{"index": 0, "text": " tok"}]}
            self.wfile.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
            self.wfile.flush()
        usage = {"choices": [], "usage": {"prompt_tokens": 8, "completion_tokens": n}}
        self.wfile.write(b"data: " + json.dumps(usage).encode() + b"\n\ndata: [DONE]\n\n")
        self.wfile.flush()
        self.close_connection = True


def main() -> int:
    if "--version" in sys.argv:
        print("version: 4242 (fakecommit)\nbuilt with fake for testing")
        return 0
    _record({"argv": sys.argv[1:]})
    parser = argparse.ArgumentParser()
    parser.add_argument("-m", required=True)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args, _ = parser.parse_known_args()
    ALLOC[::4096] = b"\1" * len(ALLOC[::4096])
    ThreadingHTTPServer((args.host, args.port), Handler).serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
