"""The viewer's web app: a fixed set of routes over one source, served by the standard library.

Only what the source names is reachable: datasets, shards and samples are addressed by number
(``/d/0/s/1234``), never by a path or URL taken from the request, so a request cannot name a
file or a shard outside the manifest. Anything else (``..``, percent-encoded paths, absolute
paths, unknown routes) is a 4xx. Responses carry a Content-Security-Policy that forbids scripts
(the pages have none) and a ``Host`` check refuses DNS-rebinding requests when bound to
loopback.
"""

from __future__ import annotations

import collections
import importlib
import ipaddress
import logging
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Dict, Optional, Tuple
from urllib.parse import parse_qs, urlsplit

import numpy as np

from .. import io as wio
from ..format import FormatError
from . import pages
from .data import MixReport, Source, ViewError, mix_report

__all__ = ["App", "Response", "ViewServer", "Viewer", "load_renderer", "make_server"]

log = logging.getLogger(__name__)

CSP = (
    "default-src 'none'; img-src 'self' data:; style-src 'self'; form-action 'self'; "
    "frame-ancestors 'none'; base-uri 'none'"
)
_NUM = r"(\d{1,15})"
_ROUTES = [
    (re.compile(r"^/$"), "home"),
    (re.compile(r"^/style\.css$"), "css"),
    (re.compile(rf"^/d/{_NUM}/$"), "overview"),
    (re.compile(rf"^/d/{_NUM}$"), "overview"),
    (re.compile(rf"^/d/{_NUM}/samples$"), "samples"),
    (re.compile(rf"^/d/{_NUM}/s/{_NUM}$"), "sample"),
    (re.compile(rf"^/d/{_NUM}/img/{_NUM}/{_NUM}\.png$"), "image"),
    (re.compile(rf"^/d/{_NUM}/raw/{_NUM}$"), "raw"),
    (re.compile(rf"^/d/{_NUM}/key/([A-Za-z0-9_-]{{1,80}})$"), "key"),
]


@dataclass
class Response:
    status: int
    content_type: str
    body: bytes
    headers: Dict[str, str] = field(default_factory=dict)


def load_renderer(spec: str, arg: Optional[str] = None) -> Any:
    """``MODULE:CALLABLE`` -> the renderer it returns (called once, with ``arg`` when given).

    The renderer must have ``render(input_ids, block) -> bytes``: the PNG of one image block,
    where ``input_ids`` are the whole sample's ids and ``block`` is one entry of the sample's
    ``meta["images"]`` (its tokens are ``input_ids[block["offset"]:][:block["num_tokens"]]``).
    """
    module, sep, attr = spec.partition(":")
    if not sep or not module or not attr:
        raise ValueError(f"--renderer {spec!r}: expected MODULE:CALLABLE (e.g. lumina.render:load_renderer)")
    try:
        obj: Any = importlib.import_module(module)
    except ImportError as e:
        raise ValueError(f"--renderer {spec}: cannot import {module}: {e}") from None
    for part in attr.split("."):
        obj = getattr(obj, part, None)
    if not callable(obj):
        raise ValueError(f"--renderer {spec}: {module} has no callable {attr}")
    renderer = obj(arg) if arg is not None else obj()
    if not callable(getattr(renderer, "render", None)):
        raise ValueError(
            f"--renderer {spec}: it returned {type(renderer).__name__}, which has "
            "no render(input_ids, block) method"
        )
    return renderer


