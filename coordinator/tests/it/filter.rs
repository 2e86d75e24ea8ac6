//! The filter language against both backends (`filter::sqlite::*`, `filter::postgres::*`).
//! Cells go in through `Queue::submit` (and some are leased, completed or failed); every filter
//! is then checked against an oracle: the same predicate written in Rust over all rows. Hostile
//! input (quotes, SQL, LIKE wildcards, backslashes, unicode) must come back as plain literals.

use std::collections::BTreeMap;

use kiln_coordinator::domain::lease::Fence;
use kiln_coordinator::domain::rows::CellRow;
use kiln_coordinator::domain::state::{CellState, FailureClass};
use kiln_coordinator::query::{Filter, parse_sort};
use kiln_coordinator::result::RenderResult;
use kiln_coordinator::store::CellQuery;
use kiln_coordinator::sweep::CellSpec;
use kiln_proto::SweepId;

use crate::harness::{Backend, Fixture, cell, submission};

conformance!(
    filters_match_the_oracle,
    hostile_input_is_data,
    numeric_bindings,
    sort_keys_order_and_tie_break,
    results_workers_and_states,
    sweep_names_resolve_to_every_sweep_of_that_name,
);

/// One stored cell as the oracle sees it.
struct Row {
    row: CellRow,
    sweep: &'static str,
    spec: CellSpec,
    result: Option<RenderResult>,
}

impl Row {
    fn b(&self, k: &str) -> Option<&str> {
        self.spec.bindings.get(k).map(String::as_str)
    }
}

/// The Rust side of a check: which rows a filter must return.
type OracleFn = dyn Fn(&Row) -> bool;
type Oracle = Box<OracleFn>;

/// The prompt with every hostile ingredient at once.
const EVIL_PROMPT: &str =
    "it's a \"fox\"; DROP TABLE cells; -- 100% _fox_ \\ back\\slash ✨ 狐 ' OR 1=1 --";

/// Sweeps "foxes" (24 cells), "cats" (6) and "evil" (2 hostile cells).
async fn seed_data(fx: &Fixture) -> (SweepId, SweepId, SweepId) {
    let mut foxes = Vec::new();
    for i in 0..24u64 {
        let mut c = cell(1000 + i);
        c.cfg = [1.0, 1.5, 2.0][(i % 3) as usize];
        c.steps = 4 + (i % 2) as u32 * 4;
        let animal = if i % 4 == 0 { "cat" } else { "fox" };
        let place = if i < 12 { "forest" } else { "city" };
        c.prompt = format!("a {animal} in a {place}, photo");
        c.bindings.insert("animal".into(), animal.into());
        c.bindings.insert("place".into(), place.into());
        c.bindings.insert(
            "strength".into(),
            ["0.5", "1.0", "1.25", "2"][(i % 4) as usize].into(),
        );
        c.bindings.insert("seed".into(), (1000 + i).to_string());
        foxes.push(c);
    }
    let cats: Vec<CellSpec> = (0..6u64)
        .map(|i| {
            let mut c = cell(5000 + i);
            c.prompt = format!("a cat on a sofa {i}");
            c.bindings.insert("animal".into(), "cat".into());
            c
        })
        .collect();
    let mut evil = cell(7);
    evil.prompt = EVIL_PROMPT.into();
    evil.negative_prompt = "%_%".into();
    evil.model = "x' OR '1'='1".into();
    for (k, v) in [
        ("we\"ird' key", "va'l\"ue; --"),
        ("动物", "狐狸"),
        ("$.animal", "path"),
        ("a[0]", "bracket"),
        ("sp ace", "%"),
        ("strength", "abc"),
        ("'; DROP TABLE cells; --", "x"),
        ("back\\slash", "b\\s"),
    ] {
        evil.bindings.insert(k.into(), v.into());
    }
    let mut odd = cell(8);
    odd.prompt = "100 percent".into();
    for (k, v) in [
        ("strength", " 7 "),
        ("n", "07"),
        ("big", "1e400"),
        ("neg", "-2.5"),
    ] {
        odd.bindings.insert(k.into(), v.into());
    }
    let s1 = fx
        .queue
        .submit(submission("foxes", foxes))
        .await
        .unwrap()
        .id;
    let s2 = fx.queue.submit(submission("cats", cats)).await.unwrap().id;
    let s3 = fx
        .queue
        .submit(submission("evil", vec![evil, odd]))
        .await
        .unwrap()
        .id;
    (s1, s2, s3)
}

