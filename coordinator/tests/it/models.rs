//! The model registry (issue 20). On both backends: names added once per content, re-pointed,
//! listed and removed; a sweep's registry references pinned at submit, kept by an extend after
//! a re-point; leases preferring cells whose pinned models the worker holds. Over gRPC (a real
//! server on 127.0.0.1:0): `ModelService` with its scopes and bounds, a sweep file pinned at
//! submit and still rendering the planned hash after the name is re-pointed, an unknown
//! `sha256:` refused before anything is stored, `cached_models` and `activity` bounds, and the
//! activity shown with the worker's running cells.

use kiln_coordinator::Error;
use kiln_coordinator::config::Security;
use kiln_coordinator::domain::auth::Secret;
use kiln_coordinator::domain::state::{ModelKind, Scope};
use kiln_coordinator::queue::{QueueConfig, Submission, SubmittedCells, stored_source};
use kiln_coordinator::sweep::{CellSpec, SweepSource};
use kiln_proto::v1 as pb;
use kiln_proto::v1::model_service_client::ModelServiceClient;
use kiln_proto::v1::sweep_service_client::SweepServiceClient;
use kiln_proto::v1::worker_service_client::WorkerServiceClient;
use tonic::Code;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::interceptor::InterceptedService;
use tonic::transport::Channel;

use crate::harness::{Backend, Fixture, Served, TestDb, cell, submission};

conformance!(
    registry_stores_once_repoints_lists_and_removes,
    sweeps_pin_names_and_hashes_and_extends_keep_them,
    leases_prefer_workers_that_hold_the_models,
);

const A: &str = "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
const B: &str = "bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb";

async fn registry_stores_once_repoints_lists_and_removes(backend: Backend) {
    let fx = Fixture::new(backend).await;
    let q = &fx.queue;
    let (dream, previous) = q
        .add_model("dream", A, 10, ModelKind::Checkpoint)
        .await
        .unwrap();
    assert_eq!(
        (dream.sha256.as_str(), dream.bytes, dream.kind, previous),
        (A, 10, ModelKind::Checkpoint, None)
    );
    // The same file under a second name is the same blob; with another size it is refused.
    q.add_model("also dream", A, 10, ModelKind::Checkpoint)
        .await
        .unwrap();
    assert_eq!(q.store().model_blob(A).await.unwrap(), Some(10));
    assert!(matches!(
        q.add_model("liar", A, 11, ModelKind::Checkpoint).await,
        Err(Error::Conflict(_))
    ));
    assert!(q.store().model_get("liar").await.unwrap().is_none());
    // Re-pointing says what the name pointed at.
    let (repointed, previous) = q.add_model("dream", B, 20, ModelKind::Lora).await.unwrap();
    assert_eq!(previous.as_deref(), Some(A));
    assert_eq!(
        (repointed.sha256.as_str(), repointed.kind),
        (B, ModelKind::Lora)
    );
    let listed: Vec<(String, String)> = q
        .models()
        .await
        .unwrap()
        .into_iter()
        .map(|m| (m.name, m.sha256))
        .collect();
    assert_eq!(
        listed,
        [("also dream".into(), A.into()), ("dream".into(), B.into())]
    );
    // Removing drops the name, not the blob.
    assert_eq!(q.remove_model("dream").await.unwrap(), B);
    assert!(matches!(
        q.remove_model("dream").await,
        Err(Error::ModelNotFound(n)) if n == "dream"
    ));
    assert_eq!(q.store().model_blob(B).await.unwrap(), Some(20));
    // Bad input is refused and stores nothing.
    for (name, sha, size) in [
        ("", A, 1),
        ("a/b", A, 1),
        ("sha256:x", A, 1),
        ("http-thing", A, 1),
        (&*"n".repeat(129), A, 1),
        ("ok", "ABC", 1),
        ("ok", &*A.to_uppercase(), 1),
        ("ok", A, 0),
        ("ok", A, (1 << 40) + 1),
    ] {
        assert!(
            matches!(
                q.add_model(name, sha, size, ModelKind::Vae).await,
                Err(Error::Invalid(_))
            ),
            "{name:?} {sha} {size}"
        );
    }
    assert_eq!(q.models().await.unwrap().len(), 1);
    fx.finish().await;
}

