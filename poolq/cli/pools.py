"""Looking at and acting on pools: ``poolq status``, ``pools``, ``wait``, ``drain``, ``stop``, ``maintain``."""

from __future__ import annotations

import json
import sys
import time
from typing import NoReturn

import click

from ..client import Client
from ..errors import PoolqError
from ..store.status import PoolStatus
from .base import CONFIG_OPTION, _config, main


@main.command()
@CONFIG_OPTION
@click.argument("pool")
def maintain(config_path: str | None, pool: str) -> None:
    """Run one maintenance pass for POOL now and print what it decided."""
    from ..scaling.maintenance import maintain as run_maintenance

    client = Client(_config(config_path))
    decision = run_maintenance(client.app, client.config, pool, client.state)
    if decision is None:
        click.echo("skipped: another maintenance run holds the lock")
        return
    click.echo(f"scale: {decision.scale or 'none'}")
    for replace in decision.replace:
        click.echo(f"replace: {replace.agent_id} ({replace.reason})")


@main.command()
@CONFIG_OPTION
@click.argument("pool")
@click.option("--timeout", type=float, help="Seconds to wait [default: forever].")
def wait(config_path: str | None, pool: str, timeout: float | None) -> None:
    """Wait until POOL's queue is empty and every agent idle (quiescence)."""
    status = Client(_config(config_path)).wait_quiet(pool, timeout=timeout)
    click.echo(render_status(status))


@main.command()
@CONFIG_OPTION
@click.argument("pool")
def drain(config_path: str | None, pool: str) -> None:
    """Retire POOL's idle agents above each node's base size now (not after overflow_idle)."""
    retired = Client(_config(config_path)).drain(pool)
    click.echo(f"retired {sum(retired.values())} idle agent(s) of {pool}")


@main.command()
@CONFIG_OPTION
@click.argument("pool")
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds to wait for the nodes to stop.")
def stop(config_path: str | None, pool: str, timeout: float) -> None:
    """Close POOL and stop its worker nodes gracefully: in-flight calls finish, queued calls stay queued.

    Calls to POOL then fail at once with PoolClosed, until a node of POOL starts again.
    """
    client = Client(_config(config_path))
    stopped = client.stop(pool, timeout=timeout)
    click.echo(f"stopped {len(stopped)} node(s) of {pool}: {', '.join(stopped) or 'none were running'}")
    click.echo(render_status(client.status(pool)))


#: ``poolq status`` exits with this when a pool it shows is degraded.
EXIT_DEGRADED = 3


@main.command()
@CONFIG_OPTION
@click.argument("pool", required=False)
@click.option("--json", "as_json", is_flag=True, help="Print JSON instead of a table.")
@click.option("-w", "--watch", is_flag=True, help="Redraw every --interval seconds until Ctrl-C.")
@click.option(
    "--interval", type=click.FloatRange(min=0.2), default=2.0, show_default=True, help="Seconds between redraws."
)
def status(config_path: str | None, pool: str | None, as_json: bool, watch: bool, interval: float) -> None:
    """Show each pool's state, counters and agents (or only POOL's).

    Exit status: 0, or 3 when a pool shown is degraded (1 on an error).
    """
    client = Client(_config(config_path))
    names = [pool] if pool else list(client.config.pools)
    if watch:
        _watch(client, names, interval)
    statuses = [client.status(name) for name in names]
    if as_json:
        click.echo(json.dumps([s.as_dict() for s in statuses], indent=2))
    else:
        click.echo("\n\n".join(render_status(s) for s in statuses))
    if any(s.state == "degraded" for s in statuses):
        sys.exit(EXIT_DEGRADED)


def _watch(client: Client, names: list[str], interval: float) -> NoReturn:
    try:
        while True:
            try:
                text = "\n\n".join(render_status(client.status(name)) for name in names)
            except PoolqError as exc:
                text = f"poolq: {type(exc).__name__}: {exc}"
            click.clear()
            click.echo(f"{time.strftime('%H:%M:%S')}  every {interval:g}s  (Ctrl-C stops)\n\n{text}")
            time.sleep(interval)
    except KeyboardInterrupt:
        sys.exit(0)


def render_status(s: PoolStatus) -> str:
    """A pool's status as a small text table."""
    c = s.counters
    lines = [
        f"pool {s.pool}: {s.state}   size {s.size}  available {s.available}  in use {s.in_use}  "
        f"overflow {s.overflow}/{s.max_overflow}  waiting {s.waiting}",
        f"  requests {c['requests']}  recycles {c['recycles']}  spawned {c['spawned']}  "
        f"terminated {c['terminated']}  scale up/down {c['scale_ups']}/{c['scale_downs']}",
    ]
    if s.skipped_because:
        lines.append(f"  skipped: {s.skipped_because}")
    if s.degraded_by:
        lines.append(f"  degraded by: {s.degraded_by}")
    if s.last_scale:
        e = s.last_scale
        lines.append(f"  last scale: {e.get('direction')} {e.get('from')} -> {e.get('to')} ({e.get('reason')})")
    if s.agents:
        lines.append(f"  {'AGENT':<22} {'STATE':<10} {'NODE':<24} {'PID':>7} {'REQUESTS':>9} {'AGE':>8} {'IDLE':>8}")
        for a in s.agents:
            idle = "-" if a.idle_s is None else _duration(a.idle_s)
            age = _duration(a.age_s)
            lines.append(f"  {a.name:<22} {a.state:<10} {a.node:<24} {a.pid:>7} {a.requests:>9} {age:>8} {idle:>8}")
    else:
        lines.append("  no agents running")
    return "\n".join(lines)


def _duration(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.0f}s"
    if seconds < 3600:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


@main.command()
@CONFIG_OPTION
def pools(config_path: str | None) -> None:
    """Check the configuration and list its pools."""
    config = _config(config_path)
    for pool in config.pools.values():
        click.echo(
            f"{pool.name}: {pool.agent} size={pool.size} max_overflow={pool.max_overflow} "
            f"worker_pool={pool.worker_pool}"
            + (f" strategy={pool.strategy}" if pool.strategy else "")
            + f" queue={pool.queue}"
        )
