"""poolq: pools of warm, long-lived agents inside Celery workers.

Example::

    import poolq

    poolq.call("echo", text="hi")                 # send and wait
    handle = poolq.cast("echo", text="later")     # send, resolve later
    handle.result(timeout=10)
"""

from . import events
from .agent import Agent, batched, operation
from .client import (
    Arguments,
    AsyncClient,
    AsyncLease,
    Client,
    Completed,
    Handle,
    Lease,
    acall,
    alease,
    amap,
    astatus,
    await_quiet,
    call,
    cast,
    default_client,
    drain,
    lease,
    map,
    status,
    wait_quiet,
)
from .config import Config, PoolConfig, load_config
from .errors import (
    AgentCrashed,
    AgentError,
    AgentUnavailable,
    AlreadyRunning,
    BlockingInEventLoop,
    BrokerNotConfigured,
    BrokerUnavailable,
    CallCancelled,
    CallTimeout,
    CheckoutTimeout,
    ConfigError,
    EmbeddedBrokerError,
    InvalidArguments,
    InvalidOption,
    InvalidPayload,
    LeaseLost,
    PoolClosed,
    PoolDegraded,
    PoolExhausted,
    PoolqError,
    PoolqTimeout,
    RateLimited,
    ResultTimeout,
    UnknownOperation,
    UnknownPool,
)
from .events import Observer, subscribe, unsubscribe
from .store.status import AgentInfo, NodeInfo, PoolStatus
from .version import VERSION

__version__ = VERSION

__all__ = [
    # client
    "call",
    "cast",
    "lease",
    "Lease",
    "map",
    "Completed",
    "wait_quiet",
    "drain",
    "status",
    "acall",
    "alease",
    "amap",
    "await_quiet",
    "astatus",
    "Arguments",
    "AsyncClient",
    "AsyncLease",
    "PoolStatus",
    "AgentInfo",
    "NodeInfo",
    "Client",
    "Handle",
    "default_client",
    # agent
    "Agent",
    "batched",
    "operation",
    # events
    "events",
    "Observer",
    "subscribe",
    "unsubscribe",
    # config
    "Config",
    "PoolConfig",
    "load_config",
    # errors
    "PoolqError",
    "ConfigError",
    "EmbeddedBrokerError",
    "AlreadyRunning",
    "BrokerNotConfigured",
    "BrokerUnavailable",
    "UnknownPool",
    "InvalidPayload",
    "InvalidOption",
    "BlockingInEventLoop",
    "PoolExhausted",
    "RateLimited",
    "PoolDegraded",
    "PoolClosed",
    "LeaseLost",
    "UnknownOperation",
    "InvalidArguments",
    "PoolqTimeout",
    "CheckoutTimeout",
    "CallTimeout",
    "CallCancelled",
    "ResultTimeout",
    "AgentError",
    "AgentCrashed",
    "AgentUnavailable",
    # version
    "__version__",
]
