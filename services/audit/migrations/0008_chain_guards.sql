-- Guards of the trail's tables against the owner role and against rows
-- that do not extend their chain.
--
-- TRUNCATE on a partition. PostgreSQL fires TRUNCATE triggers only on the
-- table that the statement names, and it copies row triggers to
-- partitions but not statement triggers. So TRUNCATE
-- audit.events_2026_12 emptied the month. Each partition gets its own
-- trigger: the existing ones here, new ones in
-- audit.ensure_month_partition. The retention job removes months with
-- DROP TABLE, which no trigger rejects.
--
-- One entry per seq in each chain. A unique index on the partitioned
-- audit.events must contain the partition key, so the index on (chain_id,
-- seq, record_time) accepted a second row at a chain's seq under another
-- record_time. Now a statement trigger checks the rows that each INSERT or
-- COPY adds, as one set, against audit.head_entries, the newest entry of
-- each chain. The rows of each chain must continue from its head with no
-- gap and no repeated seq, each row's prev_hash must be the hash of the
-- entry before it, and its record_time must not be earlier than that
-- entry's. Then the trigger moves the heads. Each partition gets the same
-- trigger, since an INSERT into a partition does not fire the one on
-- audit.events. A superuser can bypass the triggers (with
-- session_replication_role = replica); the verifier then reports the row.
--
-- The heads themselves. DELETE and TRUNCATE on audit.head_entries are
-- rejected, and a head moves only inside the insert trigger, forward, to a
-- stored entry. Otherwise deleting a head would start its chain again at
-- seq 1, and genuine new entries would look forged. A chain starts at seq
-- 1 only when audit.events contains none of its rows.
--
-- NOTE: the owner role can still get past these triggers, because it
-- owns the tables: ALTER TABLE ... DISABLE TRIGGER, a partition made with
-- CREATE TABLE ... PARTITION OF, or a filled table attached with ATTACH
-- PARTITION. An event trigger could reject that DDL, but PostgreSQL
-- lets only a superuser create one, and migrations run as the owner. The
-- verifier reports the rows that such a change adds. It reports rows
-- deleted with the triggers disabled when a checkpoint covered them, and
-- a deleted or changed newest checkpoint through the audit service's
-- anchor file, which the service compares with the database.

CREATE FUNCTION audit.reject_partition_truncate(partition regclass)
    RETURNS void
    LANGUAGE plpgsql SET search_path = audit, pg_temp
    AS $$
BEGIN
    EXECUTE format(
        'CREATE TRIGGER events_reject_truncate BEFORE TRUNCATE ON %s'
        ' FOR EACH STATEMENT EXECUTE FUNCTION audit.reject_change()',
        partition
    );
END
$$;
REVOKE EXECUTE ON FUNCTION audit.reject_partition_truncate(regclass)
    FROM PUBLIC;

SELECT audit.reject_partition_truncate(i.inhrelid::regclass)
FROM pg_inherits i
WHERE i.inhparent = 'audit.events'::regclass;

CREATE TABLE audit.head_entries (
    chain_id uuid PRIMARY KEY,
    seq bigint NOT NULL CHECK (seq > 0),
    hash bytea NOT NULL CHECK (length(hash) = 32),
    record_time timestamptz NOT NULL
);

-- The head of each chain with entries. On a tie, which only rows inserted
-- with triggers disabled can cause, the row stored first.
INSERT INTO audit.head_entries (chain_id, seq, hash, record_time)
SELECT c.id, h.seq, h.hash, h.record_time
FROM audit.chain_ids() AS c(id)
CROSS JOIN LATERAL (
    SELECT e.seq, e.hash, e.record_time FROM audit.events e
    WHERE e.chain_id = c.id
    ORDER BY e.seq DESC, e.ingest_time, e.event_id LIMIT 1
) h;

