-- Tokens, sweep owners, worker sessions and storages (issue 14). Keep in step with
-- ../sqlite/0004_auth.sql. A request's token is looked up by `hash` (its unique index) on every
-- call, so revoking one takes effect at its next call.
CREATE TABLE tokens (
    id         BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    -- What it is for, e.g. "alice's laptop".
    name       TEXT   NOT NULL,
    -- Who it acts for: the owner of the sweeps it submits.
    owner      TEXT   NOT NULL,
    scope      TEXT   NOT NULL CHECK (scope IN ('read', 'submit', 'admin', 'worker')),
    -- sha256 (hex) of the secret; the secret itself is never stored.
    hash       TEXT   NOT NULL UNIQUE,
    created_at BIGINT NOT NULL,
    revoked_at BIGINT
);
-- Who submitted a sweep (its token's owner); NULL when the coordinator ran without tokens.
ALTER TABLE sweeps ADD COLUMN owner TEXT;
-- sha256 (hex) of the session credential a worker got when it registered.
ALTER TABLE workers ADD COLUMN session_hash TEXT;
-- The storage URL it registered with: the only storage its results may name.
ALTER TABLE workers ADD COLUMN storage TEXT NOT NULL DEFAULT '';
