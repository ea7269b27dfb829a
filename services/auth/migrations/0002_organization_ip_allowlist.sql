-- Client address ranges an Enterprise organization's keys work from. An
-- empty list means any address.
ALTER TABLE auth.organizations
    ADD COLUMN ip_allowlist cidr[] NOT NULL DEFAULT '{}'
        CHECK (cardinality(ip_allowlist) <= 100);
