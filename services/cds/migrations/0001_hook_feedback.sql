-- What clinicians did with CDS Hooks cards, without PHI: the card's uuid
-- and rule, the outcome, accepted suggestion uuids and the override
-- reason's coding. Free-text comments are never stored. Rows are only
-- added: the service's role can neither update nor delete them.
CREATE SCHEMA cds;

CREATE TABLE cds.hook_feedback (
    feedback_id bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    org_id uuid NOT NULL,
    service_id text NOT NULL,
    card_uuid text NOT NULL,
    -- The knowledge-base rule the card came from; '' when unknown.
    rule_id text NOT NULL,
    outcome text NOT NULL CHECK (outcome IN ('accepted', 'overridden')),
    accepted_suggestions text[] NOT NULL DEFAULT '{}',
    override_system text NOT NULL DEFAULT '',
    override_code text NOT NULL DEFAULT '',
    outcome_time timestamptz NOT NULL,
    receive_time timestamptz NOT NULL DEFAULT now(),
    request_id text NOT NULL
);

CREATE INDEX hook_feedback_org_time ON cds.hook_feedback (org_id, receive_time);
CREATE INDEX hook_feedback_rule ON cds.hook_feedback (rule_id, outcome);

-- Row-level security: a transaction reads and writes only the rows of the
-- organization named by its `arxio.org_id` setting.
ALTER TABLE cds.hook_feedback ENABLE ROW LEVEL SECURITY;

CREATE POLICY hook_feedback_own_org ON cds.hook_feedback TO arxio_cds
    USING (org_id = NULLIF(current_setting('arxio.org_id', true), '')::uuid)
    WITH CHECK (
        org_id = NULLIF(current_setting('arxio.org_id', true), '')::uuid
    );

GRANT USAGE ON SCHEMA cds TO arxio_cds;
GRANT SELECT, INSERT ON cds.hook_feedback TO arxio_cds;