-- A chain whose entries the retention job dropped, all of them, goes on
-- from its last cut, which a month-end checkpoint signs. Its next entry
-- is filed no earlier than the start of the month after the cut.
INSERT INTO audit.head_entries (chain_id, seq, hash, record_time)
SELECT DISTINCT ON (k.chain_id)
    k.chain_id, k.seq, k.hash,
    (k.month_end + 1)::timestamp AT TIME ZONE 'UTC'
FROM audit.retention_cuts r
JOIN audit.checkpoints k
    ON k.chain_id = r.chain_id AND k.seq = r.last_removed_seq
    AND k.month_end IS NOT NULL
WHERE NOT EXISTS (
    SELECT 1 FROM audit.head_entries h WHERE h.chain_id = r.chain_id
)
ORDER BY k.chain_id, k.seq DESC;

-- Reject the statement unless its new rows, `appended`, extend the heads
-- of their chains; then move the heads to the newest of them. A chain
-- with no head starts at seq 1 only when audit.events contains no row of
-- it but the new ones.
CREATE FUNCTION audit.advance_chain_heads() RETURNS trigger
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = audit, pg_temp
    AS $$
DECLARE
    rejected record;
BEGIN
    -- FOR UPDATE waits for a concurrent insert into the same chain and
    -- then returns the head that it committed.
    WITH heads AS MATERIALIZED (
        SELECT h.chain_id, h.seq, h.hash, h.record_time
        FROM audit.head_entries h
        WHERE h.chain_id IN (SELECT a.chain_id FROM appended a)
        FOR UPDATE
    ),
    linked AS (
        SELECT a.chain_id, a.seq, a.event_id, a.prev_hash, a.record_time,
            h.seq AS head_seq,
            count(*) OVER (PARTITION BY a.chain_id, a.seq) AS rows_at_seq,
            -- Only the first row of a new chain links to the zero hash.
            h.chain_id IS NULL AND a.seq = 1 AND EXISTS (
                SELECT 1 FROM audit.events e
                WHERE e.chain_id = a.chain_id AND NOT EXISTS (
                    SELECT 1 FROM appended n WHERE n.event_id = e.event_id
                )
            ) AS headless,
            -- The entry before: a new row, the head, or the start of a
            -- new chain.
            coalesce(
                p.hash,
                CASE WHEN h.seq = a.seq - 1 THEN h.hash END,
                CASE WHEN h.chain_id IS NULL AND a.seq = 1
                    THEN decode(repeat('00', 32), 'hex') END
            ) AS previous_hash,
            coalesce(
                p.record_time,
                CASE WHEN h.seq = a.seq - 1 THEN h.record_time END,
                '-infinity'
            ) AS previous_record_time
        FROM appended a
        LEFT JOIN heads h ON h.chain_id = a.chain_id
        LEFT JOIN appended p ON p.chain_id = a.chain_id AND p.seq = a.seq - 1
    )
    SELECT chain_id, seq, event_id, head_seq,
        CASE
            WHEN rows_at_seq > 1 OR seq <= head_seq THEN 'repeated'
            WHEN headless THEN
                'audit.events has entries of the chain but '
                || 'audit.head_entries has no head for it'
            WHEN previous_hash IS NULL THEN
                'the chain has no entry at seq ' || (seq - 1)
                || ' for it to follow'
            WHEN prev_hash <> previous_hash THEN
                'its prev_hash is not the hash of the entry before it'
            ELSE 'its record_time is earlier than that of the entry '
                || 'before it'
        END AS reason
    INTO rejected
    FROM linked
    WHERE rows_at_seq > 1 OR seq <= head_seq OR headless
        OR previous_hash IS NULL OR prev_hash <> previous_hash
        OR record_time < previous_record_time
    ORDER BY chain_id, seq
    LIMIT 1;

    IF FOUND AND rejected.reason = 'repeated' THEN
        RAISE EXCEPTION 'audit.events rejected entry % of chain %: the '
            'chain has another entry at seq %',
            rejected.event_id, rejected.chain_id, rejected.seq
            USING ERRCODE = 'unique_violation',
            DETAIL = 'The chain''s head before this statement: seq '
                || coalesce(rejected.head_seq::text, 'none') || '.',
            HINT = 'A chain has one entry per seq. Insert entries through '
                'the audit ingester, which numbers them from the head.';
    ELSIF FOUND THEN
        RAISE EXCEPTION 'audit.events rejected entry % at seq % of chain '
            '%: %',
            rejected.event_id, rejected.seq, rejected.chain_id,
            rejected.reason
            USING ERRCODE = 'check_violation',
            DETAIL = 'The chain''s head before this statement: seq '
                || coalesce(rejected.head_seq::text, 'none') || '.',
            HINT = 'Insert entries through the audit ingester, which links '
                'each one to the head of its chain.';
    END IF;

    -- A chain whose new rows start after seq 1 has a head, locked above.
    UPDATE audit.head_entries h
    SET seq = n.seq, hash = n.hash, record_time = n.record_time
    FROM (
        SELECT DISTINCT ON (a.chain_id)
            a.chain_id, a.seq, a.hash, a.record_time
        FROM appended a ORDER BY a.chain_id, a.seq DESC
    ) n
    WHERE h.chain_id = n.chain_id AND n.seq > h.seq;

    -- A new chain. A concurrent statement that starts the same chain makes
    -- one of the two inserts fail on the primary key.
    INSERT INTO audit.head_entries (chain_id, seq, hash, record_time)
    SELECT DISTINCT ON (a.chain_id) a.chain_id, a.seq, a.hash, a.record_time
    FROM appended a
    WHERE a.chain_id IN (
        SELECT b.chain_id FROM appended b WHERE b.seq = 1
    )
    ORDER BY a.chain_id, a.seq DESC;

    RETURN NULL;