/// Completes `n` cells on worker "gpu-box" and fails one for good on "cpu-box".
async fn work_some(fx: &Fixture, n: usize) {
    let w = fx.worker("gpu-box").await;
    for (i, c) in fx.queue.lease(w, n, None).await.unwrap().iter().enumerate() {
        fx.clock.advance(1000);
        let r = RenderResult {
            object_key: format!("sweeps/{}/{}/{}.png", c.sweep_id, c.id, c.attempt),
            storage: "file:///out".into(),
            sha256: format!("{i:064x}"),
            bytes: 10,
            width: 512,
            height: 512,
            device: if i % 2 == 0 { "cuda:0 RTX 3060" } else { "cpu" }.into(),
            ..Default::default()
        };
        let f = Fence {
            cell: c.id,
            attempt: c.attempt,
            worker: w,
        };
        fx.queue.complete(f, &r.to_json().unwrap()).await.unwrap();
    }
    let w2 = fx.worker("cpu-box").await;
    let c = fx.queue.lease(w2, 1, None).await.unwrap().remove(0);
    let f = Fence {
        cell: c.id,
        attempt: c.attempt,
        worker: w2,
    };
    fx.queue
        .fail(f, FailureClass::BadInput, "bad")
        .await
        .unwrap();
}

async fn all_rows(fx: &Fixture, names: &[(SweepId, &'static str)]) -> Vec<Row> {
    let rows = fx
        .queue
        .query(&CellQuery {
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap();
    rows.into_iter()
        .map(|row| Row {
            sweep: names.iter().find(|(id, _)| *id == row.sweep_id).unwrap().1,
            spec: serde_json::from_str(&row.spec_json).unwrap(),
            result: row
                .result_json
                .as_deref()
                .map(|j| RenderResult::from_json(j).unwrap()),
            row,
        })
        .collect()
}

/// Ids matching `filter` (sorted by `sort`, or by id).
async fn run(fx: &Fixture, filter: &str, sort: &str) -> Vec<i64> {
    let f = Filter::parse(filter).unwrap_or_else(|e| panic!("{filter}: {e}"));
    let sorts = parse_sort(sort).unwrap();
    let default_order = sorts.is_empty();
    let mut ids: Vec<i64> = fx
        .queue
        .query(&CellQuery {
            filter: Some(f),
            sorts,
            limit: 1000,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{filter}: {e}"))
        .iter()
        .map(|r| r.id.0)
        .collect();
    if default_order {
        ids.sort();
    }
    ids
}

/// Checks `filter` against the oracle `want`.
async fn check(fx: &Fixture, rows: &[Row], filter: &str, want: impl Fn(&Row) -> bool) {
    let expected: Vec<i64> = rows
        .iter()
        .filter(|r| want(r))
        .map(|r| r.row.id.0)
        .collect();
    let got = run(fx, filter, "").await;
    assert_eq!(got, expected, "filter: {filter}");
}

/// `s` as a number when written as a JSON number (with JSON whitespace around).
fn json_number(s: &str) -> Option<f64> {
    let t = s.trim_matches([' ', '\t', '\n', '\r']);
    let v: serde_json::Value = serde_json::from_str(t).ok()?;
    if v.is_number() || t.parse::<f64>().is_ok_and(f64::is_infinite) {
        t.parse().ok()
    } else {
        None
    }
}

async fn filters_match_the_oracle(b: Backend) {
    let fx = Fixture::new(b).await;
    let (s1, s2, s3) = seed_data(&fx).await;
    let rows = all_rows(&fx, &[(s1, "foxes"), (s2, "cats"), (s3, "evil")]).await;
    assert_eq!(rows.len(), 32);

    // The issue's example.
    check(
        &fx,
        &rows,
        r#"sweep = "foxes" and animal = "fox" and cfg >= 1.5 and seed between 1000 and 1100 and prompt ~ "forest""#,
        |r| {
            r.sweep == "foxes"
                && r.b("animal") == Some("fox")
                && r.row_cfg() >= 1.5
                && (1000..=1100).contains(&r.spec.seed)
                && r.spec.prompt.contains("forest")
        },
    )
    .await;
    let cases: Vec<(String, Oracle)> = vec![
        ("sweep = 'cats'".into(), Box::new(|r| r.sweep == "cats")),
        (format!("sweep = {}", s2.0), Box::new(|r| r.sweep == "cats")),
        ("sweep != 'cats'".into(), Box::new(|r| r.sweep != "cats")),
        ("sweep ~ 'ox'".into(), Box::new(|r| r.sweep == "foxes")),
        (
            format!("sweep in ('cats', {})", s3.0),
            Box::new(|r| r.sweep != "foxes"),
        ),
        ("sweep = 'nope'".into(), Box::new(|_| false)),
        (
            "animal = 'cat' or place = 'city'".into(),
            Box::new(|r| r.b("animal") == Some("cat") || r.b("place") == Some("city")),
        ),
        (
            "animal = 'cat' and (place = 'city' or seed < 1004)".into(),
            Box::new(|r| {
                r.b("animal") == Some("cat") && (r.b("place") == Some("city") || r.spec.seed < 1004)
            }),
        ),
        (
            "not animal = 'fox'".into(),
            Box::new(|r| r.b("animal") != Some("fox")),
        ),
        (
            "animal != 'fox'".into(),
            Box::new(|r| r.b("animal") != Some("fox")),
        ),
        (
            "not (animal = 'fox' or animal = 'cat')".into(),
            Box::new(|r| r.b("animal").is_none()),
        ),
        (
            "animal in ('fox', 'dog')".into(),
            Box::new(|r| r.b("animal") == Some("fox")),
        ),
        (
            "animal not in ('fox', 'cat')".into(),
            Box::new(|r| !matches!(r.b("animal"), Some("fox" | "cat"))),
        ),
        ("cfg = 1.5".into(), Box::new(|r| r.row_cfg() == 1.5)),
        ("cfg = 2".into(), Box::new(|r| r.row_cfg() == 2.0)),
        (
            "cfg between 1.2 and 2".into(),
            Box::new(|r| (1.2..=2.0).contains(&r.row_cfg())),
        ),
        (
            "seed not between 1001 and 5002".into(),
            Box::new(|r| !(1001..=5002).contains(&r.spec.seed)),
        ),
        (
            "seed in (1000, 1005, 5000, 99)".into(),
            Box::new(|r| [1000, 1005, 5000].contains(&r.spec.seed)),
        ),
        ("steps > 4".into(), Box::new(|r| r.spec.steps > 4)),
        ("steps <= 4".into(), Box::new(|r| r.spec.steps <= 4)),
        ("width = 512 and height = 512".into(), Box::new(|_| true)),
        ("number < 3".into(), Box::new(|r| r.row.number < 3)),
        (
            format!("id = {}", rows[5].row.id.0),
            Box::new({
                let id = rows[5].row.id;
                move |r| r.row.id == id
            }),
        ),
        (
            "model = 'tiny-sd15'".into(),
            Box::new(|r| r.spec.model == "tiny-sd15"),
        ),
        ("sampler = 'lcm'".into(), Box::new(|_| true)),
        (
            "negative ~ 'blur'".into(),
            Box::new(|r| r.spec.negative_prompt.contains("blur")),
        ),
        ("prompt ~ 'Forest'".into(), Box::new(|_| false)),
        (
            "prompt !~ 'forest'".into(),
            Box::new(|r| !r.spec.prompt.contains("forest")),
        ),
        ("state = 'available'".into(), Box::new(|_| true)),
        (
            "state in ('completed', 'running')".into(),
            Box::new(|_| false),
        ),
        ("attempt = 0".into(), Box::new(|_| true)),
        ("finished > 0".into(), Box::new(|_| false)),
        ("not finished > 0".into(), Box::new(|_| true)),
        (
            "`seed` = 1003".into(),
            Box::new(|r| r.b("seed") == Some("1003")),
        ),
        (
            "binding(\"seed\") >= 1020".into(),
            Box::new(|r| {
                r.b("seed")
                    .and_then(json_number)
                    .is_some_and(|v| v >= 1020.0)
            }),
        ),
        (
            "动物 = '狐狸'".into(),
            Box::new(|r| r.b("动物") == Some("狐狸")),
        ),
        (
            "动物 ~ '狐'".into(),
            Box::new(|r| r.b("动物") == Some("狐狸")),
        ),
        (
            "prompt ~ '✨ 狐'".into(),
            Box::new(|r| r.spec.prompt == EVIL_PROMPT),
        ),
        ("ANIMAL = 'cat'".into(), Box::new(|_| false)),
        ("missing ~ ''".into(), Box::new(|_| false)),
        ("animal ~ ''".into(), Box::new(|r| r.b("animal").is_some())),
    ];
    for (f, want) in &cases {
        check(&fx, &rows, f, want).await;
    }
    fx.finish().await;
}

impl Row {
    fn row_cfg(&self) -> f64 {
        self.spec.cfg_decimal()
    }
}

async fn hostile_input_is_data(b: Backend) {
    let fx = Fixture::new(b).await;
    let (s1, s2, s3) = seed_data(&fx).await;
    let rows = all_rows(&fx, &[(s1, "foxes"), (s2, "cats"), (s3, "evil")]).await;
    let evil = |r: &Row| r.spec.prompt == EVIL_PROMPT;
    let none = |_: &Row| false;
    let cases: Vec<(&str, &OracleFn)> = vec![
        (r#"prompt ~ "'; DROP TABLE cells; --""#, &none),
        (r#"prompt ~ "; DROP TABLE cells; --""#, &evil),
        (r#"prompt ~ '" OR 1=1 --'"#, &none),
        (r#"prompt ~ "' OR 1=1 --""#, &evil),
        (r#"prompt = "' OR '1'='1""#, &none),
        (r#"model = "x' OR '1'='1""#, &evil),
        (r#"model = 'x\' OR \'1\'=\'1'"#, &evil),
        (r#"prompt ~ "100% _""#, &evil),
        (r#"prompt ~ "%""#, &evil),
        (r#"prompt ~ "_""#, &evil),
        (r#"negative = "%_%""#, &evil),
        (r#"negative ~ "%""#, &evil),
        (r#"prompt ~ "\\ back\\slash""#, &evil),
        (r#"prompt ~ "\\\\""#, &none),
        (r#"prompt ~ '\"fox\"'"#, &evil),
        (r#"`we"ird' key` = 'va\'l"ue; --'"#, &evil),
        (r#"binding("we\"ird' key") ~ "; --""#, &evil),
        (r#"`'; DROP TABLE cells; --` = "x""#, &evil),
        (r#"binding("'); DROP TABLE cells; --") = "x""#, &none),
        (r#"`$.animal` = "path""#, &evil),
        (r#"`a[0]` = "bracket""#, &evil),
        (r#"`sp ace` = "%""#, &evil),
        (r#"`sp ace` ~ "%""#, &evil),
        (r#"`back\\slash` = "b\\s""#, &evil),
        (r#"`back\\slash` = "b\\\\s""#, &none),
        (r#"animal = "path""#, &none),
        (r#"sweep = "evil' OR 1=1 --""#, &none),
        (r#"worker = "x' OR 1=1 --""#, &none),
        (r#"prompt in ("' OR 1=1 --", "a fox")"#, &none),
    ];
    for (f, want) in cases {
        check(&fx, &rows, f, want).await;
    }
    // The longest filters accepted run on both backends (SQLite limits expression depth).
    let ors = (0..256)
        .map(|i| format!("seed = {}", 1000 + i))
        .collect::<Vec<_>>()
        .join(" or ");
    check(&fx, &rows, &ors, |r| (1000..1256).contains(&r.spec.seed)).await;
    let nested = format!("{}seed >= 1000{}", "not not (".repeat(21), ")".repeat(21));
    check(&fx, &rows, &nested, |r| r.spec.seed >= 1000).await;
    let list = (0..1000)
        .map(|i| (1000 + i).to_string())
        .collect::<Vec<_>>()
        .join(", ");
    check(&fx, &rows, &format!("seed in ({list})"), |r| {
        (1000..2000).contains(&r.spec.seed)
    })
    .await;
    // The tables are all still there, with every row.
    assert_eq!(run(&fx, "id > 0", "").await.len(), 32);
    assert_eq!(fx.queue.sweeps(10, None, None).await.unwrap().len(), 3);
    fx.finish().await;
}

async fn numeric_bindings(b: Backend) {
    let fx = Fixture::new(b).await;
    let (s1, s2, s3) = seed_data(&fx).await;
    let rows = all_rows(&fx, &[(s1, "foxes"), (s2, "cats"), (s3, "evil")]).await;
    let num = |k: &'static str| move |r: &Row| r.b(k).and_then(json_number);
    let cases: Vec<(&str, Oracle)> = vec![
        // "1.0" and "1.25" compare as numbers; "abc" never matches a number.
        (
            "strength = 1",
            Box::new(move |r| num("strength")(r) == Some(1.0)),
        ),
        (
            "strength >= 1.1",
            Box::new(move |r| num("strength")(r).is_some_and(|v| v >= 1.1)),
        ),
        (
            "strength < 1",
            Box::new(move |r| num("strength")(r).is_some_and(|v| v < 1.0)),
        ),
        (
            "strength between 1 and 2",
            Box::new(move |r| num("strength")(r).is_some_and(|v| (1.0..=2.0).contains(&v))),
        ),
        (
            "strength in (0.5, 2)",
            Box::new(move |r| matches!(num("strength")(r), Some(v) if v == 0.5 || v == 2.0)),
        ),
        // A string literal compares the text exactly.
        ("strength = '1'", Box::new(|r| r.b("strength") == Some("1"))),
        (
            "strength = '1.0'",
            Box::new(|r| r.b("strength") == Some("1.0")),
        ),
        (
            "strength = 'abc'",
            Box::new(|r| r.b("strength") == Some("abc")),
        ),
        (
            "strength in ('abc', 2)",
            Box::new(move |r| r.b("strength") == Some("abc") || num("strength")(r) == Some(2.0)),
        ),
        // JSON whitespace around a number is allowed; a leading zero is not a JSON number.
        ("strength = 7", Box::new(|r| r.b("strength") == Some(" 7 "))),
        ("n = 7", Box::new(|_| false)),
        ("n = '07'", Box::new(|r| r.b("n") == Some("07"))),
        ("big > 1e300", Box::new(|r| r.b("big").is_some())),
        ("neg < -2", Box::new(|r| r.b("neg").is_some())),
        ("neg = -2.5", Box::new(|r| r.b("neg").is_some())),
        (
            "not strength > 0",
            Box::new(move |r| !num("strength")(r).is_some_and(|v| v > 0.0)),
        ),
    ];
    for (f, want) in &cases {
        check(&fx, &rows, f, want).await;
    }
    fx.finish().await;
}

async fn sort_keys_order_and_tie_break(b: Backend) {
    let fx = Fixture::new(b).await;
    let (s1, s2, s3) = seed_data(&fx).await;
    let rows = all_rows(&fx, &[(s1, "foxes"), (s2, "cats"), (s3, "evil")]).await;
    let foxes: Vec<&Row> = rows.iter().filter(|r| r.sweep == "foxes").collect();

    let mut want: Vec<&Row> = foxes.clone();
    want.sort_by(|a, b| {
        a.row_cfg()
            .total_cmp(&b.row_cfg())
            .then(b.spec.seed.cmp(&a.spec.seed))
    });
    let want: Vec<i64> = want.iter().map(|r| r.row.id.0).collect();
    assert_eq!(run(&fx, "sweep = 'foxes'", "cfg,-seed").await, want);

    // Text sorts by code point; ties by id in the last key's direction.
    let mut want: Vec<&Row> = foxes.clone();
    want.sort_by(|a, b| {
        b.spec
            .prompt
            .as_bytes()
            .cmp(a.spec.prompt.as_bytes())
            .then(b.row.id.cmp(&a.row.id))
    });
    let want: Vec<i64> = want.iter().map(|r| r.row.id.0).collect();
    assert_eq!(run(&fx, "sweep = 'foxes'", "prompt desc").await, want);

    // Bindings: numbers by value, then other text, then missing.
    let key = |r: &Row| -> (u8, f64, String) {
        match r.b("strength") {
            Some(s) => match json_number(s) {
                Some(v) => (0, v, String::new()),
                None => (1, 0.0, s.to_string()),
            },
            None => (2, 0.0, String::new()),
        }
    };
    let mut want: Vec<&Row> = rows.iter().collect();
    want.sort_by(|a, b| {
        let (ka, kb) = (key(a), key(b));
        ka.0.cmp(&kb.0)
            .then(ka.1.total_cmp(&kb.1))
            .then(ka.2.as_bytes().cmp(kb.2.as_bytes()))
            .then(a.row.id.cmp(&b.row.id))
    });
    let want: Vec<i64> = want.iter().map(|r| r.row.id.0).collect();
    assert_eq!(run(&fx, "id > 0", "strength").await, want);

    // Mixed-case and unicode text order agrees across backends.
    let mut want: Vec<&Row> = rows.iter().collect();
    want.sort_by(|a, b| {
        a.spec
            .model
            .as_bytes()
            .cmp(b.spec.model.as_bytes())
            .then(b.row.number.cmp(&a.row.number))
            .then(b.row.id.cmp(&a.row.id))
    });
    let want: Vec<i64> = want.iter().map(|r| r.row.id.0).collect();
    assert_eq!(run(&fx, "id > 0", "model, -number").await, want);
    fx.finish().await;
}

async fn results_workers_and_states(b: Backend) {
    let fx = Fixture::new(b).await;
    let (s1, s2, s3) = seed_data(&fx).await;
    work_some(&fx, 5).await;
    let rows = all_rows(&fx, &[(s1, "foxes"), (s2, "cats"), (s3, "evil")]).await;
    let completed = |r: &Row| r.row.state == CellState::Completed;
    assert_eq!(rows.iter().filter(|r| completed(r)).count(), 5);
    let dev = |r: &Row| r.result.as_ref().map(|x| x.device.clone());
    let cases: Vec<(String, Oracle)> = vec![
        ("state = 'completed'".into(), Box::new(completed)),
        (
            "state = 'discarded'".into(),
            Box::new(|r| r.row.state == CellState::Discarded),
        ),
        (
            "state != 'available'".into(),
            Box::new(|r| r.row.state != CellState::Available),
        ),
        (
            "device ~ 'cuda'".into(),
            Box::new(move |r| dev(r).is_some_and(|d| d.contains("cuda"))),
        ),
        (
            "device = 'cpu'".into(),
            Box::new(move |r| dev(r).as_deref() == Some("cpu")),
        ),
        (
            "device != 'cpu'".into(),
            Box::new(move |r| dev(r).as_deref() != Some("cpu")),
        ),
        (
            format!("sha256 = '{:064x}'", 2),
            Box::new(|r| {
                r.result
                    .as_ref()
                    .is_some_and(|x| x.sha256 == format!("{:064x}", 2))
            }),
        ),
        ("object_key ~ '.png'".into(), Box::new(completed)),
        ("worker = 'gpu-box'".into(), Box::new(completed)),
        (
            "worker ~ 'box'".into(),
            Box::new(|r| r.row.worker.is_some()),
        ),
        ("worker = 'cpu-box'".into(), Box::new(|_| false)),
        (
            "not worker = 'gpu-box'".into(),
            Box::new(move |r| !completed(r)),
        ),
        ("attempt = 1".into(), Box::new(|r| r.row.attempt == 1)),
        (
            "finished >= '2023-11-14T22:13:22Z'".into(),
            Box::new(|r| r.row.finalized_at.is_some_and(|t| t >= 1_700_000_002_000)),
        ),
        (
            "finished between 1700000000000 and 1700000003000".into(),
            Box::new(|r| {
                r.row
                    .finalized_at
                    .is_some_and(|t| (1_700_000_000_000..=1_700_000_003_000).contains(&t))
            }),
        ),
    ];
    for (f, want) in &cases {
        check(&fx, &rows, f, want).await;
    }
    // Worker by id, and finished sorts missing values last in both directions.
    let gpu = rows
        .iter()
        .find(|r| completed(r))
        .unwrap()
        .row
        .worker
        .unwrap();
    check(&fx, &rows, &format!("worker = {}", gpu.0), completed).await;
    for sort in ["finished", "-finished"] {
        let got = run(&fx, "id > 0", sort).await;
        let finished: Vec<bool> = got
            .iter()
            .map(|id| {
                rows.iter()
                    .find(|r| r.row.id.0 == *id)
                    .unwrap()
                    .row
                    .finalized_at
                    .is_some()
            })
            .collect();
        assert_eq!(
            finished,
            (0..rows.len()).map(|i| i < 6).collect::<Vec<_>>(),
            "{sort}"
        );
    }
    let by: BTreeMap<i64, Option<i64>> = rows
        .iter()
        .map(|r| (r.row.id.0, r.row.finalized_at))
        .collect();
    let got = run(&fx, "finished > 0", "-finished").await;
    assert!(got.windows(2).all(|w| by[&w[0]] >= by[&w[1]]));
    fx.finish().await;
}

async fn sweep_names_resolve_to_every_sweep_of_that_name(b: Backend) {
    let fx = Fixture::new(b).await;
    let (s1, s2, s3) = seed_data(&fx).await;
    let mut again = submission("cats-again", vec![cell(9000), cell(9001)]);
    again.name = "cats".into();
    let s4 = fx.queue.submit(again).await.unwrap().id;
    let rows = all_rows(
        &fx,
        &[(s1, "foxes"), (s2, "cats"), (s3, "evil"), (s4, "cats")],
    )
    .await;
    let cats = |r: &Row| r.sweep == "cats";
    check(&fx, &rows, "sweep = 'cats'", cats).await;
    check(&fx, &rows, "sweep != 'cats'", |r| !cats(r)).await;
    check(&fx, &rows, "sweep in ('cats', 'nope')", cats).await;
    check(&fx, &rows, "sweep in ('cats', 'foxes')", |r| {
        r.sweep != "evil"
    })
    .await;
    check(&fx, &rows, "not sweep in ('nope')", |_| true).await;
    check(&fx, &rows, "sweep = 'cats' and seed >= 9001", |r| {
        cats(r) && r.spec.seed >= 9001
    })
    .await;
    check(
        &fx,
        &rows,
        &format!("sweep = {} or sweep = 'evil'", s4.0),
        |r| r.row.sweep_id == s4 || r.sweep == "evil",
    )
    .await;
    fx.finish().await;
}
