"""Pool configuration: ``config/pools.toml`` plus ``POOLQ_*`` environment variables.

Loaded and validated once into typed, frozen objects shared by the client, the
workers and beat. Any mistake becomes one :class:`ConfigError` naming the file,
the pool and the key.

Example file::

    [poolq]
    broker_url = "redis://127.0.0.1:6379/0"   # optional; POOLQ_BROKER_URL wins

    [pools.echo]
    agent = "workers.echo:Echo"
    size = 2
    max_overflow = 1

    [pools.echo.options]
    greeting = "hello"

Environment:
    POOLQ_CONFIG        path of the TOML file (default ``config/pools.toml``)
    POOLQ_BROKER_URL    Celery broker URL (Redis or RabbitMQ)
    POOLQ_STATE_URL     Redis URL for replies, claims and the registry
                        (default: the broker URL when it is Redis)
    POOLQ_STATE_DIR     where ``poolq up`` keeps its files (default ``.poolq``)
    POOLQ_REDELIVERY_TIMEOUT  seconds before a dead node's calls go to another
                        (default 10; see ``[poolq] redelivery_timeout``)
    POOLQ_SKIP_POOLS    comma-separated pools this deployment does not run
                        (beat schedules no maintenance for them)
    POOLQ_OBSERVERS     comma-separated ``module:Class`` observers (replaces ``[poolq] observers``)
    POOLQ_<POOL>__<KEY> override one scalar key of one pool, for example
                        ``POOLQ_ECHO__SIZE=4``
"""

from __future__ import annotations

import os
import re
import sys
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, ValidationInfo, field_validator, model_validator

from .errors import BrokerNotConfigured, ConfigError, UnknownPool

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

#: Where the configuration is looked for when ``POOLQ_CONFIG`` is not set.
DEFAULT_CONFIG_PATH = Path("config") / "pools.toml"
#: Where ``poolq up`` keeps the embedded broker's files and URL.
DEFAULT_STATE_DIR = Path(".poolq")
#: The file in the state dir through which ``poolq up`` tells clients its broker.
BROKER_URL_FILE = "broker.url"

#: Seconds a call may wait in the queue for a free agent.
DEFAULT_TIMEOUT = 5.0
#: Seconds an agent may spend on one call.
DEFAULT_CALL_TIMEOUT = 60.0
#: Seconds setup() may take; Celery's own default of 4 s would kill slow agents.
DEFAULT_SETUP_TIMEOUT = 300.0
#: Largest JSON payload (arguments) accepted for one call, in bytes.
DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024
#: Deliveries of a call that kills its worker before it fails as a poison pill.
DEFAULT_MAX_DELIVERIES = 3
#: Seconds an overflow agent may sit idle before it retires.
DEFAULT_OVERFLOW_IDLE = 30.0
#: Utilization above which beat scales a pool up.
DEFAULT_SCALE_UP_AT = 0.8
#: Utilization below which (with nothing waiting) beat scales a pool down.
DEFAULT_SCALE_DOWN_AT = 0.2
#: Seconds a pool must stay underused before it scales down (and between two scale-downs).
DEFAULT_IDLE_TIMEOUT = 60.0
#: Seconds between two maintenance runs of a pool.
DEFAULT_MAINTENANCE_INTERVAL = 10.0
#: Fraction by which max_requests and max_age are lowered at random per agent, so agents do not recycle together.
DEFAULT_RECYCLE_JITTER = 0.1
#: Seconds over which an agent's CPU use is averaged against max_cpu_percent.
DEFAULT_CPU_WINDOW = 60.0
#: Seconds between health checks of an idle agent.
DEFAULT_HEALTH_INTERVAL = 30.0
#: Failed setups within the breaker window that mark a pool degraded.
DEFAULT_BREAKER_FAILURES = 3
#: Seconds over which failed setups count.
DEFAULT_BREAKER_WINDOW = 60.0
#: Seconds a degraded pool fails calls fast before it lets them try again (half-open).
DEFAULT_BREAKER_RESET = 30.0
#: Seconds a cast's result stays readable by id.
DEFAULT_RESULT_EXPIRES = 24 * 3600
#: Seconds after which the broker hands a call to another node when the node
#: that took it stopped renewing it (it died). Live nodes renew every 2 s.
DEFAULT_REDELIVERY_TIMEOUT = 10.0
#: Seconds between two sweeps that hand such calls back to their queue.
RESTORE_INTERVAL = 2.0

