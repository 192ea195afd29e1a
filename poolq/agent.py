"""The agent base class: the user's warm, long-lived object and its lifecycle.

An agent lives inside one Celery worker process (or one worker thread with the
``threads`` pool). poolq builds it once when the process starts and keeps it
across calls:

    setup()      once, when the process starts, before it takes any work
    healthy()    on demand; False sends the agent to recycling
    handle(...)  for every call without ``op``
    <operation>  for every call with ``op="<operation>"``
    reset()      when a lease ends, before the agent serves somebody else
    teardown()   when the agent is recycled and when the process shuts down

Example::

    class Classifier(poolq.Agent):
        def setup(self) -> None:
            self.model = load_model(self.options["model_path"])

        def handle(self, text: str) -> dict:
            return {"label": self.model.predict(text)}

        @poolq.operation
        def batch(self, texts: list[str]) -> list[dict]:
            return [self.handle(t) for t in texts]
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import ConfigError, InvalidArguments, UnknownOperation

if TYPE_CHECKING:
    from .config import PoolConfig

F = TypeVar("F", bound=Callable[..., Any])

#: The operation a call without ``op`` runs.
DEFAULT_OPERATION = "handle"

_OPERATION_MARK = "__poolq_operation__"


def operation(fn: F) -> F:
    """Mark an agent method as a named operation callable with ``op="<name>"``."""
    setattr(fn, _OPERATION_MARK, True)
    return fn


class Agent:
    """Base class of poolq agents; every hook does nothing by default.

    Attributes:
        options: the pool's ``options`` table from the configuration.
        pool: the name of the pool this agent serves.
        name: the agent's identity in the registry and the logs.
        device: where the pool places the agent: ``"cpu"``, ``"mps"``, or a CUDA
            device such as ``"cuda:0"``; None when the pool sets no ``device``
            (the agent decides). Pass it to your framework, e.g.
            ``SentenceTransformer(path, device=self.device or "cpu")``. With
            ``device = "cuda"`` or ``gpus_per_agent``, ``CUDA_VISIBLE_DEVICES``
            holds only this agent's GPUs (in a prefork or solo pool) and
            ``device`` is ``"cuda:0"``, the first of them.
    """

    def __init__(
        self, options: Mapping[str, Any] | None = None, *, pool: str = "", name: str = "", device: str | None = None
    ) -> None:
        self.options: dict[str, Any] = dict(options or {})
        self.pool = pool
        self.name = name
        self.device = device

    def setup(self) -> None:
        """Build the expensive state (models, clients, sessions). Runs once per agent."""

    def handle(self, *args: Any, **kwargs: Any) -> Any:
        """Serve a call made without ``op``. Must return plain JSON data."""
        raise NotImplementedError(f"{type(self).__name__} does not implement handle()")

    def healthy(self) -> bool:
        """Say whether the agent can take more work; False recycles it."""
        return True

    def reset(self) -> None:
        """Forget per-caller state (runs when a lease ends)."""

    def teardown(self) -> None:
        """Release what setup() built. Runs on recycle and on shutdown."""

    @classmethod
    def operations(cls) -> dict[str, inspect.Signature]:
        """The callable operations (``handle`` and every ``@operation``) and their signatures."""
        return _operation_table(cls)

    def bind(self, op: str | None, args: list[Any], kwargs: dict[str, Any]) -> Callable[[], Any]:
        """Resolve ``op`` and check the arguments against its signature.

        Returns a zero-argument callable that runs the operation, so that a
        ``TypeError`` raised inside the operation is never mistaken for a bad
        call.

        Raises:
            UnknownOperation: the agent has no such operation.
            InvalidArguments: the arguments do not fit its signature.
        """
        name = op or DEFAULT_OPERATION
        ops = _operation_table(type(self))
        signature = ops.get(name)
        if signature is None:
            known = ", ".join(sorted(ops))
            raise UnknownOperation(f"agent {type(self).__name__} has no operation {name!r} (known: {known})")
        try:
            signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise InvalidArguments(f"{type(self).__name__}.{name}(): {exc}") from None
        method = getattr(self, name)
        return lambda: method(*args, **kwargs)


_TABLES: dict[type[Agent], dict[str, inspect.Signature]] = {}


def _operation_table(cls: type[Agent]) -> dict[str, inspect.Signature]:
    # Signatures are computed once per class: inspect.signature is slow
    # enough to show on the call path.
    table = _TABLES.get(cls)
    if table is None:
        table = _TABLES[cls] = _build_operation_table(cls)
    return table


def _build_operation_table(cls: type[Agent]) -> dict[str, inspect.Signature]:
    methods: dict[str, Callable[..., Any]] = {DEFAULT_OPERATION: cls.handle}
    for klass in reversed(cls.__mro__):
        for attr, value in vars(klass).items():
            if getattr(value, _OPERATION_MARK, False):
                methods[attr] = value
    table = {}
    for name, fn in methods.items():
        signature = inspect.signature(fn)
        # Drop ``self``: callers bind the arguments they send.
        table[name] = signature.replace(parameters=list(signature.parameters.values())[1:])
    return table


def missing_requirements(pool: PoolConfig) -> list[str]:
    """The modules in the pool's ``requires`` that cannot be imported here."""
    return [name for name in pool.requires if importlib.util.find_spec(name) is None]


def load_agent_class(pool: PoolConfig) -> type[Agent]:
    """Import the pool's agent class from its ``module:Class`` path.

    Raises:
        ConfigError: the module or class cannot be imported, or is no Agent.
    """
    for module_name in missing_requirements(pool):
        raise ConfigError(f"pool {pool.name!r} requires the module {module_name!r}, which is not installed")
    module_name, _, class_name = pool.agent.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ImportError as exc:
        raise ConfigError(f"pool {pool.name!r}: cannot import agent module {module_name!r}: {exc}") from exc
    cls = getattr(module, class_name, None)
    if not (isinstance(cls, type) and issubclass(cls, Agent)):
        raise ConfigError(f"pool {pool.name!r}: {pool.agent} is not a poolq.Agent subclass")
    return cls
