//! Sweep planning from the example files, read the way the CLI reads them: the sweep file
//! plus every file it references, resolved next to it, sent together as a `SweepSource`.

use std::collections::HashSet;
use std::path::Path;

use kiln_coordinator::queue::{Submission, SubmittedCells};
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
            // The wildcard line `{snowy|barn} owl` binds the text it produced.
            ("animal", "barn owl"),
            ("animal.alt1", "barn"),
            ("cfg", "1.5"),
            ("light", "golden hour light"),
        ]
    );
    // Deterministic: the same input plans the same cells.
    assert_eq!(p, plan(&src, &PlanLimits::default(), 99).unwrap());
    // Bindings are no part of a cell's identity: the same renders written without the
    // wildcard are the same cells, in the same order.
    let mut plain = src.clone();
    plain.text = plain
        .text
        .replace("__animal__", "{red fox|snowy owl|barn owl}");
    let q = plan(&plain, &PlanLimits::default(), 0).unwrap();
    assert_eq!(keys(&q), keys(&p));
    assert_ne!(q.cells[0].bindings, p.cells[0].bindings);
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
    // Planned as it is taken in: the same cells, in the same order, named by the file.
    let inserted = f
        .queue
        .submit(Submission {
            name: String::new(),
            idempotency_key: "foxes-1".into(),
            priority: 5,
            max_attempts: None,
            spec: src.text.clone(),
            cells: SubmittedCells::File(src.clone()),
            owner: None,
            unique_name: false,
        })
        .await
        .unwrap();
    assert_eq!(inserted.cell_count, 24);
    let sweep = f.queue.sweep(inserted.id).await.unwrap();
    assert_eq!(sweep.name, p.name);
    let stored = f
        .queue
        .query(&kiln_coordinator::store::CellQuery {
            sweep: Some(inserted.id),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap();
    let keys: Vec<&str> = stored.iter().map(|c| c.cell_key.as_str()).collect();
    let planned: Vec<&str> = p.cells.iter().map(|c| c.cell_key.as_str()).collect();
    assert_eq!(keys, planned);
    f.finish().await;
}

/// Every kind of planning error, each with the place it must name.
#[test]
fn every_error_names_its_place() {
    const HEAD: &str = "model = \"m\"\nseeds = [1]\n";
    let wild = |body: &str| format!("{HEAD}prompt = \"a __w__\"\n[wildcards]\nw = {body}\n");
    type Files = Vec<(&'static str, &'static str)>;
    let cases: Vec<(String, Files, &str)> = vec![
        // TOML syntax.
        (
            format!("{HEAD}prompt = \n"),
            vec![],
            "s.toml:3:10: string values must be quoted, expected literal string",
        ),
        // Unknown key, in a nested table.
        (
            format!("{HEAD}prompt = \"p\"\n[[loras]]\nname = \"l\"\nweight = 1\n"),
            vec![],
            "s.toml:6:1: unknown field `weight`, expected one of `name`, `path`, `id`, `strength`, `sha256`",
        ),
        // Wrong type.
        (
            format!("{HEAD}prompt = \"p\"\ncfg = \"high\"\n"),
            vec![],
            "s.toml:4:7: invalid type: string \"high\", expected f64",
        ),
        // Missing prompt.
        (
            HEAD.to_string(),
            vec![],
            "s.toml: prompt: missing: prompt (a template), prompts (a file) or axes.prompt",
        ),
        // prompt and prompts.
        (
            format!("{HEAD}prompt = \"p\"\nprompts = \"p.txt\"\n"),
            vec![],
            "s.toml:4:11: `prompts` conflicts with `prompt (line 3)`: set it in one place (an axis replaces the top-level value)",
        ),
        // LoRA strength both fixed and an axis (unquoted dotted key).
        (
            format!(
                "{HEAD}prompt = \"p\"\n[[loras]]\nname = \"lcm.safetensors\"\nstrength = 1\n[axes]\nlora.lcm.strength = [0.5]\n"
            ),
            vec![],
            "s.toml:8:1: `axes.\"lora.lcm.strength\"` conflicts with `loras[0].strength (line 6)`: set it in one place (an axis replaces the top-level value)",
        ),
        // Seeds.
        (
            "model = \"m\"\nprompt = \"p\"\nseeds = [1, -2]\n".to_string(),
            vec![],
            "s.toml:3:13: seeds[1]: -2 is negative",
        ),
        (
            "model = \"m\"\nprompt = \"p\"\nseeds = []\n".to_string(),
            vec![],
            "s.toml:3:9: seeds: the list is empty",
        ),
        (
            "model = \"m\"\nprompt = \"p\"\nseeds = { from = 9223372036854775807, count = 2 }\n"
                .to_string(),
            vec![],
            "s.toml:3:47: seeds.count: the range runs past 2^63-1",
        ),
        (
            "model = \"m\"\nprompt = \"p\"\nseeds = { random = 0 }\n".to_string(),
            vec![],
            "s.toml:3:20: seeds.random: 0 is not a positive count",
        ),
        // Axis value out of range.
        (
            format!("{HEAD}prompt = \"p\"\n[axes]\nsize = [\"512x512\", \"500x512\"]\n"),
            vec![],
            "s.toml:5:20: axes.size[1]: 500 must be a multiple of 8 in 64..=4096",
        ),
        // Template errors in the TOML, at the character.
        (
            format!("{HEAD}prompt = \"a {{b|c}} d}}\"\n"),
            vec![],
            "s.toml:3:20: `}` without a matching `{` (write `\\}` for a literal brace)",
        ),
        (
            format!("{HEAD}prompt = 'x {{}}'\n"),
            vec![],
            "s.toml:3:13: empty alternatives `{}`: give at least one non-empty option",
        ),
        // ... and at the value when the string has escapes.
        (
            format!("{HEAD}prompt = \"\\t{{b|c\"\n"),
            vec![],
            "s.toml:3:10: `{` is never closed",
        ),
        // Unknown wildcard inside an inline wildcard list.
        (
            wild("[\"x\", \"y __v__\"]"),
            vec![],
            "s.toml:5:14: unknown wildcard `__v__` (declared: w)",
        ),
        // Wildcard file: missing, empty, malformed.
        (
            wild("\"w.txt\""),
            vec![],
            "s.toml:5:5: `w.txt` was not sent with the sweep (the client must send every referenced file)",
        ),
        (
            wild("\"w.txt\""),
            vec![("w.txt", "# nothing\n\n")],
            "w.txt: wildcard `w`: the list is empty",
        ),
        (
            wild("\"w.txt\""),
            vec![("w.txt", "ok\n\t{a|{b}\n")],
            "w.txt:2:2: `{` is never closed",
        ),
        (
            wild("\"w.txt\""),
            vec![("w.txt", "__w__\n")],
            "w.txt:1:1: wildcard cycle: w → w",
        ),
        // Prompts file.
        (
            format!("{HEAD}prompts = \"p.txt\"\n"),
            vec![("p.txt", "fine\n{x|y\n")],
            "p.txt:2:1: `{` is never closed",
        ),
        (
            format!("{HEAD}prompts = \"p.txt\"\n"),
            vec![("p.txt", "")],
            "p.txt: prompts: the list is empty",
        ),
    ];
    for (text, files, want) in cases {
        let mut src = SweepSource::new("s.toml", text.clone());
        for (name, body) in files {
            src.files.insert(name.into(), body.into());
        }
        let got = plan(&src, &PlanLimits::default(), 0)
            .map(|p| format!("planned {} cells", p.cells.len()))
            .unwrap_or_else(|e| e.to_string());
        assert_eq!(got, want, "for:\n{text}");
    }

    // Limits.
    let tight = PlanLimits {
        max_sweep_bytes: 10,
        ..PlanLimits::default()
    };
    let src = SweepSource::new("s.toml", format!("{HEAD}prompt = \"p\"\n"));
    assert_eq!(
        plan(&src, &tight, 0).unwrap_err().to_string(),
        "s.toml: 37 bytes, more than the limit of 10 bytes"
    );
    let tight = PlanLimits {
        max_nesting: 2,
        ..PlanLimits::default()
    };
    let src = SweepSource::new(
        "s.toml",
        format!("{HEAD}prompt = \"{{a|{{b|{{c|d}}}}}}\"\n"),
    );
    assert_eq!(
        plan(&src, &tight, 0).unwrap_err().to_string(),
        "s.toml:3:17: alternatives nested deeper than 2 levels"
    );
}

#[test]
fn dotted_axis_keys_may_be_quoted_or_not() {
    let base = "model = \"m\"\nprompt = \"p\"\nseeds = [1]\n[[loras]]\nname = \"x/lcm.v2.safetensors\"\n[axes]\n";
    for axis in [
        "\"lora.lcm.v2.strength\"",
        "lora.lcm.v2.strength",
        "lora.\"lcm.v2\".strength",
    ] {
        let src = SweepSource::new("s.toml", format!("{base}cfg = [1, 2]\n{axis} = [0.5, 1]\n"));
        let p = plan(&src, &PlanLimits::default(), 0).unwrap();
        assert_eq!(p.axes, ["cfg", "lora.lcm.v2.strength"], "{axis}");
        assert_eq!(p.cells[1].bindings["lora.lcm.v2.strength"], "1.0");
        assert_eq!(p.cells[1].loras[0].strength, 1.0);
    }
}