/// A sweep file submitted as `kiln submit` does: pinned, stored with its pins.
async fn submit_file(fx: &Fixture, key: &str, text: &str) -> kiln_proto::SweepId {
    let mut src = SweepSource::new("s.toml", text);
    fx.queue
        .pin_models(&mut src, &Default::default())
        .await
        .unwrap();
    let spec = stored_source(&src);
    fx.queue
        .submit(Submission {
            spec,
            cells: SubmittedCells::File(src),
            ..submission(key, vec![])
        })
        .await
        .unwrap()
        .id
}

/// Every cell of the sweep, by leasing them all.
async fn lease_all(fx: &Fixture, n: usize) -> Vec<CellSpec> {
    let w = fx.worker(&format!("w{}", rand::random::<u32>())).await;
    let mut out: Vec<CellSpec> = fx
        .queue
        .lease(w, 64, None)
        .await
        .unwrap()
        .iter()
        .map(|c| serde_json::from_str(&c.spec_json).unwrap())
        .collect();
    out.sort_by_key(|c| c.seed);
    assert_eq!(out.len(), n);
    out
}

/// A sweep file of `seeds` (a TOML list): the top-level keys come before the `[[loras]]` table.
fn sweep(seeds: &str) -> String {
    format!(
        "model = \"dream\"\nprompt = \"a fox\"\nsteps = 4\ncfg = 1.0\nvae = \"local.pt\"\n\
         seeds = {seeds}\n[[loras]]\nname = \"detail\"\n"
    )
}

async fn sweeps_pin_names_and_hashes_and_extends_keep_them(backend: Backend) {
    let fx = Fixture::new(backend).await;
    let q = &fx.queue;
    q.add_model("dream", A, 10, ModelKind::Checkpoint)
        .await
        .unwrap();
    q.add_model("detail", B, 10, ModelKind::Lora).await.unwrap();
    let id = submit_file(&fx, "pinned", &sweep("[1]")).await;
    let cells = lease_all(&fx, 1).await;
    assert_eq!(cells[0].model, "dream");
    assert_eq!(cells[0].model_sha256, A);
    assert_eq!(cells[0].loras[0].sha256, B);
    assert_eq!(
        cells[0].vae_sha256, "",
        "not a registry name: a worker-local file"
    );

    // Re-pointed after submit: the sweep's extension keeps the hash it was planned with...
    q.add_model("dream", B, 10, ModelKind::Checkpoint)
        .await
        .unwrap();
    let grown = SweepSource::new("s.toml", sweep("[1, 2]"));
    let (added, total) = q.extend(id, grown).await.unwrap();
    assert_eq!((added, total), (1, 2), "the old cell is the same cell");
    let cells = lease_all(&fx, 1).await;
    assert_eq!((cells[0].seed, cells[0].model_sha256.as_str()), (2, A));
    // ... and a new sweep of the same file gets the new one.
    submit_file(&fx, "after", &sweep("[1]")).await;
    assert_eq!(lease_all(&fx, 1).await[0].model_sha256, B);

    // `sha256:` of a registered file pins it; of an unknown one it is refused at submit.
    let by_hash = format!("model = \"sha256:{A}\"\nprompt = \"x\"\nsteps = 4\nseeds = [5]\n");
    submit_file(&fx, "hash", &by_hash).await;
    assert_eq!(lease_all(&fx, 1).await[0].model_sha256, A);
    let unknown = by_hash.replace(A, &"c".repeat(64));
    let mut src = SweepSource::new("s.toml", unknown);
    assert!(matches!(
        q.pin_models(&mut src, &Default::default()).await,
        Err(Error::ModelNotFound(r)) if r == format!("sha256:{}", "c".repeat(64))
    ));
    let mut short = SweepSource::new("s.toml", "model = \"sha256:abc\"\nprompt = \"x\"\n");
    assert!(matches!(
        q.pin_models(&mut short, &Default::default()).await,
        Err(Error::Invalid(_))
    ));
    fx.finish().await;
}

