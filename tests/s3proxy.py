"""A fault-injecting HTTP proxy on 127.0.0.1 in front of the test S3 server.

For a seeded fraction of requests it answers ``503 SlowDown`` (S3's throttling reply) or
resets the connection (TCP RST) instead of forwarding; requests whose path holds one of
``always_fail`` are refused every time. Everything else is forwarded byte for byte with its
original ``Host`` header, so SigV4 signatures stay valid. Counts of what it did are kept.
"""

from __future__ import annotations

import http.client
import random
import socket
import struct
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?><Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
_HOP = {"connection", "keep-alive", "transfer-encoding", "expect", "proxy-connection"}


class FaultProxy:
    """Start with `start()`; point clients at `endpoint`; `stop()` when done."""

    def __init__(self, upstream: str, *, slow_down: float = 0.0, reset: float = 0.0, seed: int = 0):
        self.upstream = urlsplit(upstream)
        self.slow_down, self.reset = slow_down, reset
        self.always_fail: list[str] = []
        self.counts: Counter[str] = Counter()
        self._random, self._lock = random.Random(seed), threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self._server.server_address[1]}"

    def start(self) -> FaultProxy:
        threading.Thread(target=self._server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def decide(self, path: str) -> str:
        """'slow_down', 'reset' or 'forward' for one request (counted)."""
        with self._lock:
            roll = self._random.random()
            if any(key in path for key in self.always_fail) or roll < self.slow_down:
                action = "slow_down"
            elif roll < self.slow_down + self.reset:
                action = "reset"
            else:
                action = "forward"
            self.counts[action] += 1
            return action


def _handler(proxy: FaultProxy) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def _body(self) -> bytes | None:
            if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                raw = b""
                while True:
                    line = self.rfile.readline()
                    raw += line
                    size = int(line.split(b";")[0], 16)
                    raw += self.rfile.read(size + 2)
                    if size == 0:
                        return raw
            length = int(self.headers.get("Content-Length") or 0)
            return self.rfile.read(length) if length else None

        def _proxy(self) -> None:
            body = self._body()
            action = proxy.decide(self.path)
            if action == "reset":
                linger = struct.pack("ii", 1, 0)  # close with RST, as a dropped connection
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, linger)
                self.close_connection = True
                return
            if action == "slow_down":
                self._reply(503, {"Content-Type": "application/xml"}, SLOW_DOWN)
                return
            status, headers, data = self._forward(body)
            self._reply(status, headers, data)

        def _forward(self, body: bytes | None) -> tuple[int, dict[str, str], bytes]:
            up = proxy.upstream
            conn = http.client.HTTPConnection(up.hostname, up.port, timeout=60)
            try:
                conn.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
                for key, value in self.headers.items():
                    if key.lower() not in _HOP:
                        conn.putheader(key, value)
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    conn.putheader("Transfer-Encoding", "chunked")
                conn.endheaders(body)
                resp = conn.getresponse()
                data = resp.read()
                headers = {k: v for k, v in resp.getheaders() if k.lower() not in _HOP}
                return resp.status, headers, data
            finally:
                conn.close()

        def _reply(self, status: int, headers: dict[str, str], data: bytes) -> None:
            self.send_response(status)
            length = str(len(data))
            for key, value in headers.items():
                if key.lower() == "content-length":
                    length = value if self.command == "HEAD" else length
                else:
                    self.send_header(key, value)
            self.send_header("Content-Length", length)
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(data)

        do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _proxy

    return Handler
