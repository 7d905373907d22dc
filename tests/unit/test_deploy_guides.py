"""The deployment guides work as printed, as far as this machine can tell.

``docs/deploy-pi.md`` and ``docs/deploy-jetson.md`` are read from top to bottom by someone at a
fresh device, so: every ``edgelm`` command in their code blocks names commands and options the
real CLI has; every ``agent.toml`` they show is a configuration the agent accepts; every link
in them leads to a file and heading that exist; the operator guide and the README lead to
them; and the Jetson drop-in keeps the agent's unit valid, with the security rating the guide
quotes.
"""

from __future__ import annotations

import re
import shlex
import shutil
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest

from edgelm_agent.config import resolve_config
from edgelm_cli.main import cli

REPO = Path(__file__).resolve().parents[2]
DOCS = REPO / "docs"
PI = DOCS / "deploy-pi.md"
JETSON = DOCS / "deploy-jetson.md"
GUIDES = [PI, JETSON]
UNIT = REPO / "systemd" / "edgelm-agent.service"
INSTALLED_EDGELM = "/opt/edgelm/bin/edgelm"


def fenced(text: str, *languages: str) -> list[str]:
    """The fenced code blocks of ``text`` in one of ``languages``."""
    blocks = re.findall(r"^```([a-z]*)\n(.*?)^```", text, flags=re.MULTILINE | re.DOTALL)
    return [body for language, body in blocks if language in languages]


