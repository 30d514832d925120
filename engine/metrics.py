"""Metrics, health and control over HTTP (SPEC sections 7 and 9).

Kairos keeps its counters where they are counted (plain ints and dicts, the
kernel's counter arrays); nothing is updated per event for the sake of
metrics.  A `Registry` holds collectors, callables run at scrape time that
read those counters and return `MetricFamily` values, which the registry
renders in the Prometheus text exposition format, version 0.0.4.  A
`Histogram` is the one metric kept here, for distributions such as batch
latency: it takes a whole array of observations at once.

`MetricsServer` serves, on a background thread:

- ``GET /metrics``: the registry, ``text/plain; version=0.0.4``.
- ``GET /healthz``: 200 ``ok`` while the process works, else 503 and why.
- ``GET /readyz``: 200 ``ok`` while it takes traffic, else 503 and why.
- ``GET /NAME`` for each of `reads` (e.g. ``acks``): ``reads[NAME]()`` as
  JSON, readable without a token like the metrics.
- ``POST /control/ACTION``: runs ``control[ACTION]()`` (e.g. ``reload``),
  which returns ``(ok, message)``; answers 200 or 400 with
  ``{"ok": ..., "message": ...}`` as JSON.  Actions run one at a time.  An
  action that takes an argument is called with the request body (bytes).

Exposure (SPEC section 9): the server binds to loopback unless told
otherwise, and refuses to bind anywhere else without a token.  With a token
configured, control requests must carry ``Authorization: Bearer TOKEN``
(401 otherwise), on loopback too; metrics and health stay readable without
it, for scrapers and probes.
"""

from __future__ import annotations

import hmac
import inspect
import logging
import math
import re
import socket
import threading
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from http import HTTPStatus
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit

import numpy as np
import orjson

from engine._version import __version__
from engine.exposure import is_loopback_host

log = logging.getLogger(__name__)

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
COUNTER, GAUGE, HISTOGRAM = "counter", "gauge", "histogram"

_METRIC_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")

Number = int | float | np.integer | np.floating
# The values of one metric: a single number, or (labels, number) pairs.
Series = Number | Iterable[tuple[Mapping[str, str], Number]]


@dataclass(frozen=True, slots=True)
class Sample:
    """One line of the exposition: the family name + `suffix`, labels, value."""

    suffix: str  # "", "_total", "_bucket", "_sum" or "_count"
    labels: tuple[tuple[str, str], ...]
    value: Number


@dataclass(frozen=True, slots=True)
class MetricFamily:
    """A metric and all its samples, as a collector returns it.  Build with `counter`, `gauge`, `histogram`."""

    name: str  # without the `_total` of a counter
    type: str  # COUNTER, GAUGE or HISTOGRAM
    help: str
    samples: tuple[Sample, ...]

    @property
    def exposed_name(self) -> str:
        """The name in the HELP and TYPE lines: a counter's ends in `_total`."""
        return self.name + "_total" if self.type == COUNTER else self.name


def _check_name(name: str) -> None:
    if not _METRIC_NAME.fullmatch(name):
        raise ValueError(f"metric name {name!r} is not [a-zA-Z_:][a-zA-Z0-9_:]*")


def _labels(labels: Mapping[str, str], *, reserved: str | None = None) -> tuple[tuple[str, str], ...]:
    for label in labels:
        if not _LABEL_NAME.fullmatch(label) or label.startswith("__") or label == reserved:
            raise ValueError(f"label name {label!r} is not allowed")
    return tuple((label, str(value)) for label, value in labels.items())


def _series(series: Series) -> list[tuple[tuple[tuple[str, str], ...], Number]]:
    if isinstance(series, Number):
        return [((), series)]
    return [(_labels(labels), value) for labels, value in series]


def counter(name: str, help: str, series: Series) -> MetricFamily:
    """A counter family; `name` without `_total` (a trailing one is dropped), values that only grow."""
    name = name.removesuffix("_total")
    _check_name(name)
    return MetricFamily(name, COUNTER, help, tuple(Sample("_total", lb, v) for lb, v in _series(series)))


def gauge(name: str, help: str, series: Series) -> MetricFamily:
    """A gauge family: values that go up and down."""
    _check_name(name)
    return MetricFamily(name, GAUGE, help, tuple(Sample("", lb, v) for lb, v in _series(series)))


# Seconds: from a fraction of a millisecond (a small batch) to ten seconds (a stall).
LATENCY_BUCKETS: tuple[float, ...] = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)  # fmt: skip