fn pinned(seed: u64, sha: &str) -> CellSpec {
    let mut c = cell(seed);
    c.model = format!("sha256:{sha}");
    c.model_sha256 = sha.into();
    c.loras.clear();
    c
}

async fn leases_prefer_workers_that_hold_the_models(backend: Backend) {
    let fx = Fixture::new(backend).await;
    let q = &fx.queue;
    // Queue order: a cell needing A first, then one needing B, then one needing A.
    q.submit(submission(
        "s",
        vec![pinned(1, A), pinned(2, B), pinned(3, A)],
    ))
    .await
    .unwrap();
    let warm = fx.worker("holds-b").await;
    let cold = fx.worker("holds-nothing").await;
    q.report_cached_models(warm, &[B.to_string()]).unwrap();
    q.report_cached_models(cold, &[]).unwrap();
    let seed = |c: &kiln_coordinator::domain::lease::LeasedCell| {
        serde_json::from_str::<CellSpec>(&c.spec_json).unwrap().seed
    };
    // The worker that holds B takes B's cell, past the head.
    let got = q.lease(warm, 1, None).await.unwrap();
    assert_eq!(got.iter().map(seed).collect::<Vec<_>>(), [2]);
    // A worker holding nothing still gets cells: nobody holds A, so it downloads.
    let got = q.lease(cold, 1, None).await.unwrap();
    assert_eq!(got.iter().map(seed).collect::<Vec<_>>(), [1]);
    // Another worker now holds A: the cold one still gets the last cell when it asks (a
    // preference, never a refusal).
    let third = fx.worker("holds-a").await;
    q.report_cached_models(third, &[A.to_string()]).unwrap();
    let got = q.lease(cold, 1, None).await.unwrap();
    assert_eq!(got.iter().map(seed).collect::<Vec<_>>(), [3]);
    // Reports are bounded and checked.
    let many = vec![A.to_string(); 4097];
    assert!(matches!(
        q.report_cached_models(cold, &many),
        Err(Error::TooLarge(_))
    ));
    assert!(matches!(
        q.report_cached_models(cold, &["x".into()]),
        Err(Error::Invalid(_))
    ));
    fx.finish().await;
}

/// Sends a bearer token on every call.
#[derive(Clone)]
struct Bearer(Option<AsciiMetadataValue>);

impl tonic::service::Interceptor for Bearer {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.0 {
            r.metadata_mut().insert("authorization", t.clone());
        }
        Ok(r)
    }
}

type Models = ModelServiceClient<InterceptedService<Channel, Bearer>>;

struct Pool {
    channel: Channel,
    db: TestDb,
    served: Served,
}

impl Pool {
    async fn start(require_tokens: bool) -> Pool {
        let db = TestDb::new(Backend::Sqlite).await;
        let security = Security {
            require_tokens,
            tls: None,
        };
        let cfg = QueueConfig {
            model_storage: Some("s3://models/pool".into()),
            ..Default::default()
        };
        let served = Served::start_with(&db, security, cfg).await;
        let channel = served.channel().await;
        Pool {
            channel,
            db,
            served,
        }
    }

    async fn token(&self, scope: Scope) -> Bearer {
        let secret = Secret::generate();
        let store = self.db.store().await;
        store
            .token_insert(
                "t",
                "alice",
                scope,
                &secret.hash(),
                kiln_coordinator::clock::Millis(1),
            )
            .await
            .unwrap();
        store.close().await;
        Bearer(Some(format!("Bearer {}", secret.expose()).parse().unwrap()))
    }

    fn models(&self, who: Bearer) -> Models {
        ModelServiceClient::with_interceptor(self.channel.clone(), who)
    }
}

