"""Real servers on 127.0.0.1 for the remote-source tests: nginx, moto's S3, a fault proxy.

The pytest fixtures built on them (``nginx``, ``s3``, ``s3_env``, ``remote_dataset``) are in
``conftest.py``.
Everything is session-scoped and listens on a free loopback port; nothing leaves the machine.

- ``remote_dataset``: a small format-v1 dataset folder (3 shards) built once per session.
- ``nginx``: nginx serving that folder's parent (range requests, ``daemon off``, all paths in
  a temp folder). Skipped with a clear reason where nginx is not installed; CI installs it.
- ``s3``: moto's S3 server holding the same folder in a bucket; the fixture ``s3_env`` sets the
  standard AWS variables (``AWS_ENDPOINT_URL``, fake keys, region) for one test.
- ``FaultProxy``: a threaded TCP proxy that cuts (RST) or stalls connections after N bytes.

These servers are also used by ``benchmarks/bench_stream.py`` (the classes, not the fixtures).
"""

from __future__ import annotations

import http.client
import http.server
import os
import shutil
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
from typing import List, Optional

import numpy as np

__all__ = [
    "free_port",
    "NginxServer",
    "MotoS3Server",
    "FaultProxy",
    "make_dataset",
    "S3FaultProxy",
    "find_nginx",
    "ScriptedHTTPServer",
    "DATASET_NAME",
    "BUCKET",
    "two_dataset_config",
]

DATASET_NAME = "ds"
BUCKET = "wds-test"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_port(port: int, proc: Optional[subprocess.Popen] = None, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"server exited with code {proc.returncode} before listening")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise RuntimeError(f"nothing listens on 127.0.0.1:{port} after {timeout}s")


# --- datasets ---------------------------------------------------------------------------------


