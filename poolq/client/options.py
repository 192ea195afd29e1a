"""The options every client entry point takes, checked at the boundary.

Each check raises :class:`~poolq.errors.InvalidOption` (also a ``ValueError``)
at once, before anything is sent, so no bad value ever reaches Celery or
Redis (where it would surface as an untyped error, or as a hang).

The names ``op``, ``timeout``, ``call_timeout``, ``block`` and ``kwargs``
are the client's own. An agent whose operation takes a parameter of one of
those names receives it through ``kwargs``::

    poolq.call("search", "cats", kwargs={"timeout": 3})   # the agent's own timeout
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from ..errors import InvalidOption

#: Longest timeout poolq accepts, in seconds (30 days): beyond it a deadline
#: stops being a deadline, and far beyond it date arithmetic overflows.
MAX_SECONDS = 30 * 24 * 3600.0
#: Keyword names the client functions keep for themselves.
RESERVED = ("op", "timeout", "call_timeout", "block", "kwargs")


def seconds(name: str, value: Any, default: float | None = None) -> float | None:
    """``value`` as seconds (``default`` when None): a finite number above 0 and at most 30 days.

    Raises:
        InvalidOption
    """
    if value is None:
        return default
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidOption(f"{name} must be a number of seconds, not {type(value).__name__} {value!r}")
    if not math.isfinite(value) or value <= 0 or value > MAX_SECONDS:
        raise InvalidOption(
            f"{name} must be a positive number of seconds up to {MAX_SECONDS:g} (30 days), not {value!r}"
        )
    return float(value)


def operation(op: Any) -> str | None:
    """``op`` checked: None (the agent's ``handle``) or a method name.

    Raises:
        InvalidOption
    """
    if op is None:
        return None
    if not isinstance(op, str) or not op.isidentifier() or op.startswith("_"):
        raise InvalidOption(f"op must be the name of an agent operation (a public method name), not {op!r}")
    return op


def flag(name: str, value: Any) -> bool:
    """A boolean option, checked (``1`` or ``"yes"`` are refused, not guessed at).

    Raises:
        InvalidOption
    """
    if not isinstance(value, bool):
        raise InvalidOption(f"{name} must be True or False, not {value!r}")
    return value


def pool_name(pool: Any) -> str:
    """The pool argument, checked to be a string (the configuration says whether it exists).

    Raises:
        InvalidOption
    """
    if not isinstance(pool, str):
        raise InvalidOption(f"the pool must be named by a string, not {type(pool).__name__} {pool!r}")
    return pool


def split(given: Mapping[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Split a call's keywords: the client's options, and the agent's keyword arguments.

    The agent's include those passed in ``kwargs`` (for names the client keeps).

    Raises:
        InvalidOption: ``kwargs`` is not a dict with string keys, or repeats a keyword.
    """
    chosen = {name: given[name] for name in RESERVED if name in given and name != "kwargs"}
    agent = {name: value for name, value in given.items() if name not in RESERVED}
    return chosen, keywords(agent, given.get("kwargs"))


def keywords(extra: Mapping[str, Any], kwargs: Any) -> dict[str, Any]:
    """The agent's keyword arguments: those passed directly, plus ``kwargs`` (for reserved names).

    Raises:
        InvalidOption: ``kwargs`` is not a dict with string keys, or repeats a keyword.
    """
    if kwargs is None:
        return dict(extra)
    if not isinstance(kwargs, Mapping) or not all(isinstance(key, str) for key in kwargs):
        raise InvalidOption(f"kwargs must be a dict with string keys, not {kwargs!r}")
    both = set(extra) & set(kwargs)
    if both:
        raise InvalidOption(f"keyword argument(s) {', '.join(sorted(both))} given twice (directly and in kwargs)")
    return {**extra, **kwargs}
