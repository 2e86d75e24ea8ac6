//! The `deploy/` folder as an administrator uses it: the systemd units pass `systemd-analyze
//! verify` (every key known, every referenced program present: the units' `/usr/local/bin/kiln`
//! is pointed at the binary under test), and the worker's environment file names only flags
//! `kiln worker` has. And the pool of `deploy/compose.yaml` end to end: `deploy/run-local.py`
//! starts its services (Postgres, Garage creating its bucket and key on first start, the
//! coordinator, the CPU worker of profile `cpu-worker`) natively from that file and a fresh
//! `.env`; the tiny checkpoint is added to the pool's model registry (in Garage), sweeps of a
//! model in the worker's folder and of that registry model are submitted, rendered by that
//! worker into the Garage bucket and fetched back with `kiln fetch`; then the script stops
//! every service and no process of theirs is left.
//!
//! That test needs the `garage` binary (2.5.0: `cargo install --locked garage@2.5.0`, which
//! `.ci/run` does), found as `KILN_TEST_GARAGE`, on `PATH` or in `~/.cargo/bin`, and Python
//! with PyYAML. Without them it fails; `KILN_TEST_DEPLOY=0` skips it, and says so.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use kiln_worker::engine::image::decode_png;

use crate::util::{fixtures, json_rows, kiln};

fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

#[test]
fn the_systemd_units_verify() {
    let dir = tempfile::tempdir().unwrap();
    let env_file = dir.path().join("worker.env");
    std::fs::copy(deploy().join("worker.env"), &env_file).unwrap();
    let mut units = Vec::new();
    for unit in ["kiln-coordinator.service", "kiln-worker.service"] {
        let text = std::fs::read_to_string(deploy().join(unit)).unwrap();
        assert!(text.contains("ExecStart=/usr/local/bin/kiln "), "{unit}");
        let text = text
            .replace("/usr/local/bin/kiln", env!("CARGO_BIN_EXE_kiln"))
            .replace("/etc/kiln/worker.env", env_file.to_str().unwrap());
        let path = dir.path().join(unit);
        std::fs::write(&path, text).unwrap();
        units.push(path);
    }
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .args(&units)
        .output()
        .expect("systemd-analyze (Debian: apt install systemd)");
    let stderr = String::from_utf8_lossy(&out.stderr);
    // Lines about the units under test; systemd may also complain about the host's own units.
    let ours: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains(dir.path().to_str().unwrap()) || l.contains("kiln-"))
        .collect();
    assert!(out.status.success() && ours.is_empty(), "{stderr}");
}

/// Every `KILN_*` variable in `deploy/worker.env` is one `kiln worker` reads: a misspelt name
/// would be ignored silently.
#[test]
fn the_worker_environment_file_names_real_settings() {
    let help = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["worker", "--help"])
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&help.stdout);
    let text = std::fs::read_to_string(deploy().join("worker.env")).unwrap();
    let names: Vec<&str> = text
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split_once('=').map(|(k, _)| k.trim()))
        .collect();
    assert!(names.len() >= 5, "{names:?}");
    for name in names {
        // The S3 credentials are read from the environment, not flags.
        if name == "KILN_S3_ACCESS_KEY" || name == "KILN_S3_SECRET_KEY" {
            continue;
        }
        assert!(
            help.contains(&format!("[env: {name}")),
            "{name} is not a `kiln worker` setting"
        );
    }
}

/// The `garage` binary, or `None` (after saying so) when `KILN_TEST_DEPLOY=0` skips the test.
fn garage() -> Option<PathBuf> {
    if std::env::var_os("KILN_TEST_DEPLOY").is_some_and(|v| v == "0") {
        eprintln!("deploy end-to-end test skipped: KILN_TEST_DEPLOY=0");
        return None;
    }
    let on_path = std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join("garage"))
            .find(|p| p.is_file())
    });
    let cargo_bin = std::env::var_os("HOME")
        .map(|h| PathBuf::from(h).join(".cargo/bin/garage"))
        .filter(|p| p.is_file());
    let found = std::env::var_os("KILN_TEST_GARAGE")
        .map(PathBuf::from)
        .or(on_path)
        .or(cargo_bin);
    Some(found.expect(
        "no `garage` binary for the deploy test: cargo install --locked garage@2.5.0 \
         (or KILN_TEST_GARAGE=PATH; KILN_TEST_DEPLOY=0 skips the test)",
    ))
}

