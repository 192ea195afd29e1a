"""The ``poolq`` command group and what its subcommands share."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable
from typing import Any, NoReturn

import click
from celery import Celery

from ..config import Config, load_config
from ..errors import PoolqError
from ..version import VERSION

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


def _idle_until_stopped() -> NoReturn:
    stopped = threading.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda *_: stopped.set())
    stopped.wait()
    sys.exit(0)


def _say(command: str) -> Callable[[str], None]:
    return lambda line: click.echo(f"poolq {command}: {line}", err=True)


def _app_for(config_path: str | None) -> Celery:
    """The process's app, after pointing the environment at ``config_path``.

    Celery's subcommands (and spawned pool children) build the app from the
    environment, so the path must be there, not only in this process's memory.
    """
    from ..app import default_app

    if config_path:
        os.environ["POOLQ_CONFIG"] = config_path
    return default_app()
