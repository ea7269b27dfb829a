-- The retention job's record of where it cut each chain is append-only,
-- as the trail itself is. A removed cut would make the remaining trail
-- look truncated, and a changed one would point its verification at the
-- wrong checkpoint.
CREATE TRIGGER retention_cuts_reject_update_delete
    BEFORE UPDATE OR DELETE ON audit.retention_cuts
    FOR EACH ROW EXECUTE FUNCTION audit.reject_change();

CREATE TRIGGER retention_cuts_reject_truncate
    BEFORE TRUNCATE ON audit.retention_cuts
    FOR EACH STATEMENT EXECUTE FUNCTION audit.reject_change();

ALTER TABLE audit.retention_cuts
    ADD CONSTRAINT retention_cuts_last_removed_seq_positive
    CHECK (last_removed_seq > 0);

-- The error names the table the trigger fired on; the function of the
-- first migration named audit.audit_events whatever the table.
CREATE OR REPLACE FUNCTION audit.reject_change() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    RAISE EXCEPTION '%.% is append-only: % is rejected',
        TG_TABLE_SCHEMA, TG_TABLE_NAME, TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$;
