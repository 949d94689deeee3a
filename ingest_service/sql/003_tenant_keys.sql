-- Each tenant's data keys, by version, only ever stored wrapped by the master key. Shredding a
-- tenant empties wrapped_key: its stored values can then never be decrypted.
CREATE TABLE IF NOT EXISTS welltegra.tenant_keys (
    tenant_id    text NOT NULL REFERENCES welltegra.tenants ON DELETE CASCADE,
    version      integer NOT NULL CHECK (version > 0),
    wrapped_key  bytea,
    created_at   timestamptz NOT NULL DEFAULT now(),
    destroyed_at timestamptz,
    PRIMARY KEY (tenant_id, version)
);
ALTER TABLE welltegra.tenants ADD COLUMN IF NOT EXISTS shredded_at timestamptz;
