"""The ``poolq`` command.

Each option that has an environment variable names it in its help.
``--config`` goes before or after the subcommand; ``-h`` is ``--help``.
Shell completion: ``eval "$(_POOLQ_COMPLETE=bash_source poolq)"`` (zsh:
``zsh_source``, fish: ``fish_source``), as for any Click program.
"""

from __future__ import annotations

import ipaddress
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from typing import IO, Any, NoReturn

import click
from celery import Celery

from .agent import missing_requirements
from .app import CONTROL_QUEUE
from .client import Client
from .client.aio import Arguments
from .config import Config, load_config
from .errors import ConfigError, PoolqError
from .metrics import DEFAULT_PORT
from .scaling.maintenance import restored_size
from .store import registry
from .store.connection import wait_reachable
from .store.status import PoolStatus
from .version import VERSION

CONFIG_OPTION = click.option(
    "--config",
    "config_path",
    envvar="POOLQ_CONFIG",
    type=click.Path(dir_okay=False),
    help="Pool configuration file [env: POOLQ_CONFIG; default: config/pools.toml].",
)


def _config(path: str | None) -> Config:
    return load_config(path)


def _fail(exc: PoolqError) -> NoReturn:
    click.echo(f"poolq: {type(exc).__name__}: {exc}", err=True)
    remote_traceback = getattr(exc, "remote_traceback", "")
    if remote_traceback:
        click.echo(remote_traceback.rstrip(), err=True)
    sys.exit(1)


class _PoolqGroup(click.Group):
    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except PoolqError as exc:
            _fail(exc)


@click.group(cls=_PoolqGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--config",
    "config_path",
    type=click.Path(dir_okay=False),
    help="Pool configuration file, for every subcommand [env: POOLQ_CONFIG; default: config/pools.toml].",
)
@click.version_option(VERSION, prog_name="poolq")
def main(config_path: str | None) -> None:
    """poolq: pools of warm agents inside Celery workers."""
    # Agents are named by import path (workers.echo:Echo): found from the
    # project directory, as Celery and gunicorn find an app.
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    if config_path:
        # Read by the subcommand's own --config (its envvar) and by the processes it starts.
        os.environ["POOLQ_CONFIG"] = config_path


@main.command()
@CONFIG_OPTION
@click.option("--no-flower", is_flag=True, help="Do not start Flower.")
@click.option("--no-beat", is_flag=True, help="Do not start Celery beat (nor the maintainer).")
@click.option("--no-metrics", is_flag=True, help="Do not serve /metrics.")
def up(config_path: str | None, no_flower: bool, no_beat: bool, no_metrics: bool) -> None:
    """Run every pool's worker, the maintainer, beat, metrics and Flower in the foreground.

    With no broker configured (POOLQ_BROKER_URL or [poolq] broker_url), starts
    an embedded one on 127.0.0.1 with its files under .poolq/.
    """
    from .local import up as stack

    config = _config(config_path)
    sys.exit(stack.run(config, out=sys.stdout, flower=not no_flower, beat=not no_beat, metrics=not no_metrics))


@main.command(context_settings={"ignore_unknown_options": True})
@CONFIG_OPTION
@click.argument("pool")
@click.option("-n", "--name", "node", help="Celery node name [default: POOL@%h].")
@click.option(
    "-l", "--loglevel", default="INFO", show_default=True, envvar="POOLQ_LOGLEVEL", help="[env: POOLQ_LOGLEVEL]"
)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
@click.option(
    "--task-loglevel",
    envvar="POOLQ_TASK_LOGLEVEL",
    help="Level of Celery's per-call lines (received, succeeded) [env: POOLQ_TASK_LOGLEVEL; default: --loglevel].",
)
def worker(
    config_path: str | None,
    pool: str,
    node: str | None,
    loglevel: str,
    task_loglevel: str | None,
    celery_args: tuple[str, ...],
) -> None:
    """Run a Celery worker node for POOL (extra arguments go to `celery worker`).

    Waits for the broker and the state store when they are not up yet. A pool
    whose requirements (`requires`) are missing here is skipped: the command
    says why, marks the pool `skipped`, and idles until it is stopped, so the
    rest of a Procfile or compose stack keeps running.
    """
    app = _app_for(config_path)
    config = app.poolq_config
    pool_config = config.pool(pool)
    client = Client(config, app=app)
    missing = missing_requirements(pool_config)
    if missing:
        _skip(client, pool, f"needs {', '.join(missing)} (not installed)")
    wait_reachable(client.state, config.state_url, _say("worker"))
    if pool_config.worker_pool == "prefork":
        # Start at the size maintenance last scaled the pool to (it survives restarts).
        concurrency = restored_size(client.state, pool_config)
    else:
        concurrency = 1 if pool_config.worker_pool == "solo" else pool_config.size
    argv = [
        "worker",
        "--queues", pool_config.queue,
        "--concurrency", str(concurrency),
        "--pool", pool_config.worker_pool,
        "--hostname", node or f"{pool}@%h",
        "--loglevel", loglevel,
        "--task-events",
        "--without-mingle",
        "--without-gossip",
        *celery_args,
    ]  # fmt: skip
    if task_loglevel:
        _quiet_task_lines(task_loglevel)
    app.worker_main(argv)


