"""The client side: what a web app or a script uses to call agents (no worker code).

The sync client (``sync``, threads), the async one (``aio``, asyncio) and
leases (``lease``) run the same steps (``core``, with ``options`` and
``waiting``): they differ only in how they wait.
"""

from .aio import Arguments, AsyncClient, AsyncLease, acall, alease, amap, astatus, await_quiet
from .handle import Handle
from .lease import Lease
from .mapping import Completed
from .sync import Client, call, cast, default_client, drain, lease, map, status, wait_quiet

__all__ = [
    "Arguments",
    "AsyncClient",
    "AsyncLease",
    "Client",
    "Completed",
    "Handle",
    "Lease",
    "acall",
    "alease",
    "amap",
    "astatus",
    "await_quiet",
    "call",
    "cast",
    "default_client",
    "drain",
    "lease",
    "map",
    "status",
    "wait_quiet",
]
