"""poolq from an asyncio web app: FastAPI views that ``await`` warm agents.

Run it next to ``poolq up`` (same directory, or set ``POOLQ_BROKER_URL`` and
``POOLQ_CONFIG``)::

    pip install -e '.[web]'
    uvicorn examples.fastapi_app:app --port 8000
    curl -s localhost:8000/echo -H 'content-type: application/json' -d '{"text": "hi"}'

No thread waits on a reply: every ``acall`` of the process shares one reply
mailbox per event loop, so hundreds of requests in flight cost one Redis
connection.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field

import poolq

app = FastAPI(title="poolq FastAPI example")

#: poolq's errors as HTTP answers: the pool is full or broken (503, try again),
#: too slow (504), the agent raised (502), the request was wrong (404, 422),
#: the call was cancelled by somebody else (409; a client that went away itself hears nothing).
#: Looked up along the error's classes: PoolDegraded is an AgentUnavailable,
#: CheckoutTimeout and CallTimeout are PoolqTimeouts, AgentCrashed an AgentError.
STATUS: dict[type[Exception], int] = {
    poolq.UnknownPool: 404,
    poolq.InvalidPayload: 422,
    poolq.UnknownOperation: 422,
    poolq.InvalidArguments: 422,
    poolq.PoolExhausted: 503,
    poolq.AgentUnavailable: 503,
    poolq.LeaseLost: 503,
    poolq.BrokerUnavailable: 503,
    poolq.PoolqTimeout: 504,
    poolq.CallCancelled: 409,
    poolq.AgentError: 502,
}


@app.exception_handler(poolq.PoolqError)
async def poolq_error(request: Request, exc: poolq.PoolqError) -> JSONResponse:
    status = next((STATUS[kind] for kind in type(exc).__mro__ if kind in STATUS), 500)
    body: dict[str, Any] = {"error": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, poolq.AgentError):
        body["remote_type"] = exc.remote_type
    headers = {"Retry-After": "1"} if status == 503 else None
    return JSONResponse(body, status_code=status, headers=headers)


class EchoRequest(BaseModel):
    text: str = Field(max_length=10_000)


class CallRequest(BaseModel):
    op: str | None = None
    args: list[Any] = []
    kwargs: dict[str, Any] = {}
    timeout: float | None = Field(default=None, gt=0)
    call_timeout: float | None = Field(default=None, gt=0)
    block: bool = True


class Conversation(BaseModel):
    pool: str = "echo"
    messages: list[str] = Field(min_length=1, max_length=50)


@app.post("/echo")
async def echo(body: EchoRequest) -> Any:
    """The everyday endpoint: one warm agent of the ``echo`` pool answers."""
    return await poolq.acall("echo", text=body.text)  # waits up to the pool's timeout (config)


@app.post("/pools/{pool}/call")
async def call(pool: str, body: CallRequest) -> dict[str, Any]:
    """Any operation of any pool (``block: false`` answers 503 at once when no agent is free)."""
    result = await poolq.acall(
        pool, *body.args, op=body.op, timeout=body.timeout, call_timeout=body.call_timeout, block=body.block,
        **body.kwargs,
    )  # fmt: skip
    return {"result": result}


@app.post("/conversation")
async def conversation(body: Conversation) -> dict[str, Any]:
    """A multi-step exchange on one agent: a lease keeps its state between the steps."""
    async with poolq.alease(body.pool, timeout=5, ttl=30) as agent:
        replies = [await agent.call(text=message) for message in body.messages]
        return {"agent": agent.agent_name, "replies": replies}


@app.get("/pools/{pool}/status")
async def pool_status(pool: str) -> dict[str, Any]:
    """Size, free agents, waiting calls, state and counters of a pool."""
    return (await poolq.astatus(pool)).as_dict()
