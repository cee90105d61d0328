"""Every command the README names exists: each ``attnzoo`` subcommand and flag it mentions,
each script file, and every command of its "Measured" table parses as written (issue 11: the
README cited a benchmark script that did not exist)."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

from attnzoo.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
BLOCKS = re.findall(r"```\w*\n(.*?)```", README, re.S)
SPANS = re.findall(r"`([^`\n]+)`", re.sub(r"```.*?```", "", README, flags=re.S)) + BLOCKS


def subparsers():
    parser = build_parser()
    return parser, parser._subparsers._group_actions[0].choices


def attnzoo_mentions() -> list[str]:
    """Every 'attnzoo ...' command in an inline code span or a bash block."""
    found = []
    for span in SPANS:
        for part in re.split(r"&&|\n", span):
            part = part.strip()
            if part.startswith(("attnzoo ", "python -m attnzoo ")) and "attnzoo ..." not in part:
                found.append(part)
    return found


def measured_commands() -> list[str]:
    """The command column of the README's "Measured" table."""
    section = README.split("## Measured", 1)[1].split("\n## ", 1)[0]
    commands = []
    for line in section.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 3 and cells[-1].startswith("`"):
            commands += [c for c in re.findall(r"`([^`]+)`", cells[-1]) if " " in c]
    return commands


def test_the_readme_names_commands():
    assert len(attnzoo_mentions()) >= 15
    assert len(measured_commands()) >= 5


@pytest.mark.parametrize("command", attnzoo_mentions())
def test_every_attnzoo_command_and_flag_exists(command):
    _, commands = subparsers()
    words = command.replace("python -m attnzoo", "attnzoo").split()
    sub = words[1]
    assert sub in commands, f"README names `attnzoo {sub}`, which does not exist"
    known = set(commands[sub]._option_string_actions)
    for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", command):
        assert flag in known, f"`{command}`: attnzoo {sub} has no {flag}"


@pytest.mark.parametrize("command", measured_commands())
def test_every_measured_command_runs_as_written(command):
    """The figures' commands are concrete: they parse (attnzoo) or name a file that exists."""
    words = shlex.split(command)
    if words[0] in ("python", "bash") and words[1] != "-m":
        assert (ROOT / words[1]).is_file(), f"`{command}`: {words[1]} does not exist"
        return
    if words[:3] == ["python", "-m", "attnzoo"]:
        words = ["attnzoo", *words[3:]]
    assert words[0] == "attnzoo", command
    parser, _ = subparsers()
    try:
        parser.parse_args(words[1:])
    except SystemExit as e:
        pytest.fail(f"`{command}` does not parse (exit {e.code})")


def test_every_script_the_readme_names_exists():
    scripts = set(
        re.findall(r"((?:benchmarks|attnzoo|docs|tests)/[\w/.-]+\.(?:py|sh|md|yaml))", README)
    )
    assert scripts
    for path in scripts:
        assert (ROOT / path).exists(), f"README names {path}, which does not exist"
