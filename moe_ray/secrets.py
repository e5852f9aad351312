"""Recognising credentials, so they are refused in job files and redacted in logs."""

from __future__ import annotations

import re

# Names that are credentials, alone or as the end of a longer name (`aws_secret_access_key`,
# `hf_token`). `max_nodes_per_token` (a count per token) and `tokenizer` are not.
_SECRET_NAMES = (
    "secret",
    "password",
    "passwd",
    "credentials",
    "token",
    "api_key",
    "apikey",
    "access_key",
    "secret_key",
    "access_key_id",
    "auth_token",
    "session_token",
    "private_key",
    "client_secret",
)
_SECRET_ENDINGS = tuple(f"_{n}" for n in _SECRET_NAMES)
_AWS_KEY_ID = re.compile(r"(AKIA|ASIA)[0-9A-Z]{16}")
_URL_PASSWORD = re.compile(r"([a-z][a-z0-9+.-]*://[^/@\s:]*:)([^/@\s]+)(@)", re.IGNORECASE)  # scheme://user:PASSWORD@


def looks_secret_key(name: str) -> bool:
    last = name.lower().replace("-", "_").rsplit(".", 1)[-1]
    return last in _SECRET_NAMES or (last.endswith(_SECRET_ENDINGS) and not last.endswith("_per_token"))


def secret_value_kind(value: str) -> str | None:
    """What kind of credential `value` contains, if any."""
    if _AWS_KEY_ID.search(value):
        return "an AWS access key"
    if _URL_PASSWORD.search(value):
        return "a password in a URL (user:password@host)"
    return None


def redact(text: str) -> str:
    """`text` with URL passwords and AWS key ids masked, for printing and logging."""
    return _AWS_KEY_ID.sub("***", _URL_PASSWORD.sub(r"\1***\3", text))
