"""Bearer tokens for the index service: an admin token for what mutates the DB, an optional read token.

A token source is the environment variable (``RETRO_ADMIN_TOKEN``, ``RETRO_READ_TOKEN``) or a file
(``--admin-token-file``, ``--read-token-file``: the form a mounted Kubernetes Secret takes). Each
non-empty line of either is ``<token>`` or ``<name>:<token>``; the name (``admin`` or ``read`` when
none is given) is what the audit log records, the token itself never reaches a log. Tokens are
compared in constant time, and every configured token is compared, so timing tells nothing.

    no admin token configured   mutating endpoints answer 403, saying how to enable them
    missing or wrong token      401 with ``WWW-Authenticate: Bearer``
    read token configured       reads need it (or an admin token); /healthz and /metrics stay open

``admin`` and ``reader`` are the routes' FastAPI dependencies; they check the replica's ``Tokens``.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass

from fastapi import HTTPException, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from index_service.deployments import replica_object

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


bearer = HTTPBearer(
    auto_error=False, description="the admin token (RETRO_ADMIN_TOKEN); for reads, a read token where one is configured"
)


def _presented(credentials: HTTPAuthorizationCredentials | None) -> str | None:
    return credentials.credentials if credentials is not None else None


async def admin(credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> str:
    """The audit log's name for the caller of a mutating endpoint: 403 where none is configured, 401
    without a valid one."""
    tokens = replica_object().tokens
    if not tokens.admin:
        raise HTTPException(
            403,
            f"deleting and restoring documents is disabled on this service: start it with {ADMIN_ENV} set "
            "or --admin-token-file (see README, Serving the index)",
        )
    name = match(_presented(credentials), tokens.admin)
    if name is None:
        raise HTTPException(
            401, "this needs the admin token: Authorization: Bearer <token>", headers={"WWW-Authenticate": "Bearer"}
        )
    return f"token:{name}"


async def reader(credentials: HTTPAuthorizationCredentials | None = Security(bearer)) -> None:
    """Reads are open unless read tokens are configured; then a read or an admin token is needed."""
    tokens = replica_object().tokens
    presented = _presented(credentials)
    if tokens.read and match(presented, tokens.read) is None and match(presented, tokens.admin) is None:
        raise HTTPException(
            401,
            "this service needs a read token: Authorization: Bearer <token>",
            headers={"WWW-Authenticate": "Bearer"},
        )
