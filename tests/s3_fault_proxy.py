"""A small fault-injecting reverse proxy for S3 over HTTP (stdlib only), put between a client and moto.

No maintained fault proxy is installed here (toxiproxy needs its Go server, mitmproxy is heavy and
absent), and S3 faults are about requests, not bytes on a wire: which operation, which key. So:

    with S3FaultProxy(s3_endpoint) as proxy:
        store = S3Store(bucket, endpoint_url=proxy.url, read_timeout=1)
        proxy.inject("slowdown", method="GET", key_pattern=r"^photos/", times=2)
        store.get("photos/1.jpg")                       # fails twice, then passes through
        proxy.stats.faults == {"slowdown": 2}; proxy.stats.requests == {"GET": 3}

Fault kinds (``FAULT_KINDS``):

- ``slowdown``: HTTP 503 with S3's ``SlowDown`` XML error body (S3's throttling reply);
- ``internal``: HTTP 500 ``InternalError``;
- ``reset``: the request is read, then the connection is closed with a TCP RST, no response;
- ``timeout``: the request is read, then nothing is sent for ``stall_s`` seconds (longer than the
  client's read timeout), then the connection is closed;
- ``truncate``: the real response is fetched, its headers sent with the full Content-Length, then
  only half of the body, and the connection is closed.

Faults are never forwarded upstream (except ``truncate``, which needs the real body), so a faulted
PUT did not happen. Requests are classified (path-style addressing, what botocore uses for an IP
endpoint) as ``GET`` (an object), ``LIST`` (a GET on the bucket: ListObjects[V2]), ``PUT``,
``HEAD``, ``POST`` or ``DELETE``; the key a rule's ``key_pattern`` is searched in is the object
key, or the ``prefix`` parameter of a LIST.
"""

from __future__ import annotations

import dataclasses
import http.client
import random
import re
import socket
import struct
import threading
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

FAULT_KINDS = ("slowdown", "internal", "reset", "timeout", "truncate")
OPERATIONS = ("GET", "LIST", "PUT", "HEAD", "POST", "DELETE")
_ERRORS = {"slowdown": (503, "Slow Down", "SlowDown", "Please reduce your request rate."),
           "internal": (500, "Internal Server Error", "InternalError",
                        "We encountered an internal error. Please try again.")}
_HOP_BY_HOP = {"connection", "keep-alive", "proxy-connection", "transfer-encoding", "te", "trailer", "upgrade",
               "expect", "content-length"}


@dataclasses.dataclass
class FaultRule:
    """One injected fault: ``kind`` for requests of ``method`` whose key matches ``key_pattern``.

    ``times``: how many requests it faults (None: until :meth:`S3FaultProxy.clear`);
    ``probability``: the chance a matching request is faulted (drawn from the proxy's seeded RNG).
    """

    kind: str
    method: str | None = None
    key_pattern: re.Pattern | None = None
    times: int | None = 1
    probability: float = 1.0
    fired: int = 0

    def matches(self, operation: str, key: str) -> bool:
        return ((self.times is None or self.fired < self.times)
                and (self.method is None or self.method == operation)
                and (self.key_pattern is None or self.key_pattern.search(key) is not None))


@dataclasses.dataclass
class ProxyStats:
    """A snapshot: requests seen by operation, faults injected by kind and by (operation, kind)."""

    requests: Counter
    faults: Counter
    faults_by_operation: Counter


class S3FaultProxy:
    """A threaded HTTP proxy in front of ``upstream_url`` that injects the faults it is told to."""

    def __init__(self, upstream_url: str, *, seed: int = 0, stall_s: float = 3.0, upstream_timeout_s: float = 30.0):
        upstream = urlsplit(upstream_url)
        if upstream.scheme != "http" or not upstream.hostname:
            raise ValueError(f"plain http://host:port upstream expected, got {upstream_url!r}")
        self.upstream = (upstream.hostname, upstream.port or 80)
        self.stall_s = stall_s
        self.upstream_timeout_s = upstream_timeout_s
        self.history: list[tuple[str, str, str | None]] = []  # (operation, key, fault kind or None)
        self._rules: list[FaultRule] = []
        self._random = random.Random(seed)
        self._requests: Counter = Counter()
        self._faults: Counter = Counter()
        self._faults_by_operation: Counter = Counter()
        self._lock = threading.Lock()
        self._stopping = threading.Event()
        self._server: _ProxyServer | None = None
        self._thread: threading.Thread | None = None

    # --- lifecycle ---------------------------------------------------------------------------

    def start(self) -> S3FaultProxy:
        server = _ProxyServer(("127.0.0.1", 0), _ProxyHandler)
        server.proxy = self
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="s3-fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes stalled handlers
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._thread.join(timeout=5)
            self._server = None

    def __enter__(self) -> S3FaultProxy:
        return self.start()

    def __exit__(self, *exc_info) -> None:
        self.stop()

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    # --- rules and counts --------------------------------------------------------------------

    def inject(self, kind: str, *, method: str | None = None, key_pattern: str | None = None,
               times: int | None = 1, probability: float = 1.0) -> FaultRule:
        """Fault the next ``times`` matching requests (None: all of them until :meth:`clear`).

        Rules are tried in the order they were added; the first that matches and fires wins.
        """
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault kind {kind!r}: one of {FAULT_KINDS}")
        if method is not None and method.upper() not in OPERATIONS:
            raise ValueError(f"unknown method {method!r}: one of {OPERATIONS}")
        rule = FaultRule(kind, method.upper() if method else None,
                         re.compile(key_pattern) if key_pattern is not None else None, times, probability)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        """Drop every rule: from now on requests pass through untouched."""
        with self._lock:
            self._rules.clear()

    @property
    def stats(self) -> ProxyStats:
        with self._lock:
            return ProxyStats(Counter(self._requests), Counter(self._faults), Counter(self._faults_by_operation))

    def reset_stats(self) -> None:
        with self._lock:
            self._requests.clear()
            self._faults.clear()
            self._faults_by_operation.clear()
            self.history.clear()

    def _decide(self, operation: str, key: str) -> str | None:
        """Count the request and pick its fault (None: pass it through)."""
        with self._lock:
            self._requests[operation] += 1
            kind = None
            for rule in self._rules:
                if rule.matches(operation, key) and (rule.probability >= 1 or
                                                     self._random.random() < rule.probability):
                    rule.fired += 1
                    kind = rule.kind
                    self._faults[kind] += 1
                    self._faults_by_operation[(operation, kind)] += 1
                    break
            self.history.append((operation, key, kind))
            return kind


