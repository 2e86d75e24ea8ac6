//! The web UI's sweep page and farm overview on both backends, through the router the server
//! merges: failed attempts grouped by reason (class and first line of the message) with the
//! cells, attempts and workers they happened on; a worker's recent errors; counts and the
//! sweep file as stored.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use kiln_coordinator::domain::lease::Fence;
use kiln_coordinator::domain::state::FailureClass;
use kiln_coordinator::web::{NoImages, Thumbs, WebOptions};
use std::sync::Arc;
use tower::ServiceExt;

use crate::harness::{Backend, Fixture, cell, submission};

conformance!(sweep_page_groups_failures_by_reason);

async fn get(app: &axum::Router, path: &str) -> (StatusCode, String) {
    let resp = app
        .clone()
        .oneshot(Request::get(path).body(Body::empty()).unwrap())
        .await
        .unwrap();
    let status = resp.status();
    let body = axum::body::to_bytes(resp.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&body).into_owned())
}

async fn sweep_page_groups_failures_by_reason(backend: Backend) {
    let fx = Fixture::new(backend).await;
    let sweep = fx
        .queue
        .submit(submission("failing", (0..5).map(cell).collect()))
        .await
        .unwrap()
        .id;
    let w = fx.worker("gpu").await;
    let leased = fx.queue.lease(w, 5, None).await.unwrap();
    assert_eq!(leased.len(), 5);
    // Three attempts run out of memory (one message, two first lines alike), one has a bad
    // model, one is left running.
    let reasons = [
        (
            FailureClass::Resource,
            "CUDA out of memory\ntried to allocate 2 GiB",
        ),
        (
            FailureClass::Resource,
            "CUDA out of memory\ntried to allocate 4 GiB",
        ),
        (FailureClass::Resource, "CUDA out of memory"),
        (FailureClass::BadInput, "model <b>x</b> not found"),
    ];
    for (l, (class, message)) in leased.iter().zip(reasons) {
        let f = Fence {
            cell: l.id,
            attempt: l.attempt,
            worker: w,
        };
        fx.queue.fail(f, class, message).await.unwrap();
    }
    let options = WebOptions {
        images: Arc::new(NoImages),
        thumbs: Arc::new(Thumbs::temporary().unwrap()),
    };
    let (_stop, stopping) = tokio::sync::watch::channel(false);
    let app = kiln_coordinator::web::router(fx.queue.clone(), options, false, false, stopping);

    let (status, html) = get(&app, &format!("/sweeps/{}", sweep.0)).await;
    assert_eq!(status, StatusCode::OK);
    // One row per reason, the most frequent first, with its count and each attempt's cell.
    let oom = html.find("CUDA out of memory").expect("the memory reason");
    let bad = html
        .find("model &lt;b&gt;x&lt;/b&gt; not found")
        .expect("escaped");
    assert!(oom < bad, "most frequent first");
    assert_eq!(html.matches("CUDA out of memory").count(), 1, "one group");
    assert!(
        html.contains("<td class=\"num\">3</td><td>resource</td>"),
        "{html}"
    );
    assert!(
        html.contains("<td class=\"num\">1</td><td>bad_input</td>"),
        "{html}"
    );
    for l in &leased[..4] {
        assert!(
            html.contains(&format!("href=\"/cells/{}\"", l.id.0)),
            "cell {} listed",
            l.id.0
        );
    }
    assert!(!html.contains(&format!("href=\"/cells/{}\"", leased[4].id.0)));
    assert!(html.contains(&format!("attempt 1 on worker {}", w.0)));

    // The overview embeds the farm: the worker's recent errors, newest first.
    let (status, html) = get(&app, "/").await;
    assert_eq!(status, StatusCode::OK);
    let errors = html.find("bad_input: model").expect("recent error");
    let first = html
        .find("resource: CUDA out of memory")
        .expect("recent error");
    assert!(errors < first, "newest first");
    assert!(!html.contains("tried to allocate"), "first lines only");

    // Unknown and malformed sweep ids are pages that do not exist.
    assert_eq!(get(&app, "/sweeps/999999").await.0, StatusCode::NOT_FOUND);
    assert_eq!(get(&app, "/sweeps/abc").await.0, StatusCode::NOT_FOUND);
    fx.finish().await;
}
