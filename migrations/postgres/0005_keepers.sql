-- Keepers (issue 17, item 5): a user stars the images worth keeping and rates them.
-- Keep in step with ../sqlite/0005_keepers.sql (same columns, CHECKs and index). BIGINT like
-- every integer here (the store reads integers as i64); a constant default adds the columns
-- without rewriting the table.
--
-- Both are set only by a person (`kiln star`, `SetKeeper`); nothing in the queue reads them.
-- 1: starred.
ALTER TABLE cells ADD COLUMN starred BIGINT NOT NULL DEFAULT 0 CHECK (starred IN (0, 1));
-- 1 to 5 stars; 0: not rated.
ALTER TABLE cells ADD COLUMN rating BIGINT NOT NULL DEFAULT 0 CHECK (rating BETWEEN 0 AND 5);
-- `starred` filters (`kiln fetch 'sweep = "foxes" and starred'`): the few starred cells of a
-- sweep, without reading the rest. Partial, so it costs nothing for the cells nobody starred;
-- the filter writes `starred = 1` as literal SQL, which the planner can match to it.
CREATE INDEX cells_starred ON cells (sweep_id, id) WHERE starred = 1;
