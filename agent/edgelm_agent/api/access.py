"""Who may call the HTTP listener. Pure: headers in, an error or nothing out.

The Unix socket is guarded by its file mode (0660, group ``edgelm``). The HTTP listener is
reachable by anything on the box, including a web page in the kiosk's browser, so:

* **DNS rebinding**: a page on ``evil.example`` whose name later resolves to 127.0.0.1 sends
  ``Host: evil.example``. We accept only the loopback names and addresses we listen on.
* **Cross-site requests**: a page can POST to ``http://127.0.0.1:8470`` with the right Host but
  cannot hide its ``Origin``; we refuse origins that are not configured. Only the listener's
  own origin (``http://127.0.0.1:8470``, and the same port under the other loopback names) is
  implied: a page on another port of the same machine (``http://localhost``, port 80) is
  another origin, and gets nothing unless it is listed in ``allowed_origins``.
* **Bearer token**: when ``api_token`` is set, every HTTP request must carry it. Binding a
  non-loopback address requires one (checked at startup), and then Host is not restricted.

A web app on a configured origin gets CORS headers, and its preflight (``OPTIONS``, which
browsers send without credentials) is answered before the token check.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass

from edgelm_agent.config import HttpListen
from edgelm_agent.errors import ConfigError, ForbiddenHost, NotAuthorized, shown

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")


def check_bind_allowed(listen: HttpListen, api_token: str | None) -> None:
    if not listen.is_loopback and not api_token:
        raise ConfigError(
            f"refusing to serve HTTP on non-loopback address {listen}: "
            "set api_token (EDGELM_API_TOKEN) first, or bind 127.0.0.1"
        )


@dataclass(frozen=True)
class HttpAccessPolicy:
    allowed_hosts: frozenset[str]
    allowed_origins: frozenset[str]
    api_token: str | None
    restrict_host: bool
    #: How to call the agent, for the message of a refused Host: each name with its port.
    preferred_hosts: tuple[str, ...] = ()

    @classmethod
    def for_listener(
        cls, listen: HttpListen, api_token: str | None, allowed_origins: tuple[str, ...] = ()
    ) -> HttpAccessPolicy:
        names = {listen.host if ":" not in listen.host else f"[{listen.host}]", *LOOPBACK_NAMES}
        with_port = {f"{name}:{listen.port}" for name in names}
        hosts = names | with_port
        origins = {f"http://{h}" for h in with_port} | set(allowed_origins)
        return cls(
            allowed_hosts=frozenset(h.lower() for h in hosts),
            allowed_origins=frozenset(o.lower() for o in origins),
            api_token=api_token,
            restrict_host=listen.is_loopback,
            preferred_hosts=tuple(sorted(with_port)),
        )

    def check_origin(self, *, host: str | None, origin: str | None) -> None:
        if self.restrict_host and (host is None or host.lower() not in self.allowed_hosts):
            raise ForbiddenHost(
                f"Host header {shown(host, 80)} is not allowed; call this agent as "
                f"{' or '.join(self.preferred_hosts)}"
            )
        if origin is not None and origin.rstrip("/").lower() not in self.allowed_origins:
            raise ForbiddenHost(
                f"Origin {shown(origin, 80)} is not allowed; add it to allowed_origins to call "
                "the agent from a web page"
            )

    def check_token(self, authorization: str | None) -> None:
        if self.api_token is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        # Header text may carry undecodable bytes as surrogates; compare bytes, never crash.
        given = token.strip().encode("utf-8", errors="surrogateescape")
        if scheme.lower() != "bearer" or not hmac.compare_digest(given, self.api_token.encode()):
            raise NotAuthorized("missing or invalid bearer token")

    def check(self, *, host: str | None, origin: str | None, authorization: str | None) -> None:
        self.check_origin(host=host, origin=origin)
        self.check_token(authorization)

    @staticmethod
    def cors_headers(origin: str | None) -> dict[str, str]:
        """Headers that let a browser page on an allowed ``origin`` read our responses."""
        if origin is None:
            return {}
        return {
            "Access-Control-Allow-Origin": origin,
            "Access-Control-Allow-Methods": "GET, POST, DELETE, OPTIONS",
            "Access-Control-Allow-Headers": "Authorization, Content-Type, X-Request-Id",
            "Access-Control-Expose-Headers": "X-Request-Id, Retry-After",
            "Access-Control-Max-Age": "600",
            "Vary": "Origin",
        }
