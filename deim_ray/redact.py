"""Credential redaction for every line deim_ray prints or logs (error lines, tracebacks, log records).

Shared by all layers, like `logs.py`. What is removed:

- the password of `user:password@host` in any URL (with or without a scheme), and the user name with it;
- the values of secret-looking environment variables (names containing SECRET, TOKEN, PASSWORD, ACCESS_KEY,
  CREDENTIAL or API_KEY) wherever they appear;
- `key=value` / `key: value` pairs whose key names a secret, and SigV4 `Credential=` / `Signature=` fields.
"""

from __future__ import annotations

import logging
import os
import re

MASK = "***"
_SECRET_NAME = re.compile(r"SECRET|TOKEN|PASSWORD|PASSWD|ACCESS_KEY|CREDENTIAL|API_KEY", re.IGNORECASE)
_MIN_SECRET = 6
"""Shorter environment values are not searched for (they would mask ordinary words and numbers)."""
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)?(?P<user>[^\s/@:'\"<>]+):[^\s/@'\"<>]+@")
_PAIR = re.compile(r"(?P<key>\b[\w-]*(?:secret|token|password|passwd|access_key|api_key|credential|signature)"
                   r"(?:_key|_id)?)(?P<sep>\s*[=:]\s*['\"]?)[^\s,'\"&;]+", re.IGNORECASE)


def _env_secrets() -> list[str]:
    values = {v for k, v in os.environ.items() if _SECRET_NAME.search(k) and len(v) >= _MIN_SECRET}
    return sorted(values, key=len, reverse=True)  # a longer secret containing a shorter one goes first


def redact(text: str) -> str:
    """`text` with every credential deim_ray can recognise replaced by `***` (see the module docstring)."""
    text = str(text)
    for secret in _env_secrets():
        text = text.replace(secret, MASK)
    text = _USERINFO.sub(lambda m: f"{m['scheme'] or ''}{MASK}@", text)
    return _PAIR.sub(lambda m: f"{m['key']}{m['sep']}{MASK}", text)


class RedactingFilter(logging.Filter):
    """Rewrites each record's final message (arguments and exception text included) with `redact`."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        record.msg, record.args = redact(message), None
        if record.exc_text:
            record.exc_text = redact(record.exc_text)
        return True
