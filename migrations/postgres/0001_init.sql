-- kiln schema, Postgres flavour. Keep in step with ../sqlite/0001_init.sql (same tables,
-- columns, states and CHECKs); the conformance suite runs against both.
-- Times are unix milliseconds (BIGINT); JSON documents are TEXT (bindings: JSONB, for queries).

-- A sweep: what a user submitted. `idempotency_key` makes submission idempotent.
CREATE TABLE sweeps (
    id              BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name            TEXT    NOT NULL,
    idempotency_key TEXT    NOT NULL UNIQUE,
    priority        BIGINT NOT NULL CHECK (priority BETWEEN 0 AND 9),
    max_attempts    BIGINT NOT NULL CHECK (max_attempts >= 1),
    -- active: cells handed out; paused: cells held; cancelled: by a user.
    state           TEXT    NOT NULL CHECK (state IN ('active', 'paused', 'cancelled')),
    -- The sweep file verbatim (may be empty).
    spec            TEXT    NOT NULL,
    created_at      BIGINT NOT NULL
);

-- A registered worker process and what it declared about its device.
CREATE TABLE workers (
    id            BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    name          TEXT    NOT NULL,
    device_kind   TEXT    NOT NULL CHECK (device_kind IN ('unspecified', 'cpu', 'cuda', 'metal')),
    device_model  TEXT    NOT NULL,
    memory_mib    BIGINT NOT NULL CHECK (memory_mib >= 0),
    max_pixels    BIGINT NOT NULL CHECK (max_pixels >= 0),
    -- JSON array of affinity keys of the pipelines it has loaded.
    loaded        TEXT    NOT NULL,
    version       TEXT    NOT NULL,
    -- active, or drained after a graceful release.
    state         TEXT    NOT NULL CHECK (state IN ('active', 'drained')),
    registered_at BIGINT NOT NULL,
    last_seen_at  BIGINT NOT NULL
);

-- A cell: one fully resolved render, and the lifecycle of its attempts.
CREATE TABLE cells (
    id                  BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
    sweep_id            BIGINT NOT NULL REFERENCES sweeps (id),
    -- Position within the sweep, from 0.
    number              BIGINT NOT NULL CHECK (number >= 0),
    -- sha256 (hex) of the render parameters: the cell's identity within its sweep.
    cell_key            TEXT    NOT NULL,
    -- JSON of the resolved render (model, LoRAs, prompt, seed, ...).
    spec                TEXT    NOT NULL,
    -- Hash of model + LoRA stack + size: what a worker must have loaded to reuse a pipeline.
    affinity_key        TEXT    NOT NULL,
    -- Copied from the sweep so the fetch index orders by it.
    priority            BIGINT NOT NULL,
    pixels              BIGINT NOT NULL CHECK (pixels > 0),
    min_memory_mib      BIGINT NOT NULL CHECK (min_memory_mib >= 0),
    -- Queryable copies of render parameters.
    model               TEXT    NOT NULL,
    prompt              TEXT    NOT NULL,
    negative_prompt     TEXT    NOT NULL,
    seed                BIGINT NOT NULL CHECK (seed >= 0),
    steps               BIGINT NOT NULL,
    cfg                 DOUBLE PRECISION    NOT NULL,
    sampler             TEXT    NOT NULL,
    width               BIGINT NOT NULL,
    height              BIGINT NOT NULL,
    -- JSON object: which alternative / wildcard value / axis value made this cell.
    bindings            JSONB   NOT NULL,
    -- available: may be leased now; scheduled: waits for scheduled_at; running: leased;
    -- retryable: failed, waits for its backoff; held: sweep paused; completed, cancelled,
    -- discarded: terminal.
    state               TEXT    NOT NULL CHECK (state IN ('available', 'scheduled', 'running',
                            'retryable', 'held', 'completed', 'cancelled', 'discarded')),
    -- Attempts made; grows at lease.
    attempt             BIGINT NOT NULL CHECK (attempt >= 0),
    max_attempts        BIGINT NOT NULL CHECK (max_attempts >= 1),
    -- JSON array of {attempt, worker, class, message, at}, one per failed attempt.
    errors              TEXT    NOT NULL,
    scheduled_at        BIGINT NOT NULL,
    created_at          BIGINT NOT NULL,
    attempted_at        BIGINT,
    finalized_at        BIGINT,
    -- The lease: who holds the current attempt and until when.
    lease_owner         BIGINT REFERENCES workers (id),
    lease_expires_at    BIGINT,
    heartbeat_at        BIGINT,
    progress_step       BIGINT,
    progress_total      BIGINT,
    cancel_requested_at BIGINT,
    -- Worker of the last failed attempt: the cell is handed to others first.
    last_failed_worker  BIGINT,
    -- JSON of the render result, and the worker of the winning attempt.
    result              TEXT,
    result_worker       BIGINT,
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
