//! Hires cells on both backends: their `hires_*` columns are stored and queried (missing, so
//! false, on a cell without a hires fix), their spec keeps the settings, and the lease filter
//! compares a worker's max pixels with the hires pass's final size.

use kiln_coordinator::query::Filter;
use kiln_coordinator::store::CellQuery;
use kiln_coordinator::sweep::{CellSpec, HiresSpec};

use crate::harness::{Backend, Fixture, cell, registration, submission};

conformance!(
    hires_cells_are_stored_and_queried,
    a_worker_is_leased_only_hires_cells_whose_final_size_it_takes,
);

/// A cell with a hires fix at `scale` and `denoise`, Euler a first pass.
fn hires(seed: u64, scale: f32, denoise: f32) -> CellSpec {
    let mut c = cell(seed);
    c.sampler = "Euler a".parse().unwrap();
    c.hires = Some(HiresSpec {
        denoise,
        ..HiresSpec::scaled(scale)
    });
    c
}

async fn seeds(fx: &Fixture, filter: &str) -> Vec<u64> {
    let mut seeds: Vec<u64> = fx
        .queue
        .query(&CellQuery {
            filter: Some(Filter::parse(filter).unwrap()),
            limit: 100,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("{filter}: {e}"))
        .iter()
        .map(|r| serde_json::from_str::<CellSpec>(&r.spec_json).unwrap().seed)
        .collect();
    seeds.sort_unstable();
    seeds
}

async fn hires_cells_are_stored_and_queried(backend: Backend) {
    let fx = Fixture::new(backend).await;
    let mut sized = hires(4, 1.0, 0.5);
    let h = sized.hires.as_mut().unwrap();
    (h.scale, h.size, h.steps) = (0.0, Some((768, 512)), 10);
    h.upscaler = "latent_nearest".parse().unwrap();
    h.sampler = Some("dpmpp_2m_karras".parse().unwrap());
    let cells = vec![cell(1), hires(2, 1.5, 0.3), hires(3, 1.5, 0.5), sized];
    fx.queue.submit(submission("hires", cells)).await.unwrap();

    assert_eq!(
        seeds(&fx, r#"hires_denoise >= 0.5 and hires_upscaler = "latent""#).await,
        [3]
    );
    assert_eq!(seeds(&fx, "hires_denoise = 0.5").await, [3, 4]);
    assert_eq!(seeds(&fx, "hires_denoise = 0.3").await, [2], "4 decimals");
    assert_eq!(seeds(&fx, "hires_scale = 1.5").await, [2, 3]);
    assert_eq!(
        seeds(&fx, "hires_width = 768 and hires_height = 768").await,
        [2, 3]
    );
    assert_eq!(
        seeds(&fx, "hires_width = 768 and hires_height = 512").await,
        [4]
    );
    assert_eq!(seeds(&fx, "hires_steps = 10").await, [4]);
    assert_eq!(seeds(&fx, "hires_steps = 0").await, [2, 3]);
    assert_eq!(seeds(&fx, r#"hires_upscaler ~ "nearest""#).await, [4]);
    assert_eq!(seeds(&fx, "not hires_denoise > 0").await, [1]);
    assert_eq!(seeds(&fx, "not hires_scale >= 1").await, [1, 4]);

    let rows = fx
        .queue
        .query(&CellQuery {
            filter: Some(Filter::parse("hires_steps = 10").unwrap()),
            limit: 10,
            ..Default::default()
        })
        .await
        .unwrap();
    let spec: CellSpec = serde_json::from_str(&rows[0].spec_json).unwrap();
    let h = spec.hires.unwrap();
    assert_eq!(
        (h.size, h.upscaler.as_str(), h.sampler.unwrap().as_str()),
        (
            Some((768, 512)),
            "latent_nearest",
            "dpmpp_2m_karras".to_string()
        )
    );
    fx.finish().await;
}

async fn a_worker_is_leased_only_hires_cells_whose_final_size_it_takes(backend: Backend) {
    let fx = Fixture::new(backend).await;
    // 512×512 first passes; the hires one ends at 1024×1024.
    let cells = vec![hires(1, 2.0, 0.5), cell(2)];
    fx.queue.submit(submission("sizes", cells)).await.unwrap();
    let mut small = registration("small");
    small.max_pixels = 768 * 768;
    let small = fx.queue.register(&small).await.unwrap().0;
    let got = fx.queue.lease(small, 4, None).await.unwrap();
    let leased: Vec<u64> = got
        .iter()
        .map(|c| serde_json::from_str::<CellSpec>(&c.spec_json).unwrap().seed)
        .collect();
    assert_eq!(leased, [2], "the hires cell needs 1024x1024");
    let mut big = registration("big");
    big.max_pixels = 1024 * 1024;
    let big = fx.queue.register(&big).await.unwrap().0;
    let got = fx.queue.lease(big, 4, None).await.unwrap();
    assert_eq!(got.len(), 1);
    fx.finish().await;
}
