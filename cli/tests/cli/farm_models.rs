//! Models across the pool, end to end: a real coordinator process (SQLite file) whose model
//! storage is a bucket on the real S3 test server (s3s-fs), `kiln model add` of the tiny
//! single-file checkpoint and a LoRA, and a sweep naming them by registry name, rendered by two
//! `kiln worker` processes whose `--models` folders do not hold them and whose model caches
//! start empty. Each worker downloads each file once (its `/metrics` says so), verifies it and
//! renders; every image equals a local `kiln render` of the same files, to the byte.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use kiln_worker::engine::image::decode_png;
use kiln_worker::upload::{S3Store, Storage, StorageUrl};

use crate::s3server::{ACCESS_KEY, S3Server, SECRET_KEY};
use crate::spawn_with;
use crate::util::{Worker, fixtures, json_rows, kiln};

const SWEEP: &str = r#"
name = "pooled"
model = "tiny"
prompt = "a photograph of an astronaut riding a horse"
size = "64x64"
steps = 4
seeds = [1, 2, 3, 4, 5, 6, 7, 8]

[[loras]]
name = "detail"
strength = 0.7
"#;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// `kiln ARGS` against the coordinator at `addr` with the S3 test server's credentials.
fn kiln_s3(addr: &str, s3: &S3Server, args: &[&str]) -> String {
    let out = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(args)
        .args(["--s3-endpoint", &s3.endpoint, "--s3-path-style"])
        .env("KILN_COORDINATOR", format!("http://{addr}"))
        .env("KILN_S3_ACCESS_KEY", ACCESS_KEY)
        .env("KILN_S3_SECRET_KEY", SECRET_KEY)
        .env("KILN_LOG", "warn")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "kiln {args:?}: {}{stdout}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

/// A worker with an empty model cache of its own, reading models from the pool's bucket.
fn worker(addr: &str, s3: &S3Server, dir: &Path, name: &str, metrics: u16) -> Worker {
    let empty_models = dir.join(format!("{name}-models"));
    std::fs::create_dir_all(&empty_models).unwrap();
    Worker(
        Command::new(env!("CARGO_BIN_EXE_kiln"))
            .args(["worker", "--coordinator", &format!("http://{addr}")])
            .args(["--storage", "s3://pool/renders", "--s3-path-style"])
            .args(["--model-storage", "s3://pool/farm"])
            .args(["--s3-endpoint", &s3.endpoint, "--name", name])
            .args(["--idle-poll-ms", "50"])
            .args(["--metrics-addr", &format!("127.0.0.1:{metrics}")])
            .arg("--models")
            .arg(&empty_models)
            .arg("--model-cache")
            .arg(dir.join(format!("{name}-cache")))
            .env("KILN_S3_ACCESS_KEY", ACCESS_KEY)
            .env("KILN_S3_SECRET_KEY", SECRET_KEY)
            .env("KILN_LOG", "warn")
            .stdout(Stdio::null())
            .spawn()
            .unwrap(),
    )
}

/// A counter from the worker's `/metrics` (0 when absent).
fn counter(port: u16, name: &str) -> f64 {
    let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    write!(s, "GET /metrics HTTP/1.0\r\nHost: x\r\n\r\n").unwrap();
    let mut out = String::new();
    s.read_to_string(&mut out).unwrap();
    out.lines()
        .find_map(|l| l.strip_prefix(&format!("{name} ")))
        .map_or(0.0, |v| v.trim().parse().unwrap())
}

/// A kohya LoRA for the tiny single-file checkpoint (whose modules no LoRA fixture fits):
/// rank 4 on its text encoder's first MLP, values from a fixed sequence, written into `dir`.
fn tiny_lora(dir: &Path) -> std::path::PathBuf {
    use safetensors::{Dtype, tensor::TensorView};
    let mut state = 0x2545_f491_u32;
    let mut values = |n: usize| -> Vec<u8> {
        (0..n)
            .flat_map(|_| {
                state = state.wrapping_mul(1_664_525).wrapping_add(1_013_904_223);
                ((state >> 8) as f32 / (1u32 << 24) as f32 - 0.5).to_le_bytes()
            })
            .collect()
    };
    let (down, up, alpha) = (values(4 * 8), values(32 * 4), 4.0f32.to_le_bytes().to_vec());
    let module = "lora_te_text_model_encoder_layers_0_mlp_fc1";
    let tensors = vec![
        (
            format!("{module}.lora_down.weight"),
            TensorView::new(Dtype::F32, vec![4, 8], &down).unwrap(),
        ),
        (
            format!("{module}.lora_up.weight"),
            TensorView::new(Dtype::F32, vec![32, 4], &up).unwrap(),
        ),
        (
            format!("{module}.alpha"),
            TensorView::new(Dtype::F32, vec![], &alpha).unwrap(),
        ),
    ];
    let path = dir.join("detail.safetensors");
    safetensors::serialize_to_file(tensors, None, &path).unwrap();
    path
}

/// `kiln render` of one cell from the same files.
fn local_render(dir: &Path, lora: &Path, seed: u64) -> Vec<u8> {
    let out = dir.join(format!("local-{seed}.png"));
    let result = Command::new(env!("CARGO_BIN_EXE_kiln"))
        .arg("render")
        .arg("--model")
        .arg(fixtures().join("tiny-ldm.safetensors"))
        .arg("--lora")
        .arg(format!("{}:0.7", lora.display()))
        .args(["--prompt", "a photograph of an astronaut riding a horse"])
        .args(["--steps", "4", "--width", "64", "--height", "64"])
        .args(["--seed", &seed.to_string(), "-o"])
        .arg(&out)
        .env("KILN_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        result.status.success(),
        "{}",
        String::from_utf8_lossy(&result.stderr)
    );
    decode_png(&std::fs::read(&out).unwrap())
        .unwrap()
        .image
        .pixels
}

#[tokio::test(flavor = "multi_thread")]
async fn two_workers_with_empty_caches_fetch_registered_models_once_and_render_them() {
    let dir = tempfile::tempdir().unwrap();
    let s3 = S3Server::start();
    S3Store::new("pool".into(), String::new(), &s3.options())
        .unwrap()
        .create_bucket()
        .await
        .unwrap();
    let db = format!("sqlite://{}", dir.path().join("kiln.db").display());
    let c = spawn_with(&db, dir.path(), &["--model-storage", "s3://pool/farm"]);

    let ckpt = fixtures().join("tiny-ldm.safetensors");
    let lora = tiny_lora(dir.path());
    kiln_s3(
        &c.addr,
        &s3,
        &["model", "add", ckpt.to_str().unwrap(), "--name", "tiny"],
    );
    kiln_s3(
        &c.addr,
        &s3,
        &[
            "model",
            "add",
            lora.to_str().unwrap(),
            "--name",
            "detail",
            "--kind",
            "lora",
        ],
    );
    let listed = kiln(&c.addr, &["model", "list"]);
    assert!(
        listed.contains("tiny") && listed.contains("detail"),
        "{listed}"
    );

    let file = dir.path().join("pooled.toml");
    std::fs::write(&file, SWEEP).unwrap();
    let said = kiln(&c.addr, &["submit", file.to_str().unwrap()]);
    assert!(said.contains("8 cells"), "{said}");
    let (m1, m2) = (free_port(), free_port());
    let _w1 = worker(&c.addr, &s3, dir.path(), "pc1", m1);
    let _w2 = worker(&c.addr, &s3, dir.path(), "pc2", m2);
    kiln(&c.addr, &["watch", "pooled"]);

    let cells = json_rows(&kiln(
        &c.addr,
        &["query", r#"sweep = "pooled""#, "--format", "json"],
    ));
    assert_eq!(cells.len(), 8);
    let url: StorageUrl = "s3://pool/renders".parse().unwrap();
    let renders = Storage::open(&url, &s3.options()).await.unwrap();
    let hash = |p: &Path| {
        use sha2::Digest;
        hex::encode(sha2::Sha256::digest(std::fs::read(p).unwrap()))
    };
    for cell in &cells {
        assert_eq!(cell["state"], "completed", "{cell}");
        // Pinned to the registered files' content at submit.
        assert_eq!(cell["model_sha256"], hash(&ckpt).as_str(), "{cell}");
        assert_eq!(cell["loras"][0]["sha256"], hash(&lora).as_str(), "{cell}");
        let key = cell["object_key"].as_str().unwrap();
        let png = decode_png(&renders.get(key).await.unwrap()).unwrap();
        let seed = cell["seed"].as_u64().unwrap();
        assert!(
            png.image.pixels == local_render(dir.path(), &lora, seed),
            "seed {seed}: the pooled render differs from kiln render of the same files"
        );
    }
    // A worker that rendered downloaded each of the two files exactly once; one that rendered
    // nothing downloaded nothing.
    let rendering: std::collections::BTreeSet<u64> = cells
        .iter()
        .map(|c| c["worker"].as_u64().unwrap())
        .collect();
    let downloads: Vec<f64> = [m1, m2]
        .iter()
        .map(|&port| counter(port, "kiln_worker_model_downloads_total"))
        .collect();
    let mut sorted = downloads.clone();
    sorted.sort_by(f64::total_cmp);
    let expected = if rendering.len() == 2 {
        vec![2.0, 2.0]
    } else {
        vec![0.0, 2.0]
    };
    assert_eq!(sorted, expected, "downloads per worker: {downloads:?}");
}
