//! The Windows build of kiln (`x86_64-pc-windows-gnu`, cross-compiled with Debian's mingw-w64)
//! run under Wine, so the worker's Windows paths are exercised for real: drive letters (Wine's
//! `Z:` is `/`), spaces and non-ASCII characters in every folder, `\` separators. `kiln.exe
//! render` of the tiny model equals the Linux render; `kiln.exe worker` against a Linux
//! coordinator on loopback completes a sweep into a file store, and Ctrl-C drains it.
//!
//! The executable comes from `KILN_TEST_WINDOWS_EXE`, which `tools/test.sh` sets after
//! building it when the Windows target, mingw-w64 and Wine are installed (`.ci/run` installs
//! them). Without it these tests say so and pass, except under CI (`CI` set), where a missing
//! Windows build is a failure.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use kiln_worker::engine::image::decode_png;

use crate::spawn;
use crate::util::{Worker, fixtures, json_rows, kiln, max_pixel_diff};

/// Folder names with a space and non-ASCII characters, as Windows users' profiles have.
const ODD: &str = "kiln wine é ü 模型";

/// `kiln.exe`, or `None` (after saying why) when this machine has not built it.
fn windows_exe() -> Option<PathBuf> {
    match std::env::var_os("KILN_TEST_WINDOWS_EXE") {
        Some(p) => {
            let p = PathBuf::from(p);
            assert!(
                p.is_file(),
                "KILN_TEST_WINDOWS_EXE={} is no file",
                p.display()
            );
            Some(p)
        }
        None if std::env::var_os("CI").is_some() => {
            panic!("CI must run the Windows build under Wine: KILN_TEST_WINDOWS_EXE is not set")
        }
        None => {
            eprintln!(
                "wine tests skipped: KILN_TEST_WINDOWS_EXE is not set (tools/test.sh sets it \
                 when rustup's x86_64-pc-windows-gnu target, gcc-mingw-w64-x86-64 and wine are \
                 installed)"
            );
            None
        }
    }
}

/// A Wine prefix shared by the tests of one run, created once (it takes seconds, and two
/// tests creating it at the same time could race).
fn prefix() -> PathBuf {
    static READY: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    READY
        .get_or_init(|| {
            let p = Path::new(env!("CARGO_TARGET_TMPDIR")).join("wineprefix");
            std::fs::create_dir_all(&p).unwrap();
            let status = Command::new("wineboot")
                .arg("-i")
                .env("WINEPREFIX", &p)
                .env("WINEDEBUG", "-all")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .expect("wineboot (Debian: apt install wine64 wine)");
            assert!(status.success(), "wineboot -i: {status:?}");
            p
        })
        .clone()
}

/// `wine kiln.exe ARGS`.
fn wine(exe: &Path, args: &[&str]) -> Command {
    let mut c = Command::new("wine");
    c.arg(exe)
        .args(args)
        .env("WINEPREFIX", prefix())
        .env("WINEDEBUG", "-all")
        .env("KILN_LOG", "warn");
    c
}

/// The Windows name of a Linux path, through Wine's `Z:` drive: `Z:\tmp\x y\z`.
fn win(p: &Path) -> String {
    format!("Z:{}", p.display()).replace('/', "\\")
}

/// Copies a folder tree.
fn copy_tree(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap() {
        let e = e.unwrap();
        let target = to.join(e.file_name());
        if e.file_type().unwrap().is_dir() {
            copy_tree(&e.path(), &target);
        } else {
            std::fs::copy(e.path(), &target).unwrap();
        }
    }
}

/// The tiny model in a folder whose path has spaces and non-ASCII characters.
fn odd_models(dir: &Path) -> PathBuf {
    let models = dir.join(ODD).join("models dir");
    copy_tree(&fixtures().join("tiny-sd15"), &models.join("tiny-sd15"));
    models
}

const RENDER: &[&str] = &[
    "--prompt",
    "a photograph of an astronaut riding a horse",
    "--steps",
    "4",
    "--sampler",
    "lcm",
    "--seed",
    "42",
    "--width",
    "64",
    "--height",
    "64",
];

