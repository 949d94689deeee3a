-- One tenant's sandbox. {schema} is the schema name quoted by the server's quote_ident();
-- this file is applied idempotently when a tenant is created and at every start.
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
    agent_id        text NOT NULL,
    batch_sequence  bigint NOT NULL,
    ingestion_id    text NOT NULL,
    accepted_count  integer NOT NULL DEFAULT 0,
    rejected_count  integer NOT NULL DEFAULT 0,
    duplicate_count integer NOT NULL DEFAULT 0,
    committed_at    timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (agent_id, batch_sequence)
);

-- Points refused by the domain rules, as they were sent, with the reason.
CREATE TABLE IF NOT EXISTS {schema}.quarantine (
    id             bigint GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
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