class App:
    """Routes requests over one :class:`~wds_tools.view.data.Source`.

    ``tokenizer``: a tokenizer folder or ``tokenizer.json`` (loaded on the first sample page);
    ``renderer``: an object with ``render(input_ids, block) -> PNG bytes`` (or None:
    placeholders); ``page_size``: rows per sample-list page; ``mix_samples``/``batch_size``:
    the mixture dry run of a data config (as ``wds-tools mix --samples --batch-size``).
    """

    def __init__(
        self,
        source: Source,
        *,
        tokenizer: Optional[str] = None,
        renderer: Any = None,
        page_size: int = 50,
        mix_samples: int = 4000,
        batch_size: int = 8,
        image_cache: int = 64,
        dry_run: Optional[Callable[..., Dict[str, Any]]] = None,
    ):
        if page_size < 1 or mix_samples < 1 or batch_size < 1:
            raise ValueError("page_size, mix_samples and batch_size must be >= 1")
        self.source, self.renderer = source, renderer
        self.page_size, self.mix_samples, self.batch_size = page_size, mix_samples, batch_size
        self.allowed_hosts: Optional[set] = None  # set by the server once the port is known
        self._tokenizer_path = tokenizer
        self._text: Optional[pages.TokenText] = None
        self._tok_lock, self._render_lock, self._mix_lock = (
            threading.Lock(),
            threading.Lock(),
            threading.Lock(),
        )
        self._images: "collections.OrderedDict[tuple, bytes]" = collections.OrderedDict()
        self._image_cache = image_cache
        self._mix: Optional[Tuple[Optional[MixReport], Optional[str]]] = None
        self._dry_run = dry_run
        if tokenizer is not None:
            import os

            f = os.path.join(tokenizer, "tokenizer.json") if os.path.isdir(tokenizer) else tokenizer
            if not os.path.exists(f):
                raise ValueError(f"--tokenizer {tokenizer}: no tokenizer.json there")

    # --- dispatch -----------------------------------------------------------------------------

    def handle(self, method: str, target: str, host: Optional[str] = None) -> Response:
        """Answer one request (``target`` is the raw request target: path and query)."""
        try:
            if method not in ("GET", "HEAD"):
                raise ViewError(405, f"method {method} not allowed")
            if self.allowed_hosts is not None and host is not None and host.lower() not in self.allowed_hosts:
                raise ViewError(
                    403,
                    "unexpected Host header (this server answers only "
                    "requests addressed to its own loopback address)",
                )
            return self._route(target)
        except ViewError as e:
            return self._error(e.status, str(e))
        except (FormatError, ValueError, OSError) as e:
            log.warning("request %s: %s", target[:200], e)
            return self._error(500, wio.scrub(str(e)))
        except Exception as e:  # noqa: BLE001 - odd data must not take the server down
            log.exception("request %s failed", target[:200])
            return self._error(500, f"internal error: {type(e).__name__}: {wio.scrub(str(e))}")

    def _error(self, status: int, message: str) -> Response:
        return Response(
            status, "text/html; charset=utf-8", pages.error_page(status, message, self.source).encode()
        )

    def _route(self, target: str) -> Response:
        if not target.startswith("/") or target.startswith("//"):
            raise ViewError(400, "bad request target")
        parts = urlsplit(target)
        path = parts.path
        if "%" in path or "\\" in path or "/." in path or "//" in path:
            raise ViewError(
                400, "bad path (encoded characters, dot segments or empty segments are not served)"
            )
        for rx, name in _ROUTES:
            m = rx.match(path)
            if m:
                query = parse_qs(parts.query, keep_blank_values=True, max_num_fields=8)
                return getattr(self, "_" + name)(*m.groups(), query=query)
        raise ViewError(404, "no such page (only the source's datasets and samples are served)")

    def _html(self, body: str) -> Response:
        return Response(200, "text/html; charset=utf-8", body.encode())

    def _dataset(self, k: str) -> int:
        i = int(k)
        if i >= len(self.source.datasets):
            raise ViewError(404, f"no dataset {i} (the source has {len(self.source.datasets)})")
        return i

    @staticmethod
    def _int_arg(query: Dict[str, list], name: str, default: int) -> int:
        v = query.get(name, [str(default)])[-1]
        if not re.fullmatch(r"\d{1,15}", v or ""):
            raise ViewError(400, f"?{name}= must be a non-negative integer")
        return int(v)

    # --- pages --------------------------------------------------------------------------------

    def _css(self, query: Dict[str, list]) -> Response:
        return Response(200, "text/css; charset=utf-8", pages.CSS.encode(), {"Cache-Control": "max-age=3600"})

    def _home(self, query: Dict[str, list]) -> Response:
        if self.source.config is None:
            return self._html(pages.overview_page(self.source, 0))
        rep, err = self.mixture()
        cmd = f"wds-tools mix {self.source.path} --batch-size {self.batch_size}"
        return self._html(pages.mix_page(self.source, rep, err, cmd))

    def mixture(self) -> Tuple[Optional[MixReport], Optional[str]]:
        """The data config's dry run (computed once)."""
        with self._mix_lock:
            if self._mix is None:
                try:
                    self._mix = (
                        mix_report(
                            self.source.path, self.mix_samples, self.batch_size, dry_run=self._dry_run
                        ),
                        None,
                    )
                except (ValueError, OSError) as e:
                    self._mix = (None, wio.scrub(str(e)))
            return self._mix

    def _overview(self, k: str, query: Dict[str, list]) -> Response:
        return self._html(pages.overview_page(self.source, self._dataset(k)))

    def _samples(self, k: str, query: Dict[str, list]) -> Response:
        i = self._dataset(k)
        d = self.source.datasets[i]
        q = query.get("q", [""])[-1]
        if q:
            fld = query.get("field", ["key"])[-1]
            if len(q) > 200:
                raise ViewError(400, "search text is limited to 200 characters")
            res = d.search(q, fld, self._int_arg(query, "from", 0))
            return self._html(pages.search_page(self.source, i, q, fld, res))
        start = min(self._int_arg(query, "start", 0), max(0, d.num_samples - 1))
        rows = d.rows(start, self.page_size)
        return self._html(pages.samples_page(self.source, i, start, self.page_size, rows))

    def _sample(self, k: str, g: str, query: Dict[str, list]) -> Response:
        i = self._dataset(k)
        s = self.source.datasets[i].sample(int(g))
        return self._html(pages.sample_page(self.source, i, s, self._token_text(), self.renderer is not None))

    def _key(self, k: str, key: str, query: Dict[str, list]) -> Response:
        i = self._dataset(k)
        g = self.source.datasets[i].find_key(key)
        if g is None:
            raise ViewError(404, f"no sample with key {key!r} in {self.source.datasets[i].name}")
        return Response(302, "text/plain", b"", {"Location": f"/d/{i}/s/{g}"})

    def _raw(self, k: str, g: str, query: Dict[str, list]) -> Response:
        name, data = self.source.datasets[self._dataset(k)].raw(int(g))
        return Response(
            200, "application/x-tar", data, {"Content-Disposition": f'attachment; filename="{name}"'}
        )

    def _image(self, k: str, g: str, j: str, query: Dict[str, list]) -> Response:
        i, n, b = self._dataset(k), int(g), int(j)
        if self.renderer is None:
            raise ViewError(404, "no renderer (start the viewer with --renderer)")
        ck = (i, n, b)
        with self._render_lock:
            png = self._images.get(ck)
            if png is None:
                s = self.source.datasets[i].sample(n)
                ims = s["meta"].get("images") if isinstance(s["meta"], dict) else None
                if not isinstance(ims, list) or not b < len(ims) or not isinstance(ims[b], dict):
                    raise ViewError(404, f"sample {n} has no image block {b}")
                try:
                    png = bytes(self.renderer.render(np.asarray(s["input_ids"]), dict(ims[b])))
                except Exception as e:  # noqa: BLE001 - a renderer bug must not kill the page
                    log.warning("renderer failed on sample %d image %d: %s", n, b, e)
                    return Response(500, "image/svg+xml", _error_svg(f"{type(e).__name__}: {e}"))
                self._images[ck] = png
                while len(self._images) > self._image_cache:
                    self._images.popitem(last=False)
        return Response(200, "image/png", png, {"Cache-Control": "max-age=3600"})

    def _token_text(self) -> Optional[pages.TokenText]:
        if self._tokenizer_path is None:
            return None
        with self._tok_lock:
            if self._text is None:
                from ..inspect_cli import _load_tokenizer

                self._text = pages.TokenText(_load_tokenizer(self._tokenizer_path))
            return self._text


