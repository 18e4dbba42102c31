"""Every console script declared in pyproject.toml answers --help (and so do subcommands)."""

from __future__ import annotations

import importlib
import tomllib
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPTS = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]


@pytest.mark.parametrize("name", sorted(SCRIPTS))
def test_console_script_help(name: str, capsys: pytest.CaptureFixture[str]) -> None:
    module, func = SCRIPTS[name].split(":")
    main = getattr(importlib.import_module(module), func)
    with pytest.raises(SystemExit) as exc:
        main(["--help"])
    assert exc.value.code == 0
    assert "usage:" in capsys.readouterr().out


@pytest.mark.parametrize(
    "sub",
    ["ingest", "build", "rebuild", "list", "activate", "rollback", "verify", "add", "remove",
     "gc", "train-embedder", "embed", "train-detector", "label-detection", "crop", "dedup",
     "clean", "merge"],
)
def test_index_subcommand_help(sub: str, capsys: pytest.CaptureFixture[str]) -> None:
    from index_builder.cli import main

    with pytest.raises(SystemExit) as exc:
        main([sub, "--help"])
    assert exc.value.code == 0
    assert f"visearch-index {sub}" in capsys.readouterr().out
