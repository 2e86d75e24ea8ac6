//! Runs the coordinator: gRPC services (sweeps, workers, models, standard health), the web UI
//! and the Prometheus `/metrics` on one listener (HTTP/2 for gRPC, HTTP/1.1 too for browsers and
//! scrapers), and the maintenance loop, until the shutdown future resolves; then stops both
//! gracefully. `/metrics` is served whether or not the web UI is.

use std::future::Future;
use std::time::Duration;

use kiln_proto::v1::model_service_server::ModelServiceServer;
use kiln_proto::v1::sweep_service_server::SweepServiceServer;
use kiln_proto::v1::worker_service_server::WorkerServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;
use tonic::transport::{Certificate, Identity, ServerTlsConfig};

use crate::api::{
    AuthLayer, MAX_MESSAGE_BYTES, MAX_SWEEP_MESSAGE_BYTES, ModelApi, SweepApi, WorkerApi,
};
use crate::clock::SystemClock;
use crate::config::{Config, Security};
use crate::queue::{Queue, maintenance};
use crate::store::Store;
use crate::web::WebOptions;
use crate::{Error, Result};

/// A coordinator ready to serve: its database connected and migrated, its queue built. The one
/// way the coordinator is started, by `kiln coordinator` and by `kiln run`'s embedded one.
pub struct Coordinator {
    store: Store,
    queue: Queue,
    maintenance_interval: Duration,
    security: Security,
    web: Option<WebOptions>,
}

impl Coordinator {
    /// Connects to the configured database, applying migrations.
    pub async fn open(cfg: &Config) -> Result<Self> {
        let store = Store::connect(&cfg.db, &cfg.store).await?;
        tracing::info!(backend = store.backend(), db = ?cfg.db, "database ready");
        let queue = Queue::new(
            store.clone(),
            std::sync::Arc::new(SystemClock),
            cfg.queue.clone(),
        );
        Ok(Self {
            store,
            queue,
            maintenance_interval: cfg.maintenance_interval,
            security: cfg.security.clone(),
            web: None,
        })
    }

    /// Serves the web UI too, on the same port (`None`: gRPC only).
    pub fn with_web(mut self, web: Option<WebOptions>) -> Self {
        self.web = web;
        self
    }

    /// The queue, for what a caller does before serving (e.g. requeueing interrupted cells).
    pub fn queue(&self) -> &Queue {
        &self.queue
    }

    /// Serves on `listener` until `shutdown` resolves, then closes the database.
    pub async fn serve(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<()> {
        let out = serve(
            self.queue,
            listener,
            &self.security,
            self.maintenance_interval,
            self.web,
            shutdown,
        )
        .await;
        self.store.close().await;
        out
    }
}

/// Connects to the configured database (applying migrations) and serves on `listener` until
/// `shutdown` resolves.
pub async fn run(
    cfg: &Config,
    listener: TcpListener,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    Coordinator::open(cfg)
        .await?
        .serve(listener, shutdown)
        .await
}

/// Serves `queue` on `listener` as `security` says (and the web UI when `web` is given), with
/// maintenance every `maintenance_interval`, until `shutdown` resolves.
pub async fn serve(
    queue: Queue,
    listener: TcpListener,
    security: &Security,
    maintenance_interval: Duration,
    web: Option<WebOptions>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
    let mut builder = tonic::transport::Server::builder();
    if let Some(tls) = &security.tls {
        let identity = Identity::from_pem(&tls.cert_pem, &tls.key_pem);
        let mut config = ServerTlsConfig::new().identity(identity);
        if let Some(ca) = &tls.client_ca_pem {
            config = config.client_ca_root(Certificate::from_pem(ca));
        }
        builder = builder
            .tls_config(config)
            .map_err(|e| Error::Config(format!("TLS: {e}")))?;
    }
    let (stop_tx, stop_rx) = watch::channel(false);
    let stopped = |mut rx: watch::Receiver<bool>| async move {
        let _ = rx.wait_for(|s| *s).await;
    };
    let maint = tokio::spawn(maintenance::run(
        queue.clone(),
        maintenance_interval,
        stopped(stop_rx.clone()),
    ));
    tokio::spawn(async move {
        shutdown.await;
        let _ = stop_tx.send(true);
    });

    let (health, health_service) = tonic_health::server::health_reporter();
    health.set_serving::<SweepServiceServer<SweepApi>>().await;
    health.set_serving::<WorkerServiceServer<WorkerApi>>().await;
    health.set_serving::<ModelServiceServer<ModelApi>>().await;

    let addr = listener.local_addr().ok();
    let auth = if security.require_tokens {
        AuthLayer::tokens(queue.clone())
    } else {
        AuthLayer::open()
    };
    tracing::info!(
        ?addr,
        tls = security.tls.is_some(),
        tokens = security.require_tokens,
        "coordinator listening"
    );
    if addr.is_some_and(|a| !a.ip().is_loopback())
        && !(security.tls.is_some() && security.require_tokens)
    {
        tracing::warn!("reachable from the network without TLS and tokens (--insecure-lan)");
    }
    let sweeps = SweepServiceServer::new(SweepApi::new(queue.clone()))
        .max_decoding_message_size(MAX_SWEEP_MESSAGE_BYTES);
    let workers = WorkerServiceServer::new(WorkerApi::new(queue.clone()))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    // Registry requests are a name and a hash: 64 KiB is plenty.
    let models =
        ModelServiceServer::new(ModelApi::new(queue.clone())).max_decoding_message_size(64 << 10);
    let mut routes = tonic::service::Routes::builder();
    routes
        .add_service(health_service)
        .add_service(sweeps)
        .add_service(workers)
        .add_service(models);
    let metrics = crate::metrics::router(queue.clone(), security.require_tokens);
    let mut router = routes.routes().into_axum_router().merge(metrics);
    if let Some(web) = web {
        let tls = security.tls.is_some();
        let ui = crate::web::router(queue, web, security.require_tokens, tls, stop_rx.clone());
        router = router.merge(ui).fallback(crate::web::fallback);
    }
    let routes = tonic::service::Routes::from(router);
    let result = builder
        .accept_http1(true)
        .layer(auth)
        .add_routes(routes)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stopped(stop_rx))
        .await
        .map_err(|e| Error::Config(format!("gRPC server: {e}")));
    let _ = maint.await;
    tracing::info!("coordinator stopped");
    result
}
