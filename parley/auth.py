"""Who a request acts for: its owner. Every session belongs to one owner, and a request sees only its owner's.

Three modes, decided per request in this order:

1. **Embedded**: the host app set ``scope["user"]`` (Starlette's ``AuthenticationMiddleware``). An
   authenticated user's ``identity`` is the owner; anyone else has none. Parley adds no auth of its own.
2. **API keys**: ``PARLEY_API_KEYS`` / ``PARLEY_API_KEYS_FILE`` hold ``owner:key`` pairs; the request's
   ``Authorization: Bearer <key>`` or ``X-API-Key: <key>`` names its owner.
3. **Open**: neither; every request acts for :data:`OPEN_OWNER`, and one warning says so.

A request with no owner gets ``None`` here; the web layer (app.py) answers it 401. Keys are compared in
constant time and never logged, echoed or kept in clear beyond start-up.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from starlette.types import Scope

from parley.settings import SettingsError

logger = logging.getLogger("parley")

# The owner of everything in open mode, and of sessions stored before owners existed. No real owner can be
# empty (a key's owner must be named; an authenticated user with an empty identity is refused), so the open
# owner's sessions are out of reach of everyone once keys or a host's users are in use.
OPEN_OWNER = ""


class KeyFileError(SettingsError):
    """The API keys are malformed: a bad setting like any other. Its message names the variable and the entry
    (its position), never a key."""


def parse_keys(lines: Iterable[str], source: str) -> list[tuple[str, str]]:
    """``owner:key`` pairs, one per item; blank items and ``#`` comments are skipped."""
    pairs: list[tuple[str, str]] = []
    for number, raw in enumerate(lines, start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        owner, colon, key = line.partition(":")
        owner, key = owner.strip(), key.strip()
        if not colon or not owner or not key:
            raise KeyFileError(f"{source}: entry {number} is not of the form owner:key")
        pairs.append((owner, key))
    return pairs


def keys_from(api_keys: str | None, api_keys_file: str | None) -> list[tuple[str, str]]:
    """The pairs of ``PARLEY_API_KEYS`` (separated by commas or whitespace) and of the key file (one a line)."""
    pairs = parse_keys((api_keys or "").replace(",", " ").split(), "PARLEY_API_KEYS")
    if api_keys_file:
        try:
            text = Path(api_keys_file).read_text(encoding="utf-8")
        except OSError as exc:
            raise KeyFileError(f"PARLEY_API_KEYS_FILE cannot be read: {exc.strerror or exc}") from None
        pairs += parse_keys(text.splitlines(), "PARLEY_API_KEYS_FILE")
    return pairs


def _digest(key: str | bytes) -> bytes:
    # Compared as digests: equal length whatever was sent, so compare_digest's time says nothing about a key.
    # BLAKE2b, Python's own: for a short key it costs a third less than OpenSSL's SHA-256, on every request.
    return hashlib.blake2b(key.encode() if isinstance(key, str) else key, digest_size=32).digest()


class Auth:
    """Resolves a request's owner (see the module's docstring for the modes)."""

    def __init__(self, keys: Iterable[tuple[str, str]] = (), metrics_token: str | None = None) -> None:
        self._keys: list[tuple[bytes, str]] = []
        # Operators' own credential for GET /metrics (whose counts cover every owner): no owner's key opens it.
        self._metrics_token = _digest(metrics_token) if metrics_token else None
        seen: dict[bytes, str] = {}
        for owner, key in keys:
            digest = _digest(key)
            if seen.get(digest, owner) != owner:
                raise KeyFileError("PARLEY_API_KEYS, PARLEY_API_KEYS_FILE: the same API key is given to two owners")
            seen[digest] = owner
            self._keys.append((digest, owner))
        if self._metrics_token is not None and self._metrics_token in seen:
            raise KeyFileError(
                "PARLEY_METRICS_TOKEN is also an owner's API key: give the operators a token of their own"
            )
        self._warned = False

    @property
    def uses_keys(self) -> bool:
        return bool(self._keys)

    def warn_if_open(self) -> None:
        """Log, once per process, that the API is open (unless keys are configured)."""
        if self._keys or self._warned:
            return
        self._warned = True
        logger.warning(
            "parley's API is open: no PARLEY_API_KEYS or PARLEY_API_KEYS_FILE, so unless a host app "
            "authenticates its users (scope['user']), anyone who can reach it can read and delete every session"
        )

    def owner(self, scope: Scope) -> str | None:
        """The request's owner, or None when it must be refused (401). Kept in ``scope["state"]["owner"]``."""
        user: Any = scope.get("user")
        if user is not None:
            owner = _identity(user)
        elif self._keys:
            owner = self._owner_of_key(scope)
        else:
            if not self._warned:
                self.warn_if_open()
            owner = OPEN_OWNER
        if owner is not None:
            scope.setdefault("state", {})["owner"] = owner
        return owner

    def is_operator(self, scope: Scope) -> bool:
        """May the request read the metrics? With ``PARLEY_METRICS_TOKEN``, only if it carries that token (as a
        key is carried); without it, only in open mode, where everyone is the one owner."""
        if self._metrics_token is None:
            return not self._keys and scope.get("user") is None
        presented = _presented(scope)
        return presented is not None and hmac.compare_digest(_digest(presented), self._metrics_token)

    def _owner_of_key(self, scope: Scope) -> str | None:
        presented = _presented(scope)
        if presented is None:
            return None
        digest = _digest(presented)
        found = None
        for known, owner in self._keys:  # every key, no early exit: the time is the same for any key sent
            if hmac.compare_digest(known, digest):
                found = owner
        return found


def _presented(scope: Scope) -> bytes | None:
    """The key a request carries (``Authorization: Bearer`` or ``X-API-Key``), if any."""
    presented: bytes | None = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            scheme, _, token = value.strip().partition(b" ")
            if scheme.lower() == b"bearer" and token.strip():
                presented = token.strip()
        elif name == b"x-api-key" and value.strip():
            presented = value.strip()
    return presented


def _identity(user: Any) -> str | None:
    if not getattr(user, "is_authenticated", False):
        return None
    identity = user.identity
    return identity if isinstance(identity, str) and identity else None