def make_dataset(
    out_dir: str,
    num_samples: int = 300,
    max_samples: int = 100,
    seed: int = 0,
    min_tokens: int = 20,
    max_tokens: int = 400,
    key_prefix: str = "s",
) -> str:
    """A format-v1 dataset with random tokens, labels and metadata; returns the manifest path."""
    from wds_tools.merge import merge
    from wds_tools.writer import ShardWriter

    rng = np.random.default_rng(seed)
    with ShardWriter(out_dir, vocab_size=65536, max_samples=max_samples, tokenizer="test-tokenizer") as w:
        for i in range(num_samples):
            n = int(rng.integers(min_tokens, max_tokens + 1))
            ids = rng.integers(0, 65536, n)
            labels = np.where(np.arange(n) >= n // 3, ids, -100)
            w.write(f"{key_prefix}{i:07d}", ids, labels=labels, meta={"i": i, "seed": seed})
    merge(out_dir)
    return os.path.join(out_dir, "index.json")


# --- nginx ------------------------------------------------------------------------------------


def find_nginx() -> Optional[str]:
    return shutil.which("nginx") or next(
        (
            p
            for p in ("/usr/sbin/nginx", "/usr/local/sbin/nginx", "/usr/local/nginx/sbin/nginx")
            if os.path.exists(p)
        ),
        None,
    )


_NGINX_CONF = """\
{user}
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/client_body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    types {{ application/json json; application/x-tar tar; }}
    default_type application/octet-stream;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 100000;
    server {{
        listen 127.0.0.1:{port};
        root {root};
        location / {{ }}
    }}
}}
"""


class NginxServer:
    """nginx serving ``root`` at ``http://127.0.0.1:PORT/`` (a non-daemon child process)."""

    def __init__(self, root: str, port: Optional[int] = None):
        self.binary = find_nginx()
        if self.binary is None:
            raise FileNotFoundError("nginx is not installed (apt-get install -y nginx)")
        self.root, self.port = os.path.abspath(root), port or free_port()
        self.tmp = tempfile.mkdtemp(prefix="wds_nginx_")
        self.proc: Optional[subprocess.Popen] = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "NginxServer":
        # as root, nginx workers would drop to 'nobody', who cannot read a 0700 temp folder
        user = "user root root;" if os.geteuid() == 0 else ""
        conf = os.path.join(self.tmp, "nginx.conf")
        with open(conf, "w") as f:
            f.write(_NGINX_CONF.format(user=user, tmp=self.tmp, port=self.port, root=self.root))
        self.proc = subprocess.Popen(
            [self.binary, "-p", self.tmp, "-c", conf], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        try:
            _wait_port(self.port, self.proc)
        except RuntimeError as e:
            err = self.proc.stderr.read().decode(errors="replace") if self.proc.poll() is not None else ""
            self.stop()
            raise RuntimeError(f"nginx did not start: {e}\n{err}") from None
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None
        shutil.rmtree(self.tmp, ignore_errors=True)

    def __enter__(self) -> "NginxServer":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --- moto S3 ----------------------------------------------------------------------------------

FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "testing-key-id",
    "AWS_SECRET_ACCESS_KEY": "testing-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_SESSION_TOKEN": "testing-session-token",
}


class MotoS3Server:
    """moto's S3 server on ``127.0.0.1:PORT``; ``env`` holds the AWS variables that point boto3
    at it. In-process threads by default; ``process=True`` runs ``python -m moto.server`` as a
    child process instead (benchmarks: the server then does not share the reader's GIL)."""

    def __init__(self, port: Optional[int] = None, process: bool = False):
        self.port = port or free_port()
        self.proc: Optional[subprocess.Popen] = None
        self._server = None
        if not process:
            from moto.server import ThreadedMotoServer

            self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    @property
    def endpoint(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict:
        return dict(FAKE_AWS_ENV, AWS_ENDPOINT_URL=self.endpoint)

    def start(self) -> "MotoS3Server":
        if self._server is not None:
            self._server.start()
        else:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(self.port)],
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        _wait_port(self.port, self.proc, timeout=30)
        return self

    def stop(self) -> None:
        if self._server is not None:
            self._server.stop()
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def client(self):
        import boto3

        return boto3.session.Session(
            aws_access_key_id=FAKE_AWS_ENV["AWS_ACCESS_KEY_ID"],
            aws_secret_access_key=FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
            region_name=FAKE_AWS_ENV["AWS_DEFAULT_REGION"],
        ).client("s3", endpoint_url=self.endpoint)

    def upload_folder(self, folder: str, bucket: str, prefix: str) -> None:
        c = self.client()
        try:
            c.create_bucket(Bucket=bucket)
        except c.exceptions.BucketAlreadyOwnedByYou:
            pass
        for name in sorted(os.listdir(folder)):
            path = os.path.join(folder, name)
            if os.path.isfile(path):
                c.upload_file(path, bucket, f"{prefix}/{name}")

    def __enter__(self) -> "MotoS3Server":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


# --- fault proxy ------------------------------------------------------------------------------


class FaultProxy:
    """A TCP proxy to ``127.0.0.1:target_port`` that breaks server->client streams.

    Each of the first ``faults`` connections that carry more than ``after_bytes`` response bytes
    is broken at that point: ``mode="cut"`` resets both sides (RST), ``mode="stall"`` stops
    forwarding and holds the connection open (a stalled server), ``mode="close"`` ends the
    response early with an orderly FIN (a truncated body), ``mode="trickle"`` forwards the next
    ``trickle_span`` bytes in ``trickle_bytes`` pieces every ``trickle_delay`` seconds (a slow
    link that never stalls long enough to time out), then normally until ``after_bytes`` more
    (the next fault). Later connections pass through.
    ``faults_done`` counts the faults injected.
    """

    def __init__(
        self,
        target_port: int,
        after_bytes: int = 100_000,
        faults: int = 3,
        mode: str = "cut",
        trickle_bytes: int = 4096,
        trickle_delay: float = 0.01,
        trickle_span: int = 32768,
    ):
        if mode not in ("cut", "stall", "close", "trickle"):
            raise ValueError("mode must be 'cut', 'stall', 'close' or 'trickle'")
        self.target_port, self.after_bytes, self.faults, self.mode = (target_port, after_bytes, faults, mode)
        self.trickle_bytes, self.trickle_delay, self.trickle_span = (
            trickle_bytes,
            trickle_delay,
            trickle_span,
        )
        self.faults_done = 0
        self.connections = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sock = socket.socket()
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self._sock.bind(("127.0.0.1", 0))
        self._sock.listen(64)
        self.port = self._sock.getsockname()[1]
        self._open: List[socket.socket] = []
        self._thread = threading.Thread(target=self._accept, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "FaultProxy":
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._sock.close()
        with self._lock:
            for s in self._open:
                _hard_close(s)
            self._open.clear()

    def __enter__(self) -> "FaultProxy":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()

    def _accept(self) -> None:
        while not self._stop.is_set():
            try:
                client, _ = self._sock.accept()
            except OSError:
                return
            try:
                upstream = socket.create_connection(("127.0.0.1", self.target_port))
            except OSError:
                _hard_close(client)
                continue
            with self._lock:
                self.connections += 1
                self._open += [client, upstream]
            threading.Thread(target=self._pipe, args=(client, upstream, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(upstream, client, True), daemon=True).start()

    def _take_fault(self) -> bool:
        with self._lock:
            if self.faults_done < self.faults:
                self.faults_done += 1
                return True
            return False

    def _pipe(self, src: socket.socket, dst: socket.socket, response: bool) -> None:
        sent, armed = 0, response
        try:
            while not self._stop.is_set():
                data = src.recv(65536)
                if not data:
                    break
                if armed and sent + len(data) > self.after_bytes:
                    if self._take_fault():
                        dst.sendall(data[: max(0, self.after_bytes - sent)])
                        if self.mode == "trickle":  # a slow stretch, then normal again
                            if not self._trickle(src, dst, data[max(0, self.after_bytes - sent) :]):
                                break
                            sent = 0
                            continue
                        if self.mode == "close":  # orderly FIN: the body ends short
                            for s in (dst, src):
                                try:
                                    s.shutdown(socket.SHUT_RDWR)
                                except OSError:
                                    pass
                                s.close()
                            return
                        if self.mode == "stall":
                            self._stop.wait()  # hold the connection open, send nothing
                        _hard_close(src)
                        _hard_close(dst)
                        return
                    armed = False
                dst.sendall(data)
                sent += len(data)
        except OSError:
            pass
        try:
            dst.shutdown(socket.SHUT_WR)
        except OSError:
            pass

    def _trickle(self, src: socket.socket, dst: socket.socket, pending: bytes) -> bool:
        """``trickle_span`` bytes of this connection, slowly (``trickle_bytes`` every
        ``trickle_delay`` s); False when the upstream closed meanwhile."""
        left = self.trickle_span
        while not self._stop.is_set() and left > 0:
            if not pending:
                pending = src.recv(min(65536, left))
                if not pending:
                    return False
            piece, pending = (
                pending[: min(self.trickle_bytes, left)],
                pending[min(self.trickle_bytes, left) :],
            )
            dst.sendall(piece)
            left -= len(piece)
            time.sleep(self.trickle_delay)
        if pending:
            dst.sendall(pending)
        return True


def _hard_close(s: socket.socket) -> None:
    """Close with RST (SO_LINGER 0), like a crashed peer or a middlebox dropping the flow."""
    try:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        # wake a thread blocked in recv() on this socket, or close() would wait for it
        s.shutdown(socket.SHUT_RD)
    except OSError:
        pass
    try:
        s.close()
    except OSError:
        pass


# --- a scripted HTTP server --------------------------------------------------------------------


class _QuietHandler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *a):
        pass


class _ThreadedHTTP:
    """A threaded HTTP server on 127.0.0.1 (free port), started by ``with``.

    Fault schedule shared by the subclasses: ``fail_all`` fails every request, ``fail_every=N``
    (> 0) every N-th; failures take the next code of ``fail_codes`` (cycled) and count in
    ``errors_sent``."""

    fail_all, fail_every, fail_codes, errors_sent = False, 0, [500], 0

    def _periodic_fault(self, n: int) -> Optional[int]:
        """The status for the ``n``-th request (1-based) by the schedule, or None to serve it.
        Callers hold their own lock."""
        if self.fail_all or (self.fail_every and n % self.fail_every == 0):
            code = self.fail_codes[self.errors_sent % len(self.fail_codes)]
            self.errors_sent += 1
            return code
        return None

    def _serve(self, handler) -> None:
        self._httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self.port = self._httpd.server_address[1]
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()


class ScriptedHTTPServer(_ThreadedHTTP):
    """A small threaded HTTP server over ``root`` whose answers follow a script.

    ``errors``: status codes returned (with ``Retry-After: 0``) by the first requests, in
    order; then files are served normally. ``fail_every=N`` (> 0) also answers every N-th
    request with the next code of ``fail_codes`` (cycled); ``fail_all=True`` answers every
    request with them (a server that never recovers). ``honour_ranges=False`` answers every
    GET with the whole file and 200, like a server without range support. ``requests`` logs
    (method, path, Range header); ``errors_sent`` counts the error answers given. Files
    deleted from ``root`` are 404 from then on (a shard that vanishes). ``allow_head=False``
    answers HEAD with 405 Method Not Allowed, like some object gateways.
    """

    def __init__(
        self,
        root: str,
        errors=(),
        honour_ranges: bool = True,
        fail_every: int = 0,
        fail_codes=(500, 503),
        fail_all: bool = False,
        allow_head: bool = True,
    ):
        outer = self
        self.root, self.errors, self.honour_ranges = root, list(errors), honour_ranges
        self.allow_head = allow_head
        self.fail_every, self.fail_codes, self.fail_all = fail_every, list(fail_codes), fail_all
        self.errors_sent = 0
        self._count_lock = threading.Lock()
        self.requests: List[tuple] = []

        def scripted_error() -> Optional[int]:
            with outer._count_lock:
                if outer.errors:
                    outer.errors_sent += 1
                    return outer.errors.pop(0)
                return outer._periodic_fault(len(outer.requests))

        class Handler(_QuietHandler):
            def do_HEAD(self):
                if not outer.allow_head:
                    outer.requests.append((self.command, self.path, None))
                    self.send_response(405)
                    self.send_header("Allow", "GET")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self._serve(body=False)

            def do_GET(self):
                self._serve(body=True)

            def _serve(self, body):
                outer.requests.append((self.command, self.path, self.headers.get("Range")))
                code = scripted_error()
                if code is not None:
                    self.send_response(code)
                    self.send_header("Retry-After", "0")
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                path = os.path.join(outer.root, self.path.split("?")[0].lstrip("/"))
                if not os.path.isfile(path):
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                with open(path, "rb") as f:
                    data = f.read()
                rng = self.headers.get("Range")
                if rng and outer.honour_ranges:
                    a, _, b = rng[len("bytes=") :].partition("-")
                    a, b = int(a), min(int(b) if b else len(data) - 1, len(data) - 1)
                    if a >= len(data):
                        self.send_response(416)
                        self.send_header("Content-Length", "0")
                        self.end_headers()
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {a}-{b}/{len(data)}")
                    data = data[a : b + 1]
                else:
                    self.send_response(200)
                self.send_header("Content-Length", str(len(data)))
                self.send_header("ETag", f'"{os.path.getmtime(path)}"')
                self.end_headers()
                if body:
                    self.wfile.write(data)

        self._serve(Handler)


# --- an S3 front that throttles -----------------------------------------------------------------

_S3_ERROR_XML = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code>'
    "<Message>{msg}</Message><RequestId>reliability-{n}</RequestId></Error>"
)
_S3_ERRORS = {
    503: ("SlowDown", "Please reduce your request rate."),
    500: ("InternalError", "We encountered an internal error. Please try again."),
}


class S3FaultProxy(_ThreadedHTTP):
    """An HTTP front for an S3 server (moto) that answers some requests itself, like S3 under
    load: every ``fail_every``-th request (1-based; 0: none) gets the next status of
    ``codes`` (503 ``SlowDown``, 500 ``InternalError``, with S3's XML error body; HEAD
    answers carry no body, as S3's do); ``fail_all=True`` fails every request. Everything
    else is forwarded to ``127.0.0.1:target_port`` unchanged (moto does not check signatures,
    so the client may sign for this host). Point ``AWS_ENDPOINT_URL`` at ``url``.
    ``errors_sent`` counts the injected answers, ``requests`` all requests."""

    def __init__(self, target_port: int, fail_every: int = 3, codes=(503, 500), fail_all: bool = False):
        outer = self
        self.target_port, self.fail_every, self.fail_codes = target_port, fail_every, list(codes)
        self.fail_all = fail_all
        self.requests = self.errors_sent = 0
        self._lock = threading.Lock()

        def decide() -> Optional[int]:
            with outer._lock:
                outer.requests += 1
                return outer._periodic_fault(outer.requests)

        class Handler(_QuietHandler):
            def _any(self):
                n = int(self.headers.get("Content-Length") or 0)
                body = self.rfile.read(n) if n else b""
                code = decide()
                if code is not None:
                    name, msg = _S3_ERRORS.get(code, ("ServiceUnavailable", "Try again."))
                    data = _S3_ERROR_XML.format(code=name, msg=msg, n=outer.errors_sent).encode()
                    self.send_response(code)
                    self.send_header("Content-Type", "application/xml")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                    return
                conn = http.client.HTTPConnection("127.0.0.1", outer.target_port, timeout=30)
                try:
                    headers = {
                        k: v for k, v in self.headers.items() if k.lower() not in ("connection", "keep-alive")
                    }
                    conn.request(self.command, self.path, body=body or None, headers=headers)
                    r = conn.getresponse()
                    data = r.read()
                    self.send_response(r.status)
                    for k, v in r.getheaders():
                        if k.lower() not in (
                            "connection",
                            "keep-alive",
                            "transfer-encoding",
                            "content-length",
                            "server",
                            "date",
                        ):
                            self.send_header(k, v)
                    length = r.getheader("Content-Length")
                    if self.command == "HEAD" and length is not None:
                        self.send_header("Content-Length", length)
                    else:
                        self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    if self.command != "HEAD":
                        self.wfile.write(data)
                finally:
                    conn.close()

            do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _any

        self._serve(Handler)


def two_dataset_config(
    folder, name: str, base: str, *, seed: int, weights=(0.5, 0.5), on_error: str = "fail"
) -> str:
    """``folder/NAME.yaml``: a one-epoch mixture of ``BASE/ds`` and ``BASE/ds2`` (the
    ``remote_dataset`` layout, wherever it is served from) with shard and sample shuffling."""
    import yaml

    doc = {
        "seed": seed,
        "on_error": on_error,
        "shuffle": {"shards": True, "samples": True, "block_size": 16, "window_blocks": 4},
        "partitions": 2,  # slices of 150: several windows each, so shards are read mid-stream
        "datasets": [
            {
                "name": "a",
                "manifest": f"{base}/{DATASET_NAME}/index.json",
                "weight": weights[0],
                "max_epochs": 1,
            },
            {
                "name": "b",
                "manifest": f"{base}/{DATASET_NAME}2/index.json",
                "weight": weights[1],
                "max_epochs": 1,
            },
        ],
    }
    path = os.path.join(str(folder), f"{name}.yaml")
    with open(path, "w") as f:
        yaml.safe_dump(doc, f)
    return path


if __name__ == "__main__":  # manual check: python tests/servers.py
    with tempfile.TemporaryDirectory() as d:
        make_dataset(os.path.join(d, DATASET_NAME))
        with NginxServer(d) as srv:
            print("nginx up at", srv.url, file=sys.stderr)
