"""The operator's HTTPS to its own control plane: trust the fleet CA, not the system's store.

A fleet directory with a CA (``tls/ca.pem``) issued the control plane's HTTPS certificate
itself, so no public authority vouches for it, and none should be able to: an operator command
that would accept any publicly trusted certificate for the control plane's name would hand the
operator token to whoever got one. So every ``edgelm fleet`` call, ``edgelm provision revoke``'s
call, and the repository check before a push or a key publication verify the server against the
fleet CA and nothing else. Without a fleet
directory, or for a fleet without a CA, the system store applies (a control plane behind a
reverse proxy with a public certificate).
"""

from __future__ import annotations

import ssl
from collections.abc import Iterator
from pathlib import Path

import urllib3
from tuf.api import exceptions as tuf_exceptions
from tuf.ngclient import FetcherInterface

#: The fleet CA alone. During a CA rotation the previous CA is not trusted here: ``ca-rotate``
#: re-issues the control plane's certificate from the new CA, and a rotation is often done
#: because the old key may have leaked, so it must not be able to pose as the control plane.
_TRUST_FILES = ("tls/ca.pem",)


def fleet_trust_files(fleet_root: Path | None) -> list[Path]:
    """The CA certificates a fleet directory trusts for its own servers; empty if none."""
    if fleet_root is None:
        return []
    return [fleet_root / name for name in _TRUST_FILES if (fleet_root / name).is_file()]


def fleet_ssl_context(fleet_root: Path | None) -> ssl.SSLContext | None:
    """A client context trusting only the fleet's CA files, or None (the system store)."""
    files = fleet_trust_files(fleet_root)
    if not files:
        return None
    # With cadata given, create_default_context loads no system certificates (without it, it
    # would, and $SSL_CERT_FILE with them).
    return ssl.create_default_context(cadata="".join(path.read_text() for path in files))


class FleetTrustFetcher(FetcherInterface):
    """python-tuf's fetch port over urllib3 with the fleet's trust: the repository check
    must verify the control plane's server the same way the devices do."""

    def __init__(self, context: ssl.SSLContext, *, socket_timeout_s: int = 30) -> None:
        self._pool = urllib3.PoolManager(ssl_context=context)
        self._timeout = urllib3.Timeout(socket_timeout_s)

    def _fetch(self, url: str) -> Iterator[bytes]:
        try:
            response = self._pool.request(
                "GET", url, preload_content=False, timeout=self._timeout, retries=False
            )
        except urllib3.exceptions.MaxRetryError as exc:
            raise tuf_exceptions.DownloadError(f"cannot fetch {url}: {exc.reason}") from exc
        except urllib3.exceptions.HTTPError as exc:
            raise tuf_exceptions.DownloadError(f"cannot fetch {url}: {exc}") from exc
        if response.status >= 400:
            response.close()
            raise tuf_exceptions.DownloadHTTPError(
                f"HTTP {response.status} for {url}", response.status
            )
        return self._chunks(response, url)

    @staticmethod
    def _chunks(response: urllib3.BaseHTTPResponse, url: str) -> Iterator[bytes]:
        try:
            yield from response.stream(64 * 1024)
        except urllib3.exceptions.HTTPError as exc:
            raise tuf_exceptions.DownloadError(f"cannot fetch {url}: {exc}") from exc
        finally:
            response.release_conn()
