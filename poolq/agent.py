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

        @poolq.batched(max_size=32, max_wait=0.005)
        def label(self, texts: list[str]) -> list[dict]:
            # poolq.call("classify", "one text", op="label") -> that text's dict:
            # the calls waiting together arrive here as one list.
            return [{"label": y} for y in self.model.predict_many(texts)]
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, TypeVar, overload

from .errors import ConfigError, InvalidArguments, UnknownOperation

if TYPE_CHECKING:
    from .config import PoolConfig

F = TypeVar("F", bound=Callable[..., Any])

#: The operation a call without ``op`` runs.
DEFAULT_OPERATION = "handle"

_OPERATION_MARK = "__poolq_operation__"
#: The attribute through which the worker answers :meth:`Agent.cancelled` during a call.
CANCEL_CHECK = "_poolq_cancel_check"
_BATCH_MARK = "__poolq_batch__"

#: A batched operation's default largest batch, and its default wait (seconds) for more calls.
DEFAULT_BATCH_SIZE = 32
DEFAULT_BATCH_WAIT = 0.005


def operation(fn: F) -> F:
    """Mark an agent method as a named operation callable with ``op="<name>"``."""
    setattr(fn, _OPERATION_MARK, True)
    return fn


@dataclass(frozen=True)
class BatchSpec:
    """How a node gathers the calls of one batched operation (see :func:`batched`)."""

    #: The most calls in one invocation.
    max_size: int = DEFAULT_BATCH_SIZE
    #: Seconds a call waits for companions after it arrives, when a process is free.
    max_wait: float = DEFAULT_BATCH_WAIT


@overload
def batched(fn: F, /) -> F: ...
@overload
def batched(*, max_size: int = DEFAULT_BATCH_SIZE, max_wait: float = DEFAULT_BATCH_WAIT) -> Callable[[F], F]: ...
def batched(fn: Any = None, /, *, max_size: int = DEFAULT_BATCH_SIZE, max_wait: float = DEFAULT_BATCH_WAIT) -> Any:
    """Mark an agent method as a batched operation: it serves many calls in one invocation.

    Each call sends one item, ``poolq.call(pool, item, op="<name>")``, and gets
    its own result. The worker node gathers the calls of the operation that
    wait together (up to ``max_size``, waiting at most ``max_wait`` seconds
    after the first while a process is free) and invokes the method once with
    the list of their items. It must return a list of the same length, the
    result of each item at its position; an ``Exception`` instance in a
    position fails that call alone (its caller gets ``AgentError``). A method
    that raises, or returns a list of another length, fails every call of the
    batch. Outside a batch (a lease, a redelivered call) the method is invoked
    with a list of one item. Example::

        @poolq.batched(max_size=64, max_wait=0.01)
        def embed(self, texts: list[str]) -> list[list[float]]:
            return self.model.encode(texts).tolist()

    Raises:
        ConfigError: ``max_size`` is not an integer of at least 1, ``max_wait``
            not a finite number of seconds of at least 0, or the method does
            not take exactly one argument besides ``self``.
    """
    if isinstance(max_size, bool) or not isinstance(max_size, int) or max_size < 1:
        raise ConfigError(f"@poolq.batched: max_size must be an integer >= 1, not {max_size!r}")
    if isinstance(max_wait, bool) or not isinstance(max_wait, (int, float)) or not math.isfinite(max_wait):
        raise ConfigError(f"@poolq.batched: max_wait must be a finite number of seconds, not {max_wait!r}")
    if max_wait < 0:
        raise ConfigError(f"@poolq.batched: max_wait must be >= 0 seconds, not {max_wait!r}")
    spec = BatchSpec(max_size=max_size, max_wait=float(max_wait))

    def mark(method: F) -> F:
        if not callable(method):
            raise ConfigError(f"@poolq.batched decorates a method, not {method!r}")
        parameters = list(inspect.signature(method).parameters.values())
        positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
        if len(parameters) != 2 or any(p.kind not in positional for p in parameters):
            raise ConfigError(
                f"@poolq.batched: {getattr(method, '__qualname__', method)} must take exactly one argument "
                "besides self: the list of items"
            )
        setattr(method, _OPERATION_MARK, True)
        setattr(method, _BATCH_MARK, spec)
        return method

    return mark if fn is None else mark(fn)


def batch_spec(method: Any) -> BatchSpec | None:
    """The batching of an agent method, or None when it is not batched."""
    spec = getattr(method, _BATCH_MARK, None)
    return spec if isinstance(spec, BatchSpec) else None


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

    def cancelled(self) -> bool:
        """Whether the caller cancelled the call this agent runs now (False outside a call, and in a lease).

        poolq never interrupts an operation for a cancel (it does at
        ``call_timeout``): a long operation polls this where it can stop
        cleanly, and returns. Its caller gets ``CallCancelled`` whatever it
        returns, and the agent serves on, warm. It reads the state Redis at
        most every 0.1 s, so a loop may ask at every step. Example::

            @poolq.operation
            def generate(self, prompt: str, max_tokens: int) -> str:
                tokens = []
                for _ in range(max_tokens):
                    if self.cancelled():     # the web client went away
                        break
                    tokens.append(self.model.next_token(prompt, tokens))
                return "".join(tokens)
        """
        check: Callable[[], bool] | None = getattr(self, CANCEL_CHECK, None)
        return check is not None and check()

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

    @classmethod
    def batched_operations(cls) -> dict[str, BatchSpec]:
        """The ``@batched`` operations and how their calls are gathered."""
        table = _operation_table(cls)
        specs = {name: batch_spec(getattr(cls, name)) for name in table}
        return {name: spec for name, spec in specs.items() if spec is not None}

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
        method = getattr(self, name)
        if batch_spec(method) is not None:
            item = batch_item(type(self), name, args, kwargs)
            return lambda: _single(name, method, item)
        try:
            signature.bind(*args, **kwargs)
        except TypeError as exc:
            raise InvalidArguments(f"{type(self).__name__}.{name}(): {exc}") from None
        return lambda: method(*args, **kwargs)


def batch_item(cls: type[Agent], op: str, args: list[Any], kwargs: dict[str, Any]) -> Any:
    """The item a call of batched operation ``op`` sends: its one positional argument.

    Raises:
        InvalidArguments: the call sends keyword arguments, or not exactly one positional argument.
    """
    if len(args) != 1 or kwargs:
        raise InvalidArguments(
            f"{cls.__name__}.{op}() is batched: a call sends exactly one positional argument (its item), "
            f"not {len(args)} positional and {len(kwargs)} keyword"
        )
    return args[0]


def batch_results(op: str, results: Any, expected: int) -> list[Any]:
    """Check what a batched operation returned: a list with one entry per item.

    Raises:
        TypeError: it is not a list (or tuple) of ``expected`` entries.
    """
    if not isinstance(results, (list, tuple)):
        raise TypeError(f"batched operation {op}() must return a list, not {type(results).__name__}")
    if len(results) != expected:
        raise TypeError(f"batched operation {op}() returned {len(results)} results for {expected} items")
    return list(results)


def _single(op: str, method: Callable[[list[Any]], Any], item: Any) -> Any:
    # A batched operation run for one call: a batch of one.
    (result,) = batch_results(op, method([item]), 1)
    if isinstance(result, BaseException):
        raise result
    return result


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
