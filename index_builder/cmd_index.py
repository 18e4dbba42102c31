"""Subcommands of ``visearch-index`` (placeholder until its subsystem lands)."""

from __future__ import annotations

import argparse


def register(sub: argparse._SubParsersAction) -> None:
    """Add this module's subcommands to ``sub`` (none yet)."""