def classify(method: str, target: str) -> tuple[str, str]:
    """(operation, key) of a path-style S3 request: ``GET /bucket?list-type=2&prefix=a/`` -> (LIST, a/)."""
    parts = urlsplit(target)
    bucket_and_key = parts.path.lstrip("/").split("/", 1)
    key = unquote(bucket_and_key[1]) if len(bucket_and_key) == 2 else ""
    if method == "GET" and not key:
        return "LIST", parse_qs(parts.query).get("prefix", [""])[0]
    return method, key


class _ProxyServer(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # a stalled handler must not hold up the test's teardown
    request_queue_size = 128  # a burst of concurrent GETs must not wait on a full accept queue
    proxy: S3FaultProxy


class _ProxyHandler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"  # keep-alive, and "Expect: 100-continue" answered as botocore expects
    timeout = 60  # an idle keep-alive connection's handler thread ends after this

    def log_message(self, format, *args):  # noqa: A002 - BaseHTTPRequestHandler's signature
        pass

    def do_GET(self):
        self._handle()

    do_PUT = do_HEAD = do_POST = do_DELETE = do_GET

    def _handle(self) -> None:
        proxy: S3FaultProxy = self.server.proxy
        body = self._read_body()  # always read first: a fault answers a whole request
        operation, key = classify(self.command, self.path)
        kind = proxy._decide(operation, key)
        if kind in _ERRORS:
            self._send_error(*_ERRORS[kind])
        elif kind == "reset":
            self._reset()
        elif kind == "timeout":
            proxy._stopping.wait(proxy.stall_s)
            self.close_connection = True
        else:
            status, reason, headers, data = self._forward(proxy, body)
            self._send(status, reason, headers, data, truncate=kind == "truncate")

    def _read_body(self) -> bytes | None:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            chunks = []
            while size := int(self.rfile.readline().split(b";", 1)[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):  # trailers
                pass
            return b"".join(chunks)
        length = self.headers.get("Content-Length")
        return self.rfile.read(int(length)) if length is not None else None

    def _forward(self, proxy: S3FaultProxy, body: bytes | None):
        headers = {name: value for name, value in self.headers.items() if name.lower() not in _HOP_BY_HOP}
        if body is not None:
            headers["Content-Length"] = str(len(body))
        connection = http.client.HTTPConnection(*proxy.upstream, timeout=proxy.upstream_timeout_s)
        try:
            connection.request(self.command, self.path, body=body, headers=headers)
            response = connection.getresponse()
            data = response.read()
            return response.status, response.reason, response.getheaders(), data
        finally:
            connection.close()

    def _send(self, status: int, reason: str, headers, data: bytes, *, truncate: bool = False) -> None:
        self.send_response_only(status, reason)
        for name, value in headers:
            if name.lower() not in _HOP_BY_HOP:
                self.send_header(name, value)
        if self.command == "HEAD":  # no body; the object's size is the upstream's Content-Length
            length = next((value for name, value in headers if name.lower() == "content-length"), "0")
            self.send_header("Content-Length", length)
            self.end_headers()
            return
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[:len(data) // 2] if truncate else data)
        if truncate:
            self.wfile.flush()
            self.close_connection = True

    def _send_error(self, status: int, reason: str, code: str, message: str) -> None:
        request_id = f"fault-{id(self):x}"
        body = (f'<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
                f"<Resource>{urlsplit(self.path).path}</Resource><RequestId>{request_id}</RequestId></Error>"
                ).encode()
        self.send_response_only(status, reason)
        self.send_header("Content-Type", "application/xml")
        self.send_header("x-amz-request-id", request_id)
        self.send_header("Content-Length", "0" if self.command == "HEAD" else str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def _reset(self) -> None:
        """Close with SO_LINGER 0: the kernel sends RST instead of FIN, the peer sees 'connection reset'."""
        self.close_connection = True
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()  # the descriptor goes when the handler's rfile closes, right after this
