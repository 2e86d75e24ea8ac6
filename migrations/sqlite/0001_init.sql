-- kiln schema, SQLite flavour. Keep in step with ../postgres/0001_init.sql (same tables,
-- columns, states and CHECKs); the conformance suite runs against both.
-- Times are unix milliseconds (INTEGER); JSON documents are TEXT.

-- A sweep: what a user submitted. `idempotency_key` makes submission idempotent.
CREATE TABLE sweeps (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    name            TEXT    NOT NULL,
    idempotency_key TEXT    NOT NULL UNIQUE,
    priority        INTEGER NOT NULL CHECK (priority BETWEEN 0 AND 9),
    max_attempts    INTEGER NOT NULL CHECK (max_attempts >= 1),
    -- active: cells handed out; paused: cells held; cancelled: by a user.
    state           TEXT    NOT NULL CHECK (state IN ('active', 'paused', 'cancelled')),
    -- The sweep file verbatim (may be empty).
    spec            TEXT    NOT NULL,
    created_at      INTEGER NOT NULL
);

-- A registered worker process and what it declared about its device.
CREATE TABLE workers (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    name          TEXT    NOT NULL,
    device_kind   TEXT    NOT NULL CHECK (device_kind IN ('unspecified', 'cpu', 'cuda', 'metal')),
    device_model  TEXT    NOT NULL,
    memory_mib    INTEGER NOT NULL CHECK (memory_mib >= 0),
    max_pixels    INTEGER NOT NULL CHECK (max_pixels >= 0),
    -- JSON array of affinity keys of the pipelines it has loaded.
    loaded        TEXT    NOT NULL,
    version       TEXT    NOT NULL,
    -- active, or drained after a graceful release.
    state         TEXT    NOT NULL CHECK (state IN ('active', 'drained')),
    registered_at INTEGER NOT NULL,
    last_seen_at  INTEGER NOT NULL
);

-- A cell: one fully resolved render, and the lifecycle of its attempts.
CREATE TABLE cells (
    id                  INTEGER PRIMARY KEY AUTOINCREMENT,
    sweep_id            INTEGER NOT NULL REFERENCES sweeps (id),
    -- Position within the sweep, from 0.
    number              INTEGER NOT NULL CHECK (number >= 0),
    -- sha256 (hex) of the render parameters: the cell's identity within its sweep.
    cell_key            TEXT    NOT NULL,
    -- JSON of the resolved render (model, LoRAs, prompt, seed, ...).
    spec                TEXT    NOT NULL,
    -- Hash of model + LoRA stack + size: what a worker must have loaded to reuse a pipeline.
    affinity_key        TEXT    NOT NULL,
    -- Copied from the sweep so the fetch index orders by it.
    priority            INTEGER NOT NULL,
    pixels              INTEGER NOT NULL CHECK (pixels > 0),
    min_memory_mib      INTEGER NOT NULL CHECK (min_memory_mib >= 0),
    -- Queryable copies of render parameters.
    model               TEXT    NOT NULL,
    prompt              TEXT    NOT NULL,
    negative_prompt     TEXT    NOT NULL,
    seed                INTEGER NOT NULL CHECK (seed >= 0),
    steps               INTEGER NOT NULL,
    cfg                 REAL    NOT NULL,
    sampler             TEXT    NOT NULL,
    width               INTEGER NOT NULL,
    height              INTEGER NOT NULL,
    -- JSON object: which alternative / wildcard value / axis value made this cell.
    bindings            TEXT    NOT NULL,
    -- available: may be leased now; scheduled: waits for scheduled_at; running: leased;
    -- retryable: failed, waits for its backoff; held: sweep paused; completed, cancelled,
    -- discarded: terminal.
    state               TEXT    NOT NULL CHECK (state IN ('available', 'scheduled', 'running',
                            'retryable', 'held', 'completed', 'cancelled', 'discarded')),
    -- Attempts made; grows at lease.
    attempt             INTEGER NOT NULL CHECK (attempt >= 0),
    max_attempts        INTEGER NOT NULL CHECK (max_attempts >= 1),
    -- JSON array of {attempt, worker, class, message, at}, one per failed attempt.
    errors              TEXT    NOT NULL,
    scheduled_at        INTEGER NOT NULL,
    created_at          INTEGER NOT NULL,
    attempted_at        INTEGER,
    finalized_at        INTEGER,
    -- The lease: who holds the current attempt and until when.
    lease_owner         INTEGER REFERENCES workers (id),
    lease_expires_at    INTEGER,
    heartbeat_at        INTEGER,
    progress_step       INTEGER,
    progress_total      INTEGER,
    cancel_requested_at INTEGER,
    -- Worker of the last failed attempt: the cell is handed to others first.
    last_failed_worker  INTEGER,
    -- JSON of the render result, and the worker of the winning attempt.
    result              TEXT,
    result_worker       INTEGER,
    UNIQUE (sweep_id, cell_key),
    UNIQUE (sweep_id, number),
    CHECK ((finalized_at IS NOT NULL) = (state IN ('completed', 'cancelled', 'discarded'))),
    CHECK ((lease_owner IS NOT NULL AND lease_expires_at IS NOT NULL) = (state = 'running')),
    CHECK ((result IS NOT NULL) = (state = 'completed'))
);

-- The lease query: first available cells by priority, then age.
CREATE INDEX cells_fetch ON cells (state, priority, scheduled_at, id);
-- Per-sweep counts and sweep-wide transitions (cancel, pause, retry).
CREATE INDEX cells_sweep_state ON cells (sweep_id, state);
-- Maintenance: expired leases and due retries.
CREATE INDEX cells_lease_expiry ON cells (lease_expires_at) WHERE state = 'running';
CREATE INDEX cells_due ON cells (scheduled_at) WHERE state IN ('scheduled', 'retryable');
CREATE INDEX cells_lease_owner ON cells (lease_owner) WHERE state = 'running';
-- Worker throughput (ListWorkers): recent completions by worker.
CREATE INDEX cells_result_worker ON cells (result_worker, finalized_at) WHERE state = 'completed';
