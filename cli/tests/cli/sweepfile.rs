//! Sweep files end to end with real processes: `kiln plan`, `submit`, `watch`, `query` in every
//! format, `extend` (only the new cells run), `fetch`, `grid`, and `kiln run` (the README quick start,
//! interrupted with SIGKILL and resumed).

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use crate::spawn;
use crate::util::{fixtures, json_rows, kiln, spawn_worker};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn sweep_file(seeds: u32) -> String {
    format!(
        r#"name = "foxes"
model = "tiny-sd15"
loras = [{{ name = "lora_kohya", strength = 1.0 }}]
prompt = "a {{red|arctic}} fox in a forest"
steps = 4
width = 64
height = 64
seeds = {{ from = 1, count = {seeds} }}

[axes]
cfg = [1.0, 1.5]
"#
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn plan_submit_watch_query_extend_fetch() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("kiln.db").display());
    let c = spawn(&db, dir.path());
    let out_dir = dir.path().join("out");
    let worker = spawn_worker(&c.addr, &out_dir, &[&fixtures()]);

    let file = dir.path().join("foxes.toml");
    std::fs::write(&file, sweep_file(2)).unwrap();
    let f = file.to_str().unwrap();
    let out = kiln(&c.addr, &["plan", f]);
    assert!(
        out.contains("8 cells") && out.contains("axes: [cfg]"),
        "{out}"
    );
    // Planned here, it needs no coordinator, and says what the coordinator says.
    assert_eq!(kiln("127.0.0.1:9", &["plan", f]), out);
    assert_eq!(kiln(&c.addr, &["plan", f, "--remote"]), out);
    let out = kiln(&c.addr, &["submit", f]);
    assert!(out.contains("sweep 1 submitted: 8 cells"), "{out}");
    let out = kiln(&c.addr, &["submit", f]);
    assert!(out.contains("already submitted"), "{out}");
    kiln(&c.addr, &["watch", "1"]);

    let rows = json_rows(&kiln(
        &c.addr,
        &[
            "query",
            r#"sweep = "foxes" and cfg = 1.5 and alt1 = "red""#,
            "--format",
            "json",
        ],
    ));
    assert_eq!(rows.len(), 2);
    assert!(
        rows.iter()
            .all(|r| r["state"] == "completed" && r["bindings"]["alt1"] == "red")
    );
    let csv = kiln(
        &c.addr,
        &[
            "query",
            "sweep = 1",
            "--format",
            "csv",
            "--sort",
            "cfg,-seed",
        ],
    );
    let lines: Vec<&str> = csv.lines().collect();
    assert_eq!(lines.len(), 9, "{csv}");
    assert!(lines[0].starts_with("cell,sweep,number,state"));
    let table = kiln(&c.addr, &["query", "seed = 2 and cfg = 1"]);
    assert_eq!(table.lines().count(), 3, "{table}");
    assert!(table.contains("completed"));
    // Injection attempts are literals: they match nothing and break nothing.
    let none = json_rows(&kiln(
        &c.addr,
        &[
            "query",
            r#"prompt ~ "'; DROP TABLE cells; --""#,
            "--format",
            "json",
        ],
    ));
    assert!(none.is_empty());
    assert_eq!(
        json_rows(&kiln(&c.addr, &["query", "", "--format", "json"])).len(),
        8
    );

    // The file grows by one seed: a plain submit says the sweep exists and how to go on...
    std::fs::write(&file, sweep_file(3)).unwrap();
    let refused = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["submit", f])
        .env("KILN_COORDINATOR", format!("http://{}", c.addr))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{err}");
    assert!(
        err.contains("a sweep named \"foxes\" exists (sweep 1)")
            && err.contains("kiln submit --extend")
            && err.contains("kiln submit --new"),
        "{err}"
    );
    // ... and --extend adds only the 4 new cells, which alone are rendered.
    let out = kiln(&c.addr, &["submit", "--extend", f]);
    assert!(out.contains("4 new cells added, 12 cells in all"), "{out}");
    let out = kiln(&c.addr, &["extend", "foxes", f]);
    assert!(out.contains("0 new cells added, 12 cells in all"), "{out}");
    kiln(&c.addr, &["watch", "1"]);
    let rows = json_rows(&kiln(&c.addr, &["query", "sweep = 1", "--format", "json"]));
    assert_eq!(rows.len(), 12);
    assert!(
        rows.iter()
            .all(|r| r["state"] == "completed" && r["attempt"] == 1),
        "no cell ran twice"
    );

    let fetched = dir.path().join("fetched");
    let out = kiln(
        &c.addr,
        &[
            "fetch",
            "sweep = 1 and seed = 3",
            "-o",
            fetched.to_str().unwrap(),
        ],
    );
    assert!(out.contains("4 images written"), "{out}");
    assert_eq!(std::fs::read_dir(&fetched).unwrap().count(), 4);

    let grid = dir.path().join("grid.png");
    let out = kiln(
        &c.addr,
        &[
            "grid",
            "sweep = 1 and seed = 1",
            "--x",
            "cfg",
            "--y",
            "alt1",
            "-o",
            grid.to_str().unwrap(),
        ],
    );
    assert!(out.contains("2x2 grid (4 images)"), "{out}");
    let png = kiln_worker::engine::image::decode_png(&std::fs::read(&grid).unwrap()).unwrap();
    assert!(png.image.width > 2 * 64 && png.image.height > 2 * 64);
    if let Ok(keep) = std::env::var("KILN_TEST_KEEP_GRID") {
        std::fs::copy(&grid, keep).unwrap();
    }

    drop(worker);
}

