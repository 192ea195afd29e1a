"""Sending work: ``poolq call``, ``cast``, ``result``, ``map``."""

from __future__ import annotations

import json
import sys
from typing import IO, Any

import click

from ..client import Client
from ..client.aio import Arguments
from ..errors import PoolqError
from .base import CONFIG_OPTION, _config, main


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
