//! The disk model cache against a real S3 server (s3s-fs on loopback) and real files: objects
//! read in order from any offset, resumed
//! downloads after a real interruption, verification before a blob exists, corruption found
//! and fetched again, the budget and eviction, and two processes sharing one cache folder
//! (this test binary run again as a child, see [`child`]).

use std::io::{BufRead, BufReader, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use kiln_worker::cache::disk::{DiskCache, DiskError, model_key};
use kiln_worker::upload::{S3Options, S3Store, Storage};
use sha2::{Digest, Sha256};

use crate::s3server::{ACCESS_KEY, S3Server, SECRET_KEY};

const MB: usize = 1 << 20;

/// `n` bytes that differ per `seed`, and their sha256.
fn content(n: usize, seed: u64) -> (Vec<u8>, String) {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    let bytes: Vec<u8> = (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    let hex = hex::encode(Sha256::digest(&bytes));
    (bytes, hex)
}

fn options(endpoint: &str) -> S3Options {
    S3Options {
        endpoint: Some(endpoint.to_string()),
        region: Some("us-east-1".into()),
        path_style: true,
        access_key: Some(ACCESS_KEY.into()),
        secret_key: Some(SECRET_KEY.into()),
    }
}

async fn bucket(endpoint: &str) -> Storage {
    let o = options(endpoint);
    S3Store::new("models".into(), "pool".into(), &o)
        .unwrap()
        .create_bucket()
        .await
        .unwrap();
    Storage::open(&"s3://models/pool".parse().unwrap(), &o)
        .await
        .unwrap()
}

async fn upload(storage: &Storage, bytes: &[u8], hex: &str) {
    storage.put(&model_key(hex), bytes.to_vec()).await.unwrap();
}

fn none(_: u64, _: u64) {}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_download_is_verified_before_it_exists_and_then_a_hit() {
    let server = S3Server::start();
    let storage = bucket(&server.endpoint).await;
    let (bytes, hex) = content(3 * MB + 17, 1);
    upload(&storage, &bytes, &hex).await;
    let dir = tempfile::tempdir().unwrap();
    let cache = DiskCache::open(dir.path().to_path_buf(), 1 << 40).unwrap();
    let blob_path = cache.blob_path(&hex);
    let seen = Mutex::new(Vec::new());
    // While bytes arrive, only the partial file exists: nothing looks complete.
    let watch = |done: u64, size: u64| {
        assert!(!blob_path.exists(), "a blob exists before verification");
        assert!(!cache.named_path(&hex, "m.safetensors").exists());
        seen.lock().unwrap().push((done, size));
    };
    let blob = cache
        .ensure(&hex, "m.safetensors", &storage, &watch)
        .await
        .unwrap();
    assert_eq!(std::fs::read(blob.path()).unwrap(), bytes);
    assert_eq!(blob.path(), cache.named_path(&hex, "m.safetensors"));
    assert!(!cache.partial_path(&hex).exists());
    let seen = seen.into_inner().unwrap();
    assert!(seen.len() > 1, "progress is reported as bytes arrive");
    assert_eq!(
        *seen.last().unwrap(),
        (bytes.len() as u64, bytes.len() as u64)
    );
    let stats = cache.stats();
    assert_eq!((stats.downloads, stats.hits), (1, 0));
    assert_eq!(stats.downloaded_bytes, bytes.len() as u64);
    assert_eq!(cache.held(), std::slice::from_ref(&hex));
    drop(blob);
    // Again under another name: no bytes move.
    let again = cache
        .ensure(&hex, "other.safetensors", &storage, &none)
        .await
        .unwrap();
    assert_eq!(std::fs::read(again.path()).unwrap(), bytes);
    assert_eq!(cache.stats().hits, 1);
    assert_eq!(cache.stats().downloaded_bytes, bytes.len() as u64);

    // Not in the storage, or stored with other bytes than its name says.
    let (_, absent) = content(10, 2);
    let e = cache
        .ensure(&absent, "x", &storage, &none)
        .await
        .unwrap_err();
    assert!(matches!(e, DiskError::Missing { .. }), "{e}");
    let (wrong, _) = content(1000, 3);
    upload(&storage, &wrong, &absent).await;
    let e = cache
        .ensure(&absent, "x", &storage, &none)
        .await
        .unwrap_err();
    assert!(matches!(e, DiskError::Mismatch { .. }), "{e}");
    assert!(!cache.blob_path(&absent).exists());
    assert!(!cache.partial_path(&absent).exists());
    assert_eq!(
        cache.stats().downloaded_bytes,
        bytes.len() as u64 + 2 * 1000,
        "fetched once more from scratch, then an error"
    );
}

/// Objects are read as several ranged GETs in flight at once: the chunks still come in order,
/// from any offset, and end where the object ends.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn objects_are_read_whole_and_in_order_from_any_offset() {
    let server = S3Server::start();
    let storage = bucket(&server.endpoint).await;
    let (bytes, hex) = content(41 * MB + 3, 7);
    upload(&storage, &bytes, &hex).await;
    for offset in [0, 1, 5 * MB + 1, 8 * MB, 41 * MB + 2, 41 * MB + 3] {
        let mut reader = storage
            .read_from(&model_key(&hex), offset as u64)
            .await
            .unwrap();
        assert_eq!(reader.size, bytes.len() as u64);
        let mut got = Vec::new();
        let mut chunks = 0;
        while let Some(chunk) = reader.next_chunk().await.unwrap() {
            got.extend_from_slice(&chunk);
            chunks += 1;
        }
        assert!(
            got == bytes[offset..],
            "offset {offset}: {} bytes differ",
            got.len()
        );
        if bytes.len() - offset > 16 * MB {
            assert!(chunks > 2, "offset {offset}: read in parts, got {chunks}");
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_interrupted_download_resumes_where_it_stopped() {
    let server = Mutex::new(S3Server::start());
    let endpoint = server.lock().unwrap().endpoint.clone();
    let storage = bucket(&endpoint).await;
    // Larger than the GETs in flight at the kill (8 parts of 8 MiB, and the one started
    // after the first part was taken), so some are asked for after it.
    let (bytes, hex) = content(128 * MB, 4);
    upload(&storage, &bytes, &hex).await;
    let dir = tempfile::tempdir().unwrap();
    let cache = DiskCache::open(dir.path().to_path_buf(), 1 << 40).unwrap();
    // The server dies (SIGKILL) a few MB into the download.
    let kill = |done: u64, _: u64| {
        if done >= 4 * MB as u64 {
            server.lock().unwrap().stop();
        }
    };
    let e = cache
        .ensure(&hex, "m.safetensors", &storage, &kill)
        .await
        .unwrap_err();
    assert!(matches!(e, DiskError::Storage(_)), "{e}");
    assert!(!cache.blob_path(&hex).exists());
    let kept = std::fs::metadata(cache.partial_path(&hex)).unwrap().len();
    assert!(
        kept >= 4 * MB as u64 && kept < bytes.len() as u64,
        "kept {kept} bytes"
    );
    assert_eq!(
        &std::fs::read(cache.partial_path(&hex)).unwrap()[..],
        &bytes[..kept as usize]
    );

    server.lock().unwrap().resume();
    // A new process's cache: it finds the partial file and fetches only the rest.
    let resumed = DiskCache::open(dir.path().to_path_buf(), 1 << 40).unwrap();
    let blob = resumed
        .ensure(&hex, "m.safetensors", &storage, &none)
        .await
        .unwrap();
    assert_eq!(resumed.stats().downloaded_bytes, bytes.len() as u64 - kept);
    assert_eq!(std::fs::read(blob.path()).unwrap(), bytes);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_flipped_byte_is_found_and_the_file_fetched_again() {
    let server = S3Server::start();
    let storage = bucket(&server.endpoint).await;
    let (bytes, hex) = content(2 * MB, 5);
    upload(&storage, &bytes, &hex).await;
    let dir = tempfile::tempdir().unwrap();
    let cache = DiskCache::open(dir.path().to_path_buf(), 1 << 40).unwrap();
    drop(
        cache
            .ensure(&hex, "m.safetensors", &storage, &none)
            .await
            .unwrap(),
    );
    // Let the clock move past the recorded modification time, then flip one byte in place.
    std::thread::sleep(Duration::from_millis(20));
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(cache.blob_path(&hex))
        .unwrap();
    f.seek(SeekFrom::Start(12345)).unwrap();
    f.write_all(&[bytes[12345] ^ 0x01]).unwrap();
    drop(f);
    let blob = cache
        .ensure(&hex, "m.safetensors", &storage, &none)
        .await
        .unwrap();
    assert_eq!(std::fs::read(blob.path()).unwrap(), bytes, "fetched again");
    let stats = cache.stats();
    assert_eq!((stats.corrupt, stats.downloads), (1, 2));
    assert_eq!(stats.downloaded_bytes, 2 * bytes.len() as u64);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn eviction_keeps_the_budget_and_never_a_file_in_use() {
    let server = S3Server::start();
    let storage = bucket(&server.endpoint).await;
    let size = MB;
    let files: Vec<(Vec<u8>, String)> = (10..14).map(|s| content(size, s)).collect();
    for (bytes, hex) in &files {
        upload(&storage, bytes, hex).await;
    }
    let dir = tempfile::tempdir().unwrap();
    // Room for two and a half files.
    let cache = DiskCache::open(dir.path().to_path_buf(), (5 * size / 2) as u64).unwrap();
    let ensure = |i: usize| cache.ensure(&files[i].1, "f.safetensors", &storage, &none);
    let a = ensure(0).await.unwrap();
    drop(ensure(1).await.unwrap());
    // C needs room: A is older but in use, so B goes.
    let c = ensure(2).await.unwrap();
    let exists = |i: usize| cache.blob_path(&files[i].1).exists();
    assert_eq!((exists(0), exists(1), exists(2)), (true, false, true));
    assert!(a.path().exists() && c.path().exists());
    drop((a, c));
    // Nothing in use: the least recently used (A) goes for D.
    let _d = ensure(3).await.unwrap();
    assert_eq!((exists(0), exists(2), exists(3)), (false, true, true));
    assert!(!cache.named_path(&files[0].1, "f.safetensors").exists());
    let held: u64 = cache
        .held()
        .iter()
        .map(|h| std::fs::metadata(cache.blob_path(h)).unwrap().len())
        .sum();
    assert!(held <= cache.budget(), "{held} bytes held");
    assert_eq!(cache.stats().evictions, 2);
}

/// Runs this test binary again as a child process doing `mode` (see [`child`]).
fn spawn_child(
    mode: &str,
    root: &Path,
    endpoint: &str,
    hex: &str,
    start: &Path,
) -> std::process::Child {
    Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "disk::two_processes_download_once_and_never_evict_in_use",
        ])
        .args(["--nocapture", "--test-threads", "1"])
        .env("KILN_DISK_CHILD", mode)
        .env("KILN_DISK_ROOT", root)
        .env("KILN_DISK_ENDPOINT", endpoint)
        .env("KILN_DISK_HEX", hex)
        .env("KILN_DISK_START", start)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap()
}

/// A child's part: waits for the start file, fetches the file, prints `BYTES <n>` (bytes it
/// downloaded); in mode `hold` it then keeps the file in use until its stdin closes.
async fn child(mode: &str) {
    let var = |k: &str| std::env::var(k).unwrap();
    let start = PathBuf::from(var("KILN_DISK_START"));
    let deadline = Instant::now() + Duration::from_secs(30);
    while !start.exists() {
        assert!(Instant::now() < deadline, "never started");
        std::thread::sleep(Duration::from_millis(2));
    }
    let storage = Storage::open(
        &"s3://models/pool".parse().unwrap(),
        &options(&var("KILN_DISK_ENDPOINT")),
    )
    .await
    .unwrap();
    let cache = DiskCache::open(var("KILN_DISK_ROOT").into(), 1 << 40).unwrap();
    let blob = cache
        .ensure(&var("KILN_DISK_HEX"), "m.safetensors", &storage, &none)
        .await
        .unwrap();
    println!("\nBYTES {}", cache.stats().downloaded_bytes);
    std::io::stdout().flush().unwrap();
    if mode == "hold" {
        let mut line = String::new();
        let _ = std::io::stdin().read_line(&mut line);
    }
    drop(blob);
}

/// The `BYTES` a child printed (its output is read on only as far as that line).
fn bytes_of(out: &mut impl BufRead) -> u64 {
    let mut seen = String::new();
    let mut line = String::new();
    while out.read_line(&mut line).unwrap() > 0 {
        // The harness may have begun the line (`test … `).
        if let Some((_, n)) = line.trim().split_once("BYTES ") {
            return n.parse().unwrap();
        }
        seen.push_str(&line);
        line.clear();
    }
    panic!("the child did not report its bytes; it wrote:\n{seen}")
}

/// Reads the rest of a child's output (so its test harness never writes to a closed pipe)
/// and checks that it passed.
fn finish(mut child: std::process::Child, mut out: impl BufRead) {
    std::io::copy(&mut out, &mut std::io::sink()).unwrap();
    assert!(child.wait().unwrap().success());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_processes_download_once_and_never_evict_in_use() {
    if let Ok(mode) = std::env::var("KILN_DISK_CHILD") {
        return child(&mode).await;
    }
    let server = S3Server::start();
    let storage = bucket(&server.endpoint).await;
    let (bytes, hex) = content(32 * MB, 6);
    upload(&storage, &bytes, &hex).await;
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("cache");
    let start = dir.path().join("start");
    // Two workers on one machine start fetching the same file at the same moment.
    let children: Vec<_> = (0..2)
        .map(|_| spawn_child("fetch", &root, &server.endpoint, &hex, &start))
        .collect();
    std::fs::write(&start, b"go").unwrap();
    let mut total = 0;
    let mut each = Vec::new();
    for mut c in children {
        let mut out = BufReader::new(c.stdout.take().unwrap());
        let n = bytes_of(&mut out);
        finish(c, out);
        each.push(n);
        total += n;
    }
    assert_eq!(total, bytes.len() as u64, "one download in all: {each:?}");
    assert!(each.contains(&0), "{each:?}");
    let cache = DiskCache::open(root.clone(), 1 << 40).unwrap();
    assert_eq!(std::fs::read(cache.blob_path(&hex)).unwrap(), bytes);

    // Another process uses the file: eviction here skips it, then takes it once it is free.
    let mut holder = spawn_child("hold", &root, &server.endpoint, &hex, &start);
    let mut out = BufReader::new(holder.stdout.take().unwrap());
    assert_eq!(bytes_of(&mut out), 0);
    assert_eq!(cache.evict_to(0), 0);
    assert!(cache.blob_path(&hex).exists());
    drop(holder.stdin.take());
    finish(holder, out);
    assert_eq!(cache.evict_to(0), 1);
    assert!(!cache.blob_path(&hex).exists());
}
