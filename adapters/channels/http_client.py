"""Keep-alive HTTP for the channels that call their peer once per instruction (sms: Kannel's sendsms, mms: MM7).

One urllib3 connection pool per channel, to the scheme, host and port of the channel's `url`.  A
connection is opened when a delivery finds none idle and is kept for the next one afterwards, so a
channel holds as many as the outbox has deliveries in flight to it at once: its `concurrency` (up to
`KEEP_CONNECTIONS`; beyond that the extra ones are closed after use).  A kept connection that the peer
closed in the meantime is noticed when it is taken and opened again; one the peer closes while a
request is on it fails that request.

Nothing is retried here and no redirect is followed (``retries=False``): a failed request is the
channel's to judge and the outbox's to retry (its `Retry` / `Rejected` contract).  `timeout` is what
``urllib.request.urlopen(timeout=...)`` made of it: seconds to connect, and seconds for each wait on
the socket while the answer comes in.
"""

from __future__ import annotations

import urllib.parse
from collections.abc import Mapping
from typing import NamedTuple

import urllib3
from urllib3.exceptions import HTTPError as Urllib3Error

# Idle connections a pool keeps.  Connections are opened only as deliveries need them, so a channel has
# as many as its `concurrency`; this only bounds what an unusually high `concurrency` keeps open.
KEEP_CONNECTIONS = 256


class Answer(NamedTuple):
    """A peer's answer: HTTP status, headers, and the body up to the `limit` read."""

    status: int
    headers: Mapping[str, str]
    body: bytes


class RequestFailed(Exception):
    """No answer: the connection was refused, reset or closed, or the peer was too slow (`reason` says)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason


class PooledHttp:
    """Requests to one origin (scheme, host, port) over kept-alive connections; thread-safe."""

    def __init__(self, url: str, timeout: float):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ValueError(f"must be an http:// or https:// URL with a host, not {url!r}")
        self.origin = f"{parts.scheme}://{parts.netloc}"
        self._pool = urllib3.connection_from_url(
            url, maxsize=KEEP_CONNECTIONS, block=False, retries=False,
            timeout=urllib3.Timeout(connect=timeout, read=timeout),
        )  # fmt: skip

    @property
    def connections_opened(self) -> int:
        """Connections opened since the pool was made (reopened ones included)."""
        return self._pool.num_connections

    def request(self, method: str, url: str, *, body: bytes | None = None, headers: Mapping[str, str] | None = None,
                limit: int) -> Answer:
        """`method` on `url` (which must start with this pool's origin); at most `limit` bytes of the body are read.

        Every HTTP status is an `Answer`, redirects included (they are not followed); `RequestFailed` when
        there is no answer.  An answer longer than `limit` closes its connection rather than reading on.
        """
        if not url.startswith(self.origin):
            raise ValueError(f"{url!r} is not on {self.origin}")
        target = url[len(self.origin):]
        if not target.startswith("/"):
            target = "/" + target
        try:
            response = self._pool.urlopen(method, target, body=body, headers=headers, retries=False, redirect=False,
                                          preload_content=False, decode_content=False)
            try:
                data = response.read(limit, decode_content=False)
            finally:
                if not response.isclosed():  # longer than `limit`, or a read that failed: not reusable
                    response.close()
                response.release_conn()
        except (Urllib3Error, OSError) as exc:
            raise RequestFailed(_reason(exc)) from exc
        return Answer(response.status, response.headers, data)

    def close(self) -> None:
        """Close the kept connections; a request after this raises `RequestFailed`.  Idempotent."""
        self._pool.close()


def _reason(exc: BaseException) -> str:
    """The error under urllib3's wrapping, as `urlopen` reported it: "[Errno 111] Connection refused"."""
    while isinstance(exc, Urllib3Error):
        inner = exc.__cause__ or next((a for a in exc.args if isinstance(a, BaseException)), None)
        if inner is None:
            break
        exc = inner
    return str(exc) or type(exc).__name__
