-- The intake: cells of a large submission that are accepted (committed with their sweep) but
-- are not rows of `cells` yet. Keep in step with ../postgres/0003_intake.sql, which says how
-- it is used.
CREATE TABLE intake (
    sweep_id     INTEGER NOT NULL REFERENCES sweeps (id),
    -- The chunk holds the cells numbered first_number .. first_number + cell_count - 1.
    first_number INTEGER NOT NULL CHECK (first_number >= 0),
    cell_count   INTEGER NOT NULL CHECK (cell_count > 0),
    -- The submit's time: the cells' created_at and scheduled_at, so they keep their age.
    created_at   INTEGER NOT NULL,
    -- The cells' specs as JSON lines, LZ4-compressed (block format, size prepended).
    cells        BLOB    NOT NULL,
    PRIMARY KEY (sweep_id, first_number)
);
