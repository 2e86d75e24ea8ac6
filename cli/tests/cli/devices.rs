//! `kiln devices`, `kiln bench` and the start-up checks of `kiln worker` as processes: a device
//! or coordinator URL the worker cannot use stops it before it registers, with a message that
//! says what to do, instead of failing every cell it leases.

use std::path::Path;
use std::process::{Command, Output};

fn kiln(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .env("KILN_LOG", "warn")
        .output()
        .expect("run kiln")
}

fn text(out: &[u8]) -> String {
    String::from_utf8_lossy(out).into_owned()
}

#[test]
fn devices_lists_the_cpu_and_says_how_to_get_cuda() {
    let out = kiln(&["devices"]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let stdout = text(&out.stdout);
    let first = stdout.lines().next().unwrap_or_default();
    assert!(
        first.starts_with("cpu") && first.contains("threads"),
        "{stdout}"
    );
    if !cfg!(feature = "cuda") {
        assert!(
            stdout.contains("CUDA: not in this build") && stdout.contains("tools/gpu/build.sh"),
            "{stdout}"
        );
    }
}

/// The engine's thread count follows `--threads` / `KILN_THREADS` over `RAYON_NUM_THREADS`,
/// which applies when neither is given; 0 is refused.
#[test]
fn the_thread_count_follows_the_configuration() {
    let threads = |args: &[&str], env: &[(&str, &str)]| {
        let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(args)
            .env("KILN_LOG", "warn")
            .env_remove("KILN_THREADS")
            .env_remove("CANDLE_NUM_THREADS")
            .envs(env.iter().copied())
            .output()
            .expect("run kiln");
        assert!(out.status.success(), "{}", text(&out.stderr));
        let stdout = text(&out.stdout);
        let first = stdout.lines().next().unwrap_or_default().to_owned();
        first
            .split(", ")
            .find_map(|part| part.strip_suffix(" threads"))
            .and_then(|n| n.parse::<usize>().ok())
            .unwrap_or_else(|| panic!("no thread count in {first:?}"))
    };
    assert_eq!(threads(&["--threads", "3", "devices"], &[]), 3);
    assert_eq!(threads(&["devices"], &[("KILN_THREADS", "5")]), 5);
    assert_eq!(
        threads(
            &["devices", "--threads", "3"],
            &[("RAYON_NUM_THREADS", "7")]
        ),
        3
    );
    assert_eq!(threads(&["devices"], &[("RAYON_NUM_THREADS", "7")]), 7);
    let zero = kiln(&["--threads", "0", "devices"]);
    assert!(!zero.status.success());
}

#[cfg(not(feature = "cuda"))]
#[test]
fn a_worker_asked_for_cuda_on_a_cpu_build_stops_at_start() {
    use std::time::{Duration, Instant};
    // The coordinator address is a port nothing listens on: the worker must stop before it
    // tries to register, not retry there.
    let started = Instant::now();
    let out = kiln(&[
        "worker",
        "--device",
        "cuda:0",
        "--coordinator",
        "http://127.0.0.1:9",
    ]);
    assert_eq!(out.status.code(), Some(2));
    let stderr = text(&out.stderr);
    assert!(
        stderr.contains("cannot use device cuda:0: this kiln was built without CUDA support")
            && stderr.contains("tools/gpu/build.sh"),
        "{stderr}"
    );
    assert_eq!(stderr.matches("built without CUDA").count(), 1, "{stderr}");
    assert!(started.elapsed() < Duration::from_secs(30));
}

#[test]
fn a_malformed_coordinator_url_is_an_error_at_start() {
    for bad in ["not a url", "http://[::1"] {
        let out = kiln(&["worker", "--coordinator", bad]);
        assert_eq!(out.status.code(), Some(2), "{bad}");
        let stderr = text(&out.stderr);
        assert!(
            stderr.contains("--coordinator") && stderr.contains("is not a URL like http://"),
            "{bad}: {stderr}"
        );
        assert!(!stderr.contains("panicked"), "{bad}: {stderr}");
    }
}

#[test]
fn bench_reports_each_batch_size_as_json() {
    let model =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("../worker/tests/fixtures/reference/tiny-sd15");
    let out = kiln(&[
        "bench",
        "--model",
        model.to_str().unwrap(),
        "--size",
        "64",
        "--batch",
        "1,2",
        "--reps",
        "1",
        "--json",
    ]);
    assert!(out.status.success(), "{}", text(&out.stderr));
    let rows: Vec<serde_json::Value> = text(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).expect("one JSON object a line"))
        .collect();
    assert_eq!(rows.len(), 2);
    for (row, batch) in rows.iter().zip([1, 2]) {
        assert_eq!(row["batch"], batch);
        assert_eq!(row["device"], "cpu");
        assert!(row["images_per_s"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["unet_ms_per_step"].as_f64().unwrap() > 0.0, "{row}");
        assert!(row["vae_ms_per_image"].as_f64().unwrap() > 0.0, "{row}");
    }
}
