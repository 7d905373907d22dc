"""A newcomer's first hour: commands printed by the agent work as printed, mistakes get
clear answers, and scripts get exit codes they can use."""

from __future__ import annotations

import os
import pty
import re
import shlex
import subprocess
import sys
import time
from pathlib import Path

from tests.agent_process import REPO, TINY_GGUF, free_port

ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def edgelm(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "edgelm_cli", *args],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        cwd=cwd,
        env={k: v for k, v in os.environ.items() if not k.startswith("EDGELM_")},
    )


def agent_command(workdir: Path, port: int) -> list[str]:
    return [
        *(sys.executable, "-m", "edgelm_cli", "agent", "run", "--model", str(TINY_GGUF)),
        *("--state-dir", str(workdir / "state"), "--socket", str(workdir / "a.sock")),
        *("--http", f"127.0.0.1:{port}", "--threads", "2"),
    ]


class TestMistakes:
    def test_a_typo_in_a_command_gets_a_suggestion(self):
        """`edgelm modles` and `edgelm models lsit` name the command that was meant."""
        top = edgelm("modles")
        assert top.returncode == 2
        assert "Did you mean 'models'?" in top.stderr
        sub = edgelm("models", "lsit")
        assert sub.returncode == 2
        assert "Did you mean 'list'?" in sub.stderr

    def test_a_bad_number_gets_a_plain_message(self, short_tmp):
        """`--threads abc` says what was expected, not a Python exception's text."""
        result = edgelm("agent", "run", "--threads", "abc", "--state-dir", str(short_tmp / "s"))
        assert result.returncode == 1
        assert "flag --threads: expected a positive integer or 'auto', got 'abc'" in result.stderr
        assert "invalid literal" not in result.stderr

    def test_read_only_commands_refuse_a_state_dir_that_holds_no_registry(self, short_tmp):
        """A mistyped --state-dir is an error, not an empty registry, and nothing is created
        there."""
        missing = short_tmp / "no-such-dir"
        for command in ("list", "verify", "gc"):
            result = edgelm("models", command, "--state-dir", str(missing), "--json")
            assert result.returncode == 1, result.stdout
            assert '"reference": "state-dir-has-no-registry"' in result.stdout
        assert not missing.exists()


class TestReadyOutput:
    def test_the_banner_commands_work_as_printed_from_another_directory(self, short_tmp):
        """On a terminal the agent prints commands with full paths; pasted into a shell
        elsewhere, with the printed export, the chat command answers."""
        port = free_port()
        master, slave = pty.openpty()
        log = open(short_tmp / "stdout.log", "wb")  # noqa: SIM115  # closed below
        proc = subprocess.Popen(
            [*agent_command(short_tmp, port), "--log-format", "json"],
            stdout=log,
            stderr=slave,
            cwd=REPO,
            env={
                **{k: v for k, v in os.environ.items() if not k.startswith("EDGELM_")},
                "COLUMNS": "200",
            },
        )
        os.close(slave)
        banner = ""
        try:
            deadline = time.monotonic() + 120
            while "Hello!'" not in banner or "models list" not in banner:
                assert proc.poll() is None, banner
                assert time.monotonic() < deadline, banner
                try:
                    banner += ANSI.sub("", os.read(master, 65536).decode(errors="replace"))
                except OSError:
                    time.sleep(0.05)
            lines = [line.strip(" │|\r") for line in banner.splitlines()]
            export = next(line for line in lines if line.startswith("export EDGELM_SOCKET="))
            chat = next(line for line in lines if " chat " in line and "Hello!" in line)
            socket_path = shlex.split(export.split("#")[0])[1].split("=", 1)[1]
            assert Path(socket_path).is_absolute()
            elsewhere = short_tmp / "elsewhere"
            elsewhere.mkdir()
            answer = subprocess.run(  # noqa: S602  # the printed line, as a shell runs it
                chat,
                shell=True,
                capture_output=True,
                text=True,
                timeout=120,
                cwd=elsewhere,
                env={**os.environ, "EDGELM_SOCKET": socket_path},
                check=False,
            )
            assert answer.returncode == 0, (chat, answer.stderr)
            assert answer.stdout.strip()
        finally:
            proc.terminate()
            proc.wait(timeout=60)
            os.close(master)
            log.close()

    def test_without_a_terminal_one_plain_ready_line_names_the_addresses(self, short_tmp):
        """With stderr apart from the JSON log and not a terminal, one line says where the
        agent listens."""
        port = free_port()
        with open(short_tmp / "stdout.log", "wb") as out:
            proc = subprocess.Popen(
                agent_command(short_tmp, port),
                stdout=out,
                stderr=subprocess.PIPE,
                cwd=REPO,
                env={k: v for k, v in os.environ.items() if not k.startswith("EDGELM_")},
            )
            try:
                assert proc.stderr is not None
                line = proc.stderr.readline().decode()
            finally:
                proc.terminate()
                proc.wait(timeout=60)
                assert proc.stderr is not None
                proc.stderr.close()
        assert line.startswith("edgelm agent ready: ")
        assert f"socket={short_tmp / 'a.sock'}" in line
        assert f"http=http://127.0.0.1:{port}" in line
        assert "model=tiny-llama" in line
