-- Render levels (k-diffusion samplers, Karras schedule, variation seeds, NV noise): a cell
-- names the least worker render level that renders it, a worker the level it understands, and
-- a lease never hands a cell to a worker of a lower level (kiln_proto::sampler::RENDER_LEVEL).
-- Keep in step with ../postgres/0006_render_level.sql (same columns, CHECKs and update).
--
-- 0 for every cell and worker before this: LCM and diffusers' Euler ancestral, CPU noise, and
-- workers that do not send a level. The lease reads it as a filter on the rows `cells_fetch`
-- already orders (`render_level <= ?`), so it needs no index.
ALTER TABLE cells ADD COLUMN render_level INTEGER NOT NULL DEFAULT 0
    CHECK (render_level >= 0);
ALTER TABLE workers ADD COLUMN render_level INTEGER NOT NULL DEFAULT 0
    CHECK (render_level >= 0);
-- `euler_a` named diffusers' Euler ancestral until now and names k-diffusion's from now on
-- (A1111's "Euler a"): earlier cells take the new name of what they ran, in the column and in
-- the spec, so a query or a re-lease reads them right. Their `cell_key` does not change (the
-- identity hash keeps the old word for this sampler); their bindings keep what was written.
UPDATE cells SET sampler = 'euler_a_diffusers',
    spec = json_set(spec, '$.sampler', 'euler_a_diffusers')
    WHERE sampler = 'euler_a';