END
$$;

CREATE TRIGGER events_advance_chain_heads
    AFTER INSERT ON audit.events
    REFERENCING NEW TABLE AS appended
    FOR EACH STATEMENT EXECUTE FUNCTION audit.advance_chain_heads();

-- The head that the ingester links the next entry to. It outlives the
-- retention job's drops, so a chain whose entries were all dropped goes on
-- from its last seq instead of starting again at 1.
CREATE OR REPLACE FUNCTION audit.chain_head(
    chain uuid, OUT seq bigint, OUT hash bytea, OUT record_time timestamptz
)
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = audit, pg_temp
    AS $$
        SELECT h.seq, h.hash, h.record_time FROM audit.head_entries h
        WHERE h.chain_id = chain
    $$;

CREATE TRIGGER head_entries_reject_delete
    BEFORE DELETE ON audit.head_entries
    FOR EACH ROW EXECUTE FUNCTION audit.reject_change();

CREATE TRIGGER head_entries_reject_truncate
    BEFORE TRUNCATE ON audit.head_entries
    FOR EACH STATEMENT EXECUTE FUNCTION audit.reject_change();

-- Reject a head that is not set by audit.advance_chain_heads, which runs
-- at trigger depth 1, so its statements fire this trigger at depth 2. The
-- new head must be a stored entry, with a higher seq than the old one.
CREATE FUNCTION audit.check_head_entry() RETURNS trigger
    LANGUAGE plpgsql SET search_path = audit, pg_temp
    AS $$
