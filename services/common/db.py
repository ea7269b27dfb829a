"""Async SQLAlchemy engine and session factory over psycopg 3."""

import os
from collections.abc import Mapping
from dataclasses import dataclass
from urllib.parse import urlsplit, urlunsplit

from psycopg.conninfo import conninfo_to_dict
from sqlalchemy import text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    async_sessionmaker,
    create_async_engine,
)

from services.common.config import ConfigError, Environment

# Maximum of ARXIO_DB_POOL_SIZE, and of ARXIO_DB_MAX_OVERFLOW.
MAX_POOL_SETTING = 100


@dataclass(frozen=True)
class PoolSettings:
    """Connections that one process opens to PostgreSQL at most."""

    # Connections the pool keeps open once they were opened.
    size: int
    # Further connections opened under load, closed when returned.
    max_overflow: int

    @property
    def max_connections(self) -> int:
        return self.size + self.max_overflow

    @classmethod
    def from_env(cls, env: Environment, default_size: int) -> "PoolSettings":
        """Read ARXIO_DB_POOL_SIZE and ARXIO_DB_MAX_OVERFLOW.

        The overflow defaults to the pool size, so without either setting a
        process opens at most twice `default_size` connections.
        """
        size = env.integer(
            "ARXIO_DB_POOL_SIZE",
            default_size,
            minimum=1,
            maximum=MAX_POOL_SETTING,
        )
        max_overflow = env.integer(
            "ARXIO_DB_MAX_OVERFLOW",
            size,
            minimum=0,
            maximum=MAX_POOL_SETTING,
        )

        return cls(size=size, max_overflow=max_overflow)


def check_sslmode(url: str, environ: Mapping[str, str] | None = None) -> None:
    """Raise ConfigError when `url` weakens the sslmode that PGSSLMODE sets.

    libpq uses PGSSLMODE only when the URL names no sslmode, so a URL with
    `sslmode=require` or `disable` would otherwise turn off the server
    certificate check that the Kubernetes manifests set with
    PGSSLMODE=verify-full. The message never contains the URL, which may
    contain a password.
    """
    environ = os.environ if environ is None else environ
    required = environ.get("PGSSLMODE", "").strip()
    if required != "verify-full":
        return
    try:
        mode = conninfo_to_dict(url).get("sslmode")
    except Exception as error:
        # psycopg's ProgrammingError names the part it could not parse.
        raise ConfigError(
            f"DATABASE_URL is invalid ({type(error).__name__}): set a libpq "
            "URL such as postgresql://user:password@host:5432/arxio"
        ) from None
    if mode is not None and mode != "verify-full":
        raise ConfigError(
            f"DATABASE_URL sets sslmode={mode}, weaker than "
            "PGSSLMODE=verify-full: remove sslmode from the URL or set "
            "sslmode=verify-full"
        )


def sqlalchemy_url(url: str) -> str:
    """Convert a libpq URL to the form SQLAlchemy's psycopg dialect takes."""
    parts = urlsplit(url)
    if parts.scheme not in ("postgres", "postgresql", "postgresql+psycopg"):
        raise ValueError(
            f"unsupported database URL scheme {parts.scheme!r}: use "
            "postgresql://user@host/database"
        )

    return urlunsplit(parts._replace(scheme="postgresql+psycopg"))


def with_user(url: str, user: str, password: str | None = None) -> str:
    """Return `url` connecting as `user` instead of the URL's own user."""
    parts = urlsplit(url)
    host = parts.netloc.rsplit("@", 1)[-1]
    credentials = user if password is None else f"{user}:{password}"

    return urlunsplit(parts._replace(netloc=f"{credentials}@{host}"))


def create_engine(
    url: str, pool_size: int = 10, max_overflow: int | None = None
) -> AsyncEngine:
    """Create an engine that opens at most `pool_size + max_overflow`.

    `max_overflow` defaults to `pool_size`. Raises ConfigError when the URL
    weakens PGSSLMODE (see check_sslmode).
    """
    check_sslmode(url)

    return create_async_engine(
        sqlalchemy_url(url),
        pool_size=pool_size,
        max_overflow=pool_size if max_overflow is None else max_overflow,
        # a restarted PostgreSQL leaves dead connections in the pool
        pool_pre_ping=True,
        pool_timeout=5,
        connect_args={"connect_timeout": 5},
        # An error's text would otherwise carry the statement's values
        # (key hashes, names) into the logs.
        hide_parameters=True,
    )


def create_pooled_engine(url: str, pool: PoolSettings) -> AsyncEngine:
    """Create an engine with the pool that `pool` sets."""
    return create_engine(url, pool.size, pool.max_overflow)


def session_factory(engine: AsyncEngine) -> async_sessionmaker:
    return async_sessionmaker(engine, expire_on_commit=False)


async def database_reachable(engine: AsyncEngine) -> bool:
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 1"))

    return True
