//! Runs the coordinator: gRPC services (sweeps, workers, standard health) on a listener, and
//! the maintenance loop, until the shutdown future resolves; then stops both gracefully.

use std::future::Future;
use std::time::Duration;

use kiln_proto::v1::sweep_service_server::SweepServiceServer;
use kiln_proto::v1::worker_service_server::WorkerServiceServer;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio_stream::wrappers::TcpListenerStream;

use crate::api::{MAX_MESSAGE_BYTES, MAX_SWEEP_MESSAGE_BYTES, SweepApi, WorkerApi};
use crate::clock::SystemClock;
use crate::config::Config;
use crate::queue::{Queue, maintenance};
use crate::store::Store;
use crate::{Error, Result};

/// A coordinator ready to serve: its database connected and migrated, its queue built. The one
/// way the coordinator is started, by `kiln coordinator` and by `kiln run`'s embedded one.
pub struct Coordinator {
    store: Store,
    queue: Queue,
    maintenance_interval: Duration,
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
        })
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
        let out = serve(self.queue, listener, self.maintenance_interval, shutdown).await;
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

/// Serves `queue` on `listener` with maintenance every `maintenance_interval`, until
/// `shutdown` resolves.
pub async fn serve(
    queue: Queue,
    listener: TcpListener,
    maintenance_interval: Duration,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<()> {
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

    let addr = listener.local_addr().ok();
    tracing::info!(?addr, "coordinator listening");
    let sweeps = SweepServiceServer::new(SweepApi::new(queue.clone()))
        .max_decoding_message_size(MAX_SWEEP_MESSAGE_BYTES);
    let workers = WorkerServiceServer::new(WorkerApi::new(queue))
        .max_decoding_message_size(MAX_MESSAGE_BYTES);
    let result = tonic::transport::Server::builder()
        .add_service(health_service)
        .add_service(sweeps)
        .add_service(workers)
        .serve_with_incoming_shutdown(TcpListenerStream::new(listener), stopped(stop_rx))
        .await
        .map_err(|e| Error::Config(format!("gRPC server: {e}")));
    let _ = maint.await;
    tracing::info!("coordinator stopped");
    result
}
