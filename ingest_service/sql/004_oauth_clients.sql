-- Clients of the development OAuth issuer (`serve --dev-issuer`), one tenant each. Secrets are
-- kept only as scrypt hashes ("scrypt$N$r$p$salt$hash", base64). A revoked client stays listed
-- but gets no token; deleting its tenant deletes it.
CREATE TABLE IF NOT EXISTS welltegra.oauth_clients (
    client_id   text PRIMARY KEY CHECK (client_id ~ '^[A-Za-z0-9_-]{16,128}$'),
    tenant_id   text NOT NULL REFERENCES welltegra.tenants ON DELETE CASCADE,
    secret_hash text NOT NULL CHECK (secret_hash LIKE 'scrypt$%'),
    scopes      text[] NOT NULL DEFAULT '{api:ingest}',
    created_at  timestamptz NOT NULL DEFAULT now(),
    revoked_at  timestamptz
);
CREATE INDEX IF NOT EXISTS oauth_clients_tenant ON welltegra.oauth_clients (tenant_id);
