"""Maintenance: what beat's ``poolq.maintain`` task does for one pool.

Beat sends ``poolq.maintain(pool)`` every ``maintenance_interval`` to the
control queue, where the maintenance worker (``poolq maintainer``) runs it,
never a pool's agents. One run:

1. takes the pool's maintenance lock (beat can send a run twice; the second
   finds the lock and does nothing, so nothing is scaled or replaced twice);
2. reads the registry and the queue depth (one round trip each);
3. asks the pure policy (:mod:`poolq.scaling.policy`) what to do;
4. writes the decision to the registry: the pool's base size (``scaled_size``,
   which also survives restarts), the scale event, the agents to replace;
5. tells the pool's nodes through Celery remote control (``poolq_sync``) to
   apply it now. A node that misses the broadcast converges on its own from
   the registry within seconds, and a node started later begins at the
   scaled size.
"""

from __future__ import annotations

import logging
import time
import uuid

import redis
from celery import Celery

from .. import events
from ..config import Config, PoolConfig
from ..store import keys, queues, registry
from . import policy

logger = logging.getLogger("poolq.scaling")


def maintain(
    app: Celery, config: Config, pool_name: str, state: redis.Redis, now: float | None = None
) -> policy.Decision | None:
    """Run maintenance for one pool; the decision, or None when another run holds the lock."""
    pool = config.pool(pool_name)
    now = time.time() if now is None else now
    token = str(uuid.uuid4())
    if not state.set(keys.maintain_lock(pool.name), token, nx=True, px=int(pool.maintenance_interval * 800)):
        logger.info("maintenance of %s skipped: another run holds the lock", pool.name)
        return None
    in_state = queues.same_redis(config.broker_url, config.state_url)
    snap = registry.snapshot(state, pool.name, pool.queue if in_state else "")
    waiting = snap.waiting if snap.waiting is not None else queues.depth(app, config, pool)
    view = build_view(pool, snap, waiting, now)
    decision = policy.decide(pool, view, now)
    apply(app, state, pool, view, decision, snap, now)
    return decision


def build_view(pool: PoolConfig, snap: registry.Snapshot, waiting: int, now: float) -> policy.PoolView:
    """The policy's input from a registry snapshot."""
    stats = snap.stats
    agents = [
        policy.AgentView(
            id=record.id,
            node=record.node,
            state=record.state,
            age_s=max(0.0, now - record.started_at),
            rss_mb=record.rss_mb,
            replacing=bool(record.replace),
        )
        for record in snap.agents
    ]
    return policy.PoolView(
        target=int(stats.get("scaled_size") or pool.size),
        nodes=len(snap.nodes),
        agents=agents,
        waiting=waiting,
        last_up_at=_optional(stats.get("last_up_at")),
        last_down_at=_optional(stats.get("last_down_at")),
        underused_since=_optional(stats.get("underused_since")),
    )


def apply(
    app: Celery,
    state: redis.Redis,
    pool: PoolConfig,
    view: policy.PoolView,
    decision: policy.Decision,
    snap: registry.Snapshot,
    now: float,
) -> None:
    """Write the decision to the registry and tell the pool's nodes."""
    stats = keys.stats(pool.name)
    pipe = state.pipeline(transaction=False)
    if decision.underused_since is None:
        pipe.hdel(stats, "underused_since")
    else:
        pipe.hset(stats, "underused_since", decision.underused_since)
    if decision.scale is not None:
        scale = decision.scale
        pipe.hset(stats, mapping={"scaled_size": scale.target, f"last_{scale.direction}_at": now})
        logger.info(
            "pool %s: scale %s %d -> %d per node (%s)",
            pool.name,
            scale.direction,
            view.target,
            scale.target,
            scale.reason,
        )
    for replace in decision.replace:
        # Only while the agent still lives: a late write must not resurrect a record without a TTL.
        pipe.eval(_MARK, 1, keys.agent(replace.agent_id), replace.reason)
        logger.info("pool %s: replace %s (%s)", pool.name, replace.agent_id, replace.reason)
    pipe.execute()
    if decision.scale is not None:
        scale = decision.scale
        registry.record_scale(state, pool.name, scale.direction, view.target, scale.target, scale.reason, now)
        scaled = events.PoolScaled(
            pool.name, node="", direction=scale.direction, before=view.target, after=scale.target, reason=scale.reason
        )
        events.emit(scaled)
    if decision.scale is not None or decision.replace:
        nodes = [node.id for node in snap.nodes]
        if nodes:
            app.control.broadcast("poolq_sync", arguments={"pool": pool.name}, destination=nodes)


_MARK = "if redis.call('EXISTS', KEYS[1]) == 1 then return redis.call('HSET', KEYS[1], 'replace', ARGV[1]) end return 0"


def restored_size(state: redis.Redis, pool: PoolConfig) -> int:
    """The base size a node of ``pool`` starts with: the last scaled size, within bounds."""
    scaled = state.hget(keys.stats(pool.name), "scaled_size")
    if not scaled:
        return pool.size
    return min(max(int(scaled), pool.min_size), pool.max_size)


def _optional(value: str | None) -> float | None:
    return float(value) if value else None
