"""Wording shared by the command line's messages and the reports."""
from __future__ import annotations


def counted(n: int, noun: str, plural: str | None = None) -> str:
    """'1 run', '4 runs', '0 runs'; `plural` where adding an s is wrong ('1 process', '2 processes')."""
    return f"{n} {noun if n == 1 else plural or noun + 's'}"
