"""data layer: the one exception type raised for bad dataset input or data settings.

Every message is one line saying what is wrong and how to fix it.
"""

from __future__ import annotations


class DataError(ValueError):
    """An annotation file, image folder, image or data setting that the data layer cannot use."""