def _skip(client: Client, pool: str, reason: str) -> NoReturn:
    """Say why the pool is skipped, mark it so in the registry, and idle until stopped."""
    say = _say("worker")
    say(f"pool {pool}: skipped, {reason}; idling until stopped")
    wait_reachable(client.state, client.config.state_url, say)
    if not registry.mark_skipped(client.state, pool, reason):
        say(f"pool {pool}: another node serves it; not marked skipped")
    _idle_until_stopped()


def _idle_until_stopped() -> NoReturn:
    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    stopped.wait()
    sys.exit(0)


def _say(command: str) -> Callable[[str], None]:
    return lambda line: click.echo(f"poolq {command}: {line}", err=True)


def _quiet_task_lines(level: str) -> None:
    """Set the level of Celery's per-call log lines, after Celery sets up its logging."""
    from celery.signals import after_setup_logger

    def quiet(**_: Any) -> None:
        for name in ("celery.app.trace", "celery.worker.strategy"):
            logging.getLogger(name).setLevel(level.upper())

    after_setup_logger.connect(quiet, weak=False)


@main.command(context_settings={"ignore_unknown_options": True})
@CONFIG_OPTION
@click.option("-n", "--name", "node", default="maintainer@%h", show_default=True, help="Celery node name.")
@click.option(
    "-l", "--loglevel", default="INFO", show_default=True, envvar="POOLQ_LOGLEVEL", help="[env: POOLQ_LOGLEVEL]"
)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def maintainer(config_path: str | None, node: str, loglevel: str, celery_args: tuple[str, ...]) -> None:
    """Run the maintenance worker: it runs beat's poolq.maintain for every pool (control queue only).

    Waits for the state store when it is not up yet.
    """
    app = _app_for(config_path)
    wait_reachable(Client(app.poolq_config, app=app).state, app.poolq_config.state_url, _say("maintainer"))
    argv = [
        "worker",
        "--queues", CONTROL_QUEUE,
        "--pool", "solo",
        "--hostname", node,
        "--loglevel", loglevel,
        "--without-mingle",
        "--without-gossip",
        *celery_args,
    ]  # fmt: skip
    app.worker_main(argv)


@main.command()
@CONFIG_OPTION
@click.argument("pool")
def maintain(config_path: str | None, pool: str) -> None:
    """Run one maintenance pass for POOL now and print what it decided."""
    from .scaling.maintenance import maintain as run_maintenance

    client = Client(_config(config_path))
    decision = run_maintenance(client.app, client.config, pool, client.state)
    if decision is None:
        click.echo("skipped: another maintenance run holds the lock")
        return
    click.echo(f"scale: {decision.scale or 'none'}")
    for replace in decision.replace:
        click.echo(f"replace: {replace.agent_id} ({replace.reason})")


@main.command(context_settings={"ignore_unknown_options": True})
@CONFIG_OPTION
@click.option(
    "-l", "--loglevel", default="INFO", show_default=True, envvar="POOLQ_LOGLEVEL", help="[env: POOLQ_LOGLEVEL]"
)
@click.argument("celery_args", nargs=-1, type=click.UNPROCESSED)
def beat(config_path: str | None, loglevel: str, celery_args: tuple[str, ...]) -> None:
    """Run Celery beat, which sends poolq's maintenance on schedule."""
    app = _app_for(config_path)
    state_dir = app.poolq_config.state_dir
    try:
        state_dir.mkdir(parents=True, exist_ok=True)
        (state_dir / ".writable").touch()
    except OSError as exc:
        raise ConfigError(
            f"beat keeps its schedule in {state_dir.resolve()}, which it cannot write ({exc.strerror}): "
            "set POOLQ_STATE_DIR to a writable directory"
        ) from None
    schedule = str(state_dir / "celerybeat-schedule")
    app.start(["beat", "--schedule", schedule, "--loglevel", loglevel, *celery_args])


