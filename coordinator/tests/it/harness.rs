//! Test harness: a fresh queue on a real SQLite file or a fresh Postgres schema, on a manual
//! clock. Postgres comes from `KILN_TEST_DATABASE_URL` (default: the machine's server,
//! `postgres://postgres@127.0.0.1:5432/test`); each test gets its own schema.

use std::sync::Arc;

use kiln_coordinator::clock::{ManualClock, Millis};
use kiln_coordinator::domain::rows::WorkerRegistration;
use kiln_coordinator::domain::state::DeviceKind;
use kiln_coordinator::queue::{Queue, QueueConfig, Submission};
use kiln_coordinator::store::{DatabaseUrl, Store, StoreOptions};
use kiln_coordinator::sweep::{CellSpec, LoraSpec};
use kiln_proto::WorkerId;
use kiln_proto::sampler::SamplerName;

/// Declares each named `async fn(Backend)` as two tests, `sqlite::name` and `postgres::name`.
macro_rules! conformance {
    ($($name:ident),* $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(crate::harness::Backend::Sqlite).await
                }
            )*
        }
        mod postgres {
            $(
                #[tokio::test(flavor = "multi_thread", worker_threads = 4)]
                async fn $name() {
                    super::$name(crate::harness::Backend::Postgres).await
                }
            )*
        }
    };
}

/// Which database a test runs on.
#[derive(Clone, Copy, Debug)]
pub enum Backend {
    Sqlite,
    Postgres,
}

/// A database for one test; dropping it removes the SQLite file (Postgres schemas are dropped
/// by `cleanup`).
pub struct TestDb {
    pub url: DatabaseUrl,
    _dir: Option<tempfile::TempDir>,
    pg_schema: Option<(String, String)>,
}

pub fn pg_base_url() -> String {
    std::env::var("KILN_TEST_DATABASE_URL")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432/test".into())
}

impl TestDb {
    pub async fn new(backend: Backend) -> TestDb {
        match backend {
            Backend::Sqlite => {
                let dir = tempfile::tempdir().unwrap();
                let path = dir.path().join("kiln.db");
                TestDb {
                    url: DatabaseUrl::Sqlite(format!("sqlite://{}", path.display())),
                    _dir: Some(dir),
                    pg_schema: None,
                }
            }
            Backend::Postgres => {
                let base = pg_base_url();
                let schema = format!("kiln_t_{}_{}", std::process::id(), rand::random::<u32>());
                let admin = sqlx::PgPool::connect(&base)
                    .await
                    .unwrap_or_else(|e| panic!("Postgres at {base} (KILN_TEST_DATABASE_URL): {e}"));
                sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE SCHEMA {schema}")))
                    .execute(&admin)
                    .await
                    .unwrap();
                admin.close().await;
                let sep = if base.contains('?') { '&' } else { '?' };
                let url = format!("{base}{sep}options=-c%20search_path%3D{schema}");
                TestDb {
                    url: DatabaseUrl::Postgres(url),
                    _dir: None,
                    pg_schema: Some((base, schema)),
                }
            }
        }
    }

    pub async fn store(&self) -> Store {
        Store::connect(
            &self.url,
            &StoreOptions {
                max_connections: 40,
            },
        )
        .await
        .unwrap()
    }

    pub async fn cleanup(self) {
        if let Some((base, schema)) = &self.pg_schema {
            let admin = sqlx::PgPool::connect(base).await.unwrap();
            sqlx::raw_sql(sqlx::AssertSqlSafe(format!("DROP SCHEMA {schema} CASCADE")))
                .execute(&admin)
                .await
                .unwrap();
            admin.close().await;
        }
    }
}

/// A queue on a fresh database with a manual clock.
pub struct Fixture {
    pub db: TestDb,
    pub queue: Queue,
    pub clock: ManualClock,
}

pub const T0: i64 = 1_700_000_000_000;

impl Fixture {
    pub async fn new(backend: Backend) -> Fixture {
        Self::with_config(backend, QueueConfig::default()).await
    }

