//! `kiln coordinator`: parses flags and environment into settings, merges them over the config
//! file, validates once, binds, and serves until SIGTERM or Ctrl-C.

use std::path::PathBuf;

use anyhow::Context;
use kiln_coordinator::config::Settings;
use kiln_coordinator::server::Coordinator;

pub const EXAMPLES: &str = "Examples:
  kiln coordinator                                   # sqlite://kiln.db on 127.0.0.1:7450
  kiln coordinator --images file:///srv/kiln-out     # web UI at http://127.0.0.1:7450/
  curl http://127.0.0.1:7450/metrics                 # Prometheus metrics (README: Metrics and logs)
  kiln cert --out certs --host farm.lan              # once: a CA and a server certificate
  kiln token create --owner me --scope admin         # once: a token (printed once)
  kiln coordinator --listen 0.0.0.0:7450 --require-tokens \\
      --tls-cert certs/server.pem --tls-key certs/server.key
  kiln coordinator --db postgres://kiln:secret@db.lan/kiln
  KILN_DB=postgres://kiln@127.0.0.1/kiln kiln coordinator --config /etc/kiln/coordinator.toml";

/// Flags of `kiln coordinator`; each also reads a `KILN_*` variable.
#[derive(Debug, clap::Args)]
pub struct Args {
    /// TOML config file (keys: listen, db, lease_ttl_secs, heartbeat_secs, max_attempts,
    /// max_cells_per_sweep, maintenance_interval_ms, pg_max_connections, retry_base_ms,
    /// require_tokens, tls_cert, tls_key, tls_client_ca, insecure_lan, web, images, thumbs_dir,
    /// model_storage).
    #[arg(long, env = "KILN_CONFIG")]
    config: Option<PathBuf>,
    /// Address to listen on [default: 127.0.0.1:7450]; port 0 picks a free port.
    #[arg(long, env = "KILN_LISTEN")]
    listen: Option<String>,
    /// Database: sqlite://PATH [default: sqlite://kiln.db] or postgres://USER@HOST/DB.
    #[arg(long, env = "KILN_DB")]
    db: Option<String>,
    /// Seconds a lease lasts without a heartbeat [default: 60].
    #[arg(long, env = "KILN_LEASE_TTL_SECS")]
    lease_ttl_secs: Option<u64>,
    /// Attempts per cell when a sweep does not say [default: 5].
    #[arg(long, env = "KILN_MAX_ATTEMPTS")]
    max_attempts: Option<u32>,
    /// Maintenance pass interval in milliseconds [default: 1000].
    #[arg(long, env = "KILN_MAINTENANCE_INTERVAL_MS")]
    maintenance_interval_ms: Option<u64>,
    /// Refuse every call without a live token (`kiln token create`).
    #[arg(long, env = "KILN_REQUIRE_TOKENS")]
    require_tokens: bool,
    /// TLS certificate chain (PEM); with --tls-key, serve TLS (clients use https://).
    #[arg(long, env = "KILN_TLS_CERT")]
    tls_cert: Option<String>,
    /// TLS private key (PEM).
    #[arg(long, env = "KILN_TLS_KEY")]
    tls_key: Option<String>,
    /// Require client certificates signed by this CA (PEM).
    #[arg(long, env = "KILN_TLS_CLIENT_CA")]
    tls_client_ca: Option<String>,
    /// Listen on a non-loopback address without TLS and tokens anyway (a network you trust:
    /// anyone on it can drive the farm).
    #[arg(long, env = "KILN_INSECURE_LAN")]
    insecure_lan: bool,
    /// Write the bound address to this file once listening (for scripts using port 0).
    #[arg(long)]
    addr_file: Option<PathBuf>,
    /// Storage the web UI reads images from, as the workers write them: file://DIR or
    /// s3://BUCKET/PREFIX (repeatable; the S3 flags below apply).
    #[arg(
        long = "images",
        env = "KILN_IMAGES",
        value_name = "URL",
        value_delimiter = ','
    )]
    images: Vec<String>,
    /// Folder of the web UI's thumbnail cache [default: beside a SQLite database, else the
    /// temporary folder].
    #[arg(long, env = "KILN_THUMBS_DIR")]
    thumbs_dir: Option<String>,
    /// The pool's model storage, told to `kiln model add`: file:///DIR or s3://BUCKET/PREFIX
    /// (no credentials; each client and worker uses its own). Workers read registry models
    /// from it (their --model-storage).
    #[arg(long, env = "KILN_MODEL_STORAGE", value_name = "URL")]
    model_storage: Option<String>,
    /// Don't serve the web UI (the gRPC API and Prometheus's `/metrics` only).
    #[arg(long, env = "KILN_NO_WEB")]
    no_web: bool,
    #[command(flatten)]
    s3: crate::client::S3Args,
}

