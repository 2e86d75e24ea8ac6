//! Sweep planning from the example files, read the way the CLI reads them: the sweep file
//! plus every file it references, resolved next to it, sent together as a `SweepSource`.

use std::collections::HashSet;
use std::path::Path;

use kiln_coordinator::queue::Submission;
use kiln_coordinator::sweep::{Place, PlanLimits, SweepSource, plan, referenced_files};

use crate::harness::{Backend, Fixture};

/// What the CLI does: read the sweep file and each referenced file next to it.
fn load(rel: &str) -> SweepSource {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(rel);
    let text = std::fs::read_to_string(&path).unwrap();
    let mut src = SweepSource::new(rel, text);
    let dir = path.parent().unwrap();
    for f in referenced_files(rel, &src.text).unwrap() {
        let body = std::fs::read_to_string(dir.join(&f)).unwrap();
        src.files.insert(f, body);
    }
    src
}

fn keys(p: &kiln_coordinator::sweep::Plan) -> Vec<String> {
    p.cells.iter().map(|c| c.cell_key()).collect()
}

#[test]
fn foxes_example_plans_24_cells_with_bindings() {
    let src = load("examples/foxes.toml");
    let p = plan(&src, &PlanLimits::default(), 0).unwrap();
    assert_eq!(p.name, "foxes");
    assert_eq!(p.cells.len(), 24);
    assert_eq!(p.duplicates, 0);
    let first = &p.cells[0];
    assert_eq!(
        first.prompt,
        "a photo of a red fox in a misty forest, golden hour light, detailed fur"
    );
    assert_eq!(
        (first.steps, first.width, first.height, first.seed),
        (4, 512, 512, 1)
    );
    assert_eq!(first.model, "dreamshaper_8.safetensors");
    assert_eq!(first.loras[0].name, "lcm-lora-sdv1-5.safetensors");
    let owl = p
        .cells
        .iter()
        .find(|c| c.prompt.contains("barn owl") && c.cfg == 1.5)
        .unwrap();
    let b: Vec<(&str, &str)> = owl
        .bindings
        .iter()
        .map(|(k, v)| (k.as_str(), v.as_str()))
        .collect();
    assert_eq!(
        b,
        [
            ("alt1", "misty forest"),
            ("animal", "{snowy|barn} owl"),
            ("animal.alt1", "barn"),
            ("cfg", "1.5"),
            ("light", "golden hour light"),
        ]
    );
    // Deterministic: the same input plans the same cells.
    assert_eq!(p, plan(&src, &PlanLimits::default(), 99).unwrap());
}

#[test]
fn prompts_file_example_plans_16_cells() {
    let src = load("examples/prompts-file.toml");
    let p = plan(&src, &PlanLimits::default(), 0).unwrap();
    assert_eq!(p.cells.len(), 16);
    assert_eq!(p.seeds, [1000, 1001]);
    let c = &p.cells[2];
    assert_eq!(c.prompt, "a quiet mountain lake at dawn, mist, pine trees");
    assert_eq!(c.bindings["prompts.line"], "3");
    assert_eq!(c.bindings["lora.lcm.strength"], "0.8");
    assert_eq!((c.width, c.height), (512, 768));
}

#[test]
fn extending_a_sweep_plans_a_superset() {
    let src = load("examples/foxes.toml");
    let old = plan(&src, &PlanLimits::default(), 5).unwrap();
    let mut ext = src.clone();
    ext.text = ext
        .text
        .replace("seeds = [1, 2]", "seeds = [1, 2, 3]")
        .replace("cfg = [1.0, 1.5]", "cfg = [1.0, 1.5, 2.0]");
    ext.files
        .get_mut("wildcards/animal.txt")
        .unwrap()
        .push_str("grey wolf\n");
    let new = plan(&ext, &PlanLimits::default(), 5).unwrap();
    assert_eq!(new.cells.len(), 4 * 2 * 3 * 3);
    let new_keys: HashSet<String> = keys(&new).into_iter().collect();
    assert!(keys(&old).iter().all(|k| new_keys.contains(k)));

    // Random seeds: more of them with the same RNG seed keeps the first ones.
    let mut r4 = src.clone();
    r4.text = r4.text.replace("seeds = [1, 2]", "seeds = { random = 4 }");
    let mut r6 = src.clone();
    r6.text = r6.text.replace("seeds = [1, 2]", "seeds = { random = 6 }");
    let a = plan(&r4, &PlanLimits::default(), 77).unwrap();
    let b = plan(&r6, &PlanLimits::default(), 77).unwrap();
    assert_eq!(a.seeds[..], b.seeds[..4]);
    let b_keys: HashSet<String> = keys(&b).into_iter().collect();
    assert!(keys(&a).iter().all(|k| b_keys.contains(k)));
}

#[test]
fn errors_in_example_files_name_their_place() {
    let mut src = load("examples/foxes.toml");
    src.text = src.text.replace("__light__", "__lihgt__");
    let e = plan(&src, &PlanLimits::default(), 0).unwrap_err();
    let line = src
        .text
        .lines()
        .position(|l| l.contains("__lihgt__"))
        .unwrap() as u32
        + 1;
    assert!(
        matches!(e.place, Place::At { line: l, .. } if l == line),
        "{e}"
    );
    assert!(
        e.to_string()
            .contains("unknown wildcard `__lihgt__` (declared: animal, light)")
    );

    let mut src = load("examples/foxes.toml");
    src.files
        .insert("wildcards/animal.txt".into(), "fox\n\n{owl|\n".into());
    assert_eq!(
        plan(&src, &PlanLimits::default(), 0)
            .unwrap_err()
            .to_string(),
        "wildcards/animal.txt:3:1: `{` is never closed"
    );

    let limits = PlanLimits {
        max_cells: 10,
        ..PlanLimits::default()
    };
    let e = plan(&load("examples/foxes.toml"), &limits, 0).unwrap_err();
    assert_eq!(
        e.to_string(),
        "examples/foxes.toml: the sweep expands to 24 cells, more than the limit of 10"
    );
}

#[tokio::test]
async fn a_planned_sweep_is_accepted_by_the_queue() {
    let src = load("examples/foxes.toml");
    let p = plan(&src, &PlanLimits::default(), 0).unwrap();
    let f = Fixture::new(Backend::Sqlite).await;
    let inserted = f
        .queue
        .submit(Submission {
            name: p.name.clone(),
            idempotency_key: "foxes-1".into(),
            priority: 5,
            max_attempts: None,
            spec: src.text.clone(),
            cells: p.cells,
        })
        .await
        .unwrap();
    assert_eq!(inserted.cell_count, 24);
    f.finish().await;
}

/// The default cell limit, timed: `cargo test -p kiln-coordinator --test it -- --ignored
/// million --nocapture`.
#[test]
#[ignore = "timing; plans 1,000,000 cells"]
fn plans_a_million_cells() {
    let src = SweepSource::new(
        "big.toml",
        "model = \"m\"\nprompt = \"a {a|b|c|d|e} __n__\"\nseeds = { from = 0, count = 100 }\n\
         [wildcards]\nn = \"n.txt\"\n[axes]\ncfg = [1.0, 1.5, 2.0, 2.5]\nsteps = [2, 4, 6, 8, 10]\n",
    )
    .with_file(
        "n.txt",
        (0..100).map(|i| format!("thing {i}\n")).collect::<String>(),
    );
    let t = std::time::Instant::now();
    let p = plan(&src, &PlanLimits::default(), 0).unwrap();
    assert_eq!(p.cells.len(), 1_000_000);
    println!("planned {} cells in {:?}", p.cells.len(), t.elapsed());
}
