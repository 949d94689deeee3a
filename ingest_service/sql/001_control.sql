-- Control tables shared by all tenants: the tenant register and the audit log.
CREATE SCHEMA IF NOT EXISTS welltegra;
CREATE SCHEMA IF NOT EXISTS system_monitoring;

CREATE TABLE IF NOT EXISTS welltegra.tenants (
    tenant_id   text PRIMARY KEY CHECK (tenant_id ~ '^[a-z][a-z0-9_]{1,47}$'),
    schema_name text NOT NULL UNIQUE,
    created_at  timestamptz NOT NULL DEFAULT now()
);

CREATE TABLE IF NOT EXISTS system_monitoring.audit_log (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    at              timestamptz NOT NULL,
    action          text NOT NULL,
    outcome         text NOT NULL,
    tenant_id       text,
    subject         text,
    reason          text,
    message         text,
    peer            text,
    ingestion_id    text,
    agent_id        text,
    batch_sequence  bigint,
    accepted_count  integer NOT NULL DEFAULT 0,
    rejected_count  integer NOT NULL DEFAULT 0,
    duplicate_count integer NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS audit_log_tenant_at ON system_monitoring.audit_log (tenant_id, at);
