-- The role the gateway's writes run as, inside each batch transaction (SET LOCAL ROLE): not a
-- superuser and without BYPASSRLS, so the tenant tables' row-level security applies to it
-- whatever role the gateway logs in with. Roles are per cluster, hence the existence check.
DO $$
BEGIN
    IF NOT EXISTS (SELECT FROM pg_roles WHERE rolname = 'welltegra_writer') THEN
        CREATE ROLE welltegra_writer NOLOGIN NOSUPERUSER NOBYPASSRLS NOINHERIT;
    END IF;
END
$$;
-- The login role may switch to it (a superuser may anyway).
GRANT welltegra_writer TO CURRENT_USER;
