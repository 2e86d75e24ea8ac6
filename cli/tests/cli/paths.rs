//! A worker reads only its own files: cells from the network that name a model or LoRA by an
//! absolute path, `..`, or a device are refused as bad input (not retried) with an error that
//! is the same whether the file exists or not, and the worker goes on rendering good cells;
//! `kiln status`, `kiln watch` and `kiln query` show those refusals to the user.

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kiln_proto::v1 as pb;

use crate::{clients, finished_cells, spawn, submit_cells};

struct Worker(Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// A 64x64 two-step LCM cell of `model`, with `lora` at strength 1 if given.
pub(crate) fn cell(seed: u64, model: &str, lora: Option<&str>) -> pb::RenderCell {
    pb::RenderCell {
        model: model.into(),
        loras: lora
            .map(|name| {
                vec![pb::LoraRef {
                    name: name.into(),
                    strength: 1.0,
                    sha256: String::new(),
                }]
            })
            .unwrap_or_default(),
        prompt: format!("a fox {seed}"),
        seed,
        steps: 2,
        cfg: 1.0,
        sampler: pb::Sampler::Lcm as i32,
        width: 64,
        height: 64,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cells_cannot_make_a_worker_read_outside_its_models_folders() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("kiln.db").display());
    let c = spawn(&db, dir.path());
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../worker/tests/fixtures/reference");
    // A file that exists, outside the models folder, next to one that does not.
    let secret = dir.path().join("secret.safetensors");
    std::fs::write(&secret, b"not for cells").unwrap();
    let secret = secret.to_str().unwrap().to_owned();
    let missing = dir.path().join("missing.safetensors");
    let missing = missing.to_str().unwrap().to_owned();
    let _worker = Worker(
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["worker", "--coordinator", &format!("http://{}", c.addr)])
            .args(["--idle-poll-ms", "20"])
            .arg("--storage")
            .arg(format!("file://{}", dir.path().join("out").display()))
            .arg("--models")
            .arg(&fixtures)
            .env("KILN_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let cells = vec![
        cell(1, "tiny-sd15", None),
        cell(2, "/etc/passwd", None),
        cell(3, "../../../../etc/passwd", None),
        cell(4, &secret, None),
        cell(5, &missing, None),
        cell(6, "tiny-sd15", Some("/dev/zero")),
        cell(7, "tiny-sd15", Some("../reference/lora_kohya")),
        cell(8, "tiny-sd15", Some("lora_kohya")),
    ];
    let (mut sweeps, _, _) = clients(&c.addr).await;
    let sweep = submit_cells(&mut sweeps, "paths", cells).await;
    let rows = finished_cells(&mut sweeps, sweep, Duration::from_secs(120)).await;
    assert_eq!(rows.len(), 8);
    let mut refusals = Vec::new();
    for row in rows {
        let seed = row.cell.as_ref().unwrap().seed;
        if matches!(seed, 1 | 8) {
            assert_eq!(row.state, pb::CellState::Completed as i32, "seed {seed}");
            continue;
        }
        assert_eq!(row.state, pb::CellState::Discarded as i32, "seed {seed}");
        // Bad input: one attempt, never retried on another worker.
        assert_eq!(row.errors.len(), 1, "seed {seed}: {:?}", row.errors);
        let e = &row.errors[0];
        assert_eq!(e.class, pb::FailureClass::BadInput as i32, "seed {seed}");
        assert!(e.message.contains("refused"), "seed {seed}: {}", e.message);
        assert!(
            !e.message.contains("not found"),
            "seed {seed}: {}",
            e.message
        );
        refusals.push(e.message.clone());
    }
    // The existing and the missing file outside get the same words, but for the name itself.
    let existing = refusals.iter().find(|m| m.contains(&secret)).unwrap();
    let absent = refusals.iter().find(|m| m.contains(&missing)).unwrap();
    assert_eq!(
        existing.replace(&secret, "X"),
        absent.replace(&missing, "X")
    );

    // The reasons are shown where the user is: `kiln status` groups them, `kiln query` lists
    // each one.
    let kiln = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .env("KILN_COORDINATOR", format!("http://{}", c.addr))
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let status = kiln(&["status", &sweep.to_string()]);
    assert!(
        status.contains("6 discarded")
            && status.contains("× bad input: ")
            && status.contains("refused"),
        "{status}"
    );
    let watched = kiln(&["watch", &sweep.to_string()]);
    assert!(watched.contains("cells fail with bad input: "), "{watched}");
    let filter = format!("sweep = {sweep}");
    let json = kiln(&["query", &filter, "--format", "json"]);
    assert_eq!(
        json.matches("\"error\": \"bad input: ").count(),
        6,
        "{json}"
    );
    let table = kiln(&["query", &filter]);
    assert!(
        table.contains("LAST ERROR") && table.contains("refused"),
        "{table}"
    );
}