@main.command(context_settings={"ignore_unknown_options": True})
@CONFIG_OPTION
@click.option("--port", default=5555, show_default=True, envvar="POOLQ_FLOWER_PORT", help="[env: POOLQ_FLOWER_PORT]")
@click.option(
    "--address",
    default="127.0.0.1",
    show_default=True,
    envvar="POOLQ_FLOWER_ADDRESS",
    help="[env: POOLQ_FLOWER_ADDRESS]",
)
@click.option(
    "--insecure", is_flag=True, help="Listen beyond this machine without a password (anyone there reads every call)."
)
@click.argument("flower_args", nargs=-1, type=click.UNPROCESSED)
def flower(config_path: str | None, port: int, address: str, insecure: bool, flower_args: tuple[str, ...]) -> None:
    """Run the Flower dashboard for this deployment (extra arguments go to Flower).

    Flower shows every call's arguments and results, and can stop workers:
    on an address other than the loopback it needs a password (--basic-auth
    user:password or FLOWER_BASIC_AUTH), an --auth provider (FLOWER_AUTH), or
    --insecure.
    """
    if not (_loopback(address) or insecure or _flower_auth(flower_args)):
        raise click.UsageError(
            f"Flower on {address} would show every call's arguments to anyone who can reach it: "
            "give --basic-auth user:password (or FLOWER_BASIC_AUTH), --auth (or FLOWER_AUTH), or --insecure"
        )
    from .app import create_app

    _app_for(config_path)  # the environment, for Celery's command line
    if _loopback(address) and not _flower_auth(flower_args):
        # The pages are open to this machine already; let its API be too (Flower refuses it otherwise).
        os.environ.setdefault("FLOWER_UNAUTHENTICATED_API", "true")
    if not (_given(flower_args, "--tasks-columns") or os.environ.get("FLOWER_TASKS_COLUMNS")):
        flower_args = (f"--tasks-columns={FLOWER_TASKS_COLUMNS}", *flower_args)
    config = _config(config_path)
    _flower_lists_every_pool_queue(config)
    app = create_app(config, monitor=True)
    app.start(["flower", f"--port={port}", f"--address={address}", *flower_args])


def _flower_lists_every_pool_queue(config: Config) -> None:
    """Have Flower's Broker tab and /api/queues/length show every pool's queue.

    Flower lists the queues of the workers it inspected when it started (or
    when a page asks it to refresh), so a node that starts after Flower, as in
    a Procfile or compose stack, has its queue missing. poolq knows its queues.
    """
    from flower.views import BaseHandler

    stock = BaseHandler.get_active_queue_names
    configured = {pool.queue for pool in config.pools.values()} | {CONTROL_QUEUE}

    def get_active_queue_names(handler: BaseHandler) -> list[str]:
        return sorted(set(stock(handler)) | configured)

    BaseHandler.get_active_queue_names = get_active_queue_names


#: Flower's task list, with the arguments and the result (which names the agent) that it hides by default.
FLOWER_TASKS_COLUMNS = "name,uuid,state,args,kwargs,result,received,runtime,worker"


def _loopback(address: str) -> bool:
    try:
        return ipaddress.ip_address(address).is_loopback
    except ValueError:
        return address == "localhost"


def _flower_auth(flower_args: tuple[str, ...]) -> bool:
    if os.environ.get("FLOWER_BASIC_AUTH") or os.environ.get("FLOWER_AUTH"):
        return True
    return _given(flower_args, "--basic-auth") or _given(flower_args, "--auth")


def _given(flower_args: tuple[str, ...], option: str) -> bool:
    return any(arg.split("=", 1)[0].replace("_", "-") == option for arg in flower_args)


@main.command()
@CONFIG_OPTION
@click.option(
    "--port",
    default=DEFAULT_PORT,
    show_default=True,
    envvar="POOLQ_METRICS_PORT",
    help="[env: POOLQ_METRICS_PORT]",
)
@click.option(
    "--address", default="127.0.0.1", show_default=True, envvar="POOLQ_METRICS_ADDRESS",
    help="[env: POOLQ_METRICS_ADDRESS]",
)  # fmt: skip
def metrics(config_path: str | None, port: int, address: str) -> None:
    """Serve every pool's Prometheus metrics at http://ADDRESS:PORT/metrics until stopped."""
    from .metrics import serve

    try:
        server = serve(port, address, Client(_config(config_path)))
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {address}:{port}: {exc.strerror or exc}") from None
    _say("metrics")(f"serving http://{address}:{port}/metrics")
    try:
        _idle_until_stopped()
    finally:
        server.shutdown()


def _call_options(fn: Any) -> Any:
    for option in reversed(
        [
            CONFIG_OPTION,
            click.argument("pool"),
            click.argument("payload", required=False, default="{}"),
            click.option("--op", help="Agent operation [default: handle]."),
            click.option("--timeout", type=float, help="Seconds to wait for a free agent [default: the pool's]."),
            click.option("--call-timeout", type=float, help="Seconds the agent may take [default: the pool's]."),
        ]
    ):
        fn = option(fn)
    return fn