class Histogram:
    """Counts of observations in fixed buckets, with their sum; thread-safe.

    `buckets` are the finite upper bounds, strictly increasing; a value lands
    in the first bucket whose bound is >= the value, and the +Inf bucket holds
    the rest.  NaN observations are ignored: one would turn the sum into NaN
    for good.
    """

    def __init__(self, buckets: Iterable[float] = LATENCY_BUCKETS):
        buckets = list(buckets)
        bounds = np.array([b for b in buckets if b != math.inf], dtype=np.float64)
        if not len(bounds) or not np.all(np.isfinite(bounds)) or np.any(np.diff(bounds) <= 0):
            raise ValueError(f"histogram buckets must be finite and strictly increasing, not {buckets}")
        self.bounds = bounds
        self._counts = np.zeros(len(bounds) + 1, dtype=np.int64)  # per bucket, the last for +Inf
        self._sum = 0.0
        self._lock = threading.Lock()

    def observe(self, value: float) -> None:
        if value != value:  # NaN
            return
        index = int(np.searchsorted(self.bounds, value, side="left"))
        with self._lock:
            self._counts[index] += 1
            self._sum += value

    def observe_many(self, values: np.ndarray) -> None:
        """Observe every value of an array at once."""
        values = np.asarray(values, dtype=np.float64).ravel()
        values = values[~np.isnan(values)]
        counts = np.bincount(np.searchsorted(self.bounds, values, side="left"), minlength=len(self._counts))
        total = float(values.sum())
        with self._lock:
            self._counts += counts
            self._sum += total

    def snapshot(self) -> tuple[np.ndarray, float]:
        """Cumulative counts per bound (the last is +Inf, the total count) and the sum, taken together."""
        with self._lock:
            return np.cumsum(self._counts), self._sum


def _format_bound(bound: float) -> str:
    return "+Inf" if bound == math.inf else repr(float(bound))


def histogram(name: str, help: str, series: Histogram | Iterable[tuple[Mapping[str, str], Histogram]]) -> MetricFamily:
    """A histogram family from one `Histogram` or (labels, Histogram) pairs."""
    _check_name(name)
    pairs = [({}, series)] if isinstance(series, Histogram) else series
    samples = []
    for labels, hist in pairs:
        labels = _labels(labels, reserved="le")
        cumulative, total = hist.snapshot()
        bounds = [*hist.bounds.tolist(), math.inf]
        for bound, count in zip(bounds, cumulative.tolist(), strict=True):
            samples.append(Sample("_bucket", (*labels, ("le", _format_bound(bound))), count))
        samples.append(Sample("_sum", labels, total))
        samples.append(Sample("_count", labels, int(cumulative[-1])))
    return MetricFamily(name, HISTOGRAM, help, tuple(samples))


def _escape_label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _escape_help(text: str) -> str:
    return text.replace("\\", "\\\\").replace("\n", "\\n")


def _format_value(value: Number) -> str:
    if isinstance(value, bool | np.bool_):
        return "1" if value else "0"
    if isinstance(value, int | np.integer):
        return str(int(value))
    value = float(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)


Collector = Callable[[], Iterable[MetricFamily]]


class Registry:
    """Collectors run at scrape time; `render` is the exposition text of all they return.

    A collector that raises fails the scrape (the server answers 500 and
    logs why) rather than leaving its metrics silently out; two families of
    one name are an error for the same reason.
    """

    def __init__(self) -> None:
        self._collectors: list[Collector] = []
        self._lock = threading.Lock()

    def register(self, collector: Collector) -> Collector:
        """Add a collector; returns it, so that this serves as a decorator."""
        with self._lock:
            self._collectors.append(collector)
        return collector

    def unregister(self, collector: Collector) -> None:
        with self._lock:
            self._collectors.remove(collector)

    def collect(self) -> list[MetricFamily]:
        with self._lock:
            collectors = list(self._collectors)
        families = [family for collector in collectors for family in collector()]
        seen: set[str] = set()
        for family in families:
            if family.exposed_name in seen:
                raise ValueError(f"metric {family.exposed_name!r} is collected twice")
            seen.add(family.exposed_name)
        return families

    def render(self) -> str:
        """Text exposition format 0.0.4."""
        lines = []
        for family in self.collect():
            exposed = family.exposed_name
            lines.append(f"# HELP {exposed} {_escape_help(family.help)}")
            lines.append(f"# TYPE {exposed} {family.type}")
            for sample in family.samples:
                if sample.labels:
                    inner = ",".join(f'{k}="{_escape_label_value(v)}"' for k, v in sample.labels)
                    labels = "{" + inner + "}"
                else:
                    labels = ""
                lines.append(f"{family.name}{sample.suffix}{labels} {_format_value(sample.value)}")
        return "\n".join(lines) + "\n" if lines else ""