/// `deploy/run-local.py` running; stopped with SIGTERM (as Ctrl-C would) when dropped, so a
/// failing test leaves no service behind.
struct Pool {
    child: Child,
    state: PathBuf,
}

impl Pool {
    /// SIGTERM, then waits (at most a minute) for the script to stop every service.
    fn stop(&mut self) -> std::process::ExitStatus {
        let pid = self.child.id().to_string();
        let _ = Command::new("kill").args(["-TERM", &pid]).status();
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("run-local.py did not stop within a minute of SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Every service's log, for a failure message.
    fn logs(&self) -> String {
        let mut out = String::new();
        for e in std::fs::read_dir(self.state.join("logs"))
            .into_iter()
            .flatten()
        {
            let p = e.unwrap().path();
            let text = std::fs::read_to_string(&p).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            out += &format!("--- {}\n", p.display());
            out.extend(tail.iter().rev().map(|l| format!("{l}\n")));
        }
        out
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            self.stop();
        }
    }
}

/// 64 random hex digits, or `n` of them.
fn hex(n: usize) -> String {
    (0..n.div_ceil(16))
        .map(|_| format!("{:016x}", rand::random::<u64>()))
        .collect::<String>()[..n]
        .to_string()
}

/// Every file under `dir`, recursively.
fn files_under(dir: &Path) -> Vec<PathBuf> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir).into_iter().flatten() {
        let p = e.unwrap().path();
        if p.is_dir() {
            out.extend(files_under(&p));
        } else {
            out.push(p);
        }
    }
    out
}

/// Processes still alive whose command line names `needle` (none should be, after a stop).
fn processes_naming(needle: &str) -> Vec<String> {
    std::fs::read_dir("/proc")
        .unwrap()
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains(needle))
        .collect()
}

