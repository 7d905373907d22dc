"""The per-client token bucket and concurrency cap, and who may do what on HTTP."""

from __future__ import annotations

import dataclasses
import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgelm_agent.api.access import HttpAccessPolicy, needs_admin
from edgelm_agent.api.rate_limit import ClientLimiter, ClientLimits, TokenBucket, client_key
from edgelm_agent.config import AgentConfig, HttpListen
from edgelm_agent.errors import AdminRequired, ConfigError, NotAuthorized

gaps = st.lists(st.floats(min_value=0, max_value=5, allow_nan=False), min_size=1, max_size=200)


class TestTokenBucket:
    @given(
        rate=st.floats(min_value=0.01, max_value=100),
        burst=st.integers(min_value=1, max_value=50),
        gaps=gaps,
    )
    def test_never_admits_more_than_burst_plus_what_refilled(self, rate, burst, gaps):
        """Over any run of requests, admitted <= burst + rate * elapsed."""
        bucket = TokenBucket.full(rate, burst, 0.0)
        now, admitted = 0.0, 0
        for gap in gaps:
            now += gap
            if bucket.take(now) == 0.0:
                admitted += 1
            assert admitted <= burst + rate * now + 1e-6

    @given(
        rate=st.floats(min_value=0.01, max_value=100),
        burst=st.integers(min_value=1, max_value=50),
        gaps=gaps,
    )
    def test_a_refused_request_succeeds_once_it_has_waited(self, rate, burst, gaps):
        """The wait a refusal names is enough: retrying then is admitted."""
        bucket = TokenBucket.full(rate, burst, 0.0)
        now = 0.0
        for gap in gaps:
            now += gap
            wait = bucket.take(now)
            if wait > 0:
                assert bucket.take(now + wait * (1 + 1e-9) + 1e-9) == 0.0
                now += wait * (1 + 1e-9) + 1e-9

    def test_a_full_bucket_admits_exactly_burst_at_once(self):
        bucket = TokenBucket.full(1.0, 5, 100.0)
        assert [bucket.take(100.0) == 0.0 for _ in range(6)] == [True] * 5 + [False]

    def test_a_clock_stepping_back_takes_nothing_away(self):
        bucket = TokenBucket.full(1.0, 2, 100.0)
        bucket.take(100.0)
        assert bucket.take(50.0) == 0.0
        assert bucket.take(50.0) > 0


class TestClientLimiter:
    def test_one_client_over_its_rate_leaves_the_others_served(self):
        limiter = ClientLimiter(ClientLimits(rate_per_s=0.5, burst=2, max_concurrent=0))
        for _ in range(2):
            assert limiter.admit("a", 0.0) is None
            limiter.release("a")
        refusal = limiter.admit("a", 0.0)
        assert refusal is not None
        assert refusal.reason == "rate"
        assert refusal.retry_after_s == 2  # one token at 0.5/s
        assert limiter.admit("b", 0.0) is None
        assert limiter.admit("a", 2.0) is None

    def test_a_client_with_its_slots_full_is_refused_until_one_is_released(self):
        limiter = ClientLimiter(ClientLimits(rate_per_s=0, burst=1, max_concurrent=2))
        assert limiter.admit("a", 0.0) is None
        assert limiter.admit("a", 0.0) is None
        refusal = limiter.admit("a", 0.0)
        assert refusal is not None
        assert refusal.reason == "concurrency"
        assert refusal.retry_after_s >= 1
        assert limiter.admit("b", 0.0) is None
        limiter.release("a")
        assert limiter.admit("a", 0.0) is None
        assert limiter.inflight("a") == 2

    @given(st.lists(st.integers(min_value=0, max_value=100), max_size=300))
    def test_the_table_of_clients_stays_bounded(self, clients):
        """A process inventing names cannot grow memory without end."""
        limiter = ClientLimiter(ClientLimits(rate_per_s=1, burst=1, max_clients=10))
        for n, client in enumerate(clients):
            if limiter.admit(str(client), float(n)) is None:
                limiter.release(str(client))
            assert len(limiter._buckets) <= 10

    def test_rate_zero_turns_the_limit_off(self):
        limiter = ClientLimiter(ClientLimits(rate_per_s=0, burst=1, max_concurrent=0))
        for _ in range(1000):
            assert limiter.admit("a", 0.0) is None


