//! `hf:` and URL references as a user pastes them, against a real HTTP server in the Hugging
//! Face hub's URL layout (`HF_ENDPOINT`): `kiln render` of `hf:` model and LoRA repos draws
//! the image the local files draw, fetching only the files the engine reads, once; offline
//! (`KILN_OFFLINE`, or the hub unreachable) a cached reference works and a missing one is a
//! clear error naming it; a farm worker fetches a URL a cell names only when allowed, and
//! fetches just before the render, so a busy hub (503) is a transient failure that is retried.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use kiln_proto::v1 as pb;
use kiln_worker::engine::image::decode_png;

use crate::hubserver::{COMMIT, HubServer};
use crate::paths::cell;
use crate::util::{Worker, fixtures, worker_command};
use crate::{clients, finished_cells, spawn, submit_cells};

const MODEL: &str = "hf:kiln-test/tiny-sd15";
const LORA: &str = "hf:kiln-test/tiny-lora:1";

fn hub_server() -> HubServer {
    let server = HubServer::start();
    // Files a diffusers repo has that kiln must never fetch: pickles, a single-file copy, a
    // README, the tokenizer (kiln's is built in).
    server.add_repo_dir(
        "kiln-test/tiny-sd15",
        &fixtures().join("tiny-sd15"),
        &[
            ("unet/diffusion_pytorch_model.bin", b"PK\x03\x04 a pickle"),
            ("text_encoder/pytorch_model.bin", b"PK\x03\x04 a pickle"),
            ("v1-5-pruned.ckpt", b"PK\x03\x04 a pickle"),
            ("README.md", b"# tiny"),
        ],
    );
    server.add_repo(
        "kiln-test/tiny-lora",
        BTreeMap::from([
            ("README.md".to_string(), b"# lora".to_vec()),
            (
                "pytorch_lora_weights.safetensors".to_string(),
                std::fs::read(fixtures().join("lora_kohya.safetensors")).unwrap(),
            ),
        ]),
    );
    server
}

/// `kiln render` of `model` + `lora` at 64x64 with `env` (HF_* from `hf_home` and `endpoint`).
fn render(
    model: &str,
    lora: &str,
    out: &Path,
    endpoint: &str,
    hf_home: &Path,
    env: &[(&str, &str)],
) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["render", "--model", model, "--lora", lora])
        .args(["--prompt", "a lighthouse at dusk", "--seed", "42"])
        .args([
            "--steps",
            "2",
            "--sampler",
            "lcm",
            "--width",
            "64",
            "--height",
            "64",
        ])
        .arg("-o")
        .arg(out)
        .env("HF_ENDPOINT", endpoint)
        .env("HF_HOME", hf_home)
        .env("HF_TOKEN", "hf_secret")
        .env("KILN_CACHE_DIR", hf_home.join("kiln"))
        .env_remove("HF_HUB_CACHE")
        .env_remove("HF_HUB_OFFLINE")
        .env_remove("KILN_OFFLINE")
        .env("KILN_LOG", "warn")
        .envs(env.iter().copied())
        .output()
        .expect("run kiln render")
}

