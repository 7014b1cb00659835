"""Credentials out of logs: URLs may carry `user:password@`, and a log line or an MLflow param must not.

`redact("http://trainer:s3cret@mlflow:5000")` is "http://trainer:***@mlflow:5000". Anything that prints or
records a URI (tracking URI, mirror, git remote, command output) goes through `redact` first. On top of that,
`redact_all_logs()` (called by every command's and flow's entry) redacts every log record the process makes,
whichever logger makes it and whichever handler sends it on: ours, Prefect's (to the API), a library's.
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


def redact_record(record: logging.LogRecord) -> logging.LogRecord:
    """The record with the credentials in its formatted message masked (a message that cannot be formatted
    is left for the handler to report, as logging does)."""
    try:
        message = record.getMessage()
    except Exception:
        return record
    cleaned = redact(message)
    if cleaned != message:
        record.msg, record.args = cleaned, None
    return record


class _RedactingFactory:
    """A log record factory that redacts each record as it is made (wrapping the factory in place before)."""

    def __init__(self, inner) -> None:
        self.inner = inner

    def __call__(self, *args, **kwargs) -> logging.LogRecord:
        return redact_record(self.inner(*args, **kwargs))


def redact_all_logs() -> None:
    """From now on, every log record this process makes has the credentials in its URLs masked. Handlers
    added later (Prefect adds its own) are covered too: the records are cleaned where they are made."""
    factory = logging.getLogRecordFactory()
    if not isinstance(factory, _RedactingFactory):
        logging.setLogRecordFactory(_RedactingFactory(factory))
