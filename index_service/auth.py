"""Bearer tokens for the index service: an admin token for what mutates the DB, an optional read token.

A token source is the environment variable (``RETRO_ADMIN_TOKEN``, ``RETRO_READ_TOKEN``) or a file
(``--admin-token-file``, ``--read-token-file``: the form a mounted Kubernetes Secret takes). Each
non-empty line of either is ``<token>`` or ``<name>:<token>``; the name (``admin`` or ``read`` when
none is given) is what the audit log records, the token itself never reaches a log. Tokens are
compared in constant time, and every configured token is compared, so timing tells nothing.

    no admin token configured   mutating endpoints answer 403, saying how to enable them
    missing or wrong token      401 with ``WWW-Authenticate: Bearer``
    read token configured       reads need it (or an admin token); /healthz and /metrics stay open
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass

ADMIN_ENV, READ_ENV = "RETRO_ADMIN_TOKEN", "RETRO_READ_TOKEN"
MIN_TOKEN_CHARS = 16


def parse_tokens(text: str, default_name: str, source: str) -> dict[str, str]:
    """``{token: name}`` from the lines of a token source; a short token is refused (it is guessable)."""
    tokens = {}
    for lineno, line in enumerate(text.splitlines(), 1):
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, token = line.rpartition(":")
        name, token = (name.strip(), token.strip()) if sep and name.strip() else (default_name, line)
        if len(token) < MIN_TOKEN_CHARS:
            raise ValueError(f"{source} line {lineno}: a token needs at least {MIN_TOKEN_CHARS} characters")
        tokens[token] = name
    return tokens


def load_tokens(env: str, file: str, default_name: str) -> dict[str, str]:
    """Tokens from the environment variable ``env`` and the file ``file`` (either may be absent)."""
    tokens = {}
    if os.environ.get(env, "").strip():
        tokens.update(parse_tokens(os.environ[env], default_name, f"${env}"))
    if file:
        try:
            with open(file) as f:
                text = f.read()
        except OSError as e:
            raise ValueError(f"token file {file}: {e.strerror}") from None
        tokens.update(parse_tokens(text, default_name, file))
    return tokens


@dataclass(frozen=True)
class Tokens:
    admin: dict[str, str]  # token -> name
    read: dict[str, str]

    @classmethod
    def load(cls, admin_token_file: str = "", read_token_file: str = "") -> "Tokens":
        return cls(load_tokens(ADMIN_ENV, admin_token_file, "admin"), load_tokens(READ_ENV, read_token_file, "read"))


def match(presented: str | None, tokens: dict[str, str]) -> str | None:
    """The name of the token presented, or None; every token is compared, in constant time."""
    if presented is None:
        return None
    found = None
    for token, name in tokens.items():
        if hmac.compare_digest(presented.encode("utf-8"), token.encode("utf-8")):
            found = name
    return found