# ---------------------------------------------------------------------------
# Exposure


# ---------------------------------------------------------------------------
# HTTP

Check = Callable[[], tuple[bool, str]]
Action = Callable[[], tuple[bool, str]]

_ACTION_NAME = re.compile(r"[a-z][a-z0-9_-]*")
# Control requests carry no body of use; anything larger than this is refused unread.
DEFAULT_MAX_BODY = 64 << 10
# Seconds a client may take to send its request before its connection is dropped.
REQUEST_TIMEOUT = 10.0


def _ok() -> tuple[bool, str]:
    return True, "ok"


class MetricsServer:
    """Metrics, health and control over HTTP on a background thread.  See the module docstring.

    `health` and `ready` return (ok, reason) and default to always ok.
    `control` maps an action name to a callable returning (ok, message); the
    server calls these on its own threads, one at a time.  `port` 0 picks a
    free port; `.port` is the actual one once started.
    """

    def __init__(
        self,
        host: str,
        port: int,
        registry: Registry,
        *,
        health: Check | None = None,
        ready: Check | None = None,
        control: Mapping[str, Action] | None = None,
        reads: Mapping[str, Callable[[], object]] | None = None,
        token: str | None = None,
        max_body: int = DEFAULT_MAX_BODY,
    ):
        if token is not None and not token:
            raise ValueError("metrics server: the token must not be empty")
        if token is None and not is_loopback_host(host):
            raise ValueError(
                f"metrics server: {host!r} is not a loopback address; listening beyond loopback "
                "requires a token for control requests (SPEC section 9)"
            )
        for action in control or {}:
            if not _ACTION_NAME.fullmatch(action):
                raise ValueError(f"metrics server: control action name {action!r} is not [a-z][a-z0-9_-]*")
        self.host = host
        self.port = port
        self.registry = registry
        self.health = health or _ok
        self.ready = ready or _ok
        self.control = dict(control or {})
        self.reads = dict(reads or {})
        self.max_body = max_body
        self._token = token.encode() if token is not None else None
        self._control_lock = threading.Lock()
        self._server: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> None:
        if self._server is not None:
            raise RuntimeError("metrics server already started")
        server_class = _Server6 if ":" in self.host else ThreadingHTTPServer
        try:
            server = server_class((self.host.strip("[]"), self.port), _Handler)
        except OSError as error:
            raise OSError(error.errno, f"metrics server: cannot listen on {self.host}:{self.port}: {error}") from error
        server.metrics = self
        self._server = server
        self.port = server.server_address[1]
        self._thread = threading.Thread(
            target=server.serve_forever, kwargs={"poll_interval": 0.2}, name="kairos-metrics", daemon=True
        )
        self._thread.start()
        log.info("metrics server listening on %s:%d", self.host, self.port)

    def stop(self) -> None:
        """Stop serving and close the socket; idempotent."""
        server, self._server = self._server, None
        if server is None:
            return
        server.shutdown()
        server.server_close()
        self._thread.join()
        self._thread = None

    def __enter__(self) -> MetricsServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def authorized(self, header: str | None) -> bool:
        """Whether a request with this Authorization header may use control."""
        if self._token is None:
            return True
        scheme, _, credentials = (header or "").strip().partition(" ")
        if scheme.lower() != "bearer":
            return False
        # http.server decodes header bytes as Latin-1: encoding back gives the bytes sent.
        return hmac.compare_digest(credentials.strip().encode("latin-1", "replace"), self._token)

    def run_action(self, action: str, body: bytes = b"") -> tuple[bool, str]:
        handler = self.control[action]
        with self._control_lock:
            ok, message = handler(body) if _takes_argument(handler) else handler()
        return bool(ok), str(message)


def _takes_argument(handler: Callable) -> bool:
    try:
        return len(inspect.signature(handler).parameters) > 0
    except (TypeError, ValueError):
        return False