def _parse_payload(payload: str) -> tuple[list[Any], dict[str, Any]]:
    """PAYLOAD is a JSON object (keyword arguments), a JSON array (positional ones), or - for stdin."""
    text = sys.stdin.read() if payload == "-" else payload
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(f"not JSON: {exc}", param_hint="PAYLOAD") from None
    if isinstance(value, dict):
        return [], value
    if isinstance(value, list):
        return value, {}
    raise click.BadParameter(
        "give a JSON object (keyword arguments) or array (positional arguments)", param_hint="PAYLOAD"
    )


@main.command()
@_call_options
def call(
    config_path: str | None, pool: str, payload: str, op: str | None, timeout: float | None, call_timeout: float | None
) -> None:
    """Call POOL with PAYLOAD (a JSON object of keyword arguments) and print the JSON result."""
    args, kwargs = _parse_payload(payload)
    result = Client(_config(config_path)).call(pool, *args, op=op, timeout=timeout, call_timeout=call_timeout, **kwargs)
    click.echo(json.dumps(result, ensure_ascii=False))


@main.command()
@_call_options
def cast(
    config_path: str | None, pool: str, payload: str, op: str | None, timeout: float | None, call_timeout: float | None
) -> None:
    """Send PAYLOAD to POOL without waiting; print the call's id (see `poolq result`)."""
    args, kwargs = _parse_payload(payload)
    handle = Client(_config(config_path)).cast(pool, *args, op=op, timeout=timeout, call_timeout=call_timeout, **kwargs)
    click.echo(handle.id)


@main.command()
@CONFIG_OPTION
@click.argument("call_id")
@click.option("--timeout", type=float, help="Seconds to wait for the result [default: forever].")
def result(config_path: str | None, call_id: str, timeout: float | None) -> None:
    """Wait for the result of the cast CALL_ID and print it as JSON."""
    value = Client(_config(config_path)).handle(call_id).result(timeout=timeout)
    click.echo(json.dumps(value, ensure_ascii=False))


@main.command(name="map")
@CONFIG_OPTION
@click.argument("pool")
@click.argument("inputs", type=click.File("r"), default="-")
@click.option("--op", help="Agent operation [default: handle].")
@click.option("--concurrency", type=int, help="Calls in flight at once [default: twice the pool's agents].")
@click.option("--timeout", type=float, help="Seconds each call may wait for a free agent [default: the pool's].")
@click.option("--call-timeout", type=float, help="Seconds the agent may take per call [default: the pool's].")
@click.option(
    "--ordered/--unordered",
    default=True,
    help="Print the results in input order at the end, or each as it arrives [default: ordered].",
)
def map_command(
    config_path: str | None,
    pool: str,
    inputs: IO[str],
    op: str | None,
    concurrency: int | None,
    timeout: float | None,
    call_timeout: float | None,
    ordered: bool,
) -> None:
    """Call POOL once per line of INPUTS (JSON lines; default stdin) and print the results.

    Each line is an object (keyword arguments) or an array (positional
    arguments), as for `poolq call`. In order (the default), each result line
    is the JSON result, or {"error": ...} for a line that failed, and a
    progress bar goes to stderr. With --unordered each result is printed as
    soon as it arrives, as {"index": N, "result": ...} or {"index": N,
    "error": ...}, N counting the input lines from 0.
    """
    lines = [line for line in inputs.read().splitlines() if line.strip()]
    items = [Arguments(*_parse_payload(line)) for line in lines]
    client = Client(_config(config_path))
    options: dict[str, Any] = {"op": op, "concurrency": concurrency, "timeout": timeout, "call_timeout": call_timeout}
    options["return_exceptions"] = True  # a failed line is printed as such; the others go on
    if not ordered:
        for index, result in client.map(pool, items, ordered=False, **options):
            shown = _map_error(result) if isinstance(result, PoolqError) else {"result": result}
            click.echo(json.dumps({"index": index, **shown}, ensure_ascii=False))  # flushed: shown at once
        return
    with click.progressbar(length=len(items), label=f"poolq map {pool}", file=sys.stderr) as bar:
        results = client.map(pool, items, on_progress=lambda done, total: bar.update(1), **options)
    results = [_map_error(r) if isinstance(r, PoolqError) else r for r in results]
    for result in results:
        click.echo(json.dumps(result, ensure_ascii=False))


def _map_error(exc: PoolqError) -> dict[str, str]:
    return {"error": f"{type(exc).__name__}: {exc}"}


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


def _app_for(config_path: str | None) -> Celery:
    """The process's app, after pointing the environment at ``config_path``.

    Celery's subcommands (and spawned pool children) build the app from the
    environment, so the path must be there, not only in this process's memory.
    """
    from .app import default_app

    if config_path:
        os.environ["POOLQ_CONFIG"] = config_path
    return default_app()