class TestClientKey:
    def test_a_token_names_the_client_without_showing_the_token(self):
        key, who = client_key("Bearer s3cret", "127.0.0.1")
        assert key.startswith("token:")
        assert "s3cret" not in key + who
        assert client_key("Bearer other", "127.0.0.1")[0] != key
        assert client_key("bearer s3cret", "10.0.0.2")[0] == key

    def test_without_a_token_the_peer_address_names_it(self):
        assert client_key(None, "127.0.0.1") == ("peer:127.0.0.1", "the client at 127.0.0.1")
        assert client_key("Basic abc", "::1")[0] == "peer:::1"
        assert client_key("Bearer \udcff", None)[0].startswith("token:")  # never crashes


class TestAdminPolicy:
    @pytest.mark.parametrize(
        "path",
        [
            "/v1/registry/import",
            "/v1/registry/install",
            "/v1/registry/activate",
            "/v1/registry/rollback",
            "/v1/registry/verify",
            "/v1/registry/gc",
            "/v1/registry/pin",
            "/v1/registry/some-route-added-later",
        ],
    )
    def test_registry_changes_are_admin(self, path):
        assert needs_admin("POST", path)
        assert needs_admin("DELETE", path)

    @pytest.mark.parametrize(
        ("method", "path"),
        [
            ("GET", "/v1/registry/models"),
            ("GET", "/v1/registry/available"),
            ("POST", "/v1/chat/completions"),
            ("POST", "/v1/completions"),
            ("POST", "/v1/jobs"),
            ("DELETE", "/v1/jobs/{job_id}"),
            ("GET", "/v1/sync"),
            ("POST", "unmatched"),
        ],
    )
    def test_reads_generation_and_jobs_are_not(self, method, path):
        assert not needs_admin(method, path)

    def policy(self, api: str | None, admin: str | None) -> HttpAccessPolicy:
        config = AgentConfig(api_token=api, admin_token=admin)
        policy = HttpAccessPolicy.from_config(config)
        assert policy is not None
        return policy

    def test_only_the_admin_token_opens_admin_operations(self):
        """The API token is a known client that may not (403 AdminRequired); no token, a
        wrong one or another scheme is no valid client at all (401 NotAuthorized)."""
        policy = self.policy("user", "admin")
        policy.check_admin("Bearer admin")
        with pytest.raises(AdminRequired, match="admin_token"):
            policy.check_admin("Bearer user")
        for given_token in (None, "Bearer adminx", "Basic admin"):
            with pytest.raises(NotAuthorized, match="admin_token") as caught:
                policy.check_admin(given_token)
            assert not isinstance(caught.value, AdminRequired)

    def test_the_admin_token_also_opens_what_the_api_token_opens(self):
        policy = self.policy("user", "admin")
        policy.check_token("Bearer user")
        policy.check_token("Bearer admin")
        with pytest.raises(NotAuthorized):
            policy.check_token("Bearer nobody")

    def test_without_an_admin_token_admin_is_refused_on_http(self):
        with pytest.raises(AdminRequired, match="set admin_token"):
            self.policy(None, None).check_admin("Bearer anything")

    def test_the_two_tokens_must_differ(self):
        with pytest.raises(ConfigError, match="must differ"):
            self.policy("same", "same")

    def test_settings_reach_the_policy(self):
        config = AgentConfig(
            http_client_rate_per_s=2.5, http_client_burst=7, http_client_max_concurrent=3
        )
        policy = HttpAccessPolicy.from_config(config)
        assert policy is not None
        assert policy.client_limits == dataclasses.replace(
            ClientLimits(), rate_per_s=2.5, burst=7, max_concurrent=3
        )
        assert HttpAccessPolicy.from_config(dataclasses.replace(config, http=None)) is None
        everywhere = HttpListen("0.0.0.0", 8470)  # noqa: S104  # refused: no api_token
        with pytest.raises(ConfigError, match="api_token"):
            HttpAccessPolicy.from_config(AgentConfig(http=everywhere))


def test_retry_after_is_whole_seconds_and_at_least_one():
    limiter = ClientLimiter(ClientLimits(rate_per_s=1000, burst=1, max_concurrent=0))
    assert limiter.admit("a", 0.0) is None
    refusal = limiter.admit("a", 0.0)
    assert refusal is not None
    assert refusal.retry_after_s == 1 == math.ceil(0.001)
