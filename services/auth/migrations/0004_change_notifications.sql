-- Tell every auth replica when a key or an organization changes, so that
-- replicas caching credentials drop them as the change commits.
-- NOTIFY is delivered at commit and not at all on rollback.
CREATE FUNCTION auth.notify_change() RETURNS trigger
    LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_notify('arxio_auth_changes', TG_TABLE_NAME);
    RETURN NULL;
END
$$;

CREATE TRIGGER organizations_notify_change
    AFTER UPDATE OR DELETE ON auth.organizations
    FOR EACH STATEMENT EXECUTE FUNCTION auth.notify_change();

CREATE TRIGGER api_keys_notify_change
    AFTER UPDATE OR DELETE ON auth.api_keys
    FOR EACH STATEMENT EXECUTE FUNCTION auth.notify_change();
