"""Config-test helpers: write small YAML trees into a temporary directory."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest


@pytest.fixture
def write(tmp_path: Path):
    """write("a.yml", text) -> path; text is dedented, parent folders are created."""

    def _write(name: str, text: str) -> Path:
        path = tmp_path / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text), encoding="utf-8")
        return path

    return _write


def one_line(message: str) -> bool:
    return "\n" not in message and message.strip() == message
