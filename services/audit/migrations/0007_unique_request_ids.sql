-- Each request id at most once in the trail.
--
-- audit.events is partitioned by record_time, and PostgreSQL requires a
-- unique index on a partitioned table to contain the partition key. A
-- unique index on (request_id, record_time) would still let an id recur
-- in another month, so the ids get a table of their own. The ingester
-- inserts each entry's id here in the transaction that inserts the entry,
-- and gives an entry whose id is here already a fresh one.
CREATE TABLE audit.request_ids (
    request_id text PRIMARY KEY,
    -- The record_time of the newest entry with this id. The retention job
    -- deletes the ids older than the oldest partition it keeps.
    record_time timestamptz NOT NULL
);

-- Entries stored before this migration may share an id; they keep it.
INSERT INTO audit.request_ids (request_id, record_time)
SELECT request_id, max(record_time) FROM audit.events GROUP BY request_id;

GRANT SELECT, INSERT ON audit.request_ids TO arxio_audit;