fn add(name: &str, sha: &str, size: u64) -> pb::AddModelRequest {
    pb::AddModelRequest {
        name: name.into(),
        sha256: sha.into(),
        size,
        kind: pb::ModelKind::Checkpoint as i32,
    }
}

fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    r.map_or_else(|s| s.code(), |_| Code::Ok)
}

#[tokio::test]
async fn model_service_scopes_and_bounds() {
    let pool = Pool::start(true).await;
    let (read, submit, admin) = (
        pool.token(Scope::Read).await,
        pool.token(Scope::Submit).await,
        pool.token(Scope::Admin).await,
    );
    assert_eq!(
        code(pool.models(Bearer(None)).add_model(add("m", A, 1)).await),
        Code::Unauthenticated
    );
    assert_eq!(
        code(pool.models(read.clone()).add_model(add("m", A, 1)).await),
        Code::PermissionDenied
    );
    let r = pool
        .models(submit.clone())
        .add_model(add("m", A, 5))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.model.unwrap().sha256, A);
    assert_eq!(r.previous_sha256, "");
    let listed = pool
        .models(read.clone())
        .list_models(pb::ListModelsRequest {})
        .await
        .unwrap()
        .into_inner()
        .models;
    assert_eq!(listed.len(), 1);
    assert_eq!((listed[0].name.as_str(), listed[0].size), ("m", 5));
    let place = pool
        .models(read.clone())
        .model_storage(pb::ModelStorageRequest {})
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        (place.url.as_str(), place.key_prefix.as_str()),
        ("s3://models/pool", "models/sha256/")
    );
    // Removing needs an admin token.
    let rm = |who: Bearer| {
        let mut c = pool.models(who);
        async move {
            c.remove_model(pb::RemoveModelRequest { name: "m".into() })
                .await
        }
    };
    assert_eq!(
        rm(submit.clone()).await.unwrap_err().code(),
        Code::PermissionDenied
    );
    assert_eq!(rm(admin.clone()).await.unwrap().into_inner().sha256, A);
    assert_eq!(rm(admin.clone()).await.unwrap_err().code(), Code::NotFound);
    // Validation and bounds.
    let mut c = pool.models(submit);
    for bad in [
        add("a/b", A, 1),
        add("m", "zz", 1),
        add("m", A, 0),
        pb::AddModelRequest {
            kind: 99,
            ..add("m", A, 1)
        },
    ] {
        assert_eq!(
            c.add_model(bad).await.unwrap_err().code(),
            Code::InvalidArgument
        );
    }
    let huge = add(&"x".repeat(100_000), A, 1);
    assert_eq!(
        c.add_model(huge).await.unwrap_err().code(),
        Code::OutOfRange,
        "a request past 64 KiB is refused before the handler"
    );
    pool.served.stop().await;
}