class _Server6(ThreadingHTTPServer):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server_version = f"kairos/{__version__}"
    sys_version = ""
    timeout = REQUEST_TIMEOUT

    def version_string(self) -> str:
        return self.server_version  # the Server header: "kairos/X.Y.Z", without the Python version

    @property
    def metrics(self) -> MetricsServer:
        return self.server.metrics

    def log_message(self, format: str, *args: object) -> None:
        log.debug("%s %s", self.address_string(), format % args)

    def _reply(self, status: int, body: bytes | str, content_type: str = "text/plain; charset=utf-8",
               headers: Mapping[str, str] | None = None) -> None:  # fmt: skip
        data = body.encode() if isinstance(body, str) else body
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    def _json(self, status: int, ok: bool, message: str, headers: Mapping[str, str] | None = None) -> None:
        self._reply(status, orjson.dumps({"ok": ok, "message": message}), "application/json", headers)

    def _safely(self, handle: Callable[[str], None]) -> None:
        path = urlsplit(self.path).path
        try:
            handle(path)
        except Exception as error:
            log.exception("metrics server: %s %s failed", self.command, path)
            try:
                self._reply(HTTPStatus.INTERNAL_SERVER_ERROR, f"internal error: {type(error).__name__}\n")
            except OSError:
                pass  # the client is gone

    def do_GET(self) -> None:
        self._safely(self._get)

    def do_POST(self) -> None:
        self._safely(self._post)

    def _get(self, path: str) -> None:
        if path == "/metrics":
            self._reply(HTTPStatus.OK, self.metrics.registry.render(), CONTENT_TYPE)
        elif path in ("/healthz", "/readyz"):
            self._check(self.metrics.health if path == "/healthz" else self.metrics.ready)
        elif path.startswith("/control/"):
            self._reply(HTTPStatus.METHOD_NOT_ALLOWED, "use POST\n", headers={"Allow": "POST"})
        elif path.removeprefix("/") in self.metrics.reads:
            self._reply(HTTPStatus.OK, orjson.dumps(self.metrics.reads[path.removeprefix("/")]()), "application/json")
        else:
            self._reply(HTTPStatus.NOT_FOUND, "not found\n")

    def _check(self, check: Check) -> None:
        try:
            ok, reason = check()
        except Exception as error:
            # A check that cannot run reports the process unhealthy, not the server broken.
            log.exception("metrics server: %s check failed", self.path)
            ok, reason = False, f"check failed: {type(error).__name__}: {error}"
        if ok:
            self._reply(HTTPStatus.OK, "ok\n")
        else:
            self._reply(HTTPStatus.SERVICE_UNAVAILABLE, f"{reason}\n")

    def _post(self, path: str) -> None:
        if path in ("/metrics", "/healthz", "/readyz"):
            self._reply(HTTPStatus.METHOD_NOT_ALLOWED, "use GET\n", headers={"Allow": "GET"})
            return
        if not path.startswith("/control/"):
            self._reply(HTTPStatus.NOT_FOUND, "not found\n")
            return
        body = self._read_body()
        if body is None:
            return
        # Authorization before the action is looked up, so that no one learns the actions without the token.
        if not self.metrics.authorized(self.headers.get("Authorization")):
            self._json(HTTPStatus.UNAUTHORIZED, False, "a valid bearer token is required",
                       {"WWW-Authenticate": 'Bearer realm="kairos"'})  # fmt: skip
            return
        action = path.removeprefix("/control/")
        if action not in self.metrics.control:
            self._json(HTTPStatus.NOT_FOUND, False, f"no control action {action!r}")
            return
        try:
            ok, message = self.metrics.run_action(action, body)
        except Exception as error:
            log.exception("metrics server: control action %r failed", action)
            self._json(HTTPStatus.INTERNAL_SERVER_ERROR, False, f"{action} failed: {type(error).__name__}: {error}")
            return
        log.info("control %s: ok=%s %s", action, ok, message)
        self._json(HTTPStatus.OK if ok else HTTPStatus.BAD_REQUEST, ok, message)

    def _read_body(self) -> bytes | None:
        """The request body within the size limit; None when refused (the reply is sent)."""
        if self.headers.get("Transfer-Encoding"):
            self._reply(HTTPStatus.LENGTH_REQUIRED, "a Content-Length is required\n")
            return None
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            length = -1
        if length < 0:
            self._reply(HTTPStatus.BAD_REQUEST, "bad Content-Length\n")
            return None
        if length > self.metrics.max_body:
            self.close_connection = True
            self._reply(HTTPStatus.REQUEST_ENTITY_TOO_LARGE, f"body over {self.metrics.max_body} bytes\n")
            return None
        return self.rfile.read(length)
