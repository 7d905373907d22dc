"""HTTP access policy: DNS rebinding, cross-site requests and bearer tokens."""

from __future__ import annotations

import pytest

from edgelm_agent.api.access import HttpAccessPolicy, check_bind_allowed
from edgelm_agent.config import HttpListen
from edgelm_agent.errors import ConfigError, ForbiddenHost, NotAuthorized

LOOPBACK = HttpListen("127.0.0.1", 8470)


class TestHttpAccessPolicy:
    @pytest.mark.parametrize(
        "host",
        [
            "127.0.0.1:8470",
            "localhost:8470",
            "LOCALHOST:8470",
            "127.0.0.1",
            "localhost",
            "[::1]:8470",
        ],
    )
    def test_loopback_hosts_are_allowed(self, host):
        """The loopback names and addresses, with or without the port, pass."""
        HttpAccessPolicy.for_listener(LOOPBACK, None).check(
            host=host, origin=None, authorization=None
        )

    @pytest.mark.parametrize(
        "host",
        ["evil.example", "evil.example:8470", "127.0.0.1:9999", "192.168.1.5:8470", None, ""],
    )
    def test_other_hosts_are_refused(self, host):
        """A rebinding attacker's Host header, or a missing one, is refused."""
        with pytest.raises(ForbiddenHost):
            HttpAccessPolicy.for_listener(LOOPBACK, None).check(
                host=host, origin=None, authorization=None
            )

    def test_foreign_origin_is_refused(self):
        """A browser request from a page on another origin is refused."""
        policy = HttpAccessPolicy.for_listener(LOOPBACK, None)
        with pytest.raises(ForbiddenHost, match="Origin"):
            policy.check(host="127.0.0.1:8470", origin="https://evil.example", authorization=None)

    @pytest.mark.parametrize(
        "origin",
        ["http://localhost", "http://127.0.0.1", "http://[::1]", "http://localhost:80"],
    )
    def test_pages_on_other_ports_of_this_machine_are_other_origins(self, origin):
        """A page on port 80 of the same machine is not the agent: refused unless configured."""
        policy = HttpAccessPolicy.for_listener(LOOPBACK, None)
        with pytest.raises(ForbiddenHost, match="Origin"):
            policy.check(host="127.0.0.1:8470", origin=origin, authorization=None)
        configured = HttpAccessPolicy.for_listener(LOOPBACK, None, (origin,))
        configured.check(host="127.0.0.1:8470", origin=origin, authorization=None)

    @pytest.mark.parametrize(
        "origin", ["http://127.0.0.1:8470", "http://localhost:8470", "http://[::1]:8470"]
    )
    def test_the_listeners_own_origin_is_implied(self, origin):
        """The listener's own origin (its port, under each loopback name) needs no setting."""
        HttpAccessPolicy.for_listener(LOOPBACK, None).check(
            host="127.0.0.1:8470", origin=origin, authorization=None
        )

    def test_refused_host_message_names_every_address_with_its_port(self):
        """The 403 says how to call the agent, each name with its port, [::1] included."""
        with pytest.raises(ForbiddenHost) as refused:
            HttpAccessPolicy.for_listener(LOOPBACK, None).check(
                host="evil.example", origin=None, authorization=None
            )
        message = str(refused.value)
        for host in ("127.0.0.1:8470", "localhost:8470", "[::1]:8470"):
            assert host in message
        assert "[::1] " not in message
        assert not message.endswith("[::1]")

    def test_configured_origin_is_allowed(self):
        """An origin listed in allowed_origins may call the API."""
        policy = HttpAccessPolicy.for_listener(LOOPBACK, None, ("http://localhost:3000",))
        policy.check(host="127.0.0.1:8470", origin="http://localhost:3000/", authorization=None)

    def test_token_is_required_when_configured(self):
        """With api_token set, a missing or wrong bearer token is refused."""
        policy = HttpAccessPolicy.for_listener(LOOPBACK, "s3cret")
        for auth in (None, "Bearer nope", "Basic s3cret", "s3cret"):
            with pytest.raises(NotAuthorized):
                policy.check(host="127.0.0.1:8470", origin=None, authorization=auth)
        policy.check(host="127.0.0.1:8470", origin=None, authorization="Bearer s3cret")

    def test_undecodable_token_is_refused_not_a_crash(self):
        """A bearer token with bytes that are not UTF-8 is a 401, never an exception."""
        policy = HttpAccessPolicy.for_listener(LOOPBACK, "s3cret")
        with pytest.raises(NotAuthorized):
            policy.check(host="127.0.0.1:8470", origin=None, authorization="Bearer \udcff\udcfe")

    def test_non_loopback_bind_relies_on_the_token(self):
        """On a non-loopback address any Host is accepted, but the token is required."""
        policy = HttpAccessPolicy.for_listener(HttpListen("0.0.0.0", 8470), "t")  # noqa: S104
        policy.check(host="device.lan:8470", origin=None, authorization="Bearer t")
        with pytest.raises(NotAuthorized):
            policy.check(host="device.lan:8470", origin=None, authorization=None)


class TestBindCheck:
    def test_non_loopback_without_token_is_refused(self):
        """Binding a non-loopback address without an API token is a config error."""
        with pytest.raises(ConfigError, match="api_token"):
            check_bind_allowed(HttpListen("0.0.0.0", 8470), None)  # noqa: S104

    def test_loopback_needs_no_token(self):
        """Loopback binds need no token."""
        check_bind_allowed(LOOPBACK, None)