#[test]
fn kiln_run_quick_start_resumes_after_a_kill() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("kiln.db").display());
    let out = dir.path().join("kiln-out");
    let run = || {
        let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
        c.args(["run", "examples/tiny.toml", "--db", &db])
            .arg("--storage")
            .arg(format!("file://{}", out.display()))
            .current_dir(repo())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        c
    };
    // First run: killed as soon as the first image lands.
    let mut first = run().spawn().unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let pngs = |dir: &Path| -> usize {
        walk(dir)
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "png"))
            .count()
    };
    while pngs(&out) == 0 && Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(10));
    }
    let _ = first.kill();
    let _ = first.wait();
    // Second run: resumes and finishes.
    let second = run().output().unwrap();
    let err = String::from_utf8_lossy(&second.stderr);
    assert!(second.status.success(), "{err}");
    assert!(err.contains("resuming") && err.contains("done"), "{err}");
    assert_eq!(pngs(&out), 8, "every cell rendered once");
}

fn walk(dir: &Path) -> Vec<PathBuf> {
    let Ok(rd) = std::fs::read_dir(dir) else {
        return Vec::new();
    };
    rd.flatten()
        .flat_map(|e| {
            let p = e.path();
            if p.is_dir() { walk(&p) } else { vec![p] }
        })
        .collect()
}

/// A wildcard file past the old 4 MiB message limit plans (it is within the documented 16 MiB),
/// and one past 16 MiB is refused by the CLI with the file's name, before anything is sent.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn large_referenced_files_are_sent_or_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("kiln.db").display());
    let c = spawn(&db, dir.path());
    let sweep = dir.path().join("big.toml");
    std::fs::write(
        &sweep,
        "name = \"big\"\nmodel = \"tiny-sd15\"\nprompt = \"a __animal__\"\nseeds = [1]\n\
         [wildcards]\nanimal = \"animals.txt\"\n",
    )
    .unwrap();
    // About 6 MiB: 400,000 lines of 15 bytes.
    let animals: String = (0..400_000).map(|i| format!("animal {i:07}\n")).collect();
    std::fs::write(dir.path().join("animals.txt"), &animals).unwrap();
    let big = sweep.to_str().unwrap();
    let out = kiln(&c.addr, &["plan", big, "--show", "1", "--remote"]);
    assert!(out.contains("400000") || out.contains("400,000"), "{out}");

    let huge: String = (0..1_200_000).map(|i| format!("animal {i:07}\n")).collect();
    std::fs::write(dir.path().join("animals.txt"), &huge).unwrap();
    let failed = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["plan", sweep.to_str().unwrap()])
        .env("KILN_COORDINATOR", format!("http://{}", c.addr))
        .output()
        .unwrap();
    assert!(!failed.status.success());
    let err = String::from_utf8_lossy(&failed.stderr);
    assert!(
        err.contains("referenced file \"animals.txt\" is 17.2 MiB, at most 16 MiB"),
        "{err}"
    );
}

