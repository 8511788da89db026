"""A fault-injecting HTTP proxy for the test S3 server: what a flaky object store does to a run.

    proxy = FaultProxy(upstream="http://127.0.0.1:5000", fail_rate=0.1, drop_rate=0.05, seed=0)
    proxy.start(); ... Location("s3://bucket/x", endpoint_url=proxy.url) ...; proxy.stop()

Each request is read whole, then (seeded) answered with S3's 503 SlowDown, or its connection is
closed without an answer, or it is forwarded to the upstream server and the answer relayed.
`fail_always(predicate)` fails every request it matches (a permanent outage of some keys).
`counts` says what happened: forwarded, failed (503), dropped, and failed permanently.
"""

from __future__ import annotations

import http.client
import random
import threading
from collections import Counter
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

SLOW_DOWN = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
    b"<Message>Please reduce your request rate.</Message></Error>"
)
HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "proxy-connection"}


class FaultProxy:
    def __init__(self, upstream: str, fail_rate: float = 0.0, drop_rate: float = 0.0, seed: int = 0):
        parts = urlsplit(upstream)
        self.upstream = (parts.hostname, parts.port)
        self.fail_rate, self.drop_rate = fail_rate, drop_rate
        self.random = random.Random(seed)
        self.lock = threading.Lock()
        self.counts: Counter[str] = Counter()
        self.always: list[Callable[[str, str], bool]] = []
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), self._handler())
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"

    def fail_always(self, predicate: Callable[[str, str], bool]) -> None:
        """Answer 503 to every request whose (method, path) matches."""
        self.always.append(predicate)

    def start(self) -> FaultProxy:
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def _decide(self, method: str, path: str) -> str:
        with self.lock:
            if any(match(method, path) for match in self.always):
                outcome = "failed_permanently"
            else:
                draw = self.random.random()
                outcome = (
                    "failed"
                    if draw < self.fail_rate
                    else "dropped"
                    if draw < self.fail_rate + self.drop_rate
                    else "forwarded"
                )
            self.counts[outcome] += 1
            return outcome

    def _handler(self):
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args) -> None:  # quiet
                pass

            def _read_body(self) -> bytes:
                if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
                    body = b""
                    while True:
                        size = int(self.rfile.readline().split(b";")[0].strip(), 16)
                        if size == 0:
                            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                                pass  # trailers
                            return body
                        body += self.rfile.read(size)
                        self.rfile.readline()
                return self.rfile.read(int(self.headers.get("Content-Length") or 0))

            def _proxy(self) -> None:
                body = self._read_body()
                outcome = proxy._decide(self.command, self.path)
                if outcome == "dropped":
                    self.close_connection = True
                    self.connection.close()  # the request was sent, no answer comes back
                    return
                if outcome.startswith("failed"):
                    self.send_response(503)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(SLOW_DOWN)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(SLOW_DOWN)
                    return
                upstream = http.client.HTTPConnection(*proxy.upstream, timeout=60)
                headers = {k: v for k, v in self.headers.items() if k.lower() not in HOP_BY_HOP}
                if body or self.command in ("PUT", "POST"):
                    headers["Content-Length"] = str(len(body))
                upstream.request(self.command, self.path, body=body or None, headers=headers)
                answer = upstream.getresponse()
                data = answer.read()
                self.send_response(answer.status, answer.reason)
                head = self.command == "HEAD"  # its Content-Length is the object's size: keep it
                for key, value in answer.getheaders():
                    if key.lower() not in HOP_BY_HOP and (head or key.lower() != "content-length"):
                        self.send_header(key, value)
                if not head:
                    self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)
                upstream.close()

            do_GET = do_PUT = do_POST = do_DELETE = do_HEAD = _proxy

        return Handler
