-- Indexes for `kiln query` first pages (issue 4, item 5). Keep in step with
-- ../sqlite/0002_query_indexes.sql (same names; the definitions differ only where the
-- backends order NULLs differently). Timings: BENCHMARKS.md, "Result queries".
--
-- A query's filter narrows to a sweep almost always (sweep names are resolved to ids before
-- the query, so the planner sees `sweep_id = $1`), and its page is sorted by seed, cfg or
-- finish time. Each index below lets the page be read in sort order and stop after LIMIT
-- matching rows, instead of sorting every row of the sweep. `id` ends each index because it
-- is the tie-breaker of every sort.

-- `sweep = … and seed between …`, sorted by seed (either direction).
CREATE INDEX cells_sweep_seed ON cells (sweep_id, seed, id);
-- Grids: sorted by cfg, then seed.
CREATE INDEX cells_sweep_cfg ON cells (sweep_id, cfg, seed, id);
-- Latest results first (`--sort -finished`, i.e. DESC NULLS LAST, which a default ascending
-- index cannot give: Postgres puts NULLs last ascending, hence first on a backward scan).
CREATE INDEX cells_finished ON cells (finalized_at DESC NULLS LAST, id DESC);
-- The same within a state (`state = "completed"`, the usual results query).
CREATE INDEX cells_state_finished ON cells (state, finalized_at DESC NULLS LAST, id DESC);
