"""A loopback HTTP server that records what is POSTed or PUT to it (a stand-in for a
Pushgateway and a webhook receiver), and helpers to read the pushed record."""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client.parser import text_string_to_metric_families


@dataclass
class Request:
    method: str
    path: str
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    def samples(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The text exposition body as {(name, sorted labels): value}."""
        out = {}
        for family in text_string_to_metric_families(self.body.decode()):
            for s in family.samples:
                out[(s.name, tuple(sorted(s.labels.items())))] = s.value
        return out


@dataclass
class Receiver:
    server: ThreadingHTTPServer
    requests: list[Request] = field(default_factory=list)

    @property
    def url(self) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}"

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def take(self) -> list[Request]:
        got, self.requests[:] = list(self.requests), []
        return got


def start_receiver() -> Receiver:
    """Serve on 127.0.0.1 (a free port) in a daemon thread; every request answers 200."""
    requests: list[Request] = []

    class Handler(BaseHTTPRequestHandler):
        def _record(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            body = self.rfile.read(length)
            requests.append(Request(self.command, self.path, dict(self.headers), body))
            self.send_response(200)
            self.send_header("Content-Length", "0")
            self.end_headers()

        do_POST = do_PUT = _record

        def log_message(self, *args: object) -> None:
            return None

    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return Receiver(server, requests)