#: A pool's ``rate_limit``: a whole number of calls per second, minute or hour.
_RATE_LIMIT = re.compile(r"^\s*([1-9][0-9]*)\s*/\s*([smh])\s*$")
_RATE_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}

_POOL_NAME = re.compile(r"^[a-z][a-z0-9_]*$")
_DEVICE = re.compile(r"^(cpu|cuda|cuda:\d+|mps)$")
_ENV_OVERRIDE = re.compile(r"^POOLQ_([A-Z][A-Z0-9_]*?)__([A-Z][A-Z0-9_]*)$")


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


@dataclass(frozen=True)
class RateLimit:
    """At most ``calls`` operations of a pool start in any ``per`` seconds, counted pool-wide in Redis.

    Example::

        RateLimit.parse("20/s")     # RateLimit(calls=20, per=1.0)
        RateLimit.parse("100/m")    # RateLimit(calls=100, per=60.0)
    """

    calls: int
    per: float

    @classmethod
    def parse(cls, text: object) -> RateLimit:
        """Read ``"<n>/s"``, ``"<n>/m"`` or ``"<n>/h"``.

        Raises:
            ValueError: anything else (a ConfigError when it comes from the configuration).
        """
        match = _RATE_LIMIT.match(text) if isinstance(text, str) else None
        if not match:
            raise ValueError("expected '<n>/s', '<n>/m' or '<n>/h' (n a whole number of calls, at least 1)")
        return cls(calls=int(match.group(1)), per=_RATE_UNITS[match.group(2)])

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "m", 3600.0: "h"}.get(self.per)
        return f"{self.calls}/{unit}" if unit else f"{self.calls}/{self.per:g}s"


