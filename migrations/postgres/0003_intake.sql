-- The intake: cells of a large submission that are accepted (committed with their sweep) but
-- are not rows of `cells` yet. Keep in step with ../sqlite/0003_intake.sql.
--
-- A submit of more cells than one chunk inserts the first chunk into `cells` and the rest here,
-- a few large rows instead of one row and nine index entries per cell, so the submit commits
-- in a fraction of the time. The coordinator then moves one chunk per transaction into `cells`
-- (`queue::intake`), in the state the sweep gives at that moment (active: available, paused:
-- held, cancelled: cancelled), and deletes the chunk in the same transaction; after a crash it
-- carries on where it stopped. Until then a sweep's counts show a chunk's cells as that state.
CREATE TABLE intake (
    sweep_id     BIGINT NOT NULL REFERENCES sweeps (id),
    -- The chunk holds the cells numbered first_number .. first_number + cell_count - 1.
    first_number BIGINT NOT NULL CHECK (first_number >= 0),
    cell_count   BIGINT NOT NULL CHECK (cell_count > 0),
    -- The submit's time: the cells' created_at and scheduled_at, so they keep their age.
    created_at   BIGINT NOT NULL,
    -- The cells' specs as JSON lines, LZ4-compressed (block format, size prepended).
    cells        BYTEA  NOT NULL,
    PRIMARY KEY (sweep_id, first_number)
);
-- Already compressed: do not let TOAST try again.
ALTER TABLE intake ALTER COLUMN cells SET STORAGE EXTERNAL;
