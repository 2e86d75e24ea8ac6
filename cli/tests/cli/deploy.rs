//! The `deploy/` folder as an administrator uses it: the systemd units pass `systemd-analyze
//! verify` (every key known, every referenced program present: the units' `/usr/local/bin/kiln`
//! is pointed at the binary under test), and the worker's environment file names only flags
//! `kiln worker` has.

use std::path::{Path, PathBuf};
use std::process::Command;

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
