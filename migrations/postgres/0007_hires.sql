-- The hires fix (A1111's "Hires. fix"): the settings of a cell's second pass, as columns a
-- filter can test (`kiln query 'hires_denoise >= 0.5 and hires_upscaler = "latent"'`). Keep in
-- step with ../sqlite/0007_hires.sql (same columns and CHECKs). BIGINT like every integer here
-- (the store reads integers as i64), DOUBLE PRECISION like `cfg`; nullable columns without a
-- default add nothing to existing rows.
--
-- All NULL for a cell without a hires fix (every cell before this), so a test of one is false
-- there. With one:
-- - hires_scale: the scale asked for (`hires_scale`), 4 decimals; NULL when `hires_size` gave
--   the size instead.
-- - hires_width, hires_height: the final picture's size in pixels (from a scale or a size, as
--   the engine rounds it), which `pixels` also counts.
-- - hires_upscaler: kiln's name (`latent`, `latent_nearest`, `latent_nearest_exact`, `lanczos`).
-- - hires_steps: as written; 0 means as many as the first pass.
-- - hires_denoise: the denoising strength, 4 decimals.
-- Nothing in the queue reads them; a sweep's cells are few enough to filter without an index.
ALTER TABLE cells ADD COLUMN hires_scale DOUBLE PRECISION CHECK (hires_scale >= 1);
ALTER TABLE cells ADD COLUMN hires_width BIGINT CHECK (hires_width > 0);
ALTER TABLE cells ADD COLUMN hires_height BIGINT CHECK (hires_height > 0);
ALTER TABLE cells ADD COLUMN hires_upscaler TEXT;
ALTER TABLE cells ADD COLUMN hires_steps BIGINT CHECK (hires_steps >= 0);
ALTER TABLE cells ADD COLUMN hires_denoise DOUBLE PRECISION
    CHECK (hires_denoise > 0 AND hires_denoise <= 1);