BEGIN
    IF pg_trigger_depth() < 2 THEN
        RAISE EXCEPTION 'audit.head_entries rejected % of the head of '
            'chain %: heads move only when entries are inserted into '
            'audit.events', TG_OP, NEW.chain_id
            USING ERRCODE = 'insufficient_privilege',
            HINT = 'Insert entries through the audit ingester.';
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.chain_id <> OLD.chain_id THEN
        RAISE EXCEPTION 'audit.head_entries rejected moving the head of '
            'chain % to chain %', OLD.chain_id, NEW.chain_id
            USING ERRCODE = 'check_violation';
    END IF;
    IF TG_OP = 'UPDATE' AND NEW.seq <= OLD.seq THEN
        RAISE EXCEPTION 'audit.head_entries rejected moving the head of '
            'chain % from seq % to seq %: a head moves only forward',
            NEW.chain_id, OLD.seq, NEW.seq
            USING ERRCODE = 'check_violation';
    END IF;
    IF NOT EXISTS (
        SELECT 1 FROM audit.events e
        WHERE e.chain_id = NEW.chain_id AND e.seq = NEW.seq
            AND e.record_time = NEW.record_time AND e.hash = NEW.hash
    ) THEN
        RAISE EXCEPTION 'audit.head_entries rejected the head of chain % '
            'at seq %: audit.events has no entry with its hash and '
            'record_time', NEW.chain_id, NEW.seq
            USING ERRCODE = 'check_violation';
    END IF;

    RETURN NEW;
END
$$;

CREATE TRIGGER head_entries_check_head
    BEFORE INSERT OR UPDATE ON audit.head_entries
    FOR EACH ROW EXECUTE FUNCTION audit.check_head_entry();

CREATE FUNCTION audit.check_partition_inserts(partition regclass)
    RETURNS void
    LANGUAGE plpgsql SET search_path = audit, pg_temp
    AS $$
BEGIN
    EXECUTE format(
        'CREATE TRIGGER events_advance_chain_heads AFTER INSERT ON %s'
        ' REFERENCING NEW TABLE AS appended FOR EACH STATEMENT'
        ' EXECUTE FUNCTION audit.advance_chain_heads()',
        partition
    );
END
$$;
REVOKE EXECUTE ON FUNCTION audit.check_partition_inserts(regclass)
    FROM PUBLIC;

SELECT audit.check_partition_inserts(i.inhrelid::regclass)
FROM pg_inherits i
WHERE i.inhparent = 'audit.events'::regclass;

-- Create the partition of the month that `day` falls in, if missing, with
-- its TRUNCATE trigger and its insert check.
CREATE OR REPLACE FUNCTION audit.ensure_month_partition(day date)
    RETURNS text
    LANGUAGE plpgsql SECURITY DEFINER SET search_path = audit, pg_temp
    AS $$
DECLARE
    month_start date := make_date(
        extract(year FROM day)::int, extract(month FROM day)::int, 1
    );
    name text := 'events_' || to_char(month_start, 'YYYY_MM');
BEGIN
    IF to_regclass('audit.' || name) IS NULL THEN
        -- Bounds at 00:00 UTC, whatever the session's time zone.
        EXECUTE format(
            'CREATE TABLE audit.%I PARTITION OF audit.events'
            ' FOR VALUES FROM (%L) TO (%L)',
            name,
            month_start::timestamp AT TIME ZONE 'UTC',
            (month_start + interval '1 month')::timestamp AT TIME ZONE 'UTC'
        );
        PERFORM audit.reject_partition_truncate(
            format('audit.%I', name)::regclass
        );
        PERFORM audit.check_partition_inserts(
            format('audit.%I', name)::regclass
        );
    END IF;
    RETURN name;
END
$$;

-- Whether any entry of any organization was stored before `moment`. The
-- checkpointer asks when its anchor file is empty: such entries with no
-- checkpoint mean that checkpoints were deleted. Row-level security would
-- hide other organizations' rows from the service role.
CREATE FUNCTION audit.entries_stored_before(moment timestamptz)
    RETURNS boolean
    LANGUAGE sql STABLE SECURITY DEFINER SET search_path = audit, pg_temp
    AS $$
        SELECT EXISTS (
            SELECT 1 FROM audit.events e WHERE e.ingest_time < moment
        )
    $$;
REVOKE EXECUTE ON FUNCTION audit.entries_stored_before(timestamptz)
    FROM PUBLIC;
GRANT EXECUTE ON FUNCTION audit.entries_stored_before(timestamptz)
    TO arxio_audit;
