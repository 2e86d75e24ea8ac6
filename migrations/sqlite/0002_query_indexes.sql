-- Indexes for `kiln query` first pages (issue 4, item 5). Keep in step with
-- ../postgres/0002_query_indexes.sql (same names; the definitions differ only where the
-- backends order NULLs differently). Timings: BENCHMARKS.md, "Result queries".
--
-- A query's filter narrows to a sweep almost always (sweep names are resolved to ids before
-- the query, so the planner sees `sweep_id = ?`), and its page is sorted by seed, cfg or
-- finish time. Each index below lets the page be read in sort order and stop after LIMIT
-- matching rows, instead of sorting every row of the sweep. SQLite appends the rowid (`id`)
-- to every index, which is the tie-breaker of every sort.

-- `sweep = … and seed between …`, sorted by seed (either direction).
CREATE INDEX cells_sweep_seed ON cells (sweep_id, seed);
-- Grids: sorted by cfg, then seed.
CREATE INDEX cells_sweep_cfg ON cells (sweep_id, cfg, seed);
-- Latest results first (`--sort -finished`): a backward scan gives DESC NULLS LAST. With
-- `state = "completed"` (the usual results query) the planner prefers an equality on state
-- over an ordered scan, hence the second index.
CREATE INDEX cells_finished ON cells (finalized_at);
CREATE INDEX cells_state_finished ON cells (state, finalized_at);
--
-- The planner needs statistics to choose between these and the older indexes (an equality
-- on `state` or a range on `cfg` otherwise wins over reading in sort order); the store runs
-- ANALYZE from the maintenance loop (`Store::analyze`).
