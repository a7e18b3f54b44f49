"""models layer: why `torch.load(weights_only=True)` did not load a file, in one line for an error message.

torch's own text for a refused pickle starts by advising to re-run `torch.load` with `weights_only=False`,
which would run whatever code the file carries; every loader of weights in deim_ray words its error with
`load_failure` instead: what the file holds and why it was refused, never how to load it unsafely.
"""

from __future__ import annotations

import re

_GLOBAL = re.compile(r"GLOBAL ([\w.]+)")
_LIMIT = 160


def load_failure(e: BaseException) -> str:
    """What is wrong with the file torch failed to load, e.g. `it holds the Python object posix.system, which would
    run code when unpickled; refused` or torch's first line for a truncated or corrupt file."""
    text = str(e).strip()
    if "weights only load failed" in text.lower() or _GLOBAL.search(text):
        found = _GLOBAL.search(text)
        what = f"the Python object {found[1]}" if found else "Python objects beyond tensors and plain data"
        return f"it holds {what}, which would run code when unpickled; refused, as deim_ray loads weights only"
    return (text.splitlines()[0] if text else type(e).__name__)[:_LIMIT]