    pub async fn with_config(backend: Backend, cfg: QueueConfig) -> Fixture {
        let db = TestDb::new(backend).await;
        let clock = ManualClock::new(Millis(T0));
        let queue = Queue::new(db.store().await, Arc::new(clock.clone()), cfg);
        Fixture { db, queue, clock }
    }

    pub async fn finish(self) {
        self.queue.store().close().await;
        self.db.cleanup().await;
    }

    pub async fn worker(&self, name: &str) -> WorkerId {
        self.queue.register(&registration(name)).await.unwrap().0
    }
}

pub fn registration(name: &str) -> WorkerRegistration {
    WorkerRegistration {
        name: name.into(),
        device_kind: DeviceKind::Cpu,
        device_model: "test cpu".into(),
        memory_mib: 8192,
        max_pixels: 1024 * 1024,
        loaded: vec![],
        version: "test".into(),
        storage: "file:///tmp/kiln-test".into(),
        render_level: kiln_proto::sampler::RENDER_LEVEL,
    }
}

pub fn cell(seed: u64) -> CellSpec {
    CellSpec {
        model: "tiny-sd15".into(),
        loras: vec![LoraSpec {
            name: "lcm.safetensors".into(),
            strength: 1.0,
            sha256: String::new(),
        }],
        prompt: format!("a fox in a forest, seed {seed}"),
        negative_prompt: "blurry".into(),
        seed,
        steps: 4,
        cfg: 1.0,
        sampler: SamplerName::LCM,
        width: 512,
        height: 512,
        rng: "cpu".into(),
        bindings: Default::default(),
        min_memory_mib: 0,
        vae: String::new(),
        clip_skip: 1,
        subseed: 0,
        subseed_strength: 0.0,
        seed_resize_from: None,
        hires: None,
        eta: None,
        init: None,
        model_sha256: String::new(),
        vae_sha256: String::new(),
    }
}

pub fn submission(key: &str, cells: Vec<CellSpec>) -> Submission {
    Submission {
        name: key.into(),
        idempotency_key: key.into(),
        priority: 0,
        max_attempts: None,
        spec: String::new(),
        cells: cells.into(),
        owner: None,
        unique_name: false,
    }
}

/// A real coordinator serving over gRPC on 127.0.0.1:0 (SQLite or Postgres as `db` is), as
/// `security` says, until [`Served::stop`] (or the end of the test).
pub struct Served {
    /// Where it listens.
    pub addr: std::net::SocketAddr,
    stop: Option<tokio::sync::oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Served {
    /// Serves a queue on `db` with default settings.
    pub async fn start(db: &TestDb, security: kiln_coordinator::config::Security) -> Served {
        Self::start_with(db, security, QueueConfig::default()).await
    }

    /// Serves a queue on `db` with `cfg`.
    pub async fn start_with(
        db: &TestDb,
        security: kiln_coordinator::config::Security,
        cfg: QueueConfig,
    ) -> Served {
        let queue = Queue::new(
            db.store().await,
            std::sync::Arc::new(kiln_coordinator::clock::SystemClock),
            cfg,
        );
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let maintenance = std::time::Duration::from_millis(100);
            let stopped = async {
                let _ = stopped.await;
            };
            kiln_coordinator::server::serve(queue, listener, &security, maintenance, None, stopped)
                .await
                .unwrap();
        });
        Served {
            addr,
            stop: Some(stop),
            task,
        }
    }

    /// A plain (no TLS) channel to it.
    pub async fn channel(&self) -> tonic::transport::Channel {
        tonic::transport::Channel::from_shared(format!("http://{}", self.addr))
            .unwrap()
            .connect()
            .await
            .unwrap()
    }

    /// Stops it and waits (at most 10 s) for a graceful end.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        let task = &mut self.task;
        tokio::time::timeout(std::time::Duration::from_secs(10), task)
            .await
            .expect("graceful shutdown")
            .unwrap();
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}
