"""poolq from a synchronous web app: Flask views that call warm agents.

Run it next to ``poolq up`` (same directory, or set ``POOLQ_BROKER_URL`` and
``POOLQ_CONFIG``)::

    pip install -e '.[web]'
    flask --app examples.flask_app run --port 8001
    curl -s localhost:8001/echo -H 'content-type: application/json' -d '{"text": "hi"}'

Each request thread blocks in ``poolq.call`` on its own reply list; in
production run it under a threaded server (``gunicorn --threads 32``).
"""

from __future__ import annotations

from typing import Any

from flask import Flask, jsonify, request
from werkzeug.exceptions import BadRequest

import poolq

app = Flask(__name__)

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


@app.errorhandler(poolq.PoolqError)
def poolq_error(exc: poolq.PoolqError) -> Any:
    status = next((STATUS[kind] for kind in type(exc).__mro__ if kind in STATUS), 500)
    body: dict[str, Any] = {"error": type(exc).__name__, "message": str(exc)}
    if isinstance(exc, poolq.AgentError):
        body["remote_type"] = exc.remote_type
    headers = {"Retry-After": "1"} if status == 503 else {}
    return jsonify(body), status, headers


@app.errorhandler(ValueError)
def bad_value(exc: ValueError) -> Any:
    return jsonify({"error": "ValueError", "message": str(exc)}), 422


def body(*required: str) -> dict[str, Any]:
    data = request.get_json(silent=True)
    if not isinstance(data, dict) or any(key not in data for key in required):
        raise BadRequest(f"expected a JSON object with {', '.join(required) or 'any keys'}")
    return data


@app.post("/echo")
def echo() -> Any:
    """The everyday endpoint: one warm agent of the ``echo`` pool answers."""
    return jsonify(poolq.call("echo", text=str(body("text")["text"])))  # waits up to the pool's timeout (config)


@app.post("/pools/<pool>/call")
def call(pool: str) -> Any:
    """Any operation of any pool (``block: false`` answers 503 at once when no agent is free)."""
    data = body()
    result = poolq.call(
        pool, *data.get("args", []), op=data.get("op"), timeout=data.get("timeout"),
        call_timeout=data.get("call_timeout"), block=bool(data.get("block", True)), **data.get("kwargs", {}),
    )  # fmt: skip
    return jsonify({"result": result})


@app.post("/conversation")
def conversation() -> Any:
    """A multi-step exchange on one agent: a lease keeps its state between the steps."""
    data = body("messages")
    with poolq.lease(str(data.get("pool", "echo")), timeout=5, ttl=30) as agent:
        replies = [agent.call(text=str(message)) for message in data["messages"]]
        return jsonify({"agent": agent.agent_name, "replies": replies})


@app.get("/pools/<pool>/status")
def pool_status(pool: str) -> Any:
    """Size, free agents, waiting calls, state and counters of a pool."""
    return jsonify(poolq.status(pool).as_dict())
