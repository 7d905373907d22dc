"""The files under ``systemd/``, checked with systemd's own tools (systemd 252 here, no
systemd running as PID 1, so every check is offline): ``systemd-analyze verify`` is clean,
``systemd-analyze security`` rates both services at 2.0 or lower (and the operator guide
quotes what it says), sysusers.d and tmpfiles.d apply to an empty root; and the agent serves
with writable+executable memory refused by the kernel, as ``MemoryDenyWriteExecute=yes`` does.
"""

from __future__ import annotations

import ctypes
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.agent_process import TINY_GGUF, TINY_ONNX, AgentProcess

REPO = Path(__file__).resolve().parents[2]
UNITS = REPO / "systemd"
SERVICES = ["edgelm-agent.service", "edgelm-control.service"]
INSTALLED_EDGELM = "/opt/edgelm/bin/edgelm"  # where the units expect the command
GUIDE = REPO / "docs" / "operator-guide.md"

needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


def analyze(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["systemd-analyze", "--no-pager", *args], capture_output=True, text=True, check=False
    )


@needs_systemd_analyze
class TestVerify:
    def test_both_units_verify_clean(self, tmp_path: Path):
        """``systemd-analyze verify`` says nothing and exits 0. It checks that ExecStart's
        command exists, so the copies verified point it at this checkout's own ``edgelm``
        (the units' /opt/edgelm/bin/edgelm exists only where the guide's install made it);
        nothing else is changed."""
        edgelm = Path(sys.executable).parent / "edgelm"
        assert edgelm.is_file(), "make install puts the edgelm command beside the venv's python"
        copies = []
        for name in SERVICES:
            text = (UNITS / name).read_text()
            assert f"ExecStart={INSTALLED_EDGELM} " in text
            (tmp_path / name).write_text(text.replace(INSTALLED_EDGELM, str(edgelm)))
            copies.append(str(tmp_path / name))
        result = analyze("verify", *copies)
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")


@needs_systemd_analyze
class TestSecurity:
    @pytest.mark.parametrize("name", SERVICES)
    def test_exposure_is_2_or_lower_and_quoted_in_the_guide(self, name: str):
        """The issue's bar is 2.0 ("OK"). The guide quotes the overall line as it is now."""
        result = analyze("security", "--offline=yes", str(UNITS / name))
        assert result.returncode == 0, result.stderr
        overall = re.search(
            rf"Overall exposure level for {re.escape(name)}: (\d+\.\d+) \w+", result.stdout
        )
        assert overall, result.stdout
        assert float(overall.group(1)) <= 2.0, result.stdout
        assert overall.group(0) in GUIDE.read_text(), "update the guide's quoted output"


@pytest.mark.skipif(shutil.which("systemd-sysusers") is None, reason="systemd is not installed")
class TestUsersAndFiles:
    def test_sysusers_and_tmpfiles_make_the_users_and_the_config_file(self, tmp_path: Path):
        """Applied to an empty root: two system users with their groups, and the agent's
        settings file readable by its group only."""
        root = tmp_path / "root"
        (root / "etc").mkdir(parents=True)
        subprocess.run(
            ["systemd-sysusers", f"--root={root}", str(UNITS / "sysusers.d" / "edgelm.conf")],
            check=True,
            capture_output=True,
        )
        passwd = (root / "etc" / "passwd").read_text()
        users = {line.split(":")[0]: line.split(":") for line in passwd.splitlines()}
        assert users["edgelm"][5] == "/var/lib/edgelm"
        assert users["edgelm-control"][6] == "/usr/sbin/nologin"
        subprocess.run(
            [
                "systemd-tmpfiles",
                f"--root={root}",
                "--create",
                str(UNITS / "tmpfiles.d" / "edgelm.conf"),
            ],
            check=True,
            capture_output=True,
        )
        config = root / "etc" / "edgelm" / "agent.toml"
        assert config.stat().st_mode & 0o777 == 0o640
        group = (root / "etc" / "group").read_text()
        gid = next(line.split(":")[2] for line in group.splitlines() if line.startswith("edgelm:"))
        assert config.stat().st_gid == int(gid)


PR_SET_MDWE = 65
PR_MDWE_REFUSE_EXEC_GAIN = 1
_libc = ctypes.CDLL(None, use_errno=True)


def _refuse_write_execute() -> None:
    """In the child before exec: the kernel's MDWE (Linux 6.3+) refuses memory that is both
    writable and executable, or made executable later; kept across exec. It is the policy
    ``MemoryDenyWriteExecute=yes`` sets (systemd 257+ through this prctl, older systemd through
    an equivalent seccomp filter)."""
    if _libc.prctl(PR_SET_MDWE, PR_MDWE_REFUSE_EXEC_GAIN, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_MDWE)")


def _kernel_has_mdwe() -> bool:
    try:
        subprocess.run([sys.executable, "-c", "pass"], preexec_fn=_refuse_write_execute, check=True)
    except subprocess.SubprocessError:  # the prctl failed in the child: EINVAL, an old kernel
        return False
    return True


class TestMemoryDenyWriteExecute:
    @pytest.mark.parametrize(
        ("model", "model_id"),
        [(TINY_GGUF, "tiny-llama"), (TINY_ONNX, "tiny-onnx")],
        ids=["llama.cpp", "onnxruntime"],
    )
    def test_the_agent_loads_and_generates_without_write_execute_memory(
        self, short_tmp: Path, model: Path, model_id: str
    ):
        """llama.cpp (through llama-cpp-python's ctypes callbacks) and onnxruntime-genai load,
        pass the health check and answer a chat request with W+X memory refused, so the
        agent's unit can say MemoryDenyWriteExecute=yes."""
        if not _kernel_has_mdwe():
            pytest.skip("this kernel has no PR_SET_MDWE (Linux 6.3+) to refuse W+X memory with")
        agent = AgentProcess(short_tmp, model=model, preexec_fn=_refuse_write_execute)
        try:
            agent.wait_ready()
            status, body = agent.request(
                "POST",
                "/v1/chat/completions",
                {
                    "model": model_id,
                    "messages": [{"role": "user", "content": "Hi"}],
                    "max_tokens": 4,
                },
            )
            assert status == 200, body
            assert body["usage"]["completion_tokens"] >= 1
        finally:
            agent.stop()
