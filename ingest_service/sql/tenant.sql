-- One tenant's sandbox. {schema} is the schema name quoted by the server's quote_ident(),
-- {schema_literal} and {tenant_literal} the schema name and tenant id quoted by its
-- quote_literal(); this file is applied idempotently when a tenant is created and at every
-- start.
CREATE SCHEMA IF NOT EXISTS {schema};

-- Points, one row per (well_id, parameter_name, ts): the identity that makes a resend harmless.
-- Range-partitioned by day on ts; partitions are created ahead and on demand.
CREATE TABLE IF NOT EXISTS {schema}.real_time_parameters (
    tenant_id      text NOT NULL,
    well_id        text NOT NULL,
    parameter_name text NOT NULL,
    ts             timestamptz NOT NULL,
    unit           text NOT NULL,
    -- value, original value and unit, quality code and source, sealed with the tenant's data
    -- key of key_version (AES-256-GCM; the row's identity is the associated data).
    key_version    integer NOT NULL,
    sealed         bytea NOT NULL,
    agent_id       text,
    batch_sequence bigint,
    ingestion_id   text NOT NULL,
    ingested_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (well_id, parameter_name, ts)
) PARTITION BY RANGE (ts);

-- One row per committed agent batch, written in the batch's transaction.
CREATE TABLE IF NOT EXISTS {schema}.batch_ledger (
    tenant_id       text NOT NULL DEFAULT {tenant_literal},
    agent_id        text NOT NULL,
    batch_sequence  bigint NOT NULL,
    ingestion_id    text NOT NULL,
    accepted_count  integer NOT NULL DEFAULT 0,
    rejected_count  integer NOT NULL DEFAULT 0,
    duplicate_count integer NOT NULL DEFAULT 0,
    gap_count       integer NOT NULL DEFAULT 0,
    committed_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (agent_id, batch_sequence)
);

-- Points refused by the domain rules, as they were sent, with the reason.
CREATE TABLE IF NOT EXISTS {schema}.quarantine (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id      text NOT NULL DEFAULT {tenant_literal},
    ingestion_id   text NOT NULL,
    point_index    integer NOT NULL,
    well_id        text NOT NULL,
    parameter_name text NOT NULL,
    ts             timestamptz NOT NULL,
    field          text NOT NULL,
    -- The point as sent and the reason (which may quote the value), sealed like a stored point.
    key_version    integer NOT NULL,
    sealed         bytea NOT NULL,
    sealed_reason  bytea NOT NULL,
    received_at    timestamptz NOT NULL DEFAULT now()
);

-- Points an agent lost before it could send them (its buffer's size cap or retention, or a
-- batch the gateway refused and the agent set aside), as the agent recorded them. Written in the
-- transaction of the batch that carried them, after its ledger row: a resent batch is a
-- duplicate and records nothing, and (agent_id, batch_sequence, gap_index) is unique besides.
-- Like the quarantine's, the identifying columns are in clear and the source is sealed.
CREATE TABLE IF NOT EXISTS {schema}.data_gaps (
    id              bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    tenant_id       text NOT NULL DEFAULT {tenant_literal},
    agent_id        text NOT NULL,
    batch_sequence  bigint NOT NULL,
    ingestion_id    text NOT NULL,
    gap_index       integer NOT NULL,
    well_id         text NOT NULL,
    parameter_name  text NOT NULL,
    first_timestamp timestamptz NOT NULL,
    last_timestamp  timestamptz NOT NULL CHECK (last_timestamp >= first_timestamp),
    point_count     bigint NOT NULL CHECK (point_count >= 1),
    reason          text NOT NULL,
    -- The source system, sealed with the tenant's data key of key_version (AES-256-GCM; the
    -- tenant, ingestion id and gap_index are the associated data).
    key_version     integer NOT NULL,
    sealed_source   bytea NOT NULL,
    received_at     timestamptz NOT NULL DEFAULT now(),
    UNIQUE (agent_id, batch_sequence, gap_index)
);
CREATE INDEX IF NOT EXISTS data_gaps_by_time ON {schema}.data_gaps (last_timestamp);

-- Row-level security, the second fence behind the per-tenant schema: the gateway writes as
-- welltegra_writer with app.current_tenant set for the transaction (set_config(..., true), a
-- bind parameter), and sees or writes only rows of that tenant. FORCE applies it to the
-- tables' owner too.
-- Tables made before row-level security had no tenant column in the ledger and quarantine.
ALTER TABLE {schema}.batch_ledger
    ADD COLUMN IF NOT EXISTS tenant_id text NOT NULL DEFAULT {tenant_literal};
ALTER TABLE {schema}.quarantine
    ADD COLUMN IF NOT EXISTS tenant_id text NOT NULL DEFAULT {tenant_literal};
-- Ledgers made before data gaps had no gap count.
ALTER TABLE {schema}.batch_ledger ADD COLUMN IF NOT EXISTS gap_count integer NOT NULL DEFAULT 0;
GRANT USAGE ON SCHEMA {schema} TO welltegra_writer;
GRANT SELECT, INSERT, UPDATE ON {schema}.real_time_parameters, {schema}.batch_ledger,
    {schema}.quarantine, {schema}.data_gaps TO welltegra_writer;
ALTER TABLE {schema}.real_time_parameters ENABLE ROW LEVEL SECURITY;
ALTER TABLE {schema}.real_time_parameters FORCE ROW LEVEL SECURITY;
ALTER TABLE {schema}.batch_ledger ENABLE ROW LEVEL SECURITY;
ALTER TABLE {schema}.batch_ledger FORCE ROW LEVEL SECURITY;
ALTER TABLE {schema}.quarantine ENABLE ROW LEVEL SECURITY;
ALTER TABLE {schema}.quarantine FORCE ROW LEVEL SECURITY;
ALTER TABLE {schema}.data_gaps ENABLE ROW LEVEL SECURITY;
ALTER TABLE {schema}.data_gaps FORCE ROW LEVEL SECURITY;
DO $$
DECLARE
    target text;
BEGIN
    FOREACH target IN ARRAY ARRAY['real_time_parameters', 'batch_ledger', 'quarantine', 'data_gaps']
    LOOP
        IF NOT EXISTS (
            SELECT FROM pg_policies
            WHERE schemaname = {schema_literal} AND tablename = target
              AND policyname = 'tenant_only'
        ) THEN
            EXECUTE format(
                'CREATE POLICY tenant_only ON %I.%I'
                ' USING (tenant_id = current_setting(''app.current_tenant'', true))'
                ' WITH CHECK (tenant_id = current_setting(''app.current_tenant'', true))',
                {schema_literal}, target);
        END IF;
    END LOOP;
END
$$;
