"""parley: chat with an AI agent over HTTP, the reply streamed as it comes, cancellable mid-stream.

Embed it in a host app with ``Mount("/chat", app=create_app(settings))``; run it on its own with
``uvicorn app:app`` from a checkout. The package is laid out as:

- :mod:`parley.app`: every route and how an app is put together; :mod:`parley.settings` and :mod:`parley.auth`.
- :mod:`parley.agents`: what answers a message (the agent interface, the echo and OpenAI-compatible agents).
- :mod:`parley.sessions`: conversations: their store, the interactions in progress, the turn runner, and the
  coordination of claims, cancels and rejoins across processes.
- The web layer around them: request forms, the chat response and its wire formats, rejoin, uploads, the OpenAPI
  document, telemetry, metrics and logs.
"""

from __future__ import annotations

from parley.agents import Agent, AgentError, Agents, Turn
from parley.app import create_app, serve_from_environment
from parley.auth import Auth
from parley.sessions import Store
from parley.sessions.turns import TurnObserver
from parley.settings import Settings, SettingsError

__all__ = [
    "Agent",
    "AgentError",
    "Agents",
    "Auth",
    "Settings",
    "SettingsError",
    "Store",
    "Turn",
    "TurnObserver",
    "create_app",
    "serve_from_environment",
]
