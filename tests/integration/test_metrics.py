"""/metrics exposes what an operator needs, in Prometheus text format."""

from __future__ import annotations

import re

from tests.agent_process import AgentProcess


def sample(text: str, name: str, **labels: str) -> float:
    """The value of one sample, found by name and (a subset of) its labels."""
    for line in text.splitlines():
        if not line.startswith(name):
            continue
        match = re.fullmatch(rf"{re.escape(name)}(?:\{{(.*)\}})? (\S+)", line)
        if match is None:
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', match.group(1) or ""))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(match.group(2))
    raise AssertionError(f"no sample {name}{labels} in:\n{text}")


class TestMetrics:
    async def test_counts_requests_tokens_latency_and_load(self, start_agent):
        """After two completions and a 404, the metrics show them all."""
        agent: AgentProcess = start_agent()
        async with agent.unix_session() as s:
            for _ in range(2):
                async with s.post(
                    "http://localhost/v1/completions",
                    json={"model": "tiny-llama", "prompt": "hello", "max_tokens": 7},
                ) as r:
                    assert r.status == 200
            async with s.post(
                "http://localhost/v1/completions", json={"model": "other", "prompt": "x"}
            ) as r:
                assert r.status == 404
            async with s.get("http://localhost/metrics") as r:
                assert r.headers["Content-Type"].startswith("text/plain")
                text = await r.text()
        route = "/v1/completions"
        assert sample(text, "edgelm_requests_total", route=route, status="200") == 2
        assert sample(text, "edgelm_requests_total", route=route, status="404") == 1
        # the activation's health check generates 8 tokens (its default budget) at start-up
        assert sample(text, "edgelm_tokens_generated_total", model="tiny-llama") == 2 * 7 + 8
        assert sample(text, "edgelm_time_to_first_token_seconds_count", model="tiny-llama") == 2
        assert sample(text, "edgelm_tokens_per_second_count", model="tiny-llama") >= 2
        assert sample(text, "edgelm_queue_wait_seconds_count") >= 2
        assert sample(text, "edgelm_queue_depth") == 0
        assert sample(text, "edgelm_model_load_seconds", model="tiny-llama") > 0
        assert sample(text, "edgelm_prompt_tokens_total", model="tiny-llama") > 0
