"""Insert feedback rows into the `cds.hook_feedback` table."""

from sqlalchemy import text
from sqlalchemy.ext.asyncio import async_sessionmaker

from services.cds.hooks.feedback import FeedbackRow


class FeedbackStore:
    def __init__(self, sessions: async_sessionmaker) -> None:
        self._sessions = sessions

    async def insert(
        self,
        org_id: str,
        service_id: str,
        request_id: str,
        rows: list[FeedbackRow],
    ) -> None:
        """Insert every row of one feedback call in one transaction."""
        async with self._sessions.begin() as session:
            # Row-level security admits only rows of this organization.
            await session.execute(
                text("SELECT set_config('arxio.org_id', :org_id, true)"),
                {"org_id": org_id},
            )
            await session.execute(
                text(
                    "INSERT INTO cds.hook_feedback (org_id, service_id,"
                    " card_uuid, rule_id, outcome, accepted_suggestions,"
                    " override_system, override_code, outcome_time,"
                    " request_id) VALUES (:org_id, :service_id, :card_uuid,"
                    " :rule_id, :outcome, :accepted_suggestions,"
                    " :override_system, :override_code, :outcome_time,"
                    " :request_id)"
                ),
                [
                    {
                        "org_id": org_id,
                        "service_id": service_id,
                        "card_uuid": row.card_uuid,
                        "rule_id": row.rule_id,
                        "outcome": row.outcome,
                        "accepted_suggestions": list(row.accepted_suggestions),
                        "override_system": row.override_system,
                        "override_code": row.override_code,
                        "outcome_time": row.outcome_time,
                        "request_id": request_id,
                    }
                    for row in rows
                ],
            )
