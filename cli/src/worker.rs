//! `kiln worker`: one render worker per PC. Parses flags, environment and its config file
//! (defaults, then the file, then `KILN_*` variables, then flags), opens storage,
//! and runs the agent until SIGTERM or Ctrl-C, then drains (finishes the current render and
//! gives leased-but-unstarted cells back).

use std::path::PathBuf;
use std::time::Duration;

use kiln_worker::agent::pinned::ModelCacheConfig;
use kiln_worker::agent::resolve::PathPolicy;
use kiln_worker::agent::yielding::YieldSettings;
use kiln_worker::agent::{self, AgentConfig};
use kiln_worker::engine::VaeTiling;
use kiln_worker::upload::{RetryPolicy, S3Options, Storage, StorageUrl};

pub const EXAMPLES: &str = "Examples:
  kiln worker --coordinator http://192.168.1.10:7450 --models D:\\sd\\models --storage file://D:/kiln-out
  kiln worker --coordinator http://farm:7450 --device cuda:0 --models ~/sd --cache-gb 16 \\
      --storage s3://renders/kiln --s3-endpoint http://nas:3900 --s3-path-style
  (S3 credentials from KILN_S3_ACCESS_KEY / KILN_S3_SECRET_KEY or AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY)";

/// Flags of `kiln worker`.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// Coordinator URL (https:// when it serves TLS).
    #[arg(long, env = "KILN_COORDINATOR", default_value = crate::client::DEFAULT_COORDINATOR)]
    coordinator: String,
    #[command(flatten)]
    access: crate::client::AccessArgs,
    /// Where images go: s3://BUCKET/PREFIX or file://DIR.
    #[arg(long, env = "KILN_STORAGE", default_value = "file://kiln-out")]
    storage: String,
    /// Compute device: cpu, cuda:N or metal:N (`kiln devices` lists them). A device this build
    /// or machine cannot use stops the worker at start.
    #[arg(long, env = "KILN_DEVICE", default_value = "cpu")]
    device: String,
    /// Folder searched for model and LoRA names (repeatable). Cells may name only files inside
    /// these folders (by name or relative path).
    #[arg(long = "models", env = "KILN_MODELS")]
    models: Vec<PathBuf>,
    /// A folder of textual-inversion embeddings (`NAME.safetensors`; repeatable), searched after
    /// each --models folder's `embeddings/` subfolder: NAME in a prompt or negative prompt stands
    /// for the embedding, as in A1111. Read at start, and again when a file there changes.
    #[arg(long = "embeddings", env = "KILN_EMBEDDINGS", value_name = "DIR")]
    embeddings: Vec<PathBuf>,
    /// Also let cells name absolute paths and `..` (only when you submit every sweep yourself:
    /// anyone who can submit could then make this worker open any file it can read).
    #[arg(long, env = "KILN_ALLOW_ANY_PATH")]
    allow_any_path: bool,
    /// Also fetch `https://…` model, LoRA and VAE files that cells name (`hf:` references are
    /// fetched from HF_ENDPOINT in any case). Anyone who can submit could then make this worker
    /// download from any server it reaches.
    #[arg(long, env = "KILN_ALLOW_URL_MODELS")]
    allow_url_models: bool,
    /// Host memory budget for loaded models and CPU pipelines, GiB.
    #[arg(long, env = "KILN_CACHE_GB", default_value_t = 8.0)]
    cache_gb: f64,
    /// GPU memory budget for loaded pipelines, GiB [default: a CUDA card's free memory at
    /// start less a workspace for rendering (the larger of 4 GiB and a quarter); on Metal,
    /// whose memory is the host's, --cache-gb].
    #[arg(long, env = "KILN_DEVICE_CACHE_GB")]
    device_cache_gb: Option<f64>,
    /// Name shown in `kiln workers` [default: the host name].
    #[arg(long, env = "KILN_WORKER_NAME")]
    name: Option<String>,
    /// Largest width×height this worker renders.
    #[arg(long, env = "KILN_MAX_PIXELS", default_value_t = 1024 * 1024)]
    max_pixels: u64,
    /// Device memory declared to the coordinator, MiB [default: on a GPU the card's free
    /// memory at start, on the CPU 8192].
    #[arg(long, env = "KILN_MEMORY_MIB")]
    memory_mib: Option<u64>,
    /// Cells leased beyond the next batch: while one batch renders, the worker holds the next
    /// batch (--batch cells) plus this many, so the device never waits for a lease.
    #[arg(long, env = "KILN_PREFETCH", default_value_t = 1)]
    prefetch: u32,
    /// Render up to N cells that share model, LoRA stack, size, steps, CFG and sampler as one
    /// UNet batch (each with its own seed's noise, so each image equals its single render).
    #[arg(long, env = "KILN_BATCH", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=64))]
    batch: u32,
    /// S3 endpoint URL (for Garage, MinIO, Ceph, ...); AWS when unset.
    #[arg(long, env = "KILN_S3_ENDPOINT")]
    s3_endpoint: Option<String>,
    /// S3 region.
    #[arg(long, env = "KILN_S3_REGION")]
    s3_region: Option<String>,
    /// Path-style S3 addressing (most self-hosted servers).
    #[arg(long, env = "KILN_S3_PATH_STYLE")]
    s3_path_style: bool,
    /// Milliseconds between polls when the queue is empty.
    #[arg(long, default_value_t = 500)]
    idle_poll_ms: u64,
    /// Upload tries before the attempt fails as transient.
    #[arg(long, default_value_t = 5)]
    upload_tries: u32,
    /// On SIGTERM or Ctrl-C, the longest wait (seconds) for uploads and completes of finished
    /// renders when storage or the coordinator does not answer; then the worker exits and those
    /// cells run again.
    #[arg(long, env = "KILN_DRAIN_TIMEOUT_SECS", default_value_t = 60,
          value_parser = clap::value_parser!(u64).range(1..))]
    drain_timeout_secs: u64,
    /// Serve Prometheus metrics (`GET /metrics`: images, phase times, pipeline cache, device
    /// memory, draining) on this address, e.g. 127.0.0.1:9451 [default: not served]. Anyone
    /// who can reach it may read them: keep it on loopback or a trusted network.
    #[arg(long, env = "KILN_METRICS_ADDR", value_name = "HOST:PORT")]
    metrics_addr: Option<std::net::SocketAddr>,
    /// Folder of the disk model cache: models pinned by sha256 (registry entries) that this
    /// machine lacks are downloaded there, once per machine however many workers share it
    /// [default: the OS cache folder's kiln/models, e.g. ~/.cache/kiln/models].
    #[arg(long, env = "KILN_MODEL_CACHE", value_name = "DIR")]
    model_cache: Option<PathBuf>,
    /// Most bytes the model cache keeps (e.g. 40GB, 500MiB); the least recently used files
    /// go first, never one a worker is using.
    #[arg(
        long,
        env = "KILN_MODEL_CACHE_SIZE",
        default_value = "50GB",
        value_name = "SIZE"
    )]
    model_cache_size: bytesize::ByteSize,
    /// Where models pinned by sha256 are downloaded from (`models/sha256/HEX` under it):
    /// s3://BUCKET/PREFIX or file://DIR [default: --storage]. The S3 settings are --storage's.
    #[arg(long, env = "KILN_MODEL_STORAGE", value_name = "URL")]
    model_storage: Option<String>,
    /// When the VAE decodes in tiles (diffusers' `enable_tiling()`, A1111's "Tiled VAE"), which
    /// bounds its memory at large sizes but changes pixels slightly: auto (only images past 4×
    /// the VAE's native area: above 1024² for SD1.5), on (every image larger than one tile,
    /// 512² for SD1.5) or off [default: the config file's `vae_tiling`, else auto].
    #[arg(long, env = "KILN_VAE_TILING", value_name = "auto|on|off")]
    vae_tiling: Option<VaeTiling>,
    /// TOML config file: `vae_tiling = "auto"|"on"|"off"`, and a `[yield]` table of processes,
    /// hours, weekend_hours, gpu_busy, grace_secs and poll_ms; each is overridden by its flag
    /// or KILN_* variable.
    #[arg(long, env = "KILN_WORKER_CONFIG", value_name = "FILE")]
    config: Option<PathBuf>,
    #[command(flatten)]
    yielding: YieldArgs,
}

