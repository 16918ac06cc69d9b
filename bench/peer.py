"""The peer: what most people would write instead, FastAPI with a StreamingResponse over an async generator."""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import FastAPI, Form
from fastapi.responses import StreamingResponse

_TOKEN = re.compile(r"\s*\S+\s*|\s+")
DELAY = float(os.environ.get("PARLEY_ECHO_DELAY", "0"))

app = FastAPI()


@app.post("/api/v1/chat")
async def chat(ui_session_id: Annotated[str, Form()], message: Annotated[str, Form()]) -> StreamingResponse:
    async def tokens() -> AsyncIterator[str]:
        for token in _TOKEN.findall(message):
            await asyncio.sleep(DELAY)
            yield token

    return StreamingResponse(tokens(), media_type="text/plain; charset=utf-8")
