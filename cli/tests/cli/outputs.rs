//! What a new user gets out of a sweep, with real processes (issue 16): `kiln fetch --name`
//! patterns (fields, folders, sanitised values, `-2` suffixes, refused escapes, the default
//! names unchanged) and `kiln grid` saying how many matches it shows and refusing an unknown
//! axis with the axes there are.

use std::path::{Path, PathBuf};

use crate::spawn;
use crate::util::{fixtures, kiln, kiln_fails, spawn_worker};

/// Every file under `dir`, as `/`-joined paths relative to it, sorted.
fn files(dir: &Path) -> Vec<String> {
    fn walk(dir: &Path, out: &mut Vec<PathBuf>) {
        for e in std::fs::read_dir(dir).unwrap().flatten() {
            if e.path().is_dir() {
                walk(&e.path(), out);
            } else {
                out.push(e.path());
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, &mut out);
    let mut names: Vec<String> = out
        .iter()
        .map(|p| {
            let rel = p.strip_prefix(dir).unwrap();
            let parts: Vec<String> = rel
                .components()
                .map(|c| c.as_os_str().to_string_lossy().into_owned())
                .collect();
            parts.join("/")
        })
        .collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fetch_names_and_grid_counts() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("kiln.db").display());
    let c = spawn(&db, dir.path());
    let store = dir.path().join("store");
    let _worker = spawn_worker(&c.addr, &store, &[&fixtures()]);
    // A sweep name with a character Windows refuses, a non-ASCII prompt, two seeds per
    // (alt1, cfg): 8 cells, 2 on each of 4 (alt1, cfg) positions.
    let file = dir.path().join("night.toml");
    std::fs::write(
        &file,
        r#"name = "fox: night"
model = "tiny-sd15"
prompt = "a {red|arctic} fox in a forêt"
steps = 2
width = 64
height = 64
seeds = [1, 2]

[axes]
cfg = [1.0, 1.5]
"#,
    )
    .unwrap();
    let out = kiln(&c.addr, &["submit", file.to_str().unwrap()]);
    assert!(out.contains("sweep 1 submitted: 8 cells"), "{out}");
    kiln(&c.addr, &["watch", "1"]);

    // A pattern with folders, a cut prompt and a binding: two cells per name, so the later
    // of each pair gets -2.
    let named = dir.path().join("named");
    let out = kiln(
        &c.addr,
        &[
            "fetch",
            "sweep = 1",
            "-o",
            named.to_str().unwrap(),
            "--name",
            "{sweep}/{b.alt1}/{prompt:12}-{cfg}",
        ],
    );
    assert!(out.contains("8 images written"), "{out}");
    assert!(out.contains("4 of them share a name"), "{out}");
    let mut expected = Vec::new();
    for (alt, prompt) in [("arctic", "a arctic fox"), ("red", "a red fox in")] {
        for name in ["1", "1-2", "1.5", "1.5-2"] {
            expected.push(format!("fox_ night/{alt}/{prompt}-{name}.png"));
        }
    }
    expected.sort();
    assert_eq!(files(&named), expected);
    for f in &expected {
        let png = kiln_worker::engine::image::decode_png(&std::fs::read(named.join(f)).unwrap());
        assert_eq!(png.unwrap().image.width, 64, "{f}");
    }
    // Fetching again gives every image the name it had.
    kiln(
        &c.addr,
        &[
            "fetch",
            "sweep = 1",
            "-o",
            named.to_str().unwrap(),
            "--name",
            "{sweep}/{b.alt1}/{prompt:12}-{cfg}",
        ],
    );
    assert_eq!(files(&named), expected);

    // {cell} makes names unique by themselves; non-ASCII text is kept.
    let unique = dir.path().join("unique");
    let out = kiln(
        &c.addr,
        &[
            "fetch",
            "sweep = 1 and seed = 1",
            "-o",
            unique.to_str().unwrap(),
            "--name",
            "{cell:3}-{seed}-{steps}-{width}x{height}-{sampler}-{model}-{prompt}",
        ],
    );
    assert!(
        out.contains("4 images written") && !out.contains("share"),
        "{out}"
    );
    let got = files(&unique);
    assert_eq!(got.len(), 4);
    assert!(
        got.iter()
            .any(|f| f.ends_with("-1-2-64x64-lcm-tiny-sd15-a red fox in a forêt.png")),
        "{got:?}"
    );

    // The default names are today's.
    let plain = dir.path().join("plain");
    kiln(
        &c.addr,
        &["fetch", "sweep = 1", "-o", plain.to_str().unwrap()],
    );
    let got = files(&plain);
    assert_eq!(got.len(), 8);
    for f in &got {
        let parts: Vec<&str> = f.trim_end_matches(".png").split('-').collect();
        assert!(
            matches!(parts.as_slice(), ["1", n, "1" | "2"] if n.len() == 6),
            "{f}"
        );
    }

    // Patterns that would leave the folder, and bindings no cell has, are refused before
    // anything is written.
    let refused = dir.path().join("refused");
    for (pattern, says) in [
        ("../{seed}", "`..` is not allowed"),
        ("/tmp/{seed}", "relative to the output folder"),
        ("{b.colour}", "no matched cell has the binding \"colour\""),
        ("{colour}", "unknown field {colour}"),
    ] {
        let err = kiln_fails(
            &c.addr,
            &[
                "fetch",
                "sweep = 1",
                "-o",
                refused.to_str().unwrap(),
                "--name",
                pattern,
            ],
        );
        assert!(err.contains(says), "{pattern}: {err}");
    }
    assert!(!refused.exists());
    assert!(!dir.path().join("1.png").exists());

    // The grid: 8 matches on 4 tiles says so; an unknown axis lists the axes there are.
    let grid = dir.path().join("grid.png");
    let out = kiln(
        &c.addr,
        &[
            "grid",
            "sweep = 1",
            "--x",
            "cfg",
            "--y",
            "alt1",
            "-o",
            grid.to_str().unwrap(),
        ],
    );
    assert!(
        out.contains("2x2 grid (4 images) from 8 matches: 4 not shown (several per tile"),
        "{out}"
    );
    assert!(out.contains("narrow the filter or add --x/--y"), "{out}");
    let png = kiln_worker::engine::image::decode_png(&std::fs::read(&grid).unwrap()).unwrap();
    assert!(png.image.width > 2 * 64 && png.image.height > 2 * 64);
    if let Ok(keep) = std::env::var("KILN_TEST_KEEP_GRID") {
        std::fs::copy(&grid, keep).unwrap();
    }
    let out = kiln(
        &c.addr,
        &[
            "grid",
            "sweep = 1",
            "--x",
            "seed",
            "--y",
            "cfg",
            "-o",
            grid.to_str().unwrap(),
        ],
    );
    assert!(
        out.contains("2x2 grid (4 images) from 8 matches: 4 not shown"),
        "{out}"
    );
    let err = kiln_fails(
        &c.addr,
        &[
            "grid",
            "sweep = 1",
            "--x",
            "colour",
            "-o",
            grid.to_str().unwrap(),
        ],
    );
    assert!(
        err.contains("unknown axis \"colour\": none of the 8 matched cells has it"),
        "{err}"
    );
    assert!(
        err.contains("bindings: alt1 (2 values), cfg (2 values)"),
        "{err}"
    );
    assert!(err.contains("seed (2 values)"), "{err}");
}
