-- Agents send two kinds of batch and report the points they lost: the audit log says whether a
-- batch was replayed from the agent's backlog (historical) and how many data gaps it recorded.
-- Each tenant's data_gaps table, and its ledger's gap_count, are in tenant.sql, which every
-- start applies to every tenant after these files: existing tenants get them at the next start.
ALTER TABLE system_monitoring.audit_log
    ADD COLUMN IF NOT EXISTS historical boolean NOT NULL DEFAULT false,
    ADD COLUMN IF NOT EXISTS gap_count integer NOT NULL DEFAULT 0;
