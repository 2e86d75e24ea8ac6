//! The worker's Prometheus metrics, served as `GET /metrics` (OpenMetrics text, through the
//! `prometheus-client` crate) on `--metrics-addr` when it is given: images rendered, the time
//! of each render phase as histograms in seconds, the pipeline cache's hits, misses and bytes,
//! the device memory the worker declared, whether it is draining, and the disk model cache's
//! downloads (bytes, seconds), hits, corrupt files and evictions.
//!
//! The numbers are counted where they happen: an image when its complete is accepted (with its
//! phase times, the ones it reports to the coordinator in `timings_ms`), the cache's counters
//! on the render thread, which publishes them with its loaded pipelines
//! ([`Renderer::cache_report`]). Serving is a small HTTP/1.1 server on the Tokio runtime; a
//! scrape reads atomics and the published report, never the render thread. There is no paused
//! state besides draining yet, so no `paused` series.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::header;
use axum::response::IntoResponse;
use axum::routing::get;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::{Registry, Unit};

use super::renderer::{CacheReport, Renderer};
use crate::cache::disk::{DiskCache, DiskStats};

/// The content type of the OpenMetrics text format.
const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PhaseLabel {
    phase: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MemoryLabel {
    memory: &'static str,
}

/// Phase buckets: 5 ms to about 160 s, doubling (a step of a tiny model to loading a large
/// checkpoint from a slow disk).
fn phase_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.005, 2.0, 16))
}

/// The worker's counters and gauges, shared by the agent's tasks.
#[derive(Clone, Debug)]
pub struct Metrics {
    images: Counter,
    phases: Family<PhaseLabel, Histogram, fn() -> Histogram>,
    draining: Gauge,
    device_memory_bytes: i64,
    model_cache: Option<DiskCache>,
}

impl Metrics {
    /// Metrics of a worker that declared `device_memory_bytes` of device memory.
    pub fn new(device_memory_bytes: u64) -> Self {
        Self {
            images: Counter::default(),
            phases: Family::new_with_constructor(phase_histogram),
            draining: Gauge::default(),
            device_memory_bytes: i64::try_from(device_memory_bytes).unwrap_or(i64::MAX),
            model_cache: None,
        }
    }

    /// Also reports the counters of the disk model cache `disk`.
    pub fn with_model_cache(mut self, disk: DiskCache) -> Self {
        self.model_cache = Some(disk);
        self
    }

