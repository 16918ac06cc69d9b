"""The HTTP endpoints, one module per concern: :mod:`.sessions`, :mod:`.chat` (chat, cancel, rejoin), :mod:`.files`
and :mod:`.operations` (agents, probes, the OpenAPI document, metrics). The route table that maps paths to them is
in :mod:`parley.app`. Every endpoint starts with :func:`authenticated`: the app's parts and the owner it acts for.
"""

from __future__ import annotations

from starlette.requests import Request

from parley.errors import Unauthorized
from parley.service import Parley
from parley.sessions.errors import SessionNotFound
from parley.sessions.store import Session


async def authenticated(request: Request) -> tuple[Parley, str]:
    """The app's parts, ready, and the owner the request acts for: Unauthorized (401) when it has none (see
    auth.py)."""
    parley: Parley = request.app.state.parley
    owner = request.app.state.auth.owner(request.scope)
    if owner is None:
        bearer = "user" not in request.scope  # a host app's users sign in the host's way, not with our keys
        raise Unauthorized(
            "Authentication required: send an API key as 'Authorization: Bearer <key>' or 'X-API-Key: <key>'."
            if bearer
            else "Authentication required.",
            bearer=bearer,
        )
    return await parley.ready(), owner


async def owned_session(parley: Parley, session_id: str, owner: str) -> Session:
    """The owner's session: SessionNotFound for one that does not exist or is another owner's, exactly alike."""
    session = await parley.store.get_session(session_id, owner)
    if session is None:
        raise SessionNotFound(session_id)
    return session
