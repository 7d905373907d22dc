"""The broker URL, parsed once for the device agent, the control plane and provisioning.

::

    mqtt://[user[:password]@]host[:port][/][?protocol=5|3.1.1]
    mqtts://...                          (TLS; the port defaults to 8883 instead of 1883)

The host may be a name, an IPv4 address or an IPv6 address in brackets; user and password
are percent-decoded. ``?protocol=3.1.1`` makes the client speak MQTT 3.1.1, for a broker that
speaks nothing newer (the embedded demo broker); the default is MQTT 5. Anything else (another
scheme, a path, another query key, a fragment, spaces, a port outside 1..65535, a password
without a user) is refused with :class:`InvalidBrokerUrl`, which names the problem. Pure: no
I/O, no DNS.
"""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass, field

from edgelm_protocol.mqtt.errors import InvalidBrokerUrl
from edgelm_protocol.mqtt.settings import MAX_UINT16, MqttVersion

SCHEMES = {"mqtt": 1883, "mqtts": 8883}
"""The schemes a broker URL may have, with their default ports."""
PROTOCOL_KEY = "protocol"
SHAPE = "mqtt[s]://[user[:password]@]host[:port][?protocol=5|3.1.1]"


@dataclass(frozen=True)
class BrokerUrl:
    """A parsed broker URL. ``str()`` gives it back in canonical form, without the password."""

    host: str
    port: int = 1883
    username: str | None = None
    password: str | None = field(default=None, repr=False)
    tls: bool = False
    protocol_version: MqttVersion = MqttVersion.V5

    @property
    def mqtt5(self) -> bool:
        """False with ``?protocol=3.1.1``: no shared subscriptions, no session expiry."""
        return self.protocol_version is MqttVersion.V5

    @property
    def scheme(self) -> str:
        return "mqtts" if self.tls else "mqtt"

    def __str__(self) -> str:  # never shows the password
        user = f"{urllib.parse.quote(self.username, safe='')}@" if self.username else ""
        host = f"[{self.host}]" if ":" in self.host else self.host
        query = "" if self.mqtt5 else f"?{PROTOCOL_KEY}={self.protocol_version}"
        return f"{self.scheme}://{user}{host}:{self.port}{query}"


def _invalid(url: object, problem: str) -> InvalidBrokerUrl:
    return InvalidBrokerUrl(redact(url) if isinstance(url, str) else repr(url), problem, SHAPE)


def parse_broker_url(url: object) -> BrokerUrl:
    """Parse ``url``; raise :class:`InvalidBrokerUrl` naming the first problem found."""
    if not isinstance(url, str):
        raise _invalid(url, "a broker URL is a string")
    if not url:
        raise _invalid(url, "the URL is empty")
    if any(ord(c) <= 32 or ord(c) == 127 for c in url):
        # urlsplit silently drops tabs and newlines; a URL with them was mangled on the way.
        raise _invalid(url, "the URL holds spaces or control characters")
    try:
        parts = urllib.parse.urlsplit(url)
    except ValueError as exc:  # an unclosed IPv6 bracket
        raise _invalid(url, f"the host is malformed ({exc})") from None
    if parts.scheme not in SCHEMES:
        scheme = f"{parts.scheme}://" if parts.scheme else "no scheme"
        raise _invalid(url, f"the scheme must be mqtt:// or mqtts://, not {scheme}")
    if not parts.netloc or not parts.hostname:
        raise _invalid(url, "the host is missing")
    try:
        port = parts.port
    except ValueError:
        raise _invalid(url, "the port must be a number from 1 to 65535") from None
    if port is not None and not 0 < port <= MAX_UINT16:
        raise _invalid(url, "the port must be a number from 1 to 65535")
    if parts.path not in ("", "/"):
        raise _invalid(url, f"a broker URL has no path, got {parts.path!r}")
    if parts.fragment:
        raise _invalid(url, f"a broker URL has no fragment, got #{parts.fragment}")
    username = urllib.parse.unquote(parts.username) if parts.username else None
    password = urllib.parse.unquote(parts.password) if parts.password else None
    if password is not None and username is None:
        raise _invalid(url, "a password needs a user name (user:password@host)")
    return BrokerUrl(
        host=parts.hostname,
        port=port or SCHEMES[parts.scheme],
        username=username,
        password=password,
        tls=parts.scheme == "mqtts",
        protocol_version=_protocol(url, parts.query),
    )


def _protocol(url: str, query: str) -> MqttVersion:
    if not query:
        return MqttVersion.V5
    try:
        pairs = urllib.parse.parse_qsl(
            query, keep_blank_values=True, strict_parsing=True, max_num_fields=8
        )
    except ValueError:
        raise _invalid(url, f"the query {query!r} is not protocol=5|3.1.1") from None
    keys = [key for key, _ in pairs]
    unknown = sorted(set(keys) - {PROTOCOL_KEY})
    if unknown:
        raise _invalid(url, f"the only query option is protocol=5|3.1.1, got {', '.join(unknown)}")
    if len(pairs) != 1:
        raise _invalid(url, "protocol= is given more than once")
    value = pairs[0][1]
    try:
        return MqttVersion(value)
    except ValueError:
        raise _invalid(url, f"protocol must be 5 or 3.1.1, got {value!r}") from None


def redact(url: str) -> str:
    """``url`` with the password of its user part, if any, replaced by ``***``."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return repr(url)
    ends = [i for i in (rest.find(c) for c in "/?#") if i >= 0]
    end = min(ends, default=len(rest))
    userinfo, at, hostport = rest[:end].rpartition("@")
    if at and ":" in userinfo:
        userinfo = userinfo.split(":", 1)[0] + ":***"
    return repr(f"{scheme}{sep}{userinfo}{at}{hostport}{rest[end:]}")
