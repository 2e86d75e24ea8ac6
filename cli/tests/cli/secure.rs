//! A pool run safely, as processes: `kiln cert` makes a CA and a certificate, `kiln token create`
//! makes an admin and a worker token, `kiln coordinator` serves TLS and requires tokens, a
//! `kiln worker` joins over https with its token, and every client command (submit, watch,
//! status, sweeps, query, fetch, workers, grid, plan, extend, pause, resume, cancel, retry)
//! works with the admin token, while the same commands
//! without a token, or over plain http, are refused with a clear error.

use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn kiln(args: &[&str], envs: &[(&str, &str)]) -> Output {
    let mut c = Command::new(env!("CARGO_BIN_EXE_kiln"));
    c.args(args).env("KILN_LOG", "warn");
    for (k, v) in envs {
        c.env(k, v);
    }
    c.output().unwrap()
}

fn ok(out: &Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "stdout: {stdout}\nstderr: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

#[test]
fn a_pool_with_tls_and_tokens_works_end_to_end_and_refuses_strangers() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let db = format!("sqlite://{}", d.join("kiln.db").display());
    let certs = d.join("certs");
    let certs_s = certs.to_str().unwrap();
    ok(&kiln(
        &[
            "cert",
            "--out",
            certs_s,
            "--host",
            "127.0.0.1",
            "--host",
            "localhost",
        ],
        &[],
    ));
    // A second run does not overwrite the CA by accident.
    assert!(
        !kiln(&["cert", "--out", certs_s, "--host", "127.0.0.1"], &[])
            .status
            .success()
    );
    let token = |scope: &str| {
        let out = kiln(
            &[
                "token", "create", "--owner", "me", "--scope", scope, "--name", scope,
            ],
            &[("KILN_DB", &db)],
        );
        ok(&out).trim().to_string()
    };
    let admin = token("admin");
    let worker_token = token("worker");
    assert!(admin.starts_with("kiln_") && admin != worker_token);
    let listed = ok(&kiln(&["token", "list"], &[("KILN_DB", &db)]));
    assert!(
        listed.contains("admin") && listed.contains("worker"),
        "{listed}"
    );
    assert!(!listed.contains(&admin), "a listing shows a secret");

    let addr_file = d.join("addr");
    let _coordinator = Proc(
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["coordinator", "--listen", "127.0.0.1:0", "--require-tokens"])
            .arg("--tls-cert")
            .arg(certs.join("server.pem"))
            .arg("--tls-key")
            .arg(certs.join("server.key"))
            .arg("--addr-file")
            .arg(&addr_file)
            .env("KILN_DB", &db)
            .env("KILN_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let deadline = Instant::now() + Duration::from_secs(30);
    let addr = loop {
        if let Ok(a) = std::fs::read_to_string(&addr_file)
            && !a.is_empty()
        {
            break a;
        }
        assert!(Instant::now() < deadline, "coordinator did not start");
        std::thread::sleep(Duration::from_millis(20));
    };
    let url = format!("https://{addr}");
    let ca = certs.join("ca.pem");
    let ca_s = ca.to_str().unwrap();
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../worker/tests/fixtures/reference");
    let _worker = Proc(
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["worker", "--coordinator", &url, "--tls-ca", ca_s])
            .args(["--idle-poll-ms", "20"])
            .arg("--storage")
            .arg(format!("file://{}", d.join("out").display()))
            .arg("--models")
            .arg(&fixtures)
            .env("KILN_TOKEN", &worker_token)
            .env("KILN_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    );

    let sweep_file = d.join("foxes.toml");
    std::fs::write(
        &sweep_file,
        "name = \"foxes\"\nmodel = \"tiny-sd15\"\nprompt = \"a {red|arctic} fox\"\n\
         steps = 2\nwidth = 64\nheight = 64\nseeds = { from = 1, count = 2 }\n",
    )
    .unwrap();
    let client = [
        ("KILN_COORDINATOR", url.as_str()),
        ("KILN_TLS_CA", ca_s),
        ("KILN_TOKEN", admin.as_str()),
    ];
    let submitted = ok(&kiln(&["submit", sweep_file.to_str().unwrap()], &client));
    assert!(submitted.contains("4 cells"), "{submitted}");
    ok(&kiln(&["watch", "1"], &client));
    // A sweep is named by its id or its name.
    let status = ok(&kiln(&["status", "foxes"], &client));
    assert!(status.contains("completed"), "{status}");
    assert!(ok(&kiln(&["sweeps"], &client)).contains("foxes"));
    let rows = ok(&kiln(
        &["query", "sweep = \"foxes\"", "--format", "csv"],
        &client,
    ));
    assert_eq!(
        rows.lines().filter(|l| l.contains("completed")).count(),
        4,
        "{rows}"
    );
    let fetched = d.join("fetched");
    let out = ok(&kiln(&["fetch", "-o", fetched.to_str().unwrap()], &client));
    assert!(out.contains("4 images"), "{out}");
    assert_eq!(std::fs::read_dir(&fetched).unwrap().count(), 4);
    assert!(ok(&kiln(&["workers"], &client)).contains("cpu"));
    let grid = d.join("grid.png");
    ok(&kiln(
        &[
            "grid",
            "sweep = 1",
            "--x",
            "alt1",
            "-o",
            grid.to_str().unwrap(),
        ],
        &client,
    ));
    assert!(grid.exists());
    let planned = ok(&kiln(&["plan", sweep_file.to_str().unwrap()], &client));
    assert!(planned.contains("4 cells"), "{planned}");
    // More seeds: extend adds only the new cells; pause, resume, retry and cancel answer.
    std::fs::write(
        &sweep_file,
        "name = \"foxes\"\nmodel = \"tiny-sd15\"\nprompt = \"a {red|arctic} fox\"\n\
         steps = 2\nwidth = 64\nheight = 64\nseeds = { from = 1, count = 3 }\n",
    )
    .unwrap();
    let extended = ok(&kiln(
        &["extend", "1", sweep_file.to_str().unwrap()],
        &client,
    ));
    assert!(extended.contains('2'), "{extended}");
    for cmd in [["pause", "foxes"], ["resume", "1"]] {
        ok(&kiln(&cmd, &client));
    }
    let unknown = kiln(&["cancel", "wolves"], &client);
    assert!(
        String::from_utf8_lossy(&unknown.stderr).contains("no sweep is named \"wolves\""),
        "{unknown:?}"
    );
    ok(&kiln(&["retry", "--failed", "1"], &client));
    ok(&kiln(&["cancel", "1"], &client));

    // Strangers: no token, a wrong one, plain http.
    let no_token = kiln(&["sweeps"], &client[..2]);
    assert!(!no_token.status.success());
    let e = String::from_utf8_lossy(&no_token.stderr);
    assert!(e.contains("requires a token"), "{e}");
    let wrong = kiln(&["sweeps", "--token", "kiln_nope"], &client[..2]);
    assert!(String::from_utf8_lossy(&wrong.stderr).contains("Unauthenticated"));
    let plain = kiln(
        &["sweeps", "--coordinator", &format!("http://{addr}")],
        &client[1..],
    );
    assert!(!plain.status.success());
    // The worker token cannot drive sweeps.
    let as_worker = kiln(&["sweeps", "--token", &worker_token], &client[..2]);
    assert!(String::from_utf8_lossy(&as_worker.stderr).contains("PermissionDenied"));
}
