//! Helpers the process tests share: running `kiln` against a coordinator, reading JSON query
//! output, a worker process killed when the test ends, and comparing images.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use kiln_worker::engine::image::RgbImage;

/// The reference fixtures of the worker's tests (tiny models, LoRAs, reference images).
pub fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../worker/tests/fixtures/reference")
}

/// Runs `kiln ARGS` against the coordinator at `addr`; its stdout, after asserting success.
pub fn kiln(addr: &str, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_COORDINATOR", format!("http://{addr}"))
        .env("KILN_LOG", "warn")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "kiln {args:?} failed: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// Runs `kiln ARGS` against the coordinator at `addr`, which must fail; its stderr.
pub fn kiln_fails(addr: &str, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_COORDINATOR", format!("http://{addr}"))
        .env("KILN_LOG", "warn")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(!out.status.success(), "kiln {args:?} succeeded: {err}");
    err
}

/// A `kiln worker` process for the coordinator at `addr`, polling every 50 ms, writing to the
/// folder `storage` and reading models from `models`.
pub fn spawn_worker(addr: &str, storage: &Path, models: &[&Path]) -> Worker {
    Worker(
        worker_command(addr, storage, models)
            .env("KILN_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// The command [`spawn_worker`] runs, for a test to add to.
pub fn worker_command(addr: &str, storage: &Path, models: &[&Path]) -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.args(["worker", "--coordinator", &format!("http://{addr}")])
        .args(["--idle-poll-ms", "50"])
        .arg("--storage")
        .arg(format!("file://{}", storage.display()));
    for m in models {
        c.arg("--models").arg(m);
    }
    c
}

/// The rows of `kiln query … --format json` output.
pub fn json_rows(out: &str) -> Vec<serde_json::Value> {
    serde_json::from_str::<serde_json::Value>(out)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

/// A worker process, killed when the test ends however it ends.
pub struct Worker(pub std::process::Child);

impl Drop for Worker {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The largest difference of one channel of one pixel between two images of one size.
pub fn max_pixel_diff(a: &RgbImage, b: &RgbImage) -> u8 {
    assert_eq!((a.width, a.height), (b.width, b.height), "image sizes");
    a.pixels
        .iter()
        .zip(&b.pixels)
        .map(|(x, y)| x.abs_diff(*y))
        .max()
        .unwrap_or(0)
}
