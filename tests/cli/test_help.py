"""``vpp --help`` as an operator reads it: each command's summary flows as one sentence, wrapped
by the terminal at its own width, not cut where the source's docstring had a line break."""

from __future__ import annotations

import re
from typing import Any

import pytest
import typer
from typer.testing import CliRunner

from cli.main import app

runner = CliRunner()


def _groups(cmd: Any, path: tuple[str, ...] = ()) -> list[tuple[tuple[str, ...], Any]]:
    # typer ships its own click (typer._click): a group is what has subcommands.
    out: list[tuple[tuple[str, ...], Any]] = []
    if hasattr(cmd, "commands"):
        out.append((path, cmd))
        for name, sub in cmd.commands.items():
            out.extend(_groups(sub, (*path, name)))
    return out


GROUPS = _groups(typer.main.get_command(app))


def _rows(text: str) -> list[str]:
    """The text of the Commands panel, one entry per table line (borders stripped)."""
    return [re.sub(r"^[│\s]+|[│\s]+$", "", line) for line in text.splitlines()]


@pytest.mark.parametrize("path,group", GROUPS, ids=[" ".join(p) or "vpp" for p, _ in GROUPS])
def test_command_summaries_are_not_cut_mid_sentence(path: tuple[str, ...], group: Any) -> None:
    # A wide terminal: every summary of this project fits on one line, so a summary that
    # spreads over two lines was broken by the source, not by the terminal.
    result = runner.invoke(app, [*path, "--help"], env={"COLUMNS": "400"}, terminal_width=400)
    assert result.exit_code == 0, result.output
    rows = _rows(result.output)
    for name, sub in group.commands.items():
        summary = sub.get_short_help_str(limit=10_000)
        assert "\n" not in summary, f"{name}: {summary!r}"
        line = next((r for r in rows if r.startswith(name + " ")), None)
        assert line is not None, f"{name} is not listed in `vpp {' '.join(path)} --help`"
        assert summary in line, f"`{name}` summary wraps: {line!r}"
