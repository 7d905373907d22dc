"""Presets through a rollout, every part real: `edgelm fleet models push --presets`, the
control plane, a Mosquitto, and an enrolled agent on the tiny GGUF that serves the preset.

The prompt and the schema reach the device the way the weights do: inside the signed target,
verified by the device's registry before the model is activated.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import jsonschema
import openai
import pytest

from tests.agent_process import REPO, TINY_GGUF
from tests.integration.test_fleet_e2e import FullFleet
from tests.mosquitto import Mosquitto

pytestmark = pytest.mark.timeout(600)

INVOICE: dict[str, Any] = {
    "type": "object",
    "properties": {
        "paid": {"type": "boolean"},
        "total": {"type": "integer", "minimum": 0, "maximum": 9999},
    },
    "required": ["paid", "total"],
}
PRESETS: dict[str, Any] = {
    "extract": {
        "description": "Invoice fields as JSON",
        "system": "You read invoices and answer with their fields.",
        "response_format": {
            "type": "json_schema",
            "json_schema": {"name": "invoice", "schema": INVOICE},
        },
        "sampling": {"max_tokens": 64},
    }
}


@pytest.fixture
def full_fleet(short_tmp: Path, mosquitto_factory: Callable[..., Mosquitto]) -> Iterator[FullFleet]:
    fleet = FullFleet(short_tmp, mosquitto_factory(persistence=True))
    try:
        yield fleet
    finally:
        fleet.stop_all()


def push(fleet: FullFleet, version: str, presets: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [
            *(sys.executable, "-m", "edgelm_cli", "fleet", "models", "push", str(TINY_GGUF)),
            *("--name", "tiny", "--version", version, "--presets", str(presets)),
            *("--fleet-dir", str(fleet.dir), "--json"),
        ],
        cwd=REPO,
        env=fleet.env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


class TestPresetsRollOut:
    def test_a_preset_pushed_with_the_model_is_served_by_the_device(
        self, full_fleet: FullFleet, short_tmp: Path
    ):
        """Pushed with --presets, rolled out, health-checked: the device lists the preset and
        a request that selects it gets a reply the preset's schema holds. The same version
        with another prompt is refused at the push: a changed preset is a new version."""
        full_fleet.add_device("kiosk-1")
        presets = short_tmp / "presets.json"
        presets.write_text(json.dumps(PRESETS))
        pushed = push(full_fleet, "1.0", presets)
        assert pushed.returncode == 0, pushed.stderr
        assert json.loads(pushed.stdout)["target"]["presets"] == PRESETS

        rollout = full_fleet.rollout("tiny@1.0", waves="1")
        done = full_fleet.wait_rollout(rollout, "completed")
        assert {d["state"] for d in done["devices"]} == {"succeeded"}

        agent = full_fleet.agents["kiosk-1"]
        client = openai.OpenAI(base_url=agent.base_url + "/v1", api_key="unused", max_retries=0)
        [model] = client.models.list().data
        assert (model.model_extra or {})["presets"] == [
            {"name": "extract", "description": "Invoice fields as JSON"}
        ]
        reply = client.chat.completions.create(
            model="tiny",
            messages=[{"role": "user", "content": "Invoice 12, paid."}],
            seed=3,
            extra_body={"preset": "extract"},
        )
        assert reply.choices[0].finish_reason == "stop"
        jsonschema.validate(json.loads(reply.choices[0].message.content or ""), INVOICE)

        changed = json.loads(json.dumps(PRESETS))
        changed["extract"]["system"] = "You read receipts."
        presets.write_text(json.dumps(changed))
        refused = push(full_fleet, "1.0", presets)
        assert refused.returncode == 1, refused.stdout
        error = json.loads(refused.stdout)["error"]
        assert "published already with other content or settings" in error["message"]
        assert "new --version" in error["hint"]
