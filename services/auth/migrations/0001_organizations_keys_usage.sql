-- Organizations, their API keys (stored only as SHA-256 hashes) and their
-- request counts per UTC day, which the daily quota reads.
CREATE SCHEMA auth;

CREATE TABLE auth.organizations (
    org_id uuid PRIMARY KEY,
    name text NOT NULL CHECK (length(name) BETWEEN 1 AND 200),
    plan text NOT NULL CHECK (plan IN ('free', 'pro', 'enterprise')),
    state text NOT NULL DEFAULT 'active'
        CHECK (state IN ('active', 'suspended')),
    create_time timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE auth.api_keys (
    key_id text PRIMARY KEY,
    org_id uuid NOT NULL REFERENCES auth.organizations (org_id),
    name text NOT NULL DEFAULT '' CHECK (length(name) <= 200),
    key_sha256 bytea NOT NULL UNIQUE CHECK (length(key_sha256) = 32),
    scopes text[] NOT NULL,
    create_time timestamptz NOT NULL DEFAULT now(),
    expire_time timestamptz,
    revoke_time timestamptz
);

CREATE INDEX api_keys_org_create_time
    ON auth.api_keys (org_id, create_time, key_id);

CREATE TABLE auth.daily_usage (
    org_id uuid NOT NULL REFERENCES auth.organizations (org_id),
    day date NOT NULL,
    request_count bigint NOT NULL CHECK (request_count >= 0),
    PRIMARY KEY (org_id, day)
);

GRANT USAGE ON SCHEMA auth TO arxio_auth;
GRANT SELECT, INSERT, UPDATE ON auth.organizations TO arxio_auth;
GRANT SELECT, INSERT, UPDATE ON auth.api_keys TO arxio_auth;
GRANT SELECT, INSERT, UPDATE ON auth.daily_usage TO arxio_auth;
