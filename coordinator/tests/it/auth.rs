//! Who may do what, over real gRPC with TLS on loopback: a coordinator that requires tokens
//! refuses calls without a live token (UNAUTHENTICATED), refuses a scope's overreach and
//! another owner's sweeps (PERMISSION_DENIED), holds every worker call to the session its
//! worker got at registration, and refuses results that name another storage.

use std::time::Duration;

use kiln_coordinator::clock::{Clock, SystemClock};
use kiln_coordinator::config::{Security, Tls};
use kiln_coordinator::domain::auth::Secret;
use kiln_coordinator::domain::state::Scope;
use kiln_coordinator::store::Store;
use kiln_proto::v1 as pb;
use kiln_proto::v1::sweep_service_client::SweepServiceClient;
use kiln_proto::v1::worker_service_client::WorkerServiceClient;
use rcgen::{BasicConstraints, CertificateParams, IsCa, Issuer, KeyPair};
use tonic::Code;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig, Endpoint};

use crate::harness::{Backend, Served, TestDb};

/// A CA and a certificate for 127.0.0.1 signed by it: (CA PEM, server cert PEM, key PEM).
fn certificates() -> (String, String, String) {
    let ca_key = KeyPair::generate().unwrap();
    let mut ca = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_cert = ca.self_signed(&ca_key).unwrap();
    let issuer = Issuer::new(ca, &ca_key);
    let key = KeyPair::generate().unwrap();
    let server = CertificateParams::new(vec!["127.0.0.1".to_string()]).unwrap();
    let cert = server.signed_by(&key, &issuer).unwrap();
    (ca_cert.pem(), cert.pem(), key.serialize_pem())
}

/// Adds a token (when given) and a worker session (when given) to every call.
#[derive(Clone, Default)]
struct As {
    token: Option<AsciiMetadataValue>,
    session: Option<AsciiMetadataValue>,
}

impl As {
    fn token(secret: &str) -> As {
        As {
            token: Some(format!("Bearer {secret}").parse().unwrap()),
            session: None,
        }
    }

    fn with_session(mut self, session: &str) -> As {
        self.session = Some(session.parse().unwrap());
        self
    }
}

impl tonic::service::Interceptor for As {
    fn call(&mut self, mut r: tonic::Request<()>) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.token {
            r.metadata_mut().insert("authorization", t.clone());
        }
        if let Some(s) = &self.session {
            r.metadata_mut().insert("x-kiln-session", s.clone());
        }
        Ok(r)
    }
}

struct Farm {
    channel: Channel,
    plain: String,
    store: Store,
    _served: Served,
    _db: TestDb,
}

impl Farm {
    async fn start() -> Farm {
        let db = TestDb::new(Backend::Sqlite).await;
        let store = db.store().await;
        let (ca, cert, key) = certificates();
        let security = Security {
            require_tokens: true,
            tls: Some(Tls {
                cert_pem: cert.into_bytes(),
                key_pem: key.into_bytes(),
                client_ca_pem: None,
            }),
        };
        let served = Served::start(&db, security).await;
        let addr = served.addr;
        let channel = Endpoint::from_shared(format!("https://{addr}"))
            .unwrap()
            .tls_config(ClientTlsConfig::new().ca_certificate(Certificate::from_pem(ca)))
            .unwrap()
            .connect()
            .await
            .unwrap();
        Farm {
            channel,
            plain: format!("http://{addr}"),
            store,
            _served: served,
            _db: db,
        }
    }

    /// A token of `owner` with `scope`; returns (id, secret).
    async fn token(&self, owner: &str, scope: Scope) -> (i64, String) {
        let secret = Secret::generate();
        let id = self
            .store
            .token_insert("t", owner, scope, &secret.hash(), SystemClock.now())
            .await
            .unwrap();
        (id, secret.expose().to_string())
    }

    fn sweeps(
        &self,
        who: As,
    ) -> SweepServiceClient<tonic::service::interceptor::InterceptedService<Channel, As>> {
        SweepServiceClient::with_interceptor(self.channel.clone(), who)
    }

    fn workers(
        &self,
        who: As,
    ) -> WorkerServiceClient<tonic::service::interceptor::InterceptedService<Channel, As>> {
        WorkerServiceClient::with_interceptor(self.channel.clone(), who)
    }
}

