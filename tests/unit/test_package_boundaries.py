"""The agent and the control plane never import each other; what they share lives in
edgelm_protocol, which imports neither. Checked on the source, so a lazy import inside a
function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGES = {
    "edgelm_agent": REPO / "agent" / "edgelm_agent",
    "edgelm_control": REPO / "control-plane" / "edgelm_control",
    "edgelm_protocol": REPO / "protocol" / "edgelm_protocol",
}
FORBIDDEN = {
    "edgelm_agent": {"edgelm_control", "edgelm_provisioning"},
    "edgelm_control": {"edgelm_agent", "edgelm_provisioning"},
    "edgelm_protocol": {"edgelm_agent", "edgelm_control", "edgelm_provisioning", "edgelm_cli"},
}


def imported_roots(path: Path) -> set[str]:
    roots = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            roots.add(node.module.split(".")[0])
    return roots


@pytest.mark.parametrize("package", sorted(PACKAGES))
def test_a_package_imports_none_of_the_others_it_must_not(package: str) -> None:
    offences = {
        str(path.relative_to(REPO)): sorted(imported_roots(path) & FORBIDDEN[package])
        for path in sorted(PACKAGES[package].rglob("*.py"))
        if imported_roots(path) & FORBIDDEN[package]
    }
    assert offences == {}
