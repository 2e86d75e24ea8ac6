-- Tokens, sweep owners, worker sessions and storages (issue 14). Keep in step with
-- ../postgres/0004_auth.sql.
CREATE TABLE tokens (
    id         INTEGER PRIMARY KEY AUTOINCREMENT,
    -- What it is for, e.g. "alice's laptop".
    name       TEXT    NOT NULL,
    -- Who it acts for: the owner of the sweeps it submits.
    owner      TEXT    NOT NULL,
    scope      TEXT    NOT NULL CHECK (scope IN ('read', 'submit', 'admin', 'worker')),
    -- sha256 (hex) of the secret; the secret itself is never stored.
    hash       TEXT    NOT NULL UNIQUE,
    created_at INTEGER NOT NULL,
    revoked_at INTEGER
);
-- Who submitted a sweep (its token's owner); NULL when the coordinator ran without tokens.
ALTER TABLE sweeps ADD COLUMN owner TEXT;
-- sha256 (hex) of the session credential a worker got when it registered.
ALTER TABLE workers ADD COLUMN session_hash TEXT;
-- The storage URL it registered with: the only storage its results may name.
ALTER TABLE workers ADD COLUMN storage TEXT NOT NULL DEFAULT '';
