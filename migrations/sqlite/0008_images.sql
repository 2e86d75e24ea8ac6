-- img2img pictures (issue 18): the files sweeps start renders from, uploaded once by
-- `PutImage` and named by the sha256 of their bytes, which cells carry
-- (`spec.init.sha256`); workers fetch them with `GetImage`. Keep in step with
-- ../postgres/0008_images.sql (same columns and CHECKs).
--
-- The coordinator decoded each whole before storing it (kiln_proto::picture: PNG, JPEG or WebP,
-- at most 32 MiB and 4096 pixels a side), so `format`, `width` and `height` are what the
-- decoder read. Rows are never updated; the same bytes uploaded twice are stored once.
CREATE TABLE images (
    sha256 TEXT PRIMARY KEY CHECK (length(sha256) = 64),
    format TEXT NOT NULL CHECK (format IN ('png', 'jpeg', 'webp')),
    width INTEGER NOT NULL CHECK (width > 0),
    height INTEGER NOT NULL CHECK (height > 0),
    bytes INTEGER NOT NULL CHECK (bytes > 0),
    data BLOB NOT NULL,
    created_at INTEGER NOT NULL
);