/// When the worker yields to its PC's owner: it stops leasing, finishes or hands back its
/// render within --yield-grace-secs, frees device memory, and resumes by itself.
#[derive(Debug, clap::Args)]
struct YieldArgs {
    /// Yield while a program of this name runs (repeatable or comma-separated; case-insensitive,
    /// `.exe` optional), e.g. --yield-process eldenring.exe.
    #[arg(
        long = "yield-process",
        env = "KILN_YIELD_PROCESS",
        value_name = "NAME",
        value_delimiter = ','
    )]
    processes: Vec<String>,
    /// Render only within these hours, local time, HH:MM-HH:MM; may cross midnight, e.g.
    /// 22:00-08:00 [default: any time].
    #[arg(
        long = "yield-hours",
        env = "KILN_YIELD_HOURS",
        value_name = "HH:MM-HH:MM"
    )]
    hours: Option<String>,
    /// The allowed hours on Saturday and Sunday [default: --yield-hours].
    #[arg(
        long = "yield-weekend-hours",
        env = "KILN_YIELD_WEEKEND_HOURS",
        value_name = "HH:MM-HH:MM"
    )]
    weekend_hours: Option<String>,
    /// Yield while another process uses the GPU (NVIDIA cards, through the driver's NVML;
    /// without NVML this is off, and the log says so).
    #[arg(long = "yield-gpu-busy", env = "KILN_YIELD_GPU_BUSY")]
    gpu_busy: bool,
    /// Seconds a render in flight may take to finish once the worker must yield; then it is
    /// stopped and handed back for another worker [default: 10].
    #[arg(
        long = "yield-grace-secs",
        env = "KILN_YIELD_GRACE_SECS",
        value_name = "SECS"
    )]
    grace_secs: Option<u64>,
    /// Milliseconds between two looks at the yield signals [default: 2000].
    #[arg(long = "yield-poll-ms", env = "KILN_YIELD_POLL_MS", value_name = "MS",
          value_parser = clap::value_parser!(u64).range(1..))]
    poll_ms: Option<u64>,
}

