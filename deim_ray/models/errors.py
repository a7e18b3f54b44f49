"""models layer: the one exception type raised for bad model input.

Every message is one line saying what is wrong and how to fix it.
"""

from __future__ import annotations


class ModelError(ValueError):
    """A model config, input batch, target or weights file that the models layer cannot use."""
