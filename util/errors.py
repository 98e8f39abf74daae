"""Errors users act on (no dependencies, so every layer can raise them)."""
from __future__ import annotations


class FlagError(ValueError):
    """An impossible flag value or combination; main.py's cli() exits with its one-line message (status 2)."""
