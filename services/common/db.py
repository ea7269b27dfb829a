"""Async SQLAlchemy engine and session factory over psycopg 3."""

from urllib.parse import urlsplit, urlunsplit

from sqlalchemy import text
from sqlalchemy.ext.asyncio import (
    AsyncEngine,
    async_sessionmaker,
    create_async_engine,
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


def create_engine(url: str, pool_size: int = 10) -> AsyncEngine:
    return create_async_engine(
        sqlalchemy_url(url),
        pool_size=pool_size,
        max_overflow=pool_size,
        # a restarted PostgreSQL leaves dead connections in the pool
        pool_pre_ping=True,
        pool_timeout=5,
        connect_args={"connect_timeout": 5},
        # An error's text would otherwise carry the statement's values
        # (key hashes, names) into the logs.
        hide_parameters=True,
    )


def session_factory(engine: AsyncEngine) -> async_sessionmaker:
    return async_sessionmaker(engine, expire_on_commit=False)


async def database_reachable(engine: AsyncEngine) -> bool:
    async with engine.connect() as connection:
        await connection.execute(text("SELECT 1"))

    return True