class PoolConfig(_Model):
    """One named pool: its agent, its size and its limits."""

    name: str
    agent: str = Field(pattern=r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$", description="import path module:Class")
    size: int = Field(default=1, ge=1)
    max_overflow: int = Field(default=0, ge=0)
    overflow_idle: float = Field(default=DEFAULT_OVERFLOW_IDLE, gt=0)
    max_waiting: int | None = Field(default=None, ge=0)
    # Pool-wide: operation starts in any window, e.g. "20/s"; see the rate property.
    rate_limit: str | None = None
    worker_pool: Literal["prefork", "threads", "solo"] = "prefork"
    # Which idle agent a threads node hands out; see _strategy_where_honoured.
    strategy: Literal["lifo", "fifo"] | None = None
    # Where the agents run (see poolq.worker.placement); None: the agent decides.
    device: str | None = None
    gpus_per_agent: int | None = Field(default=None, ge=1)
    timeout: float = Field(default=DEFAULT_TIMEOUT, gt=0)
    call_timeout: float = Field(default=DEFAULT_CALL_TIMEOUT, gt=0)
    setup_timeout: float = Field(default=DEFAULT_SETUP_TIMEOUT, gt=0)
    max_payload_bytes: int = Field(default=DEFAULT_MAX_PAYLOAD_BYTES, ge=2)
    max_deliveries: int = Field(default=DEFAULT_MAX_DELIVERIES, ge=1)
    requires: tuple[str, ...] = ()
    options: dict[str, Any] = Field(default_factory=dict)
    # Autoscaling by beat: the base size of each node moves between these bounds.
    min_size: int = Field(default=0, ge=0, description="default: size")
    max_size: int = Field(default=0, ge=0, description="default: size")
    scale_up_at: float = Field(default=DEFAULT_SCALE_UP_AT, gt=0, le=1)
    scale_down_at: float = Field(default=DEFAULT_SCALE_DOWN_AT, ge=0, lt=1)
    scale_up_cooldown: float = Field(default=0.0, ge=0, description="default: maintenance_interval")
    idle_timeout: float = Field(default=DEFAULT_IDLE_TIMEOUT, gt=0)
    maintenance_interval: float = Field(default=DEFAULT_MAINTENANCE_INTERVAL, gt=0)
    # Recycling: replace an agent after so many calls, so long, so much memory.
    max_requests: int | None = Field(default=None, ge=1)
    max_age: float | None = Field(default=None, gt=0)
    max_memory_mb: float | None = Field(default=None, gt=0)
    max_cpu_percent: float | None = Field(default=None, gt=0, description="percent of one core")
    cpu_window: float = Field(default=DEFAULT_CPU_WINDOW, gt=0)
    max_recycles: int | None = Field(default=None, ge=1)
    recycle_jitter: float = Field(default=DEFAULT_RECYCLE_JITTER, ge=0, lt=1)
    health_interval: float = Field(default=DEFAULT_HEALTH_INTERVAL, gt=0)
    # Circuit breaker: so many failed setups within the window open it.
    breaker_failures: int = Field(default=DEFAULT_BREAKER_FAILURES, ge=1)
    breaker_window: float = Field(default=DEFAULT_BREAKER_WINDOW, gt=0)
    breaker_reset: float = Field(default=DEFAULT_BREAKER_RESET, gt=0)

    @model_validator(mode="before")
    @classmethod
    def _bounds_default_to_size(cls, data: Any) -> Any:
        if isinstance(data, dict):
            size = data.get("size", 1)
            data = {**data}
            data.setdefault("min_size", size)
            data.setdefault("max_size", size)
        return data

    @field_validator("strategy")
    @classmethod
    def _strategy_where_honoured(cls, value: str | None, info: ValidationInfo) -> str | None:
        if value is not None and info.data.get("worker_pool") != "threads":
            raise ValueError(
                "applies where poolq hands out the agents: worker_pool = 'threads'. A prefork or solo node "
                "gives each call to whichever process is free, in Celery's order"
            )
        return value

    @field_validator("rate_limit", mode="before")
    @classmethod
    def _rate_limit_reads(cls, value: Any) -> Any:
        if value is not None:
            RateLimit.parse(value)
        return value

    @property
    def rate(self) -> RateLimit | None:
        """The pool's ``rate_limit``, read (None: unlimited)."""
        return None if self.rate_limit is None else RateLimit.parse(self.rate_limit)

    @field_validator("device")
    @classmethod
    def _known_device(cls, value: str | None) -> str | None:
        if value is not None and not _DEVICE.match(value):
            raise ValueError("a device is 'cpu', 'cuda', 'cuda:N' (N: a GPU's number) or 'mps'")
        return value

    @field_validator("gpus_per_agent")
    @classmethod
    def _gpus_where_placed(cls, value: int | None, info: ValidationInfo) -> int | None:
        device = info.data.get("device")
        if value is not None and device not in (None, "cuda"):
            raise ValueError(f"spreads the agents over GPUs: it needs device = 'cuda' (or none), not {device!r}")
        if value is not None and value > 1 and info.data.get("worker_pool") == "threads":
            raise ValueError(
                "a threads node runs every agent in one process, with one CUDA_VISIBLE_DEVICES: there each agent "
                "gets one GPU (as cuda:N). Use worker_pool = 'prefork' to give an agent several"
            )
        return value

    @property
    def handout(self) -> str:
        """The strategy a threads node hands its agents out by (lifo unless set)."""
        return self.strategy or "lifo"

    @model_validator(mode="after")
    def _check_sizes(self) -> PoolConfig:
        if not self.min_size <= self.size <= self.max_size:
            raise ValueError(f"need min_size <= size <= max_size, got {self.min_size} / {self.size} / {self.max_size}")
        if (self.max_overflow or self.min_size != self.max_size) and self.worker_pool != "prefork":
            raise ValueError(
                "max_overflow and autoscaling (min_size < max_size) need worker_pool = 'prefork' "
                f"(extra agents are extra processes), not {self.worker_pool!r}"
            )
        return self

    @property
    def up_cooldown(self) -> float:
        """Seconds between two scale-ups (default: one maintenance interval)."""
        return self.scale_up_cooldown or self.maintenance_interval

    @property
    def queue(self) -> str:
        """The Celery queue that carries this pool's calls."""
        return f"poolq.{self.name}"

    @property
    def task_name(self) -> str:
        """The Celery task name of this pool's calls (what Flower lists)."""
        return f"poolq.{self.name}"

    @property
    def concurrency(self) -> int:
        """Agents one worker node of this pool runs at most."""
        return self.max_size + self.max_overflow


class ProjectConfig(_Model):
    """The ``[poolq]`` table: settings shared by every pool."""

    broker_url: str | None = None
    state_url: str | None = None
    result_expires: int = Field(default=DEFAULT_RESULT_EXPIRES, ge=1)
    # Live nodes renew their calls every heartbeat (2 s), so this only bounds how
    # long a dead node's calls wait; it need not exceed any call_timeout.
    redelivery_timeout: float = Field(default=DEFAULT_REDELIVERY_TIMEOUT, ge=5, le=3600)
    #: Import paths (``module:Class``) of :class:`poolq.Observer` subclasses every poolq process subscribes.
    observers: list[str] = Field(default_factory=list)


class _FileModel(_Model):
    poolq: ProjectConfig = Field(default_factory=ProjectConfig)
    pools: dict[str, dict[str, Any]] = Field(default_factory=dict)


@dataclass(frozen=True)
class Config:
    """Everything poolq reads at start: pools, URLs and paths."""

    path: Path
    pools: Mapping[str, PoolConfig]
    project: ProjectConfig = field(default_factory=ProjectConfig)
    state_dir: Path = DEFAULT_STATE_DIR
    env_broker_url: str | None = None
    env_state_url: str | None = None
    #: Pools this deployment does not run (``poolq up`` skips those whose requirements are missing):
    #: beat schedules no maintenance for them.
    skip_pools: frozenset[str] = frozenset()

    @property
    def redelivery_window(self) -> float:
        """Longest time between an agent's death and its call's next delivery."""
        return self.project.redelivery_timeout + 2 * RESTORE_INTERVAL

    def pool(self, name: str) -> PoolConfig:
        """The pool called ``name``.

        Raises:
            UnknownPool: no such pool is configured.
        """
        try:
            return self.pools[name]
        except (KeyError, TypeError):
            known = ", ".join(sorted(self.pools)) or "none"
            raise UnknownPool(f"no pool named {name!r} in {self.path} (configured: {known})") from None

    @property
    def broker_url(self) -> str:
        """The broker: environment, then file, then a running ``poolq up``.

        Raises:
            BrokerNotConfigured: none of the three gives one.
        """
        url = self.env_broker_url or self.project.broker_url or embedded_broker_url(self.state_dir)
        if not url:
            raise BrokerNotConfigured(
                "no broker: run `poolq up` in this project directory, "
                "or set POOLQ_BROKER_URL (for example redis://127.0.0.1:6379/0)"
            )
        return url

    @property
    def state_url(self) -> str:
        """The Redis that holds replies, claims and the registry."""
        url = self.env_state_url or self.project.state_url
        if url:
            return url
        broker = self.broker_url
        if broker.startswith(("redis://", "rediss://", "unix://")):
            return broker
        raise ConfigError(
            f"{self.path}: the broker {redact(broker)} is not Redis, so poolq needs a Redis for its state: "
            "set POOLQ_STATE_URL or [poolq] state_url"
        )


def load_config(path: str | os.PathLike[str] | None = None, env: Mapping[str, str] | None = None) -> Config:
    """Read, override and validate the configuration.

    Parameters:
        path: the TOML file; default ``$POOLQ_CONFIG`` or ``config/pools.toml``.
        env: the environment to read ``POOLQ_*`` from; default ``os.environ``.

    Raises:
        ConfigError: the file is missing, is not TOML, or has a bad key.
    """
    env = os.environ if env is None else env
    config_path = Path(path or env.get("POOLQ_CONFIG") or DEFAULT_CONFIG_PATH)
    try:
        raw = tomllib.loads(config_path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{config_path}: no such file (set POOLQ_CONFIG or create config/pools.toml)") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{config_path}: not valid TOML: {exc}") from None

    if env.get("POOLQ_OBSERVERS"):
        raw.setdefault("poolq", {})["observers"] = [p.strip() for p in env["POOLQ_OBSERVERS"].split(",") if p.strip()]
    if env.get("POOLQ_REDELIVERY_TIMEOUT"):
        raw.setdefault("poolq", {})["redelivery_timeout"] = env["POOLQ_REDELIVERY_TIMEOUT"]
    try:
        file_model = _FileModel.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(_describe(config_path, exc)) from None

    pools_raw = {name: dict(table) for name, table in file_model.pools.items()}
    sources = _apply_env_overrides(config_path, pools_raw, env)
    pools: dict[str, PoolConfig] = {}
    for name, table in pools_raw.items():
        if not _POOL_NAME.match(name):
            raise ConfigError(
                f"{config_path}: pool {name!r}: a pool name is lowercase letters, digits and _, starting with a letter"
            )
        try:
            pools[name] = PoolConfig.model_validate({**table, "name": name})
        except ValidationError as exc:
            raise ConfigError(_describe(config_path, exc, pool=name, sources=sources)) from None
    return Config(
        path=config_path,
        pools=pools,
        project=file_model.poolq,
        state_dir=Path(env.get("POOLQ_STATE_DIR") or DEFAULT_STATE_DIR),
        env_broker_url=env.get("POOLQ_BROKER_URL") or None,
        env_state_url=env.get("POOLQ_STATE_URL") or None,
        skip_pools=_skip_pools(config_path, pools, env.get("POOLQ_SKIP_POOLS", "")),
    )


def _skip_pools(path: Path, pools: Mapping[str, PoolConfig], value: str) -> frozenset[str]:
    names = frozenset(name.strip() for name in value.split(",") if name.strip())
    unknown = sorted(names - set(pools))
    if unknown:
        raise ConfigError(f"POOLQ_SKIP_POOLS names pools that {path} does not configure: {', '.join(unknown)}")
    return names


def _apply_env_overrides(
    path: Path, pools: dict[str, dict[str, Any]], env: Mapping[str, str]
) -> dict[tuple[str, str], str]:
    """Apply ``POOLQ_<POOL>__<KEY>`` variables; return which keys came from where."""
    sources: dict[tuple[str, str], str] = {}
    for var, value in env.items():
        match = _ENV_OVERRIDE.match(var)
        if not match:
            continue
        pool, key = match.group(1).lower(), match.group(2).lower()
        if pool not in pools:
            raise ConfigError(f"{var}: no pool named {pool!r} in {path}")
        if key in ("name", "options", "requires"):
            raise ConfigError(f"{var}: key {key!r} cannot be set from the environment")
        pools[pool][key] = value
        sources[(pool, key)] = var
    return sources


def _describe(
    path: Path, exc: ValidationError, pool: str | None = None, sources: Mapping[tuple[str, str], str] | None = None
) -> str:
    lines = []
    for error in exc.errors():
        loc = [str(part) for part in error["loc"]]
        where = [str(path)]
        if pool is not None:
            where.append(f"pool {pool!r}")
        elif loc[:1] == ["pools"] and len(loc) > 1:
            where.append(f"pool {loc[1]!r}")
            loc = loc[2:]
        key = ".".join(loc) or "(table)"
        where.append(f"key {key!r}")
        origin = (sources or {}).get((pool or "", loc[0] if loc else ""))
        message = "unknown key" if error["type"] == "extra_forbidden" else error["msg"]
        if error["type"] == "missing":
            message = "required key is missing"
        if origin:
            message += f" (from {origin}={error.get('input')!r})"
        elif "input" in error and error["type"] not in ("missing", "extra_forbidden"):
            message += f" (got {error['input']!r})"
        lines.append(", ".join(where) + ": " + message)
    return "\n".join(lines)


def embedded_broker_url(state_dir: Path) -> str | None:
    """The URL a running ``poolq up`` wrote for its embedded broker, if any."""
    try:
        return (state_dir / BROKER_URL_FILE).read_text(encoding="utf-8").strip() or None
    except OSError:
        return None


def redact(url: str) -> str:
    """The URL with any password replaced by ``***`` (for messages and logs)."""
    return re.sub(r"(://[^:/@]*:)[^@/]+@", r"\1***@", url)
