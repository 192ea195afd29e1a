"""The ``poolq`` command.

Each option that has an environment variable names it in its help.
``--config`` goes before or after the subcommand; ``-h`` is ``--help``.
Shell completion: ``eval "$(_POOLQ_COMPLETE=bash_source poolq)"`` (zsh:
``zsh_source``, fish: ``fish_source``), as for any Click program.
"""

from .base import main
from .calls import _parse_payload, call, cast, map_command, result
from .pools import EXIT_DEGRADED, drain, maintain, pools, render_status, status, stop, wait
from .services import beat, flower, maintainer, metrics, up, worker

__all__ = [
    "EXIT_DEGRADED",
    "_parse_payload",
    "beat",
    "call",
    "cast",
    "drain",
    "flower",
    "main",
    "maintain",
    "maintainer",
    "map_command",
    "metrics",
    "pools",
    "render_status",
    "result",
    "status",
    "stop",
    "up",
    "wait",
    "worker",
]
