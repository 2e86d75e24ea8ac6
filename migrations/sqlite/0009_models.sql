-- The model registry (issue 20): model files uploaded once by `kiln model add` to the pool's
-- object storage under `models/sha256/<hex>`, and the names that point at them. Keep in step
-- with ../postgres/0009_models.sql (same columns and CHECKs).
--
-- `model_blobs` is one row per content, never updated or deleted (`kiln model rm` removes a
-- name; the stored object and this row stay, so cells pinned to it keep rendering).
-- `models` maps a registry name to a blob; `kiln model add --name` of another file re-points
-- it. Sweeps pin each cell to the hash a name had at submit, so re-pointing never changes a
-- planned cell.
CREATE TABLE model_blobs (
    sha256 TEXT PRIMARY KEY CHECK (length(sha256) = 64),
    bytes INTEGER NOT NULL CHECK (bytes > 0),
    created_at INTEGER NOT NULL
);

CREATE TABLE models (
    name TEXT PRIMARY KEY CHECK (length(name) BETWEEN 1 AND 128),
    sha256 TEXT NOT NULL REFERENCES model_blobs (sha256),
    kind TEXT NOT NULL CHECK (kind IN ('checkpoint', 'lora', 'embedding', 'vae')),
    created_at INTEGER NOT NULL,
    updated_at INTEGER NOT NULL
);
