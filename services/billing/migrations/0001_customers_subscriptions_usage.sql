-- Stripe customers and subscriptions of organizations, the Stripe events
-- already processed, invoice results, and the daily usage sent to Stripe's
-- meter. Stripe holds only an organization's id and name, and these tables
-- hold nothing more about it.
CREATE SCHEMA billing;

-- One Stripe customer per organization, created on first need.
CREATE TABLE billing.customers (
    org_id uuid PRIMARY KEY,
    stripe_customer_id text NOT NULL UNIQUE,
    create_time timestamptz NOT NULL DEFAULT now()
);

-- The latest state of each subscription. `status_time` is the creation
-- time of the Stripe event that set `status`; an older event never
-- overwrites a newer one.
CREATE TABLE billing.subscriptions (
    stripe_subscription_id text PRIMARY KEY,
    org_id uuid NOT NULL,
    stripe_customer_id text NOT NULL,
    status text NOT NULL,
    status_time timestamptz NOT NULL,
    -- When the subscription last started granting the Pro plan; NULL while
    -- it grants nothing. Usage is reported from this day on.
    entitle_time timestamptz,
    update_time timestamptz NOT NULL DEFAULT now()
);

CREATE INDEX subscriptions_org ON billing.subscriptions (org_id);

-- Every Stripe event id processed, so a redelivered event changes nothing.
CREATE TABLE billing.stripe_events (
    event_id text PRIMARY KEY,
    event_type text NOT NULL,
    event_time timestamptz NOT NULL,
    -- NULL when the event named no known organization.
    org_id uuid,
    outcome text NOT NULL,
    receive_time timestamptz NOT NULL DEFAULT now()
);

-- The latest payment result of each invoice.
CREATE TABLE billing.invoices (
    stripe_invoice_id text PRIMARY KEY,
    org_id uuid NOT NULL,
    stripe_subscription_id text,
    status text NOT NULL CHECK (status IN ('paid', 'payment_failed')),
    status_time timestamptz NOT NULL,
    -- In the currency's smallest unit, as Stripe reports it.
    amount_due bigint NOT NULL,
    currency text NOT NULL
);

-- Each organization's daily request count as sent to Stripe's meter: at
-- most one row, and so one meter event, per organization and UTC day.
CREATE TABLE billing.usage_reports (
    org_id uuid NOT NULL,
    day date NOT NULL,
    request_count bigint NOT NULL CHECK (request_count > 0),
    stripe_customer_id text NOT NULL,
    meter_event_name text NOT NULL,
    -- The meter event's identifier, which Stripe deduplicates on.
    identifier text NOT NULL UNIQUE,
    send_time timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (org_id, day)
);

-- Row-level security: a transaction sees one organization's rows, named by
-- its `arxio.org_id` setting, unless it sets `arxio.all_orgs` to 'on' as
-- the webhook handler and the usage job do.
CREATE FUNCTION billing.visible(row_org_id uuid) RETURNS boolean
    LANGUAGE sql STABLE AS $$
    SELECT current_setting('arxio.all_orgs', true) = 'on'
        OR row_org_id = NULLIF(current_setting('arxio.org_id', true), '')::uuid
$$;

ALTER TABLE billing.customers ENABLE ROW LEVEL SECURITY;
ALTER TABLE billing.subscriptions ENABLE ROW LEVEL SECURITY;
ALTER TABLE billing.stripe_events ENABLE ROW LEVEL SECURITY;
ALTER TABLE billing.invoices ENABLE ROW LEVEL SECURITY;
ALTER TABLE billing.usage_reports ENABLE ROW LEVEL SECURITY;

CREATE POLICY customers_own_org ON billing.customers TO arxio_billing
    USING (billing.visible(org_id)) WITH CHECK (billing.visible(org_id));
CREATE POLICY subscriptions_own_org ON billing.subscriptions
    TO arxio_billing
    USING (billing.visible(org_id)) WITH CHECK (billing.visible(org_id));
CREATE POLICY stripe_events_all_orgs ON billing.stripe_events
    TO arxio_billing
    USING (current_setting('arxio.all_orgs', true) = 'on')
    WITH CHECK (current_setting('arxio.all_orgs', true) = 'on');
CREATE POLICY invoices_own_org ON billing.invoices TO arxio_billing
    USING (billing.visible(org_id)) WITH CHECK (billing.visible(org_id));
CREATE POLICY usage_reports_own_org ON billing.usage_reports
    TO arxio_billing
    USING (billing.visible(org_id)) WITH CHECK (billing.visible(org_id));

GRANT USAGE ON SCHEMA billing TO arxio_billing;
GRANT EXECUTE ON FUNCTION billing.visible(uuid) TO arxio_billing;
GRANT SELECT, INSERT ON billing.customers TO arxio_billing;
GRANT SELECT, INSERT, UPDATE ON billing.subscriptions TO arxio_billing;
GRANT SELECT, INSERT, UPDATE ON billing.stripe_events TO arxio_billing;
GRANT SELECT, INSERT, UPDATE ON billing.invoices TO arxio_billing;
GRANT SELECT, INSERT ON billing.usage_reports TO arxio_billing;
