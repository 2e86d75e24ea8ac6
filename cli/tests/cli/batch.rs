//! `kiln worker --batch 4` as a process: alike cells render as UNet batches of 4, every image is
//! the one a `--batch 1` worker makes of the same cell (within 1/255 per value: at CFG > 1 the
//! batched UNet sums a few floats in another order), and each result records its phase timings
//! and batch size.

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use kiln_proto::v1 as pb;
use kiln_proto::v1::sweep_service_client::SweepServiceClient;
use kiln_worker::engine::image::decode_png;
use tonic::transport::Channel;

use crate::{clients, spawn};

fn worker(addr: &str, out: &Path, batch: u32) -> Child {
    let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../worker/tests/fixtures/reference");
    Command::new(env!("CARGO_BIN_EXE_kiln"))
        .args(["worker", "--coordinator", &format!("http://{addr}")])
        .args(["--batch", &batch.to_string(), "--prefetch", "4"])
        .args(["--idle-poll-ms", "20"])
        .arg("--storage")
        .arg(format!("file://{}", out.display()))
        .arg("--models")
        .arg(&fixtures)
        .env("KILN_LOG", "warn")
        .stdout(Stdio::null())
        .spawn()
        .unwrap()
}

async fn submit(sweeps: &mut SweepServiceClient<Channel>, key: &str) -> u64 {
    let cells: Vec<pb::RenderCell> = (0..8)
        .map(|seed| pb::RenderCell {
            model: "tiny-sd15".into(),
            loras: vec![pb::LoraRef {
                name: "lora_kohya".into(),
                strength: 0.8,
                sha256: String::new(),
            }],
            prompt: if seed % 2 == 0 {
                "a fox"
            } else {
                "a lighthouse"
            }
            .into(),
            negative_prompt: "blurry".into(),
            seed: seed * 1000 + 7,
            steps: 4,
            cfg: 1.5,
            sampler: pb::Sampler::Lcm as i32,
            width: 64,
            height: 64,
            ..Default::default()
        })
        .collect();
    crate::submit_cells(sweeps, key, cells).await
}

/// Waits for the sweep to finish and returns its results by seed.
async fn results(
    sweeps: &mut SweepServiceClient<Channel>,
    sweep: u64,
) -> BTreeMap<u64, pb::RenderResult> {
    let rows = crate::finished_cells(sweeps, sweep, Duration::from_secs(120)).await;
    assert_eq!(rows.len(), 8);
    rows.into_iter()
        .map(|r| {
            assert_eq!(
                r.state,
                pb::CellState::Completed as i32,
                "cell {}",
                r.cell_id
            );
            (r.cell.unwrap().seed, r.result.unwrap())
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn batch_4_renders_the_images_batch_1_renders() {
    let dir = tempfile::tempdir().unwrap();
    let db = format!("sqlite://{}", dir.path().join("kiln.db").display());
    let c = spawn(&db, dir.path());
    let (mut sweeps, _, _) = clients(&c.addr).await;

    // The cells are queued before the worker starts, so it leases all 8 in one call.
    let batched_sweep = submit(&mut sweeps, "batched").await;
    let mut w = worker(&c.addr, &dir.path().join("batched"), 4);
    let batched = results(&mut sweeps, batched_sweep).await;
    w.kill().unwrap();
    w.wait().unwrap();

    let single_sweep = submit(&mut sweeps, "single").await;
    let mut w = worker(&c.addr, &dir.path().join("single"), 1);
    let single = results(&mut sweeps, single_sweep).await;
    w.kill().unwrap();
    w.wait().unwrap();

    for (seed, b) in &batched {
        let s = &single[seed];
        assert_eq!(b.timings_ms["batch"], 4, "seed {seed}: {:?}", b.timings_ms);
        assert_eq!(s.timings_ms["batch"], 1, "seed {seed}: {:?}", s.timings_ms);
        for phase in ["load", "text_encode", "unet", "vae", "encode", "upload"] {
            assert!(b.timings_ms.contains_key(phase), "no {phase} timing");
        }
        let read = |sub: &str, key: &str| {
            let png = std::fs::read(dir.path().join(sub).join(key)).unwrap();
            decode_png(&png).unwrap().image
        };
        let (bi, si) = (
            read("batched", &b.object_key),
            read("single", &s.object_key),
        );
        assert_eq!((bi.width, bi.height), (si.width, si.height));
        let max = bi
            .pixels
            .iter()
            .zip(&si.pixels)
            .map(|(x, y)| x.abs_diff(*y))
            .max()
            .unwrap();
        assert!(max <= 1, "seed {seed}: batched image differs by {max}/255");
    }
    let distinct: std::collections::BTreeSet<&str> =
        batched.values().map(|r| r.sha256.as_str()).collect();
    assert_eq!(distinct.len(), 8, "every seed made its own image");
}
