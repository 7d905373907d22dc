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

**Public**: reading the OpenAPI document (:data:`PUBLIC_ROUTES`) needs no token.

**Admin operations** (:func:`needs_admin`: every registry change) are for the Unix socket's
group. Over HTTP they need ``admin_token``, a second bearer token; without one set they are
refused over HTTP altogether (403). The ``api_token`` never suffices for them (403); no token
or an unknown one is a 401, as everywhere. The ``admin_token`` is accepted wherever the
``api_token`` is.
"""

from __future__ import annotations

import dataclasses
import hmac
from dataclasses import dataclass, field

from edgelm_agent.api.rate_limit import ClientLimits
from edgelm_agent.config import AgentConfig, HttpListen
from edgelm_agent.errors import AdminRequired, ConfigError, ForbiddenHost, NotAuthorized, shown

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "[::1]")
#: Response headers a browser page may read: its request id, when to retry, and provenance.
EXPOSED_HEADERS = "X-Request-Id, Retry-After, X-Edgelm-Model, X-Edgelm-Model-Digest, " + (
    "X-Edgelm-Model-Signer"
)
_READ_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})
#: The agent's OpenAPI document: it holds no secrets, and a client reads it before it has a
#: token, so it is the one route that needs none (the Host and Origin checks still apply).
OPENAPI_PATH = "/openapi.json"
PUBLIC_ROUTES = frozenset({OPENAPI_PATH})


def needs_admin(method: str, route: str) -> bool:
    """Whether a request is an admin operation: anything but a read under ``/v1/registry/``
    (import, install, activate, rollback, verify, gc, pin, and whatever is added there later:
    the rule fails closed)."""
    return route.startswith("/v1/registry/") and method.upper() not in _READ_METHODS


def needs_token(path: str) -> bool:
    """Whether a request needs the ``api_token`` (when one is set): all but those for
    :data:`PUBLIC_ROUTES`, whatever their method (a wrong one gets its 405, not a 401)."""
    return path not in PUBLIC_ROUTES


def _bearer(authorization: str | None) -> bytes | None:
    scheme, _, token = (authorization or "").partition(" ")
    if scheme.lower() != "bearer":
        return None
    # Header text may carry undecodable bytes as surrogates; compare bytes, never crash.
    return token.strip().encode("utf-8", errors="surrogateescape")


def _matches(given: bytes | None, expected: str | None) -> bool:
    return (
        given is not None and expected is not None and hmac.compare_digest(given, expected.encode())
    )


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
    #: Bearer token for admin operations over HTTP; ``None`` refuses them over HTTP.
    admin_token: str | None = None
    #: Per-client rate and concurrency limits on HTTP.
    client_limits: ClientLimits = field(default_factory=ClientLimits)

    @classmethod
    def from_config(cls, config: AgentConfig) -> HttpAccessPolicy | None:
        """The HTTP listener's policy from the settings; ``None`` when HTTP is off."""
        if config.http is None:
            return None
        check_bind_allowed(config.http, config.api_token)
        if config.admin_token is not None and config.admin_token == config.api_token:
            raise ConfigError(
                "admin_token must differ from api_token: every HTTP client holds the api_token"
            )
        policy = cls.for_listener(config.http, config.api_token, config.allowed_origins)
        return dataclasses.replace(
            policy,
            admin_token=config.admin_token,
            client_limits=ClientLimits(
                rate_per_s=config.http_client_rate_per_s,
                burst=config.http_client_burst,
                max_concurrent=config.http_client_max_concurrent,
            ),
        )

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
        given = _bearer(authorization)
        if not (_matches(given, self.api_token) or _matches(given, self.admin_token)):
            raise NotAuthorized("missing or invalid bearer token")

    def check_admin(self, authorization: str | None) -> None:
        """An admin operation over HTTP: only the admin token will do. A caller without a
        valid token gets 401, as any unauthenticated call; one with the api_token gets 403
        (it is known, and not allowed), and so does everyone when admin_token is unset."""
        if self.admin_token is None:
            raise AdminRequired(
                "this is an admin operation: call it over the Unix socket (as a member of its "
                "group), or set admin_token and send Authorization: Bearer <admin_token>"
            )
        given = _bearer(authorization)
        if _matches(given, self.admin_token):
            return
        if _matches(given, self.api_token):
            raise AdminRequired(
                "this is an admin operation: over HTTP it needs Authorization: Bearer "
                "<admin_token> (the api_token is not enough), or call it over the Unix socket"
            )
        raise NotAuthorized(
            "missing or invalid bearer token: this is an admin operation, which over HTTP "
            "needs Authorization: Bearer <admin_token>, or call it over the Unix socket"
        )

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
            "Access-Control-Expose-Headers": EXPOSED_HEADERS,
            "Access-Control-Max-Age": "600",
            "Vary": "Origin",
        }