#[tokio::test]
async fn a_pinned_sweep_renders_its_hash_after_the_name_is_repointed() {
    let pool = Pool::start(false).await;
    let mut models = pool.models(Bearer(None));
    let mut sweeps = SweepServiceClient::new(pool.channel.clone());
    let mut workers = WorkerServiceClient::new(pool.channel.clone());
    models.add_model(add("dream", A, 7)).await.unwrap();
    let header = |key: &str, text: String| pb::SubmitSweepRequest {
        part: Some(pb::submit_sweep_request::Part::Header(pb::SweepHeader {
            idempotency_key: key.into(),
            spec: text,
            spec_path: "s.toml".into(),
            ..Default::default()
        })),
    };
    let text = "model = \"dream\"\nprompt = \"a fox\"\nsteps = 4\ncfg = 1.0\nseeds = [1, 2]\n";
    let sweep = sweeps
        .submit_sweep(tokio_stream::iter(vec![header("one", text.into())]))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(sweep.cell_count, 2);
    // An unknown sha256: is refused, and nothing is stored.
    let unknown = format!("model = \"sha256:{B}\"\nprompt = \"x\"\nseeds = [1]\n");
    let e = sweeps
        .submit_sweep(tokio_stream::iter(vec![header("two", unknown)]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains(B), "{}", e.message());
    let listed = sweeps
        .list_sweeps(pb::ListSweepsRequest {
            limit: 10,
            page_token: String::new(),
        })
        .await
        .unwrap()
        .into_inner()
        .sweeps;
    assert_eq!(listed.len(), 1);

    // Re-point the name, then render: the cells still carry the planned hash.
    let r = models
        .add_model(add("dream", B, 9))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(r.previous_sha256, A);
    let info = crate::harness::registration("pc");
    let reg = workers
        .register(pb::RegisterRequest {
            info: Some(pb::WorkerInfo {
                name: info.name,
                device_kind: pb::DeviceKind::Cpu as i32,
                device_model: info.device_model,
                memory_mib: 8192,
                max_pixels: 1 << 20,
                loaded: vec![],
                version: "test".into(),
                storage: "file:///tmp/kiln-test".into(),
                render_level: kiln_proto::sampler::RENDER_LEVEL,
            }),
        })
        .await
        .unwrap()
        .into_inner();
    let session: AsciiMetadataValue = reg.session.parse().unwrap();
    let mut workers = WorkerServiceClient::with_interceptor(
        pool.channel.clone(),
        move |mut r: tonic::Request<()>| -> Result<tonic::Request<()>, tonic::Status> {
            r.metadata_mut().insert("x-kiln-session", session.clone());
            Ok(r)
        },
    );
    let lease = |cached: Vec<String>| pb::LeaseRequest {
        worker_id: reg.worker_id,
        max_tasks: 8,
        loaded: vec![],
        cached_models: cached,
    };
    let e = workers
        .lease(lease(vec![A.to_string(); 4097]))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::ResourceExhausted);
    let tasks = workers
        .lease(lease(vec![A.to_string()]))
        .await
        .unwrap()
        .into_inner()
        .tasks;
    assert_eq!(tasks.len(), 2);
    for t in &tasks {
        let c = t.cell.as_ref().unwrap();
        assert_eq!((c.model.as_str(), c.model_sha256.as_str()), ("dream", A));
    }
    // Cells a client sends are pinned too: by name (now B) and by a registered sha256.
    let mut by_name = crate::grpc::render_cell(7);
    by_name.model = "dream".into();
    let mut by_hash = crate::grpc::render_cell(8);
    by_hash.model = format!("sha256:{A}");
    let msgs = crate::grpc::submit_stream("cells", vec![vec![by_name, by_hash]]);
    sweeps.submit_sweep(tokio_stream::iter(msgs)).await.unwrap();
    let mut sent: Vec<(u64, String)> = workers
        .lease(lease(vec![]))
        .await
        .unwrap()
        .into_inner()
        .tasks
        .into_iter()
        .map(|t| t.cell.unwrap())
        .map(|c| (c.seed, c.model_sha256))
        .collect();
    sent.sort();
    assert_eq!(sent, [(7, B.to_string()), (8, A.to_string())]);
    // The worker says what it is doing; `kiln workers` shows it; bounds hold.
    let progress = |activity: &str| pb::ProgressRequest {
        worker_id: reg.worker_id,
        attempt: Some(pb::AttemptRef {
            cell_id: tasks[0].cell_id,
            attempt: tasks[0].attempt,
        }),
        step: 0,
        total_steps: 4,
        activity: activity.into(),
    };
    let e = workers
        .report_progress(progress(&"x".repeat(129)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    workers
        .report_progress(progress("downloading dream (41%)"))
        .await
        .unwrap();
    let listed = sweeps
        .list_workers(pb::ListWorkersRequest {})
        .await
        .unwrap()
        .into_inner()
        .workers;
    let activities: Vec<&str> = listed[0]
        .running
        .iter()
        .map(|p| p.activity.as_str())
        .filter(|a| !a.is_empty())
        .collect();
    assert_eq!(activities, ["downloading dream (41%)"]);
    pool.served.stop().await;
}
