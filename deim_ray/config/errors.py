"""config layer: the one exception type for bad configuration input."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration problem, described in one line: what is wrong, where, and how to fix it."""

    def __init__(self, message: str) -> None:
        # Messages often quote YAML or parser output; keep them on one line for logs and CLIs.
        super().__init__(" ".join(str(message).split()))
