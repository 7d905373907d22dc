"""Pure registry cores: target schema, bundle manifests, the clock, state transitions."""

from __future__ import annotations

import datetime

import pytest
from hypothesis import given
from hypothesis import strategies as st

from edgelm_agent.registry.bundle import BundleFile, build_manifest, parse_manifest
from edgelm_agent.registry.clock import LastKnownGoodClock
from edgelm_agent.registry.errors import InvalidModelMetadata, TargetMismatch, UnsafeTargetPath
from edgelm_agent.registry.model_target import (
    model_target_from_dict,
    parse_model_target,
    split_target_path,
)
from edgelm_agent.registry.state import RegistryState

SHA = "a" * 64


def custom(**changes: object) -> dict[str, object]:
    base: dict[str, object] = {
        "name": "m",
        "version": "1",
        "format": "gguf",
        "backend": "llama.cpp",
        "context_length": 512,
        "chat_template": None,
        "quantization": "Q4_1",
        "min_ram_bytes": 10,
        "sampling": {"temperature": "0.7", "top_k": 20},
        "health_check": {"prompt": "hi", "min_tokens_per_s": "2.5"},
    }
    return {"edgelm": {**base, **changes}}


class TestModelTarget:
    def test_parses_decimal_strings(self):
        """Decimals arrive as strings (canonical JSON has no floats) and become floats."""
        t = parse_model_target("models/m/1/model.gguf", 5, {"sha256": SHA}, custom())
        assert t.sampling.temperature == 0.7
        assert t.sampling.top_k == 20
        assert t.health_check.min_tokens_per_s == 2.5

    def test_round_trips_through_its_dict(self):
        """A target survives as_dict → model_target_from_dict unchanged."""
        t = parse_model_target("models/m/1/model.gguf", 5, {"sha256": SHA}, custom())
        assert model_target_from_dict(t.as_dict()) == t
        assert isinstance(t.custom()["sampling"]["temperature"], str)  # signable

    @pytest.mark.parametrize(
        "field",
        ["format", "backend", "context_length", "quantization", "min_ram_bytes", "name", "version"],
    )
    def test_missing_field_is_named(self, field):
        """A target without a required custom field is refused, naming the field."""
        data = custom()
        del data["edgelm"][field]  # type: ignore[attr-defined]
        with pytest.raises(InvalidModelMetadata, match=field):
            parse_model_target("models/m/1/model.gguf", 5, {"sha256": SHA}, data)

    def test_no_custom_at_all(self):
        """A target with no edgelm metadata is refused."""
        with pytest.raises(InvalidModelMetadata, match="no custom 'edgelm'"):
            parse_model_target("models/m/1/model.gguf", 5, {"sha256": SHA}, None)

    @pytest.mark.parametrize("context_length", [(1 << 20) + 1, 10**30])
    def test_context_length_has_an_upper_bound(self, context_length):
        """Signed metadata asking for more than 1,048,576 tokens of context is refused."""
        with pytest.raises(InvalidModelMetadata, match="at most 1048576"):
            parse_model_target(
                "models/m/1/model.gguf", 5, {"sha256": SHA}, custom(context_length=context_length)
            )

    def test_mismatched_backend(self):
        """GGUF must run on llama.cpp; anything else is refused."""
        with pytest.raises(InvalidModelMetadata, match="runs on"):
            parse_model_target(
                "models/m/1/model.gguf", 5, {"sha256": SHA}, custom(backend="onnxruntime-genai")
            )

    @pytest.mark.parametrize(
        "path",
        [
            "models/../../etc/passwd",
            "models/m/1/../../x.gguf",
            "/models/m/1/x.gguf",
            "models/m/1/sub/x.gguf",
            "models/M/1/x.gguf",
            "models/m/1/x\\y.gguf",
            "models/m/1/x\x00.gguf",
            "other/m/1/x.gguf",
            "models/m/../x.gguf",
        ],
    )
    def test_unsafe_paths(self, path):
        """Traversal, absolute paths, separators and control characters are refused."""
        with pytest.raises(UnsafeTargetPath):
            split_target_path(path)


class TestBundle:
    def test_manifest_is_canonical(self):
        """The same files in any order give the same manifest bytes."""
        files = [BundleFile("b.json", 2, SHA), BundleFile("a/x.onnx", 1, "b" * 64)]
        assert build_manifest(files) == build_manifest(list(reversed(files)))
        assert parse_manifest(build_manifest(files)) == sorted(files)

    @pytest.mark.parametrize("member", ["../x", "a/../../x", "/abs", "a//b", ".hidden"])
    def test_unsafe_members(self, member):
        """A member path that could leave the bundle folder is refused."""
        with pytest.raises(UnsafeTargetPath):
            build_manifest([BundleFile(member, 1, SHA)])

    @given(st.binary(max_size=200))
    def test_garbage_manifests_raise_cleanly(self, raw):
        """Arbitrary bytes never parse into a bundle and never raise anything unexpected."""
        with pytest.raises((TargetMismatch, UnsafeTargetPath)):
            parse_manifest(raw)


class TestClock:
    def test_only_moves_forward(self, tmp_path):
        """The last-known-good time never goes back, and covers a clock that did."""
        now = [datetime.datetime(2026, 11, 1, tzinfo=datetime.UTC)]
        clock = LastKnownGoodClock(tmp_path / "clock.json", now=lambda: now[0])
        clock.advance(now[0])
        now[0] = datetime.datetime(1970, 1, 1, tzinfo=datetime.UTC)  # power cut, no RTC
        assert clock.reference_time() == datetime.datetime(2026, 11, 1, tzinfo=datetime.UTC)
        clock.advance(now[0])
        assert clock.last_known_good() == datetime.datetime(2026, 11, 1, tzinfo=datetime.UTC)

    def test_corrupt_file_is_ignored(self, tmp_path):
        """A corrupt clock file falls back to the wall clock instead of failing."""
        (tmp_path / "clock.json").write_text("{nope")
        clock = LastKnownGoodClock(tmp_path / "clock.json")
        assert clock.last_known_good() is None


class TestState:
    def test_activation_moves_active_to_previous(self):
        """Activating B after A makes A previous; rolling back swaps them."""
        t = parse_model_target("models/m/1/model.gguf", 5, {"sha256": SHA}, custom())
        state = RegistryState().installed(t).activated("a@1").activated("b@1")
        assert (state.active, state.previous) == ("b@1", "a@1")
        state = state.rolled_back("a@1", "requested")
        assert (state.active, state.previous) == ("a@1", "b@1")
        assert [h.event for h in state.history] == [
            "installed",
            "activated",
            "activated",
            "rolled_back",
        ]
        assert RegistryState.from_json(state.to_json()) == state

    def test_keep_covers_active_previous_and_pinned(self):
        """gc keeps exactly the active, previous and pinned models."""
        state = RegistryState(active="a@1", previous="b@1", pinned=frozenset({"c@1"}))
        assert state.keep() == {"a@1", "b@1", "c@1"}
