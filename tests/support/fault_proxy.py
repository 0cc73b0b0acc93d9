"""A fault-injecting HTTP reverse proxy in front of an S3 endpoint, for tests and drills.

Why it exists: the retries and the commit protocol only matter when S3 misbehaves, and the
local endpoint (moto_server, jobs.support.local_s3) never does. This proxy sits between the clients
(s3fs/aiobotocore, pyarrow's AWS SDK, boto3) and that endpoint, on loopback, and forwards every
request unchanged, except that it may, with seeded probabilities set per request class
(reads: GET/HEAD; writes: PUT/POST/DELETE):

- answer ``503 SlowDown`` itself, with the XML error body S3 sends when it throttles, without
  forwarding the request (so the failed write never happens);
- stall: hold the request, unanswered and unforwarded, for ``stall_s`` seconds (longer than
  the client's read timeout), then drop the connection, as a lost packet or a hung server would.

Nothing in the jobs knows it exists: point AWS_ENDPOINT_URL at ``proxy.url`` instead of the
endpoint. Forwarding is faithful: headers (Host included, so signatures still match) and bodies
byte for byte, request bodies framed as the client framed them (Content-Length, or
``Transfer-Encoding: chunked`` relayed chunk by chunk, which also carries ``aws-chunked``
payloads with trailing checksums untouched); response bodies are streamed with their
Content-Length, or re-chunked when the endpoint chunked them.

The fate of a request depends only on the seed and its position in its class: the k-th read
(or write) the proxy sees is always failed, stalled or forwarded alike, so the number of faults
injected into a given number of requests is reproducible even though concurrent clients may
reach the proxy in a different order on each run.

    with LocalS3() as s3, FaultProxy(s3.endpoint, seed=7) as proxy:
        proxy.set_faults(read_error=0.2, write_error=0.2)
        os.environ["AWS_ENDPOINT_URL"] = proxy.url
        ...
        assert proxy.injected_total() > 0
"""

from __future__ import annotations

import hashlib
import http.client
import logging
import re
import threading
from collections import Counter
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

READS = frozenset({"GET", "HEAD"})
WRITES = frozenset({"PUT", "POST", "DELETE"})
# Hop-by-hop headers (RFC 9110 7.6.1) are the proxy's own business, never forwarded. Expect is
# answered here (the request handler sends "100 Continue" before the body is read).
HOP_BY_HOP = frozenset({"connection", "keep-alive", "proxy-connection", "proxy-authenticate",
                        "proxy-authorization", "te", "trailer", "upgrade", "expect"})
PIECE = 64 * 1024


@dataclass(frozen=True)
class Faults:
    """Probabilities, per request, of each fault; error + stall of a class must be <= 1."""

    read_error: float = 0.0     # GET/HEAD answered 503 SlowDown
    write_error: float = 0.0    # PUT/POST/DELETE answered 503 SlowDown (the write is not applied)
    read_stall: float = 0.0     # GET/HEAD held for stall_s, then the connection is dropped
    write_stall: float = 0.0    # PUT/POST/DELETE likewise (the write is not applied)
    stall_s: float = 5.0        # make it longer than the client's read timeout
    path: str = ""              # optional regex: only requests whose path (no query) matches are faulted

    def check(self) -> "Faults":
        for kind in ("read", "write"):
            error, stall = getattr(self, f"{kind}_error"), getattr(self, f"{kind}_stall")
            if not (0 <= error <= 1 and 0 <= stall <= 1 and error + stall <= 1):
                raise ValueError(f"{kind}_error={error} and {kind}_stall={stall}: each within [0, 1], summing to <= 1")
        if self.stall_s < 0:
            raise ValueError(f"stall_s={self.stall_s}: must be >= 0")
        re.compile(self.path)
        return self


def slowdown_body(request_id: str) -> bytes:
    return ('<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>SlowDown</Code>'
            '<Message>Please reduce your request rate.</Message>'
            f'<RequestId>{request_id}</RequestId><HostId>fault-proxy</HostId></Error>').encode()


