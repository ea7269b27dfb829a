"""Apply each service's SQL migrations, in order, once.

Migrations run with an administrative connection. Tables belong to the
`arxio_owner` role, which no service logs in as; each service logs in as its
own role with only the privileges its migrations grant.
"""

from pathlib import Path

import psycopg
import structlog
from psycopg import sql

log = structlog.get_logger()

OWNER_ROLE = "arxio_owner"
SERVICES_WITH_TABLES = ("auth", "audit", "billing", "cds")
_SERVICES_DIR = Path(__file__).resolve().parent.parent
# Any constant works; it keeps two runners from migrating at once.
_LOCK_ID = 7_305_114


def service_role(service: str) -> str:
    return f"arxio_{service}"


def _ensure_role(cursor: psycopg.Cursor, role: str, login: bool) -> None:
    cursor.execute("SELECT 1 FROM pg_roles WHERE rolname = %s", (role,))
    if cursor.fetchone() is None:
        option = sql.SQL("LOGIN" if login else "NOLOGIN")
        cursor.execute(
            sql.SQL("CREATE ROLE {} {}").format(sql.Identifier(role), option)
        )
        log.info("migrations.role_created", role=role)


def migration_files(service: str) -> list[Path]:
    return sorted((_SERVICES_DIR / service / "migrations").glob("*.sql"))


def migrate(admin_url: str) -> list[str]:
    """Apply pending migrations of every service; return what was applied."""
    applied = []
    with psycopg.connect(admin_url, autocommit=True) as connection:
        cursor = connection.cursor()
        cursor.execute("SELECT pg_advisory_lock(%s)", (_LOCK_ID,))
        try:
            _ensure_role(cursor, OWNER_ROLE, login=False)
            # Migrations run as the owner (SET ROLE). A superuser may do
            # that anyway; the admin of a managed database, which has none,
            # needs the membership, which its CREATEROLE lets it grant.
            cursor.execute(
                sql.SQL("GRANT {} TO CURRENT_USER").format(
                    sql.Identifier(OWNER_ROLE)
                )
            )
            # The owner creates each service's schema in this database.
            cursor.execute(
                sql.SQL("GRANT CREATE ON DATABASE {} TO {}").format(
                    sql.Identifier(connection.info.dbname),
                    sql.Identifier(OWNER_ROLE),
                )
            )
            for service in SERVICES_WITH_TABLES:
                _ensure_role(cursor, service_role(service), login=True)
            cursor.execute(
                "CREATE TABLE IF NOT EXISTS public.arxio_schema_migrations ("
                " service text NOT NULL, name text NOT NULL,"
                " applied_at timestamptz NOT NULL DEFAULT now(),"
                " PRIMARY KEY (service, name))"
            )
            for service in SERVICES_WITH_TABLES:
                applied += _migrate_service(connection, service)
        finally:
            cursor.execute("SELECT pg_advisory_unlock(%s)", (_LOCK_ID,))

    return applied


def _migrate_service(connection: psycopg.Connection, service: str) -> list:
    cursor = connection.cursor()
    cursor.execute(
        "SELECT name FROM public.arxio_schema_migrations WHERE service = %s",
        (service,),
    )
    done = {row[0] for row in cursor.fetchall()}
    applied = []
    for path in migration_files(service):
        if path.name in done:
            continue
        with connection.transaction():
            cursor.execute(
                sql.SQL("SET LOCAL ROLE {}").format(sql.Identifier(OWNER_ROLE))
            )
            cursor.execute(path.read_text())
            cursor.execute("RESET ROLE")
            cursor.execute(
                "INSERT INTO public.arxio_schema_migrations (service, name)"
                " VALUES (%s, %s)",
                (service, path.name),
            )
        log.info("migrations.applied", service=service, migration=path.name)
        applied.append(f"{service}/{path.name}")

    return applied


def main() -> int:
    """Apply pending migrations to DATABASE_URL, an administrative URL.

    Run as `python -m services.common.migrations`, for example by the
    Kubernetes migration Job before the services roll out. Exits 2 when
    DATABASE_URL is missing or weakens PGSSLMODE, and 1 when PostgreSQL
    rejects a step.
    """
    from services.common.config import ConfigError, Environment
    from services.common.db import check_sslmode
    from services.common.logging import configure_logging

    configure_logging("migrations")
    try:
        admin_url = Environment().text("DATABASE_URL")
        check_sslmode(admin_url)
    except ConfigError as error:
        log.error("migrations.config_invalid", error=str(error))
        return 2
    try:
        applied = migrate(admin_url)
    except psycopg.Error as error:
        log.error(
            "migrations.failed",
            error=type(error).__name__,
            sqlstate=error.sqlstate or "",
            message=str(error)[:300],
        )
        return 1
    log.info("migrations.finished", applied=len(applied))

    return 0


if __name__ == "__main__":
    raise SystemExit(main())