impl YieldArgs {
    /// The flags and environment as the top settings layer.
    fn settings(self) -> YieldSettings {
        YieldSettings {
            processes: Some(self.processes).filter(|p| !p.is_empty()),
            hours: self.hours,
            weekend_hours: self.weekend_hours,
            gpu_busy: self.gpu_busy.then_some(true),
            grace_secs: self.grace_secs,
            poll_ms: self.poll_ms,
        }
    }
}

/// The worker's config file: `vae_tiling` and `[yield]`.
#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSettings {
    #[serde(default)]
    vae_tiling: Option<VaeTiling>,
    #[serde(rename = "yield", default)]
    yielding: YieldSettings,
}

/// The settings of a config file, if one is given (all unset when none is).
fn file_settings(config: Option<&PathBuf>) -> anyhow::Result<FileSettings> {
    let Some(path) = config else {
        return Ok(FileSettings::default());
    };
    let text = std::fs::read_to_string(path)
        .map_err(|e| anyhow::anyhow!("reading config {}: {e}", path.display()))?;
    toml::from_str(&text).map_err(|e| anyhow::anyhow!("config {}: {e}", path.display()))
}

fn env_either(a: &str, b: &str) -> Option<String> {
    std::env::var(a).ok().or_else(|| std::env::var(b).ok())
}

