-- EHRs whose signed CDS Hooks JWTs authenticate as an organization, the
-- JWT ids already used (so a token cannot be replayed), and each
-- organization's CDS Hooks settings.
CREATE TABLE auth.ehr_issuers (
    issuer_id uuid PRIMARY KEY,
    org_id uuid NOT NULL REFERENCES auth.organizations (org_id),
    -- The JWT `iss` claim, compared exactly; one organization per issuer.
    issuer text NOT NULL UNIQUE CHECK (length(issuer) BETWEEN 1 AND 500),
    jwks_url text NOT NULL
        CHECK (jwks_url LIKE 'https://%' AND length(jwks_url) <= 2000),
    create_time timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX ehr_issuers_org ON auth.ehr_issuers (org_id, create_time);

-- A `jti` is kept until its token expires; later rows with the same
-- issuer and jti are replays.
CREATE TABLE auth.ehr_token_ids (
    issuer text NOT NULL,
    jti text NOT NULL,
    expire_time timestamptz NOT NULL,
    PRIMARY KEY (issuer, jti)
);

CREATE INDEX ehr_token_ids_expire_time ON auth.ehr_token_ids (expire_time);

CREATE TABLE auth.cds_hooks_settings (
    org_id uuid PRIMARY KEY REFERENCES auth.organizations (org_id),
    -- NULL: hooks get no model review.
    model_review_timeout_ms integer
        CHECK (model_review_timeout_ms BETWEEN 100 AND 10000),
    update_time timestamptz NOT NULL DEFAULT now()
);

GRANT SELECT, INSERT, DELETE ON auth.ehr_issuers TO arxio_auth;
GRANT SELECT, INSERT, DELETE ON auth.ehr_token_ids TO arxio_auth;
GRANT SELECT, INSERT, UPDATE ON auth.cds_hooks_settings TO arxio_auth;
