//! `kiln model add|list|rm` as processes against a real coordinator (`kiln coordinator
//! --model-storage s3://…`) and a real S3 server (s3s-fs) on loopback: the tiny reference
//! model uploaded and registered, stored once when added again; a big file whose multipart
//! upload was really interrupted (parts sent by the same upload code, then stopped) resumed
//! rather than started over; `list` and `rm`.

use std::path::Path;
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use kiln_worker::upload::{MIN_PART_BYTES, S3Store, Storage, Uploaded};
use sha2::{Digest, Sha256};

use crate::s3server::{ACCESS_KEY, S3Server, SECRET_KEY};
use crate::util::fixtures;

struct Proc(std::process::Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn coordinator(dir: &Path, storage: &str) -> (Proc, String) {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let child = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["coordinator", "--listen", &format!("127.0.0.1:{port}")])
        .args(["--model-storage", storage, "--no-web"])
        .env(
            "KILN_DB",
            format!("sqlite://{}", dir.join("kiln.db").display()),
        )
        .env("KILN_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(30);
    while std::net::TcpStream::connect(("127.0.0.1", port)).is_err() {
        assert!(Instant::now() < deadline, "coordinator did not start");
        std::thread::sleep(Duration::from_millis(20));
    }
    (Proc(child), format!("http://127.0.0.1:{port}"))
}

/// `kiln model ARGS` with the S3 server's endpoint and credentials.
fn model(addr: &str, s3: &S3Server, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("model")
        .args(args)
        .env("KILN_S3_ENDPOINT", &s3.endpoint)
        .env("KILN_S3_PATH_STYLE", "true")
        .env("KILN_COORDINATOR", addr)
        .env("KILN_S3_ACCESS_KEY", ACCESS_KEY)
        .env("KILN_S3_SECRET_KEY", SECRET_KEY)
        .env("KILN_LOG", "warn")
        .output()
        .unwrap()
}

fn ok(out: Output) -> String {
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "{}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn model_add_uploads_once_resumes_lists_and_removes() {
    let s3 = S3Server::start();
    let pool = S3Store::new("models".into(), "pool".into(), &s3.options()).unwrap();
    pool.create_bucket().await.unwrap();
    let storage = Storage::S3(pool.clone());
    let dir = tempfile::tempdir().unwrap();
    let (_coordinator, addr) = coordinator(dir.path(), "s3://models/pool");

    // The tiny reference model: uploaded, registered under its file stem.
    let tiny = fixtures().join("tiny-ldm.safetensors");
    let tiny_bytes = std::fs::read(&tiny).unwrap();
    let tiny_sha = sha(&tiny_bytes);
    let out = ok(model(&addr, &s3, &["add", tiny.to_str().unwrap()]));
    assert!(out.contains("uploaded"), "{out}");
    assert!(
        out.contains(&format!("registered tiny-ldm -> sha256:{tiny_sha}")),
        "{out}"
    );
    let key = format!("models/sha256/{tiny_sha}");
    assert_eq!(storage.get(&key).await.unwrap(), tiny_bytes);
    // Added again under another name: stored once, nothing sent.
    let out = ok(model(
        &addr,
        &s3,
        &["add", tiny.to_str().unwrap(), "--name", "tiny"],
    ));
    assert!(out.contains("stored already: not uploaded again"), "{out}");
    let objects = pool.list().await.unwrap();
    assert_eq!(
        objects,
        std::slice::from_ref(&key),
        "one object for one content"
    );

    // A file of three parts whose upload stopped after the first part, for real.
    let big = dir.path().join("big.safetensors");
    let size = 2 * MIN_PART_BYTES + 12345;
    let data: Vec<u8> = (0..size).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(&big, &data).unwrap();
    let big_key = format!("models/sha256/{}", sha(&data));
    let stopped = storage
        .put_file(&big_key, &big, size, Some(1), &|_| {})
        .await
        .unwrap();
    assert_eq!(
        stopped,
        Uploaded::Stopped {
            parts_done: 1,
            parts: 3
        }
    );
    assert!(storage.get(&big_key).await.is_err(), "not at the key yet");
    let out = ok(model(
        &addr,
        &s3,
        &[
            "add",
            big.to_str().unwrap(),
            "--name",
            "tiny",
            "--kind",
            "lora",
        ],
    ));
    assert!(
        out.contains(&format!(
            "resumed an interrupted upload: {MIN_PART_BYTES} of {size} bytes were there already"
        )),
        "{out}"
    );
    assert!(
        out.contains(&format!("re-pointed tiny (was sha256:{tiny_sha})")),
        "{out}"
    );
    assert_eq!(sha(&storage.get(&big_key).await.unwrap()), sha(&data));

    let listed = ok(model(&addr, &s3, &["list"]));
    let rows: Vec<Vec<&str>> = listed
        .lines()
        .skip(1)
        .map(|l| l.split_whitespace().collect())
        .collect();
    assert_eq!(
        rows,
        [
            vec!["tiny", "lora", &size.to_string(), &sha(&data)],
            vec![
                "tiny-ldm",
                "checkpoint",
                &tiny_bytes.len().to_string(),
                &tiny_sha
            ],
        ]
    );
    let out = ok(model(&addr, &s3, &["rm", "tiny-ldm"]));
    assert!(out.contains("The file stays in the model storage"), "{out}");
    let gone = model(&addr, &s3, &["rm", "tiny-ldm"]);
    assert!(!gone.status.success());
    assert!(
        String::from_utf8_lossy(&gone.stderr).contains("no registered model tiny-ldm"),
        "{}",
        String::from_utf8_lossy(&gone.stderr)
    );
    assert_eq!(storage.get(&key).await.unwrap().len(), tiny_bytes.len());
    let bad = model(
        &addr,
        &s3,
        &["add", tiny.to_str().unwrap(), "--name", "a/b"],
    );
    assert!(!bad.status.success());
}
