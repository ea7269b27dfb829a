-- A month-end checkpoint may sit at the same entry as a plain one: the
-- checkpointer may have signed a chain's head before the month closed.
-- The retention job cuts a chain only at a month-end checkpoint, and the
-- verifier accepts a cut only there.
ALTER TABLE audit.checkpoints DROP CONSTRAINT checkpoints_pkey;
CREATE UNIQUE INDEX checkpoints_chain_seq_kind
    ON audit.checkpoints (chain_id, seq, (month_end IS NOT NULL));

CREATE OR REPLACE FUNCTION audit.month_end_heads(
    month_start date, OUT chain_id uuid, OUT seq bigint, OUT hash bytea
) RETURNS SETOF record
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = audit, pg_temp
    AS $$
        SELECT c.id, h.seq, h.hash
        FROM audit.chain_ids() AS c(id)
        CROSS JOIN LATERAL (
            SELECT e.seq, e.hash FROM audit.events e
            WHERE e.chain_id = c.id
                AND e.time < month_start::timestamp AT TIME ZONE 'UTC'
            ORDER BY e.seq DESC LIMIT 1
        ) h
        WHERE NOT EXISTS (
            SELECT 1 FROM audit.checkpoints k
            WHERE k.chain_id = c.id AND k.seq = h.seq
                AND k.month_end IS NOT NULL
        )
    $$;
