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
    value          double precision NOT NULL,
    unit           text NOT NULL,
    quality_code   text NOT NULL,
    source         text NOT NULL DEFAULT '',
    original_value double precision NOT NULL,
    original_unit  text NOT NULL,
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
    value          double precision NOT NULL,
    unit           text NOT NULL,
    quality_code   text NOT NULL,
    source         text NOT NULL,
    field          text NOT NULL,
    reason         text NOT NULL,
    received_at    timestamptz NOT NULL DEFAULT now()
);