#[test]
fn the_compose_services_render_a_sweep_into_garage() {
    let Some(garage) = garage() else { return };
    let dir = tempfile::tempdir().unwrap();
    // Postgres runs as its own user when the tests run as root: it must reach its volume.
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    }
    let (access, secret) = (format!("GK{}", hex(24)), hex(64));
    let env_file = dir.path().join(".env");
    std::fs::write(
        &env_file,
        format!(
            "POSTGRES_PASSWORD={}\nGARAGE_RPC_SECRET={}\nGARAGE_ADMIN_TOKEN={}\n\
             KILN_S3_ACCESS_KEY={access}\nKILN_S3_SECRET_KEY={secret}\n",
            hex(24),
            hex(64),
            hex(32)
        ),
    )
    .unwrap();
    let state = dir.path().join("state");
    let ready = dir.path().join("ready.json");
    let child = Command::new("python3")
        .arg(deploy().join("run-local.py"))
        .arg("--env-file")
        .arg(&env_file)
        .arg("--state")
        .arg(&state)
        .args(["--profile", "cpu-worker", "--free-ports"])
        .args(["--kiln", env!("CARGO_BIN_EXE_kiln")])
        .arg("--garage")
        .arg(&garage)
        .arg("--ready-file")
        .arg(&ready)
        .env("KILN_MODELS_DIR", fixtures())
        .spawn()
        .expect("python3");
    let mut pool = Pool { child, state };
    let deadline = Instant::now() + Duration::from_secs(240);
    while !ready.exists() {
        if let Some(status) = pool.child.try_wait().unwrap() {
            panic!(
                "run-local.py exited ({status}) before ready\n{}",
                pool.logs()
            );
        }
        assert!(Instant::now() < deadline, "not ready\n{}", pool.logs());
        std::thread::sleep(Duration::from_millis(200));
    }
    let ready: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(&ready).unwrap()).unwrap();
    let addr = format!("127.0.0.1:{}", ready["ports"]["coordinator"]["7450"]);
    let s3 = format!("http://127.0.0.1:{}", ready["ports"]["garage"]["3900"]);

    // `kiln` with Garage's endpoint and the key from `.env` (for `model add` and `fetch`).
    let kiln_s3 = |args: &[&str]| {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .args(["--s3-endpoint", &s3, "--s3-path-style"])
            .env("KILN_COORDINATOR", format!("http://{addr}"))
            .env("KILN_S3_ACCESS_KEY", &access)
            .env("KILN_S3_SECRET_KEY", &secret)
            .env("KILN_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "kiln {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };

    // One sweep of a model in the worker's models folder, one of a model uploaded to the
    // pool's registry (Garage, `s3://kiln` under `models/`), which the worker downloads.
    let ckpt = fixtures().join("tiny-ldm.safetensors");
    kiln_s3(&["model", "add", ckpt.to_str().unwrap(), "--name", "tiny"]);
    for (name, model, seeds) in [
        ("deployed", "tiny-sd15", "1, 2, 3"),
        ("registry", "tiny", "4"),
    ] {
        let sweep = dir.path().join(format!("{name}.toml"));
        std::fs::write(
            &sweep,
            format!(
                "name = \"{name}\"\nmodel = \"{model}\"\nprompt = \"a fox in the snow\"\n\
                 size = \"64x64\"\nsteps = 4\nseeds = [{seeds}]\n"
            ),
        )
        .unwrap();
        kiln(&addr, &["submit", sweep.to_str().unwrap()]);
    }
    let deadline = Instant::now() + Duration::from_secs(300);
    let cells = loop {
        let cells = json_rows(&kiln(
            &addr,
            &[
                "query",
                r#"sweep = "deployed" or sweep = "registry""#,
                "--format",
                "json",
            ],
        ));
        if cells.iter().all(|c| c["state"] == "completed") {
            break cells;
        }
        assert!(
            Instant::now() < deadline,
            "the sweeps did not finish: {cells:?}\n{}",
            pool.logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    assert_eq!(cells.len(), 4);
    // Rendered by the compose file's worker, into the bucket Garage made on its first start.
    let workers = kiln(&addr, &["workers"]);
    assert!(workers.contains("compose-cpu"), "{workers}");
    for c in &cells {
        assert!(
            c["storage"]
                .as_str()
                .unwrap()
                .starts_with("s3://kiln/renders"),
            "{c}"
        );
    }

    let out = dir.path().join("out");
    kiln_s3(&[
        "fetch",
        r#"sweep = "deployed" or sweep = "registry""#,
        "-o",
        out.to_str().unwrap(),
    ]);
    let pngs: Vec<PathBuf> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().path())
        .collect();
    assert_eq!(pngs.len(), 4, "{pngs:?}");
    for p in &pngs {
        let png = decode_png(&std::fs::read(p).unwrap()).unwrap();
        assert_eq!((png.image.width, png.image.height), (64, 64), "{p:?}");
    }

    // The registry model came to the worker through Garage, into its cache volume.
    let size = std::fs::metadata(&ckpt).unwrap().len();
    let cache = pool.state.join("volumes/worker-cache");
    assert!(
        files_under(&cache)
            .iter()
            .any(|f| std::fs::metadata(f).unwrap().len() == size),
        "no {size}-byte file in {}: {:?}",
        cache.display(),
        files_under(&cache)
    );

    let status = pool.stop();
    assert!(status.success(), "run-local.py: {status}\n{}", pool.logs());
    for (name, pid) in ready["pids"].as_object().unwrap() {
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists(),
            "{name} (pid {pid}) still runs"
        );
    }
    let left = processes_naming(dir.path().to_str().unwrap());
    assert!(left.is_empty(), "left running: {left:?}");
}