#[test]
fn the_windows_render_equals_the_linux_render() {
    let Some(exe) = windows_exe() else { return };
    let dir = tempfile::tempdir().unwrap();
    let models = odd_models(dir.path());
    let linux = dir.path().join("linux.png");
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("render")
        .arg("--model")
        .arg(models.join("tiny-sd15"))
        .args(RENDER)
        .arg("-o")
        .arg(&linux)
        .env("KILN_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    let windows = dir.path().join(ODD).join("out é.png");
    let model = win(&models.join("tiny-sd15"));
    let mut args = vec!["render", "--model", &model];
    args.extend_from_slice(RENDER);
    let target = win(&windows);
    args.extend(["-o", &target]);
    let out = wine(&exe, &args).output().unwrap();
    assert!(
        out.status.success(),
        "kiln.exe render: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let a = decode_png(&std::fs::read(&linux).unwrap()).unwrap().image;
    let b = decode_png(&std::fs::read(&windows).unwrap()).unwrap().image;
    let diff = max_pixel_diff(&a, &b);
    assert!(diff <= 1, "Windows and Linux renders differ by {diff}/255");
}

const SWEEP: &str = r#"
name = "wine"
model = "tiny-sd15"
prompt = "a photograph of an astronaut riding a horse"
size = "64x64"
steps = 4
seeds = [1, 2, 3]
"#;

#[test]
fn a_windows_worker_completes_a_sweep_from_a_linux_coordinator_and_drains_on_ctrl_c() {
    let Some(exe) = windows_exe() else { return };
    let dir = tempfile::tempdir().unwrap();
    let models = odd_models(dir.path());
    let store = dir.path().join(ODD).join("out dir");
    std::fs::create_dir_all(&store).unwrap();
    let db = format!("sqlite://{}", dir.path().join("kiln.db").display());
    let c = spawn(&db, dir.path());

    let mut worker = Worker(
        wine(
            &exe,
            &[
                "worker",
                "--coordinator",
                &format!("http://{}", c.addr),
                "--idle-poll-ms",
                "50",
                "--models",
                &win(&models),
                "--storage",
                &format!("file://{}", win(&store)),
                "--name",
                "wine-pc",
            ],
        )
        .env("KILN_LOG", "info")
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap(),
    );
    let file = dir.path().join("wine.toml");
    std::fs::write(&file, SWEEP).unwrap();
    kiln(&c.addr, &["submit", file.to_str().unwrap()]);
    let deadline = Instant::now() + Duration::from_secs(300);
    let cells = loop {
        let cells = json_rows(&kiln(
            &c.addr,
            &["query", r#"sweep = "wine""#, "--format", "json"],
        ));
        if cells.iter().all(|c| c["state"] == "completed") {
            break cells;
        }
        assert!(
            worker.0.try_wait().unwrap().is_none(),
            "the Windows worker exited"
        );
        assert!(Instant::now() < deadline, "not completed: {cells:?}");
        std::thread::sleep(Duration::from_millis(200));
    };
    assert_eq!(cells.len(), 3);
    for cell in &cells {
        // The worker names its storage as it knows it, a Windows path.
        assert!(
            cell["storage"].as_str().unwrap().starts_with("file://Z:"),
            "{cell}"
        );
        let png = std::fs::read(store.join(cell["object_key"].as_str().unwrap())).unwrap();
        let png = decode_png(&png).unwrap();
        assert_eq!((png.image.width, png.image.height), (64, 64));
    }
    let workers = kiln(&c.addr, &["workers"]);
    assert!(workers.contains("wine-pc"), "{workers}");

    // Ctrl-C: Wine turns SIGINT into a console Ctrl-C event; the worker drains and exits 0.
    let pid = worker.0.id().to_string();
    assert!(
        Command::new("kill")
            .args(["-INT", &pid])
            .status()
            .unwrap()
            .success()
    );
    let deadline = Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Some(s) = worker.0.try_wait().unwrap() {
            break s;
        }
        assert!(Instant::now() < deadline, "Ctrl-C did not stop the worker");
        std::thread::sleep(Duration::from_millis(100));
    };
    let mut log = String::new();
    std::io::Read::read_to_string(worker.0.stderr.as_mut().unwrap(), &mut log).unwrap();
    assert!(status.success(), "exit {status:?}: {log}");
    assert!(log.contains("Ctrl-C: shutting down"), "{log}");
}