def _error_svg(message: str) -> bytes:
    msg = pages.e(wio.scrub(message)[:160])
    return (
        f'<svg xmlns="http://www.w3.org/2000/svg" width="360" height="60">'
        f'<rect width="360" height="60" fill="#fff4e5" stroke="#fed7aa"/>'
        f'<text x="8" y="24" font-size="12" fill="#9a3412">render failed</text>'
        f'<text x="8" y="44" font-size="10" fill="#9a3412">{msg}</text></svg>'
    ).encode()


# --- HTTP ---------------------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    server_version = "wds-tools-view"
    sys_version = ""
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        self._answer(head=False)

    def do_HEAD(self) -> None:  # noqa: N802
        self._answer(head=True)

    def _answer(self, head: bool) -> None:
        app: App = self.server.app  # type: ignore[attr-defined]
        r = app.handle("GET", self.path, self.headers.get("Host"))
        self.send_response(r.status)
        self.send_header("Content-Type", r.content_type)
        self.send_header("Content-Length", str(len(r.body)))
        self.send_header("Content-Security-Policy", CSP)
        self.send_header("X-Content-Type-Options", "nosniff")
        self.send_header("Referrer-Policy", "no-referrer")
        self.send_header("X-Frame-Options", "DENY")
        for k, v in r.headers.items():
            self.send_header(k, v)
        if "Cache-Control" not in r.headers:
            self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if not head:
            self.wfile.write(r.body)

    def send_error(self, code: int, message: Optional[str] = None, explain: Optional[str] = None) -> None:
        # malformed requests (bad request line, unsupported method): a plain answer, no echo
        self.send_response(code)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", "0")
        self.send_header("Connection", "close")
        self.end_headers()

    def log_message(self, fmt: str, *args: Any) -> None:
        log.debug("%s %s", self.address_string(), fmt % args)


class ViewServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, address: Tuple[str, int], app: App):
        family_v6 = ":" in address[0]
        if family_v6:
            import socket

            self.address_family = socket.AF_INET6
        super().__init__(address, _Handler)
        self.app = app
        app.allowed_hosts = _loopback_hosts(address[0], int(self.server_address[1]))

    @property
    def url(self) -> str:
        host, port = str(self.server_address[0]), int(self.server_address[1])
        if host in ("0.0.0.0", "::"):
            host = "127.0.0.1"
        return f"http://{'[' + host + ']' if ':' in host else host}:{port}/"


def _loopback_hosts(host: str, port: int) -> Optional[set]:
    """The Host headers accepted when bound to loopback (None: any, when bound elsewhere)."""
    try:
        loop = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        loop = False
    if not loop:
        return None
    return {f"127.0.0.1:{port}", f"localhost:{port}", f"[::1]:{port}"}


def make_server(app: App, host: str = "127.0.0.1", port: int = 0) -> ViewServer:
    return ViewServer((host, port), app)


class Viewer:
    """A viewer running in a background thread (tests, notebooks)::

    with Viewer(App(open_source("data/index.json"))) as v:
        print(v.url)
    """

    def __init__(self, app: App, host: str = "127.0.0.1", port: int = 0):
        self.app = app
        self.server = make_server(app, host, port)
        self._thread: Optional[threading.Thread] = None

    @property
    def url(self) -> str:
        return self.server.url

    def start(self) -> "Viewer":
        self._thread = threading.Thread(target=self.server.serve_forever, name="wds-view", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        if self._thread is not None:
            self._thread.join(10)

    def __enter__(self) -> "Viewer":
        return self.start()

    def __exit__(self, *exc: Any) -> None:
        self.stop()