pub fn main(args: Args) -> anyhow::Result<()> {
    let access = args.access.access();
    kiln_worker::agent::access::endpoint(&args.coordinator, &access)
        .map_err(|e| anyhow::anyhow!("--coordinator: {e}"))?;
    let cache_bytes = (args.cache_gb.max(0.0) * (1u64 << 30) as f64) as u64;
    let opened = crate::devices::open(
        &args.device,
        args.memory_mib,
        args.device_cache_gb,
        cache_bytes,
    )?;
    tracing::info!(device = %crate::devices::describe(&opened.info), "device opened");
    crate::hub::install(
        opened.device != kiln_worker::engine::Device::Cpu,
        args.allow_url_models,
    )?;
    let gpu_index = match opened.device {
        kiln_worker::engine::Device::Cuda(i) => i as u32,
        _ => 0,
    };
    let file = file_settings(args.config.as_ref())?;
    let yielding = args
        .yielding
        .settings()
        .over(file.yielding)
        .validate(gpu_index)?;
    // Flag, else KILN_VAE_TILING (clap reads both), else the file, else auto.
    let vae_tiling = args.vae_tiling.or(file.vae_tiling).unwrap_or_default();
    let url: StorageUrl = args.storage.parse()?;
    let model_url: Option<StorageUrl> = match &args.model_storage {
        Some(u) => Some(
            u.parse()
                .map_err(|e| anyhow::anyhow!("--model-storage: {e}"))?,
        ),
        None => None,
    };
    let s3 = S3Options {
        endpoint: args.s3_endpoint,
        region: args.s3_region,
        path_style: args.s3_path_style,
        access_key: env_either("KILN_S3_ACCESS_KEY", "AWS_ACCESS_KEY_ID"),
        secret_key: env_either("KILN_S3_SECRET_KEY", "AWS_SECRET_ACCESS_KEY"),
    };
    // The PC's own name (gethostname on Unix, the computer name on Windows): shells do not
    // export $HOSTNAME, so reading it named every Linux PC "worker".
    let name = args.name.unwrap_or_else(|| {
        let host = gethostname::gethostname()
            .to_string_lossy()
            .trim()
            .to_owned();
        if host.is_empty() {
            "worker".into()
        } else {
            host
        }
    });
    let cfg = AgentConfig {
        coordinator: args.coordinator,
        access,
        name,
        device: opened.device,
        models: args.models,
        embeddings: args.embeddings,
        paths: if args.allow_any_path {
            PathPolicy::AnyPath
        } else {
            PathPolicy::ModelsOnly
        },
        cache_bytes,
        device_cache_bytes: opened.device_cache_bytes,
        max_pixels: args.max_pixels,
        memory_mib: opened.memory_mib,
        prefetch: args.prefetch,
        batch: args.batch,
        upload_retry: RetryPolicy {
            attempts: args.upload_tries.max(1),
            ..RetryPolicy::default()
        },
        idle_poll: Duration::from_millis(args.idle_poll_ms.max(10)),
        drain_timeout: Duration::from_secs(args.drain_timeout_secs),
        metrics_addr: args.metrics_addr,
        model_cache: ModelCacheConfig {
            dir: args.model_cache,
            budget_bytes: args.model_cache_size.as_u64(),
            storage: None,
        },
        yielding,
        vae_tiling,
    };
    cfg.validate()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let storage = Storage::open(&url, &s3).await?;
        let mut cfg = cfg;
        if let Some(model_url) = &model_url {
            cfg.model_cache.storage = Some(Storage::open(model_url, &s3).await?);
        }
        tracing::info!(storage = %url, device = %cfg.device, "worker starting");
        agent::run(cfg, storage, crate::signal::shutdown()).await
    })
}
