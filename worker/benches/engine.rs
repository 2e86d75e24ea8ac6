//! The kiln side of the engine benchmark (see `tools/bench/README.md`).
//!
//! Times, on CPU in f32, one text encode, one UNet step (batch 1, as LCM at CFG <= 1 runs it) at
//! 512² and 256², and one VAE decode at 512², through the same public API the pipeline uses,
//! and prints one JSON object. The thread count is candle's (`RAYON_NUM_THREADS`).
//!
//! ```sh
//! RAYON_NUM_THREADS=2 cargo bench -p kiln-worker --bench engine --profile release -- /tmp/kiln-bench/sd15-random
//! ```

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use tracing_subscriber::layer::{Context, Layer, SubscriberExt};
use tracing_subscriber::registry::LookupSpan;

use kiln_worker::engine::profile::OpKind;
use kiln_worker::engine::rng::TorchRng;
use kiln_worker::engine::{Device, HostTensor, Model};

mod shared;
use shared::{loadavg, timed};

fn peak_rss_gb() -> f64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmHWM:"))
                .and_then(|l| l.split_whitespace().nth(1)?.parse::<f64>().ok())
        })
        .map_or(f64::NAN, |kb| kb / 1024.0 / 1024.0)
}

/// Seconds per operation kind: a `tracing` layer that times the engine's `op` spans
/// (`kiln_worker::engine::profile`) from creation to close.
#[derive(Clone, Default)]
struct OpTimes(Arc<Mutex<HashMap<String, f64>>>);

/// An open `op` span: its kind and when it began.
struct Open(String, Instant);

#[derive(Default)]
struct Kind(String);

impl tracing::field::Visit for Kind {
    fn record_str(&mut self, field: &tracing::field::Field, value: &str) {
        if field.name() == "kind" {
            self.0 = value.to_owned();
        }
    }

    fn record_debug(&mut self, _: &tracing::field::Field, _: &dyn std::fmt::Debug) {}
}

impl<S> Layer<S> for OpTimes
where
    S: tracing::Subscriber + for<'a> LookupSpan<'a>,
{
    fn on_new_span(
        &self,
        attrs: &tracing::span::Attributes<'_>,
        id: &tracing::span::Id,
        ctx: Context<'_, S>,
    ) {
        if attrs.metadata().name() != "op" {
            return;
        }
        let mut kind = Kind::default();
        attrs.record(&mut kind);
        if let Some(span) = ctx.span(id) {
            span.extensions_mut().insert(Open(kind.0, Instant::now()));
        }
    }

    fn on_close(&self, id: tracing::span::Id, ctx: Context<'_, S>) {
        let Some(span) = ctx.span(&id) else { return };
        if let Some(Open(kind, began)) = span.extensions_mut().remove::<Open>() {
            let mut totals = self.0.lock().unwrap();
            *totals.entry(kind).or_default() += began.elapsed().as_secs_f64();
        }
    }
}

fn main() {
    // SAFETY: first thing in main, before any thread is started (as `kiln` does).
    unsafe { kiln_worker::engine::threads::fix_thread_count(None) };
    let args: Vec<String> = shared::args();
    let model_dir = PathBuf::from(
        args.first()
            .cloned()
            .unwrap_or_else(|| "/tmp/kiln-bench/sd15-random".to_owned()),
    );
    let reps: usize = std::env::var("KILN_BENCH_REPS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let load_start = Instant::now();
    let model = Model::load(&model_dir, &[], Device::Cpu).expect("model loads");
    let load_s = load_start.elapsed().as_secs_f64();

    let prompt = "a photograph of an astronaut riding a horse";
    let context = model.encode_prompt(prompt).expect("encode");
    let text_s = timed(reps, || {
        model.encode_prompt(prompt).expect("encode");
    });
    let mut rng = TorchRng::new(0);
    let mut unet = |size: usize| {
        let latents = HostTensor {
            shape: vec![1, 4, size / 8, size / 8],
            data: rng.randn(4 * (size / 8) * (size / 8)),
        };
        timed(reps, || {
            model
                .predict_noise(&latents, 999.0, &context)
                .expect("unet");
        })
    };
    let unet_512 = unet(512);
    let unet_256 = unet(256);
    let latents = HostTensor {
        shape: vec![1, 4, 64, 64],
        data: rng.randn(4 * 64 * 64),
    };
    let vae_s = timed(reps.saturating_sub(1).max(1), || {
        model.decode(&latents).expect("decode");
    });
    // One more 512² UNet step with the per-operation profile on.
    let latents_512 = HostTensor {
        shape: vec![1, 4, 64, 64],
        data: rng.randn(4 * 64 * 64),
    };
    let times = OpTimes::default();
    let subscriber = tracing_subscriber::registry().with(times.clone());
    let start = Instant::now();
    tracing::subscriber::with_default(subscriber, || {
        model
            .predict_noise(&latents_512, 999.0, &context)
            .expect("unet");
    });
    let total = start.elapsed().as_secs_f64();
    let totals = times.0.lock().unwrap().clone();
    let ops: Vec<(&str, f64)> = OpKind::ALL
        .iter()
        .filter_map(|k| totals.get(k.name()).map(|s| (k.name(), *s)))
        .collect();
    let counted: f64 = ops.iter().map(|(_, s)| s).sum();
    let mut profile_json: Vec<String> = ops
        .iter()
        .map(|(kind, s)| format!("\"{kind}\": {s:.3}"))
        .collect();
    profile_json.push(format!("\"other\": {:.3}", total - counted));
    let threads = std::env::var("RAYON_NUM_THREADS").unwrap_or_else(|_| "all".to_owned());
    println!(
        "{{\"engine\": \"kiln\", \"threads\": \"{threads}\", \"load_s\": {load_s:.3}, \
         \"text_encode_s\": {text_s:.4}, \"unet_step_512_s\": {unet_512:.3}, \
         \"unet_step_256_s\": {unet_256:.3}, \"vae_decode_512_s\": {vae_s:.3}, \
         \"unet_512_profile_s\": {{{}}}, \"peak_rss_gb\": {:.2}, \"loadavg_after\": \"{}\"}}",
        profile_json.join(", "),
        peak_rss_gb(),
        loadavg()
    );
}
