"""The long-running processes: ``poolq up``, ``worker``, ``maintainer``, ``beat``, ``flower``, ``metrics``."""

from __future__ import annotations

import ipaddress
import logging
import os
import sys
from typing import Any, NoReturn

import click

from ..agent import missing_requirements
from ..app import CONTROL_QUEUE
from ..client import Client
from ..config import Config
from ..errors import ConfigError
from ..metrics import DEFAULT_PORT
from ..scaling.maintenance import restored_size
from ..store import registry
from ..store.connection import wait_reachable
from .base import CONFIG_OPTION, _app_for, _config, _idle_until_stopped, _say, main


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
    from ..local import up as stack

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
    from ..app import create_app

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
    from ..metrics import serve

    try:
        server = serve(port, address, Client(_config(config_path)))
    except OSError as exc:
        raise click.ClickException(f"cannot listen on {address}:{port}: {exc.strerror or exc}") from None
    _say("metrics")(f"serving http://{address}:{port}/metrics")
    try:
        _idle_until_stopped()
    finally:
        server.shutdown()