fn ok(out: &Output) {
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The stderr of a run that must have failed.
fn fails(out: &Output) -> String {
    assert!(!out.status.success());
    String::from_utf8_lossy(&out.stderr).into_owned()
}

fn pixels(png: &Path) -> Vec<u8> {
    decode_png(&std::fs::read(png).unwrap())
        .unwrap()
        .image
        .pixels
}

#[test]
fn hf_references_render_as_the_local_files_fetching_only_what_is_needed_once() {
    let server = hub_server();
    let dir = tempfile::tempdir().unwrap();
    let hf = dir.path().join("hf");
    let local_lora = format!("{}:1", fixtures().join("lora_kohya.safetensors").display());
    let model = fixtures().join("tiny-sd15");
    let local = dir.path().join("local.png");
    ok(&render(
        model.to_str().unwrap(),
        &local_lora,
        &local,
        &server.endpoint,
        &hf,
        &[],
    ));
    assert_eq!(server.seen().len(), 0, "local files need no hub");

    let fetched = dir.path().join("hub.png");
    ok(&render(MODEL, LORA, &fetched, &server.endpoint, &hf, &[]));
    assert_eq!(
        pixels(&fetched),
        pixels(&local),
        "the same image as the local files"
    );
    // Exactly the files the engine reads, in the precision there is, each once.
    assert_eq!(
        server.resolved("kiln-test/tiny-sd15"),
        [
            "model_index.json",
            "scheduler/scheduler_config.json",
            "text_encoder/config.json",
            "text_encoder/model.fp16.safetensors",
            "unet/config.json",
            "unet/diffusion_pytorch_model.fp16.safetensors",
            "vae/config.json",
            "vae/diffusion_pytorch_model.fp16.safetensors",
        ]
    );
    assert_eq!(
        server.resolved("kiln-test/tiny-lora"),
        ["pytorch_lora_weights.safetensors"]
    );
    assert_eq!(
        server.count("/cdn/"),
        4,
        "three weights and the LoRA, from the CDN"
    );
    for s in server
        .seen()
        .iter()
        .filter(|s| !s.path.starts_with("/cdn/"))
    {
        assert_eq!(
            s.authorization.as_deref(),
            Some("Bearer hf_secret"),
            "{}",
            s.path
        );
    }
    // The Hugging Face cache layout, shared with huggingface_hub.
    let repo = hf.join("hub/models--kiln-test--tiny-sd15");
    assert_eq!(
        std::fs::read_to_string(repo.join("refs/main")).unwrap(),
        COMMIT
    );
    let unet = repo.join(format!(
        "snapshots/{COMMIT}/unet/diffusion_pytorch_model.fp16.safetensors"
    ));
    #[cfg(unix)]
    assert!(
        unet.symlink_metadata().unwrap().file_type().is_symlink(),
        "{}",
        unet.display()
    );
    assert_eq!(
        std::fs::read(&unet).unwrap(),
        std::fs::read(model.join("unet/diffusion_pytorch_model.fp16.safetensors")).unwrap()
    );

    // Again: the revision is asked for, nothing is downloaded.
    let downloads = || server.count("/kiln-test/") + server.count("/cdn/");
    let before = downloads();
    let again = dir.path().join("again.png");
    ok(&render(MODEL, LORA, &again, &server.endpoint, &hf, &[]));
    assert_eq!(downloads(), before);
    assert_eq!(pixels(&again), pixels(&local));

    // Offline: from the cache, without a single request.
    let requests = server.seen().len();
    let offline = dir.path().join("offline.png");
    ok(&render(
        MODEL,
        LORA,
        &offline,
        &server.endpoint,
        &hf,
        &[("KILN_OFFLINE", "1")],
    ));
    ok(&render(
        MODEL,
        LORA,
        &offline,
        &server.endpoint,
        &hf,
        &[("HF_HUB_OFFLINE", "true")],
    ));
    assert_eq!(server.seen().len(), requests);
    assert_eq!(pixels(&offline), pixels(&local));
    // No network at all (nothing listens there): the cache too.
    let dead = "http://127.0.0.1:1";
    ok(&render(MODEL, LORA, &offline, dead, &hf, &[]));

    // Without a cached copy, offline or unreachable: an error naming the reference.
    let empty = dir.path().join("empty-hf");
    let err = fails(&render(
        MODEL,
        LORA,
        &offline,
        &server.endpoint,
        &empty,
        &[("KILN_OFFLINE", "1")],
    ));
    assert!(
        err.contains(MODEL) && err.contains("is not cached") && err.contains("offline"),
        "{err}"
    );
    let err = fails(&render(MODEL, LORA, &offline, dead, &empty, &[]));
    assert!(
        err.contains(MODEL) && err.contains("is not cached") && err.contains("cannot be reached"),
        "{err}"
    );
    assert_eq!(server.seen().len(), requests, "offline means no request");
}

#[test]
fn references_that_could_leave_the_cache_are_refused() {
    let server = hub_server();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("x.png");
    for bad in [
        "hf:../x",
        "hf:a/b/../../c",
        "hf:kiln-test/tiny-sd15@../../x",
    ] {
        let r = render(
            bad,
            LORA,
            &out,
            &server.endpoint,
            &dir.path().join("hf"),
            &[],
        );
        assert!(!r.status.success(), "{bad}");
        let err = String::from_utf8_lossy(&r.stderr);
        assert!(err.contains("refused") && err.contains(bad), "{bad}: {err}");
    }
    assert_eq!(server.seen().len(), 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_farm_worker_fetches_a_url_a_cell_names_only_when_its_owner_allows() {
    let server = hub_server();
    let url = server.add_file(
        "lora.safetensors",
        std::fs::read(fixtures().join("lora_kohya.safetensors")).unwrap(),
    );
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("kiln.db").display());
    let c = spawn(&db, dir.path());
    let (mut sweeps, _, _) = clients(&c.addr).await;
    let fixtures = fixtures();
    let worker = |allow: bool| {
        let mut cmd = worker_command(&c.addr, &dir.path().join("out"), &[&fixtures]);
        cmd.env("HF_ENDPOINT", &server.endpoint)
            .env("HF_HOME", dir.path().join("hf"))
            .env("KILN_CACHE_DIR", dir.path().join("kiln"))
            .env("KILN_LOG", "warn")
            .stdout(std::process::Stdio::null());
        if allow {
            cmd.arg("--allow-url-models");
        }
        Worker(cmd.spawn().unwrap())
    };

    let refusing = worker(false);
    let sweep = submit_cells(
        &mut sweeps,
        "url-refused",
        vec![cell(1, "tiny-sd15", Some(&url))],
    )
    .await;
    let rows = finished_cells(&mut sweeps, sweep, Duration::from_secs(120)).await;
    assert_eq!(rows[0].state, pb::CellState::Discarded as i32);
    let e = &rows[0].errors[0];
    assert_eq!(e.class, pb::FailureClass::BadInput as i32);
    assert!(
        e.message.contains("refused") && e.message.contains("--allow-url-models"),
        "{}",
        e.message
    );
    assert_eq!(server.count("/files/"), 0, "nothing fetched");
    drop(refusing);

    let _allowing = worker(true);
    let sweep = submit_cells(
        &mut sweeps,
        "url-allowed",
        vec![cell(2, "tiny-sd15", Some(&url))],
    )
    .await;
    let rows = finished_cells(&mut sweeps, sweep, Duration::from_secs(120)).await;
    assert_eq!(
        rows[0].state,
        pb::CellState::Completed as i32,
        "{:?}",
        rows[0].errors
    );
    assert_eq!(server.count("/files/"), 1);
}

/// A farm worker plans an `hf:` cell without the network and fetches it just before the
/// render: a hub that answers 503 is a transient failure, retried, not bad input.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_farm_worker_retries_a_busy_hub_and_renders() {
    let server = hub_server();
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("kiln.db").display());
    let c = spawn(&db, dir.path());
    let (mut sweeps, _, _) = clients(&c.addr).await;
    server.busy_for(1);
    let mut cmd = worker_command(&c.addr, &dir.path().join("out"), &[&fixtures()]);
    cmd.env("HF_ENDPOINT", &server.endpoint)
        .env("HF_HOME", dir.path().join("hf"))
        .env("KILN_CACHE_DIR", dir.path().join("kiln"))
        .env("KILN_LOG", "warn")
        .stdout(std::process::Stdio::null());
    let _worker = Worker(cmd.spawn().unwrap());
    let sweep = submit_cells(&mut sweeps, "busy-hub", vec![cell(3, MODEL, None)]).await;
    let rows = finished_cells(&mut sweeps, sweep, Duration::from_secs(120)).await;
    assert_eq!(
        rows[0].state,
        pb::CellState::Completed as i32,
        "{:?}",
        rows[0].errors
    );
    assert_eq!(rows[0].errors.len(), 1, "{:?}", rows[0].errors);
    let e = &rows[0].errors[0];
    assert_eq!(e.class, pb::FailureClass::Transient as i32, "{}", e.message);
    assert!(e.message.contains("503"), "{}", e.message);
    assert_eq!(
        server.count("/api/models/"),
        2,
        "asked once, then again on the retry"
    );
}
