"""The client side: what a web app or a script uses to call agents (no worker code).

``sync`` (threads), ``aio`` (asyncio) and ``lease`` share one core of checks,
deadlines and decisions (``options``, ``waiting``); they differ only in how
they wait.
"""

from .aio import Arguments, AsyncClient, AsyncLease, acall, adrain, alease, amap, astatus
from .lease import Lease
from .sync import Client, Handle, call, cast, default_client, drain, lease, map, status

__all__ = [
    "Arguments",
    "AsyncClient",
    "AsyncLease",
    "Client",
    "Handle",
    "Lease",
    "acall",
    "adrain",
    "alease",
    "amap",
    "astatus",
    "call",
    "cast",
    "default_client",
    "drain",
    "lease",
    "map",
    "status",
]
