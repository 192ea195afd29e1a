"""Web apps that use poolq: FastAPI (asyncio) and Flask (threads)."""

from __future__ import annotations

import sys

#: How each example is served, as users run it (``uvicorn ...``, ``flask run``), by module.
_SERVERS = {
    "fastapi": ["uvicorn", "examples.fastapi_app:app", "--log-level", "warning"],
    "flask": ["flask", "--app", "examples.flask_app", "run", "--with-threads"],
}

#: The examples by name.
APPS = sorted(_SERVERS)


def server_argv(app: str, port: int) -> list[str]:
    """The command that serves example ``app`` (``fastapi`` or ``flask``) on 127.0.0.1:``port``."""
    return [sys.executable, "-m", *_SERVERS[app], "--host", "127.0.0.1", "--port", str(port)]