def _commands(line: str) -> list[list[str]]:
    """The simple commands of one shell line, split at ``&&``, ``;``, ``|`` and parentheses,
    with redirections dropped."""
    lexer = shlex.shlex(line, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    commands: list[list[str]] = [[]]
    skip_next = False
    for token in lexer:
        if skip_next:
            skip_next = False
        elif token in ("&&", "||", ";", "|", "(", ")", "&"):
            commands.append([])
        elif set(token) <= set("<>&"):
            skip_next = True  # a redirection's target
        else:
            commands[-1].append(token)
    return [c for c in commands if c]


def _strip_prefixes(tokens: list[str]) -> list[str]:
    """``sudo -u edgelm env X=1 edgelm …`` → ``edgelm …``."""
    while tokens:
        head = tokens[0]
        if head in ("sudo", "env"):
            tokens = tokens[1:]
            while tokens and (tokens[0].startswith("-") or "=" in tokens[0]):
                takes_value = tokens[0] in ("-u", "-g")
                tokens = tokens[2:] if takes_value else tokens[1:]
        elif re.fullmatch(r"[A-Z_][A-Z0-9_]*=.*", head):
            tokens = tokens[1:]
        else:
            return tokens
    return tokens


def edgelm_commands(text: str) -> list[list[str]]:
    """The arguments of every ``edgelm`` command in the shell blocks of a guide."""
    found = []
    for block in fenced(text, "sh", "bash"):
        for line in block.replace("\\\n", " ").splitlines():
            for command in _commands(line):
                tokens = _strip_prefixes(command)
                if tokens and (tokens[0] == "edgelm" or tokens[0].endswith("/bin/edgelm")):
                    found.append(tokens[1:])
    return found


def check_command(args: list[str]) -> dict[str, Any]:
    """Parse ``args`` as the real CLI would, without running it: unknown commands and options,
    missing or extra arguments and values of the wrong type fail. Paths are not checked for
    existence (they exist on the device, not here)."""
    command: click.Command = cli
    ctx = click.Context(cli, info_name="edgelm")
    while isinstance(command, click.Group):
        if not args:
            raise click.UsageError(f"{ctx.command_path} needs a command")
        name, *args = args
        sub = command.get_command(ctx, name)
        if sub is None:
            raise click.UsageError(f"{ctx.command_path} has no command {name!r}")
        command, ctx = sub, click.Context(sub, info_name=name, parent=ctx)
    values, extra, _ = command.make_parser(ctx).parse_args(list(args))
    if extra:
        raise click.UsageError(f"{ctx.command_path}: unexpected {extra}")
    for param in command.params:
        value = values.get(param.name)
        given = isinstance(value, str | tuple | list | bool)
        if param.required and not given:
            raise click.UsageError(f"{ctx.command_path}: missing {param.name}")
        if given and isinstance(value, str) and not isinstance(param.type, click.Path):
            param.type.convert(value, param, ctx)
    return values


def _slug(heading: str) -> str:
    """The anchor GitHub gives a heading."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def anchors(path: Path) -> set[str]:
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    return {_slug(h) for h in re.findall(r"^#{1,6} (.+)$", text, flags=re.MULTILINE)}


def links(path: Path) -> list[str]:
    """The targets of the Markdown links outside code blocks."""
    text = re.sub(r"^```.*?^```", "", path.read_text(), flags=re.MULTILINE | re.DOTALL)
    return re.findall(r"\]\(([^)\s]+)\)", text)


class TestCommands:
    @pytest.mark.parametrize("guide", GUIDES, ids=lambda p: p.name)
    def test_every_edgelm_command_parses(self, guide: Path):
        """Each ``edgelm …`` line names real commands and options with valid values."""
        commands = edgelm_commands(guide.read_text())
        assert len(commands) >= 4, "the pattern finds the guide's commands"
        for args in commands:
            try:
                check_command(args)
            except click.ClickException as exc:
                pytest.fail(f"{guide.name}: edgelm {shlex.join(args)}: {exc.format_message()}")

    def test_the_check_refuses_what_the_cli_refuses(self):
        """A misspelt command or option, a missing argument and a bad value all fail."""
        for args in (
            ["modelz", "list"],
            ["models", "import", "/srv/x.gguf", "--nmae", "x"],
            ["models", "activate"],
            ["chat", "--max-tokens", "many", "hello"],
        ):
            with pytest.raises(click.ClickException):
                check_command(args)
        assert check_command(["models", "import", "/nowhere/x.gguf", "--name", "x"])["name"] == "x"

    def test_prefixes_and_redirections_are_seen_through(self):
        """``sudo -u edgelm /opt/edgelm/bin/edgelm …`` is an edgelm command; ``sudo tee … >``
        and ``sudo install -g edgelm …`` are not."""
        text = (
            "```sh\nsudo -u edgelm /opt/edgelm/bin/edgelm agent enroll b.json \\\n"
            "  --state-dir /var/lib/edgelm\nsudo tee /etc/edgelm/agent.toml >/dev/null <<'EOF'\n"
            "sudo install -d -m 0750 -o root -g edgelm /srv/m && edgelm models list --json\n```\n"
        )
        assert edgelm_commands(text) == [
            ["agent", "enroll", "b.json", "--state-dir", "/var/lib/edgelm"],
            ["models", "list", "--json"],
        ]


class TestSettings:
    @pytest.mark.parametrize("guide", GUIDES, ids=lambda p: p.name)
    def test_every_agent_toml_is_accepted(self, guide: Path):
        """Each TOML example loads with the agent's own resolver (unknown keys and bad values
        are refused there)."""
        blocks = fenced(guide.read_text(), "toml")
        assert blocks, f"{guide.name} shows an agent.toml"
        for block in blocks:
            resolve_config(toml_data=tomllib.loads(block), env={}, flags={})

    def test_the_settings_the_guides_rely_on(self):
        """The Pi's four threads, and the Jetson's CUDA provider, are what the agent gets."""
        pi = [resolve_config(toml_data=tomllib.loads(b)) for b in fenced(PI.read_text(), "toml")]
        assert {c.threads for c in pi} == {4}
        assert {c.context_length for c in pi} == {4096, 2048}
        jetson = resolve_config(toml_data=tomllib.loads(fenced(JETSON.read_text(), "toml")[0]))
        assert (jetson.onnx_provider, jetson.gpu_layers) == ("cuda", None)


class TestLinks:
    @pytest.mark.parametrize("guide", GUIDES, ids=lambda p: p.name)
    def test_every_local_link_resolves(self, guide: Path):
        """Links to other pages, and to their headings, lead somewhere."""
        local = [t for t in links(guide) if not t.startswith(("http://", "https://"))]
        assert local, "the pattern finds the guide's links"
        for target in local:
            file, _, anchor = target.partition("#")
            path = (guide.parent / file).resolve() if file else guide
            assert path.is_file(), f"{guide.name}: {target}"
            if anchor:
                assert anchor in anchors(path), f"{guide.name}: no heading for {target}"

    def test_the_operator_guide_and_readme_lead_to_both(self):
        """A reader of the operator guide or the README finds the two guides."""
        guide = links(DOCS / "operator-guide.md")
        readme = links(REPO / "README.md")
        for name in ("deploy-pi.md", "deploy-jetson.md"):
            assert name in guide
            assert f"docs/{name}" in readme


needs_systemd_analyze = pytest.mark.skipif(
    shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed"
)


@needs_systemd_analyze
class TestJetsonDropIn:
    def _unit_with_drop_in(self, tmp_path: Path) -> Path:
        """A copy of the agent's unit, pointed at this checkout's edgelm, with the guide's
        drop-in beside it as systemctl edit would write it."""
        [drop_in] = fenced(JETSON.read_text(), "ini")
        edgelm = Path(sys.executable).parent / "edgelm"
        unit = tmp_path / UNIT.name
        unit.write_text(UNIT.read_text().replace(INSTALLED_EDGELM, str(edgelm)))
        (tmp_path / f"{UNIT.name}.d").mkdir()
        (tmp_path / f"{UNIT.name}.d" / "override.conf").write_text(drop_in)
        return unit

    def test_the_unit_with_the_drop_in_verifies_clean(self, tmp_path: Path):
        """systemd-analyze verify says nothing about the unit and its drop-in."""
        unit = self._unit_with_drop_in(tmp_path)
        result = subprocess.run(
            ["systemd-analyze", "--no-pager", "verify", str(unit)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert (result.returncode, result.stdout, result.stderr) == (0, "", "")

    def test_the_rating_is_2_or_lower_and_quoted_in_the_guide(self, tmp_path: Path):
        """The drop-in opens the GPU's devices and nothing else: the unit stays at 2.0 or
        lower, and the guide quotes the rating it gets."""
        unit = self._unit_with_drop_in(tmp_path)
        result = subprocess.run(
            ["systemd-analyze", "--no-pager", "security", "--offline=yes", str(unit)],
            capture_output=True,
            text=True,
            check=False,
        )
        assert result.returncode == 0, result.stderr
        overall = re.search(
            r"Overall exposure level for edgelm-agent\.service: (\d+\.\d+) \w+", result.stdout
        )
        assert overall, result.stdout
        assert float(overall.group(1)) <= 2.0
        assert overall.group(0) in JETSON.read_text(), "update the guide's quoted rating"
        assert "✗ PrivateDevices=" in result.stdout, "the drop-in was applied"
        assert "✗ MemoryDenyWriteExecute=" not in result.stdout