    /// An image was rendered, stored and completed; `phases_ms` are its phase times (this
    /// image's share when it rendered in a batch), milliseconds.
    pub fn rendered(&self, phases_ms: &[(&'static str, f64)]) {
        self.images.inc();
        for &(phase, ms) in phases_ms {
            self.phases
                .get_or_create(&PhaseLabel { phase })
                .observe(ms.max(0.0) / 1000.0);
        }
    }

    /// The worker has begun to drain (finishes what it holds, takes nothing new).
    pub fn draining(&self) {
        self.draining.set(1);
    }

    /// The exposition of these metrics and of the render thread's `cache` report.
    pub fn render(&self, cache: &CacheReport) -> String {
        let mut r = Registry::with_prefix("kiln_worker");
        r.register(
            "images",
            "Images rendered, stored and reported complete to the coordinator",
            self.images.clone(),
        );
        r.register_with_unit(
            "phase",
            "Time of each render phase per image (load: waiting for the pipeline; batched \
             phases: this image's share)",
            Unit::Seconds,
            self.phases.clone(),
        );
        r.register(
            "pipeline_cache_hits",
            "Renders that found their pipeline loaded",
            ConstCounter::new(cache.stats.hits),
        );
        r.register(
            "pipeline_cache_misses",
            "Renders that had to load their pipeline (read the model, or rebuild it with \
             other LoRAs)",
            ConstCounter::new(cache.stats.reads + cache.stats.rebuilds),
        );
        r.register(
            "pipeline_cache_evictions",
            "Pipelines and models evicted from the cache",
            ConstCounter::new(cache.stats.evictions),
        );
        let held = Family::<MemoryLabel, Gauge>::default();
        for (memory, bytes) in [("host", cache.host_bytes), ("device", cache.device_bytes)] {
            held.get_or_create(&MemoryLabel { memory })
                .set(i64::try_from(bytes).unwrap_or(i64::MAX));
        }
        r.register_with_unit(
            "pipeline_cache",
            "Memory held by cached models and pipelines",
            Unit::Bytes,
            held,
        );
        r.register_with_unit(
            "device_memory",
            "Device memory the worker declared to the coordinator (a GPU's free memory at \
             start, or --memory-mib)",
            Unit::Bytes,
            ConstGauge::new(self.device_memory_bytes),
        );
        if let Some(disk) = &self.model_cache {
            register_model_cache(&mut r, disk.stats());
        }
        r.register(
            "draining",
            "1 while the worker drains (SIGTERM or Ctrl-C: finishes what it holds)",
            self.draining.clone(),
        );
        let mut out = String::new();
        // Writing to a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &r);
        out
    }
}

fn register_model_cache(r: &mut Registry, s: DiskStats) {
    r.register(
        "model_cache_hits",
        "Pinned model files found in the disk model cache, complete and verified",
        ConstCounter::new(s.hits),
    );
    r.register(
        "model_downloads",
        "Model files downloaded into the disk model cache",
        ConstCounter::new(s.downloads),
    );
    r.register_with_unit(
        "model_download",
        "Bytes received downloading model files",
        Unit::Bytes,
        ConstCounter::new(s.downloaded_bytes),
    );
    r.register_with_unit(
        "model_download",
        "Time spent downloading model files",
        Unit::Seconds,
        ConstCounter::new(s.download_ms as f64 / 1000.0),
    );
    r.register(
        "model_cache_corrupt",
        "Cached model files that no longer matched their sha256 (deleted and fetched again)",
        ConstCounter::new(s.corrupt),
    );
    r.register(
        "model_cache_evictions",
        "Model files evicted from the disk model cache",
        ConstCounter::new(s.evictions),
    );
}

#[derive(Clone)]
struct Scraped {
    metrics: Metrics,
    renderer: Renderer,
}

/// Binds `addr` and serves `GET /metrics` there on the current runtime until the returned
/// task is aborted. The bound address is logged (and returned: port 0 picks a free one).
pub async fn serve(
    addr: SocketAddr,
    metrics: Metrics,
    renderer: Renderer,
) -> anyhow::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr)
        .await
        .map_err(|e| anyhow::anyhow!("--metrics-addr {addr}: {e}"))?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/metrics", get(scrape))
        .with_state(Arc::new(Scraped { metrics, renderer }));
    tracing::info!(addr = %bound, "metrics listening");
    let task = tokio::spawn(async move {
        if let Err(e) = axum::serve(listener, app).await {
            tracing::warn!(error = %e, "metrics server stopped");
        }
    });
    Ok((bound, task))
}

async fn scrape(State(s): State<Arc<Scraped>>) -> impl IntoResponse {
    let text = s.metrics.render(&s.renderer.cache_report());
    ([(header::CONTENT_TYPE, CONTENT_TYPE)], text)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_follow_prometheus_conventions_and_counts_move() {
        let m = Metrics::new(8 << 30);
        m.rendered(&[("unet", 1500.0), ("vae", 20.0)]);
        m.rendered(&[("unet", 500.0), ("vae", 10.0)]);
        let mut cache = CacheReport::default();
        cache.stats.hits = 1;
        cache.stats.reads = 1;
        cache.device_bytes = 4096;
        let text = m.render(&cache);
        for line in [
            "kiln_worker_images_total 2",
            "kiln_worker_phase_seconds_count{phase=\"unet\"} 2",
            "kiln_worker_phase_seconds_sum{phase=\"unet\"} 2.0",
            "kiln_worker_pipeline_cache_hits_total 1",
            "kiln_worker_pipeline_cache_misses_total 1",
            "kiln_worker_pipeline_cache_bytes{memory=\"device\"} 4096",
            "kiln_worker_device_memory_bytes 8589934592",
            "kiln_worker_draining 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
        m.draining();
        assert!(m.render(&cache).contains("\nkiln_worker_draining 1\n"));
        // The disk model cache's counters, once the agent hands it over.
        let dir = tempfile::tempdir().unwrap();
        let disk = DiskCache::open(dir.path().to_path_buf(), 1 << 30).unwrap();
        let text = m.with_model_cache(disk).render(&cache);
        for line in [
            "kiln_worker_model_cache_hits_total 0",
            "kiln_worker_model_downloads_total 0",
            "kiln_worker_model_download_bytes_total 0",
            "kiln_worker_model_download_seconds_total 0.0",
            "kiln_worker_model_cache_evictions_total 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing in\n{text}");
        }
    }
}