/// The settings of a config file, if one is given.
pub fn file_settings(config: Option<&PathBuf>) -> anyhow::Result<Settings> {
    Ok(match config {
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .with_context(|| format!("reading config {}", path.display()))?;
            Settings::from_toml(&text, &path.display().to_string())?
        }
        None => Settings::default(),
    })
}

pub fn main(args: Args) -> anyhow::Result<()> {
    let file = file_settings(args.config.as_ref())?;
    let flags = Settings {
        listen: args.listen,
        db: args.db,
        lease_ttl_secs: args.lease_ttl_secs,
        max_attempts: args.max_attempts,
        maintenance_interval_ms: args.maintenance_interval_ms,
        require_tokens: args.require_tokens.then_some(true),
        tls_cert: args.tls_cert,
        tls_key: args.tls_key,
        tls_client_ca: args.tls_client_ca,
        insecure_lan: args.insecure_lan.then_some(true),
        web: args.no_web.then_some(false),
        images: Some(args.images).filter(|i| !i.is_empty()),
        thumbs_dir: args.thumbs_dir,
        model_storage: args.model_storage,
        ..Default::default()
    };
    let cfg = file.merge(flags).validate()?;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(cfg.listen)
            .await
            .with_context(|| format!("binding {}", cfg.listen))?;
        let addr = listener.local_addr()?;
        if let Some(path) = &args.addr_file {
            std::fs::write(path, addr.to_string())
                .with_context(|| format!("writing {}", path.display()))?;
        }
        let web = web_options(&cfg.web, &args.s3.options()).await?;
        if web.is_some() {
            let scheme = if cfg.security.tls.is_some() {
                "https"
            } else {
                "http"
            };
            eprintln!("web UI: {scheme}://{addr}/");
        }
        Coordinator::open(&cfg)
            .await?
            .with_web(web)
            .serve(listener, crate::signal::shutdown())
            .await?;
        anyhow::Ok(())
    })
}

/// The web UI's options from `web`, its image storages opened; `None` when it is off.
pub async fn web_options(
    web: &kiln_coordinator::config::WebConfig,
    s3: &kiln_worker::upload::S3Options,
) -> anyhow::Result<Option<kiln_coordinator::web::WebOptions>> {
    use std::sync::Arc;

    use kiln_coordinator::web::{ImageSource, NoImages, Thumbs, WebOptions};
    use kiln_worker::upload::StorageUrl;

    if !web.enabled {
        return Ok(None);
    }
    let urls = web
        .images
        .iter()
        .map(|u| {
            u.parse::<StorageUrl>()
                .with_context(|| format!("--images {u}"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let images: Arc<dyn ImageSource> = if urls.is_empty() {
        Arc::new(NoImages)
    } else {
        Arc::new(crate::images::StorageImages::open(&urls, s3).await?)
    };
    let thumbs = Thumbs::new(web.thumbs_dir.clone())
        .with_context(|| format!("thumbnail cache {}", web.thumbs_dir.display()))?;
    Ok(Some(WebOptions {
        images,
        thumbs: Arc::new(thumbs),
    }))
}
