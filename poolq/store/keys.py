"""Every key poolq keeps in its state Redis, in one place.

Lua scripts get their keys from here too (as KEYS, or as prefixes in ARGV
where a script finds its records through a set), never write them.

Per call: ``reply``, ``result``, ``claim``. Per agent and node: their
records, alive while their heartbeat lasts. Per pool: the sets of its agents
and nodes, its counters and flags (``stats``), scale events, setup failures,
its locks, and its rate limiter's window. The name pool. A lease's two lists.
An event loop's mailbox.
"""

from __future__ import annotations

#: The prefix of every poolq key (Celery's and kombu's keys are theirs).
PREFIX = "poolq"
#: An agent's record is AGENT_PREFIX + its id.
AGENT_PREFIX = f"{PREFIX}:agent:"
#: A node's record is NODE_PREFIX + its name.
NODE_PREFIX = f"{PREFIX}:node:"

NAMES_FREE = f"{PREFIX}:names:free"
NAMES_ALL = f"{PREFIX}:names:all"
NAMES_BY_PROCESS = f"{PREFIX}:names:by_process"


def reply(task_id: str) -> str:
    """The list a call's reply is pushed to (a call's caller BLPOPs it)."""
    return f"{PREFIX}:reply:{task_id}"


def result(task_id: str) -> str:
    """Where a cast's reply is kept, readable by id."""
    return f"{PREFIX}:result:{task_id}"


def claim(task_id: str) -> str:
    """Who runs a call (or that it expired, or is done), and its deliveries."""
    return f"{PREFIX}:claim:{task_id}"


def agent(agent_id: str) -> str:
    return f"{AGENT_PREFIX}{agent_id}"


def node(name: str) -> str:
    return f"{NODE_PREFIX}{name}"


def pool_agents(pool: str) -> str:
    return f"{PREFIX}:pool:{pool}:agents"


def pool_nodes(pool: str) -> str:
    return f"{PREFIX}:pool:{pool}:nodes"


def stats(pool: str) -> str:
    """The pool's counters and flags (requests, recycles, breaker, scaled size, closed ...)."""
    return f"{PREFIX}:pool:{pool}:stats"


def scale_events(pool: str) -> str:
    return f"{PREFIX}:pool:{pool}:scale_events"


def setup_failures(pool: str) -> str:
    return f"{PREFIX}:pool:{pool}:setup_failures"


def maintain_lock(pool: str) -> str:
    return f"{PREFIX}:pool:{pool}:maintain_lock"


def recycle_turn(pool: str) -> str:
    """The pool-wide turn to recycle an agent in place (threads and solo nodes)."""
    return f"{PREFIX}:pool:{pool}:recycle_turn"


def metrics(pool: str) -> str:
    """How long the pool's calls waited and ran, and how they ended (see :mod:`poolq.store.metrics`)."""
    return f"{PREFIX}:pool:{pool}:metrics"


def rate_window(pool: str) -> str:
    """The pool's rate limiter: a sorted set of the operations started lately, scored by their start (server time)."""
    return f"{PREFIX}:pool:{pool}:rate"


def pool_keys(pool: str) -> list[str]:
    """Every key of one pool (not of its agents or calls): what a fresh start of the pool clears."""
    return [
        pool_agents(pool),
        pool_nodes(pool),
        stats(pool),
        scale_events(pool),
        setup_failures(pool),
        maintain_lock(pool),
        recycle_turn(pool),
        metrics(pool),
        rate_window(pool),
    ]


def node_names(name: str) -> str:
    """The names a node's agents had at its last heartbeat."""
    return f"{PREFIX}:names:node:{name}"


def lease_requests(lease_id: str) -> str:
    """Where a lease's client pushes requests and its agent pops them."""
    return f"{PREFIX}:lease:{lease_id}:requests"


def lease_replies(lease_id: str) -> str:
    """Where a lease's agent pushes the grant, the replies, and the end of the lease."""
    return f"{PREFIX}:lease:{lease_id}:replies"


def mailbox(mailbox_id: str) -> str:
    """The reply list that every call of one event loop shares."""
    return f"{PREFIX}:mailbox:{mailbox_id}"
