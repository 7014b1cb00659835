"""Credentials out of logs: URLs may carry `user:password@`, and a log line or an MLflow param must not.

`redact("http://trainer:s3cret@mlflow:5000")` is "http://trainer:***@mlflow:5000". Anything that prints or
records a URI (tracking URI, mirror, git remote, command output) goes through `redact` first; `RedactFilter`
does it for every record a logging handler emits.
"""

from __future__ import annotations

import logging
import re

# scheme://user:password@  (the password is what is hidden; a token given as the user name alone is too)
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/\s:@]+)(?::(?P<password>[^/\s@]*))?@")


def _mask(match: re.Match[str]) -> str:
    if match["password"] is None:  # https://<token>@host: the user part is the secret
        return f"{match['scheme']}***@"
    return f"{match['scheme']}{match['user']}:***@"


def redact(text: str) -> str:
    """`text` with the credentials in every URL it contains replaced by ***."""
    return _USERINFO.sub(_mask, text)


class RedactFilter(logging.Filter):
    """A logging filter that redacts credentials in each record's formatted message."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        cleaned = redact(message)
        if cleaned != message:
            record.msg, record.args = cleaned, None
        return True
