-- Per-tenant overrides of the configured limits; NULL keeps the configured default.
CREATE TABLE IF NOT EXISTS welltegra.tenant_limits (
    tenant_id           text PRIMARY KEY REFERENCES welltegra.tenants ON DELETE CASCADE,
    requests_per_minute integer CHECK (requests_per_minute > 0),
    max_message_bytes   integer CHECK (max_message_bytes > 0),
    bytes_per_day       bigint CHECK (bytes_per_day > 0),
    updated_at          timestamptz NOT NULL DEFAULT now()
);
