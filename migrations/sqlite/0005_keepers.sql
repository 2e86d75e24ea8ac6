-- Keepers (issue 17, item 5): a user stars the images worth keeping and rates them.
-- Keep in step with ../postgres/0005_keepers.sql (same columns, CHECKs and index).
--
-- Both are set only by a person (`kiln star`, `SetKeeper`); nothing in the queue reads them.
-- 1: starred.
ALTER TABLE cells ADD COLUMN starred INTEGER NOT NULL DEFAULT 0 CHECK (starred IN (0, 1));
-- 1 to 5 stars; 0: not rated.
ALTER TABLE cells ADD COLUMN rating INTEGER NOT NULL DEFAULT 0 CHECK (rating BETWEEN 0 AND 5);
-- `starred` filters (`kiln fetch 'sweep = "foxes" and starred'`): the few starred cells of a
-- sweep, without reading the rest. Partial, so it costs nothing for the cells nobody starred;
-- the filter writes `starred = 1` as literal SQL, which the planner can match to it.
CREATE INDEX cells_starred ON cells (sweep_id, id) WHERE starred = 1;
