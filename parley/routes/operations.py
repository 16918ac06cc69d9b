"""What operators and clients ask of the server itself: its agents, liveness and readiness, the OpenAPI document,
and Prometheus metrics."""

from __future__ import annotations

from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from parley.agents import tools_of
from parley.errors import Unauthorized
from parley.health import readiness
from parley.openapi import documented, json_response, list_of, object_of, ref, served_file
from parley.routes import authenticated


@documented(
    "listAgents", "The agents this server offers", {200: json_response(list_of("agents", "Agent"), "The agents")}
)
async def list_agents(request: Request) -> Response:
    parley, _ = await authenticated(request)
    agents = [
        {"name": a.name, "description": a.description, "tools": [t.describe() for t in await tools_of(a)]}
        for a in parley.agents
    ]
    return JSONResponse({"agents": agents})


@documented(
    "healthz",
    "Liveness: the process answers",
    {200: json_response(object_of({"status": {"const": "ok"}}), "Alive")},
    public=True,
)
async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


@documented(
    "readyz",
    "Readiness: the store (and Redis, when configured) answered within a second",
    {
        200: json_response(ref("Readiness"), "Ready"),
        503: json_response(ref("Readiness"), "Not ready: checks says what is down"),
    },
    public=True,
)
async def readyz(request: Request) -> Response:
    checks = await readiness(request.app.state.parley)
    down = [name for name, state in checks.items() if state != "ok"]
    if not down:
        return JSONResponse({"status": "ok", "checks": checks})
    message = "Not ready: " + "; ".join(f"{name} is down ({checks[name]})" for name in down)
    return JSONResponse({"status": "error", "message": message, "checks": checks}, status_code=503)


@documented(
    "openapi", "This document", {200: json_response({"type": "object"}, "The OpenAPI 3.1 document")}, public=True
)
async def openapi(request: Request) -> Response:
    return JSONResponse(request.app.state.openapi)


@served_file("metrics", "Prometheus metrics, in the text exposition format", "text/plain", operator=True)
async def prometheus_metrics(request: Request) -> Response:
    if not request.app.state.auth.is_operator(request.scope):
        # Its counts cover every owner: an owner's key is not enough (see Auth.is_operator).
        raise Unauthorized(
            "GET /metrics is for operators: send PARLEY_METRICS_TOKEN as 'Authorization: Bearer <token>'.",
            bearer=True,
        )
    body, content_type = request.app.state.metrics.exposition()
    return Response(body, headers={"content-type": content_type})