/// Ctrl-C (SIGINT) and SIGTERM on `kiln run` end it within 10 s at five moments (during submit,
/// while rendering, while uploading, while the embedded coordinator stops, twice in a row), and
/// the next run finishes the sweep with every cell completed exactly once.
#[cfg(unix)]
#[test]
fn kiln_run_stops_within_seconds_on_ctrl_c_and_resumes() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("kiln.db").display());
    let out = dir.path().join("kiln-out");
    let sweep = dir.path().join("slow.toml");
    std::fs::write(
        &sweep,
        format!(
            "name = \"slow\"\nmodel = \"{}\"\nprompt = \"a fox\"\nsteps = 8\nwidth = 256\nheight = 256\n\
             seeds = {{ from = 1, count = 4 }}\n",
            fixtures().join("tiny-sd15").display()
        ),
    )
    .unwrap();
    let run = || {
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["run", sweep.to_str().unwrap(), "--db", &db])
            .arg("--storage")
            .arg(format!("file://{}", out.display()))
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap()
    };
    let signal = |pid: u32, sig: &str| {
        Command::new("kill")
            .args([sig, &pid.to_string()])
            .status()
            .unwrap();
    };
    let wait = |mut child: std::process::Child, limit: Duration| {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                let mut err = String::new();
                std::io::Read::read_to_string(&mut child.stderr.take().unwrap(), &mut err).unwrap();
                return (status, err);
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("kiln run did not stop within {limit:?}");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    };
    let pngs = |dir: &Path| -> usize {
        walk(dir)
            .iter()
            .filter(|p| p.extension().is_some_and(|e| e == "png"))
            .count()
    };
    // Five moments, SIGINT and SIGTERM: each run ends within 10 s of its first signal.
    type Moment<'a> = (&'a str, &'a dyn Fn(u32));
    let after = |ms: u64, sig: &'static str| {
        move |pid: u32| {
            std::thread::sleep(Duration::from_millis(ms));
            signal(pid, sig);
        }
    };
    let during_submit = after(30, "-INT");
    let while_rendering = after(1500, "-TERM");
    let while_uploading = |pid: u32| {
        // The moment an image lands: its upload is done, its Complete is on the way.
        let before = pngs(&out);
        let deadline = Instant::now() + Duration::from_secs(120);
        while pngs(&out) == before && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(5));
        }
        signal(pid, "-INT");
    };
    let while_coordinator_stops = |pid: u32| {
        // The embedded coordinator begins to stop on the first signal; the second comes while
        // it does, and the worker must not wait on it.
        std::thread::sleep(Duration::from_millis(1500));
        signal(pid, "-TERM");
        std::thread::sleep(Duration::from_millis(30));
        signal(pid, "-TERM");
    };
    let twice = |pid: u32| {
        std::thread::sleep(Duration::from_millis(1500));
        signal(pid, "-INT");
        std::thread::sleep(Duration::from_millis(100));
        signal(pid, "-INT");
    };
    let moments: [Moment; 5] = [
        ("during submit", &during_submit),
        ("while rendering", &while_rendering),
        ("while uploading", &while_uploading),
        ("while the coordinator stops", &while_coordinator_stops),
        ("twice in a row", &twice),
    ];
    for (moment, stop) in moments {
        let child = run();
        let pid = child.id();
        stop(pid);
        let stopped_at = Instant::now();
        let (status, err) = wait(child, Duration::from_secs(10));
        assert!(
            stopped_at.elapsed() < Duration::from_secs(10),
            "{moment}: {err}"
        );
        eprintln!("{moment}: stopped in {:?} ({status})", stopped_at.elapsed());
    }
    // Then to the end: every cell rendered.
    let (status, err) = wait(run(), Duration::from_secs(300));
    assert!(status.success(), "{err}");
    assert!(err.contains("done"), "{err}");
    let cells_with_an_image = std::fs::read_dir(out.join("sweeps/1"))
        .unwrap()
        .flatten()
        .filter(|cell| {
            walk(&cell.path())
                .iter()
                .any(|p| p.extension().is_some_and(|e| e == "png"))
        })
        .count();
    assert_eq!(cells_with_an_image, 4);
    // Exactly once: each cell completed once, by one attempt whose image is there.
    let c = spawn(&db, dir.path());
    let rows = json_rows(&kiln(&c.addr, &["query", "sweep = 1", "--format", "json"]));
    assert_eq!(rows.len(), 4);
    let mut keys = std::collections::HashSet::new();
    for r in &rows {
        assert_eq!(r["state"], "completed", "{r}");
        let key = r["object_key"].as_str().unwrap();
        assert!(out.join(key).is_file(), "{key}");
        assert!(keys.insert(key.to_owned()), "{key} twice");
    }
}