class FaultProxy:
    def __init__(self, target: str, seed: int = 0, faults: Faults | None = None, host: str = "127.0.0.1",
                 port: int = 0):
        parts = urlsplit(target)
        if parts.scheme != "http" or not parts.hostname:
            raise ValueError(f"target {target!r}: expected http://host:port (a local endpoint; no TLS)")
        self.target = (parts.hostname, parts.port or 80)
        self.seed = seed
        self.faults = (faults or Faults()).check()
        self._bind = (host, port)
        self._lock = threading.Lock()
        self._seen: Counter = Counter()          # requests seen per class ("read", "write")
        self.injected: Counter = Counter()       # (fault, class, method) -> count; fault: "503" | "stall"
        self.forwarded: Counter = Counter()      # method -> requests forwarded to the endpoint
        self.log: list[tuple[str, str, str]] = []  # (method, path, outcome), in arrival order
        self._stopping = threading.Event()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ---- control ----------------------------------------------------------------------------

    @property
    def url(self) -> str:
        if not self._server:
            raise RuntimeError("the proxy is not started")
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def set_faults(self, **changes) -> Faults:
        """Change some fault settings (the others keep their values); returns the new settings."""
        new = replace(self.faults, **changes).check()
        with self._lock:
            self.faults = new
        return new

    def heal(self) -> None:
        """No more faults from now on (counters are kept)."""
        self.set_faults(read_error=0.0, write_error=0.0, read_stall=0.0, write_stall=0.0)

    def injected_total(self, fault: str | None = None, kind: str | None = None) -> int:
        with self._lock:
            return sum(n for (f, k, _), n in self.injected.items()
                       if (fault is None or f == fault) and (kind is None or k == kind))

    def start(self) -> "FaultProxy":
        proxy = self

        class Handler(_Handler):
            owner = proxy

        self._stopping.clear()
        self._server = ThreadingHTTPServer(self._bind, Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, kwargs={"poll_interval": 0.1},
                                        name="fault-proxy", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stopping.set()  # wakes stalled requests
        if self._server:
            self._server.shutdown()
            self._server.server_close()
        if self._thread:
            self._thread.join(timeout=10)
        self._server = self._thread = None

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    # ---- the fate of one request ------------------------------------------------------------

    def _decide(self, method: str, path: str) -> str:
        """'forward', '503' or 'stall' for this request, from the seed and its position in its class."""
        kind = "read" if method in READS else "write" if method in WRITES else None
        with self._lock:
            faults = self.faults
            if kind is None or (faults.path and not re.search(faults.path, path)):
                outcome = "forward"
            else:
                k = self._seen[kind]
                self._seen[kind] += 1
                digest = hashlib.blake2b(f"{self.seed}|{kind}|{k}".encode(), digest_size=8).digest()
                u = int.from_bytes(digest, "big") / 2**64
                error, stall = getattr(faults, f"{kind}_error"), getattr(faults, f"{kind}_stall")
                outcome = "503" if u < error else "stall" if u < error + stall else "forward"
                if outcome != "forward":
                    self.injected[(outcome, kind, method)] += 1
            if outcome == "forward":
                self.forwarded[method] += 1
            self.log.append((method, path, outcome))
            return outcome


class _Handler(BaseHTTPRequestHandler):
    owner: FaultProxy
    protocol_version = "HTTP/1.1"  # keep-alive, as S3 clients expect; 100-continue handled by the base class

    def log_message(self, format, *args):  # noqa: A002 (the base class's name)
        log.debug("%s %s", self.address_string(), format % args)

    def do_GET(self):
        self._handle()

    do_HEAD = do_PUT = do_POST = do_DELETE = do_OPTIONS = do_PATCH = do_GET

    # ---- request body ------------------------------------------------------------------------

    def _is_chunked(self) -> bool:
        return "chunked" in self.headers.get("Transfer-Encoding", "").lower()

    def _body_pieces(self):
        """The request body as the client framed it: raw chunked framing (sizes, extensions,
        trailers) when it sent Transfer-Encoding: chunked, else Content-Length bytes."""
        if self._is_chunked():
            while True:
                line = self.rfile.readline(65537)
                if not line.endswith(b"\r\n"):
                    raise ValueError("malformed chunk size line")
                yield line
                size = int(line.split(b";", 1)[0].strip(), 16)
                if size == 0:
                    while True:  # trailers, then the empty line
                        trailer = self.rfile.readline(65537)
                        yield trailer
                        if trailer in (b"\r\n", b"\n", b""):
                            return
                remaining = size + 2  # data, then CRLF
                while remaining:
                    piece = self.rfile.read(min(remaining, PIECE))
                    if not piece:
                        raise ConnectionError("client closed mid-chunk")
                    remaining -= len(piece)
                    yield piece
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining:
                piece = self.rfile.read(min(remaining, PIECE))
                if not piece:
                    raise ConnectionError("client closed mid-body")
                remaining -= len(piece)
                yield piece

    # ---- one request -------------------------------------------------------------------------

    def _handle(self):
        owner = self.owner
        path = self.path.split("?", 1)[0]
        outcome = owner._decide(self.command, path)
        if outcome == "stall":
            # Never forwarded, never answered: the client times out and retries (or gives up).
            owner._stopping.wait(owner.faults.stall_s)
            self.close_connection = True
            return
        if outcome == "503":
            for _ in self._body_pieces():  # drain it, so the connection stays usable
                pass
            request_id = f"FAULT{sum(owner.injected.values()):08d}"
            body = b"" if self.command == "HEAD" else slowdown_body(request_id)
            self.send_response_only(503, "Slow Down")
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.send_header("x-amz-request-id", request_id)
            self.end_headers()
            if body:
                self.wfile.write(body)
            return
        self._forward()

    def _forward(self):
        upstream = http.client.HTTPConnection(*self.owner.target, timeout=300)
        answered = False
        try:
            upstream.putrequest(self.command, self.path, skip_host=True, skip_accept_encoding=True)
            for name, value in self.headers.items():  # order and repeats kept; Host as sent
                if name.lower() not in HOP_BY_HOP:
                    upstream.putheader(name, value)
            upstream.endheaders()
            for piece in self._body_pieces():
                upstream.send(piece)
            response = upstream.getresponse()
            self.send_response_only(response.status, response.reason)
            length = response.getheader("Content-Length")
            for name, value in response.getheaders():
                if name.lower() not in HOP_BY_HOP and name.lower() != "transfer-encoding":
                    self.send_header(name, value)
            bodiless = self.command == "HEAD" or response.status in (204, 304) or 100 <= response.status < 200
            rechunk = not bodiless and length is None
            if rechunk:  # the endpoint chunked it (or ends it by closing): chunk it again
                self.send_header("Transfer-Encoding", "chunked")
            self.end_headers()
            answered = True
            while True:
                piece = response.read(PIECE)
                if not piece:
                    break
                if rechunk:
                    self.wfile.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                else:
                    self.wfile.write(piece)
            if rechunk:
                self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
        except (OSError, http.client.HTTPException, ValueError) as exc:
            # The endpoint is gone or the client spoke nonsense: answer 502 if nothing was sent yet.
            log.warning("fault proxy: %s %s failed: %s", self.command, self.path, exc)
            self.close_connection = True
            try:
                if not answered:
                    self.send_response_only(502, "Bad Gateway")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
            except OSError:
                pass
        finally:
            upstream.close()