fn cell(seed: u64) -> pb::RenderCell {
    pb::RenderCell {
        model: "tiny-sd15".into(),
        prompt: format!("a fox {seed}"),
        seed,
        steps: 4,
        cfg: 1.0,
        sampler: pb::Sampler::Lcm as i32,
        width: 64,
        height: 64,
        ..Default::default()
    }
}

fn submission(key: &str) -> Vec<pb::SubmitSweepRequest> {
    vec![
        pb::SubmitSweepRequest {
            part: Some(pb::submit_sweep_request::Part::Header(pb::SweepHeader {
                idempotency_key: key.into(),
                ..Default::default()
            })),
        },
        pb::SubmitSweepRequest {
            part: Some(pb::submit_sweep_request::Part::Cells(pb::CellChunk {
                cells: vec![cell(1), cell(2)],
            })),
        },
    ]
}

fn info(storage: &str) -> pb::RegisterRequest {
    pb::RegisterRequest {
        info: Some(pb::WorkerInfo {
            name: "pc".into(),
            device_kind: pb::DeviceKind::Cpu as i32,
            memory_mib: 8192,
            max_pixels: 1 << 20,
            storage: storage.into(),
            ..Default::default()
        }),
    }
}

fn code<T>(r: Result<tonic::Response<T>, tonic::Status>) -> Code {
    match r {
        Ok(_) => Code::Ok,
        Err(s) => s.code(),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_scopes_owners_and_worker_sessions_over_tls() {
    let farm = Farm::start().await;
    let (_, admin) = farm.token("root", Scope::Admin).await;
    let (_, alice) = farm.token("alice", Scope::Submit).await;
    let (_, bob) = farm.token("bob", Scope::Submit).await;
    let (_, reader) = farm.token("alice", Scope::Read).await;
    let (revoked_id, revoked) = farm.token("alice", Scope::Admin).await;
    let (_, worker_token) = farm.token("farm", Scope::Worker).await;
    let list = pb::ListSweepsRequest::default;

    // No token, an unknown one, a revoked one: UNAUTHENTICATED.
    assert_eq!(
        code(farm.sweeps(As::default()).list_sweeps(list()).await),
        Code::Unauthenticated
    );
    let bogus = As::token(Secret::generate().expose());
    assert_eq!(
        code(farm.sweeps(bogus).list_sweeps(list()).await),
        Code::Unauthenticated
    );
    assert_eq!(
        code(farm.sweeps(As::token(&revoked)).list_sweeps(list()).await),
        Code::Ok
    );
    farm.store
        .token_revoke(revoked_id, SystemClock.now())
        .await
        .unwrap();
    let e = farm
        .sweeps(As::token(&revoked))
        .list_sweeps(list())
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::Unauthenticated);
    assert!(!e.message().contains(&revoked), "{}", e.message());
    // Plain HTTP/2 to a TLS coordinator gets nowhere.
    let plain = Channel::from_shared(farm.plain.clone())
        .unwrap()
        .connect_timeout(Duration::from_secs(2))
        .connect()
        .await;
    if let Ok(ch) = plain {
        let r = SweepServiceClient::with_interceptor(ch, As::token(&admin))
            .list_sweeps(list())
            .await;
        assert!(r.is_err(), "plain HTTP was served");
    }

    // Alice submits; bob can neither see nor change her sweep; admin can.
    let sweep = farm
        .sweeps(As::token(&alice))
        .submit_sweep(tokio_stream::iter(submission("alice-1")))
        .await
        .unwrap()
        .into_inner()
        .sweep_id;
    let get = || pb::GetSweepRequest { sweep_id: sweep };
    assert_eq!(
        code(farm.sweeps(As::token(&bob)).get_sweep(get()).await),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            farm.sweeps(As::token(&bob))
                .cancel_sweep(pb::SweepRequest { sweep_id: sweep })
                .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            farm.sweeps(As::token(&bob))
                .watch_sweep(pb::SweepRequest { sweep_id: sweep })
                .await
        ),
        Code::PermissionDenied
    );
    // Bob's key space is his own: alice's key does not hand him her sweep.
    assert_eq!(
        code(
            farm.sweeps(As::token(&bob))
                .submit_sweep(tokio_stream::iter(submission("alice-1")))
                .await
        ),
        Code::PermissionDenied
    );
    let bobs = farm
        .sweeps(As::token(&bob))
        .list_sweeps(list())
        .await
        .unwrap()
        .into_inner();
    assert!(bobs.sweeps.is_empty());
    let bob_query = farm
        .sweeps(As::token(&bob))
        .query_results(pb::QueryResultsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(bob_query.cells.is_empty(), "bob read alice's cells");
    assert_eq!(
        code(farm.sweeps(As::token(&admin)).get_sweep(get()).await),
        Code::Ok
    );
    let alices = farm
        .sweeps(As::token(&reader))
        .query_results(pb::QueryResultsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert_eq!(alices.cells.len(), 2);

    // Scopes: a read token cannot submit or change; a client token cannot be a worker; a
    // worker token cannot read sweeps.
    assert_eq!(
        code(
            farm.sweeps(As::token(&reader))
                .submit_sweep(tokio_stream::iter(submission("r")))
                .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            farm.sweeps(As::token(&reader))
                .pause_sweep(pb::SweepRequest { sweep_id: sweep })
                .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            farm.workers(As::token(&admin))
                .register(info("file:///srv/a"))
                .await
        ),
        Code::PermissionDenied
    );
    assert_eq!(
        code(
            farm.sweeps(As::token(&worker_token))
                .list_sweeps(list())
                .await
        ),
        Code::PermissionDenied
    );

    // Two workers on one worker token; each is held to its own session.
    let a = farm
        .workers(As::token(&worker_token))
        .register(info("file:///srv/a"))
        .await
        .unwrap()
        .into_inner();
    let b = farm
        .workers(As::token(&worker_token))
        .register(info("file:///srv/b"))
        .await
        .unwrap()
        .into_inner();
    let as_a = || farm.workers(As::token(&worker_token).with_session(&a.session));
    let as_b = || farm.workers(As::token(&worker_token).with_session(&b.session));
    let lease = |worker_id| pb::LeaseRequest {
        worker_id,
        max_tasks: 1,
        loaded: vec![],
        ..Default::default()
    };
    // Without a session, or with another worker's, nothing works.
    assert_eq!(
        code(
            farm.workers(As::token(&worker_token))
                .lease(lease(a.worker_id))
                .await
        ),
        Code::Unauthenticated
    );
    assert_eq!(
        code(as_b().lease(lease(a.worker_id)).await),
        Code::Unauthenticated
    );
    let task = as_a()
        .lease(lease(a.worker_id))
        .await
        .unwrap()
        .into_inner()
        .tasks
        .remove(0);
    let attempt = pb::AttemptRef {
        cell_id: task.cell_id,
        attempt: task.attempt,
    };
    let result = |storage: &str| pb::RenderResult {
        object_key: format!(
            "sweeps/{}/{}/{}.png",
            task.sweep_id, task.cell_id, task.attempt
        ),
        storage: storage.into(),
        sha256: "ab".repeat(32),
        bytes: 10,
        width: 64,
        height: 64,
        ..Default::default()
    };
    let complete = |worker_id, storage: &str| pb::CompleteRequest {
        worker_id,
        attempt: Some(attempt),
        result: Some(result(storage)),
        ..Default::default()
    };
    assert_eq!(
        code(
            as_b()
                .complete(complete(a.worker_id, "file:///srv/a"))
                .await
        ),
        Code::Unauthenticated
    );
    assert_eq!(
        code(
            as_b()
                .heartbeat(pb::HeartbeatRequest {
                    worker_id: a.worker_id,
                    attempts: vec![attempt],
                    loaded: vec![],
                    paused_reason: String::new(),
                })
                .await
        ),
        Code::Unauthenticated
    );
    assert_eq!(
        code(
            as_b()
                .release(pb::ReleaseRequest {
                    worker_id: a.worker_id,
                    attempts: vec![attempt],
                    draining: false,
                })
                .await
        ),
        Code::Unauthenticated
    );
    // A forged storage (a client's own disk) or key is refused at Complete.
    assert_eq!(
        code(as_a().complete(complete(a.worker_id, "file:///")).await),
        Code::InvalidArgument
    );
    let mut escape = complete(a.worker_id, "file:///srv/a");
    escape.result.as_mut().unwrap().object_key = "sweeps/../../etc/passwd.png".into();
    assert_eq!(code(as_a().complete(escape).await), Code::InvalidArgument);
    // The real worker completes its own attempt.
    assert_eq!(
        code(
            as_a()
                .complete(complete(a.worker_id, "file:///srv/a"))
                .await
        ),
        Code::Ok
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_answers_without_a_token() {
    let farm = Farm::start().await;
    let mut health = tonic_health::pb::health_client::HealthClient::new(farm.channel.clone());
    let r = health
        .check(tonic_health::pb::HealthCheckRequest {
            service: String::new(),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!(
        r.status,
        tonic_health::pb::health_check_response::ServingStatus::Serving as i32
    );
}

#[tokio::test]
async fn a_token_owner_runs_one_plan_or_submit_at_a_time() {
    let fx = crate::harness::Fixture::new(Backend::Sqlite).await;
    let first = fx.queue.owner_turn(Some("alice")).unwrap();
    let e = fx.queue.owner_turn(Some("alice")).unwrap_err();
    assert_eq!(tonic::Status::from(e).code(), Code::ResourceExhausted);
    // Another owner, and a coordinator without tokens, are not held up.
    assert!(fx.queue.owner_turn(Some("bob")).unwrap().is_some());
    assert!(fx.queue.owner_turn(None).unwrap().is_none());
    drop(first);
    assert!(fx.queue.owner_turn(Some("alice")).unwrap().is_some());
    fx.finish().await;
}

/// `SetKeeper` changes a cell: it needs a token that may submit, of the sweep's owner (or
/// admin), and checks the rating and the cell before anything is written.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_keeper_needs_submit_and_the_sweeps_owner() {
    let farm = Farm::start().await;
    let (_, admin) = farm.token("root", Scope::Admin).await;
    let (_, alice) = farm.token("alice", Scope::Submit).await;
    let (_, bob) = farm.token("bob", Scope::Submit).await;
    let (_, reader) = farm.token("alice", Scope::Read).await;
    farm.sweeps(As::token(&alice))
        .submit_sweep(tokio_stream::iter(submission("alice-1")))
        .await
        .unwrap();
    let cells = || async {
        farm.sweeps(As::token(&alice))
            .query_results(pb::QueryResultsRequest::default())
            .await
            .unwrap()
            .into_inner()
            .cells
    };
    let cell = cells().await[0].cell_id;
    let star = |cell_id, rating| pb::SetKeeperRequest {
        cell_id,
        starred: Some(true),
        rating,
    };

    // Refused: a read token (even alice's), another owner, a rating past 5, no cell, an
    // unknown cell. None of them changed anything.
    for (who, req, want) in [
        (&reader, star(cell, None), Code::PermissionDenied),
        (&bob, star(cell, Some(3)), Code::PermissionDenied),
        (&alice, star(cell, Some(6)), Code::InvalidArgument),
        (&alice, star(0, None), Code::InvalidArgument),
        (&alice, star(cell + 1000, None), Code::NotFound),
    ] {
        let got = code(farm.sweeps(As::token(who)).set_keeper(req).await);
        assert_eq!(got, want, "{req:?}");
    }
    assert!(cells().await.iter().all(|c| !c.starred && c.rating == 0));

    // The owner stars and rates; a field left out keeps its value; admin may too.
    let r = farm
        .sweeps(As::token(&alice))
        .set_keeper(star(cell, Some(4)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.cell_id, r.starred, r.rating), (cell, true, 4));
    let r = farm
        .sweeps(As::token(&admin))
        .set_keeper(pb::SetKeeperRequest {
            cell_id: cell,
            starred: None,
            rating: Some(5),
        })
        .await
        .unwrap()
        .into_inner();
    assert_eq!((r.starred, r.rating), (true, 5));

    // QueryResults shows it, and the filter language finds it.
    let found = farm
        .sweeps(As::token(&reader))
        .query_results(pb::QueryResultsRequest {
            filter: "starred and rating = 5".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner()
        .cells;
    assert_eq!(found.len(), 1);
    assert_eq!(
        (found[0].cell_id, found[0].starred, found[0].rating),
        (cell, true, 5)
    );
}
