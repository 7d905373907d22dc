"""`edgelm fleet models push --presets`: the presets signed into the target, checked first.

A real fleet's first targets metadata and its offline key; no network.
"""

from __future__ import annotations

import datetime
from pathlib import Path
from typing import Any

import pytest
from tuf.api.metadata import Metadata, Targets

from edgelm_agent.registry.model_target import parse_model_target
from edgelm_protocol.repository.writer import load_key
from edgelm_provisioning.errors import AlreadyIssued, InvalidValue
from edgelm_provisioning.fleet_dir import FleetDir
from edgelm_provisioning.fleet_init import init_fleet
from edgelm_provisioning.fleet_models_cmd import read_presets_file
from edgelm_provisioning.model_source import PreparedModel, prepare_model
from edgelm_provisioning.targets_signing import (
    ModelSettings,
    already_published,
    new_target,
    next_targets,
)
from tests.agent_process import TINY_GGUF

NOW = datetime.datetime(2026, 11, 28, 12, 0, tzinfo=datetime.UTC)
EXTRACT: dict[str, Any] = {
    "system": "You read invoices.",
    "response_format": {"type": "json_object"},
    "sampling": {"temperature": "0.2", "stop": "END"},
}


@pytest.fixture(scope="module")
def gguf() -> PreparedModel:
    return prepare_model(TINY_GGUF)


@pytest.fixture
def fleet(tmp_path: Path) -> FleetDir:
    root = tmp_path / "acme"
    init_fleet(
        root,
        fleet="acme",
        control_url="http://127.0.0.1:8480",
        broker_url="mqtt://127.0.0.1:1883",
        now=0,
    )
    return FleetDir.open(root)


def settings(presets: dict[str, Any] | None, **fields: Any) -> ModelSettings:
    return ModelSettings("tiny", "1.0", presets=presets, **fields)


class TestNewTarget:
    def test_presets_are_signed_in_their_canonical_form(self, fleet, gguf):
        """What is signed is what every agent parses back: a lone stop string becomes a list,
        and the agent's own parser (API check included) takes the signed target."""
        signer = load_key(fleet.paths.targets_key)
        target = new_target(gguf, settings({"extract": EXTRACT}))
        signed = target.info.unrecognized_fields["custom"]["edgelm"]["presets"]
        assert signed == {
            "extract": {**EXTRACT, "sampling": {"temperature": "0.2", "stop": ["END"]}}
        }
        first = Metadata[Targets].from_bytes(
            (fleet.paths.repository_dir / "metadata" / "1.targets.json").read_bytes()
        )
        metadata = next_targets(first, target, signer, now=NOW)
        info = metadata.signed.targets[target.path]
        parsed = parse_model_target(
            target.path, info.length, dict(info.hashes), info.unrecognized_fields["custom"]
        )
        assert parsed.presets == target.model.presets
        assert [p.name for p in parsed.presets] == ["extract"]

    def test_no_presets_sign_as_before(self, gguf):
        """A push without --presets signs no presets key at all."""
        target = new_target(gguf, settings(None))
        assert "presets" not in target.info.unrecognized_fields["custom"]["edgelm"]

    @pytest.mark.parametrize(
        ("presets", "match"),
        [
            ({"Bad Name": {"system": "x"}}, "preset name must be"),
            (
                {"p": {"sampling": {"max_tokens": 5000}}},
                r"max_tokens must be an integer from 1 to 4096",
            ),
            (
                {
                    "p": {
                        "response_format": {
                            "type": "json_schema",
                            "json_schema": {"schema": {"format": "date"}},
                        }
                    }
                },
                "unsupported keyword 'format'",
            ),
        ],
    )
    def test_bad_presets_are_refused_before_signing(self, gguf, presets, match):
        """The operator's CLI refuses what every device would: InvalidValue on --presets."""
        with pytest.raises(InvalidValue, match=match) as caught:
            new_target(gguf, settings(presets))
        assert caught.value.param == "presets"
        assert caught.value.reference == "invalid-presets"

    def test_a_published_version_with_other_presets_is_refused(self, fleet, gguf):
        """Targets never change: the same file and version with another preset is another
        push, refused, with the hint to push a new version."""
        signer = load_key(fleet.paths.targets_key)
        first = Metadata[Targets].from_bytes(
            (fleet.paths.repository_dir / "metadata" / "1.targets.json").read_bytes()
        )
        published = next_targets(
            first, new_target(gguf, settings({"extract": EXTRACT})), signer, now=NOW
        )
        same = new_target(gguf, settings({"extract": EXTRACT}))
        assert already_published(published.signed, same) is True
        other = new_target(gguf, settings({"extract": {**EXTRACT, "system": "You read receipts."}}))
        with pytest.raises(AlreadyIssued) as caught:
            already_published(published.signed, other)
        assert "new --version" in (caught.value.hint or "")


class TestPresetsFile:
    def test_a_file_is_read_and_checked(self, tmp_path):
        """The push reads TOML into the signed form."""
        path = tmp_path / "presets.toml"
        path.write_text(
            '[extract]\nsystem = "You read invoices."\nsampling = { temperature = 0.2 }\n'
        )
        assert read_presets_file(path) == {
            "extract": {"system": "You read invoices.", "sampling": {"temperature": "0.2"}}
        }

    def test_a_bad_file_is_an_invalid_presets_value_naming_the_file(self, tmp_path):
        """The error names the file and the place in it, with a hint."""
        path = tmp_path / "presets.toml"
        path.write_text('[extract]\nsytem = "x"\n')
        with pytest.raises(InvalidValue) as caught:
            read_presets_file(path)
        assert str(path) in str(caught.value)
        assert "unknown field 'sytem'" in str(caught.value)
        assert caught.value.hint is not None
