//! Keepers (issue 17, item 5) on both backends: `Queue::set_keeper` stars and rates a cell and
//! leaves what it is not given alone; ratings past 5 and unknown cells are refused, and the
//! schema's CHECKs refuse them even to SQL that bypasses the store; `starred` and `rating` in
//! the filter language and `--sort` return exactly the cells an oracle in Rust picks, and
//! `Queue::count` says how many cells a query pages through.

use kiln_coordinator::Error;
use kiln_coordinator::domain::lease::Fence;
use kiln_coordinator::domain::state::CellState;
use kiln_coordinator::query::{Filter, parse_sort};
use kiln_coordinator::result::RenderResult;
use kiln_coordinator::store::{CellQuery, DatabaseUrl};
use kiln_proto::{CellId, SweepId};

use crate::harness::{Backend, Fixture, cell, submission};

conformance!(
    keepers_are_set_and_the_rest_left_alone,
    keepers_out_of_bounds_are_refused_by_store_and_schema,
    keeper_filters_sorts_and_counts_match_the_oracle,
);

/// Sweeps "a" (8 cells) and "b" (4 cells); returns their cell ids in number order.
async fn two_sweeps(fx: &Fixture) -> (SweepId, Vec<CellId>, SweepId, Vec<CellId>) {
    let a = fx
        .queue
        .submit(submission("a", (0..8).map(cell).collect()))
        .await
        .unwrap()
        .id;
    let b = fx
        .queue
        .submit(submission("b", (100..104).map(cell).collect()))
        .await
        .unwrap()
        .id;
    let ids = |s: SweepId| async move {
        let q = CellQuery {
            sweep: Some(s),
            limit: 100,
            ..Default::default()
        };
        let rows = fx.queue.query(&q).await.unwrap();
        rows.iter().map(|r| r.id).collect::<Vec<_>>()
    };
    (a, ids(a).await, b, ids(b).await)
}

/// (starred, rating) of cell `id` as the store reads it.
async fn keeper(fx: &Fixture, id: CellId) -> (bool, u8) {
    let r = fx.queue.cell(id).await.unwrap();
    (r.starred, r.rating)
}

async fn keepers_are_set_and_the_rest_left_alone(b: Backend) {
    let fx = Fixture::new(b).await;
    let (_, a, _, other) = two_sweeps(&fx).await;
    let (x, y) = (a[0], a[1]);
    assert_eq!(
        keeper(&fx, x).await,
        (false, 0),
        "new cells are not keepers"
    );

    let r = fx.queue.set_keeper(x, Some(true), None).await.unwrap();
    assert_eq!((r.id, r.starred, r.rating), (x, true, 0));
    let r = fx.queue.set_keeper(x, None, Some(4)).await.unwrap();
    assert_eq!((r.starred, r.rating), (true, 4), "a rating keeps the star");
    assert_eq!(keeper(&fx, x).await, (true, 4));
    let r = fx.queue.set_keeper(x, None, None).await.unwrap();
    assert_eq!(
        (r.starred, r.rating),
        (true, 4),
        "nothing given, nothing changed"
    );
    let r = fx.queue.set_keeper(x, Some(false), None).await.unwrap();
    assert_eq!(
        (r.starred, r.rating),
        (false, 4),
        "unstarring keeps the rating"
    );
    let r = fx.queue.set_keeper(x, Some(true), Some(0)).await.unwrap();
    assert_eq!((r.starred, r.rating), (true, 0), "0 clears the rating");
    // The returned row is the whole cell, as `cell` reads it.
    let read = fx.queue.cell(x).await.unwrap();
    assert_eq!(
        (r.sweep_id, r.number, r.state),
        (read.sweep_id, 0, CellState::Available)
    );
    assert_eq!(r.spec_json, read.spec_json);

    // Only the cell named changes.
    for id in a[1..].iter().chain(&other) {
        assert_eq!(keeper(&fx, *id).await, (false, 0), "cell {id}");
    }

    // A keeper stays one through its lifecycle: starred while queued, then leased and
    // completed (the fenced writes never touch it), and a completed cell can be rated.
    fx.queue.set_keeper(y, Some(true), Some(2)).await.unwrap();
    let w = fx.worker("gpu").await;
    let leased = fx.queue.lease(w, 8, None).await.unwrap();
    let l = leased.iter().find(|l| l.id == y).expect("y leased");
    assert_eq!(keeper(&fx, y).await, (true, 2), "running");
    let result = RenderResult {
        object_key: "k".into(),
        storage: "file:///out".into(),
        sha256: "0".repeat(64),
        bytes: 1,
        width: 512,
        height: 512,
        ..Default::default()
    };
    let f = Fence {
        cell: y,
        attempt: l.attempt,
        worker: w,
    };
    fx.queue
        .complete(f, &result.to_json().unwrap())
        .await
        .unwrap();
    let done = fx.queue.cell(y).await.unwrap();
    assert_eq!(
        (done.state, done.starred, done.rating),
        (CellState::Completed, true, 2)
    );
    let r = fx.queue.set_keeper(y, None, Some(5)).await.unwrap();
    assert_eq!(
        (r.state, r.starred, r.rating),
        (CellState::Completed, true, 5)
    );
    fx.finish().await;
}

/// Runs `sql` (one cell, `$1`) on the test's database directly, past the store.
async fn raw_update(fx: &Fixture, b: Backend, sql: &str, id: CellId) -> Result<u64, String> {
    let url = match &fx.db.url {
        DatabaseUrl::Sqlite(u) | DatabaseUrl::Postgres(u) => u.clone(),
    };
    let sql = sqlx::AssertSqlSafe(sql.to_string());
    match b {
        Backend::Sqlite => {
            let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
            let r = sqlx::query(sql).bind(id.0).execute(&pool).await;
            pool.close().await;
            r.map(|r| r.rows_affected()).map_err(|e| e.to_string())
        }
        Backend::Postgres => {
            let pool = sqlx::PgPool::connect(&url).await.unwrap();
            let r = sqlx::query(sql).bind(id.0).execute(&pool).await;
            pool.close().await;
            r.map(|r| r.rows_affected()).map_err(|e| e.to_string())
        }
    }
}

async fn keepers_out_of_bounds_are_refused_by_store_and_schema(b: Backend) {
    let fx = Fixture::new(b).await;
    let (_, a, _, _) = two_sweeps(&fx).await;
    let x = a[0];
    fx.queue.set_keeper(x, Some(true), Some(3)).await.unwrap();

    for bad in [6, 7, u8::MAX] {
        match fx.queue.set_keeper(x, Some(false), Some(bad)).await {
            Err(Error::Invalid(m)) => assert!(m.contains(&format!("rating {bad}")), "{m}"),
            other => panic!("rating {bad}: {other:?}"),
        }
    }
    assert_eq!(
        keeper(&fx, x).await,
        (true, 3),
        "a refused call changes nothing"
    );
    fx.queue.set_keeper(x, None, Some(5)).await.unwrap();
    assert_eq!(keeper(&fx, x).await, (true, 5), "5 is the most");

    let missing = CellId(a.iter().map(|c| c.0).max().unwrap() + 1000);
    assert!(matches!(
        fx.queue.set_keeper(missing, Some(true), None).await,
        Err(Error::CellNotFound(id)) if id == missing
    ));

    // The CHECKs hold for SQL that skips the store.
    for sql in [
        "UPDATE cells SET rating = 6 WHERE id = $1",
        "UPDATE cells SET rating = -1 WHERE id = $1",
        "UPDATE cells SET starred = 2 WHERE id = $1",
        "UPDATE cells SET starred = -1 WHERE id = $1",
    ] {
        let e = raw_update(&fx, b, sql, x).await.expect_err(sql);
        assert!(e.to_lowercase().contains("check"), "{sql}: {e}");
    }
    // The same statement with a value in range passes: the refusals above are the CHECKs.
    assert_eq!(
        raw_update(
            &fx,
            b,
            "UPDATE cells SET rating = 1, starred = 0 WHERE id = $1",
            x
        )
        .await,
        Ok(1)
    );
    assert_eq!(keeper(&fx, x).await, (false, 1));
    fx.finish().await;
}

/// Ids of the cells `filter` matches, in `sort` order (default: sweep, number).
async fn ids(fx: &Fixture, filter: &str, sort: &str) -> Vec<i64> {
    let q = CellQuery {
        filter: Some(Filter::parse(filter).unwrap_or_else(|e| panic!("{filter}: {e}"))),
        sorts: parse_sort(sort).unwrap(),
        limit: 1000,
        ..Default::default()
    };
    let rows = fx.queue.query(&q).await.unwrap();
    let count = fx.queue.count(&q).await.unwrap();
    assert_eq!(count, rows.len() as u64, "count of {filter}");
    rows.iter().map(|r| r.id.0).collect()
}

async fn keeper_filters_sorts_and_counts_match_the_oracle(b: Backend) {
    let fx = Fixture::new(b).await;
    let (sa, a, _, other) = two_sweeps(&fx).await;
    // (cell, starred, rating): starred with and without ratings, rated without a star, and
    // keepers in both sweeps.
    let set = [
        (a[0], true, 5),
        (a[1], true, 0),
        (a[2], false, 4),
        (a[3], true, 2),
        (a[5], false, 1),
        (other[1], true, 4),
        (other[2], false, 5),
    ];
    for (id, starred, rating) in set {
        fx.queue
            .set_keeper(id, Some(starred), Some(rating))
            .await
            .unwrap();
    }
    let all: Vec<(i64, &str, bool, u8)> = a
        .iter()
        .map(|c| (c.0, "a"))
        .chain(other.iter().map(|c| (c.0, "b")))
        .map(|(id, sweep)| {
            let (starred, rating) = set
                .iter()
                .find(|(c, _, _)| c.0 == id)
                .map_or((false, 0), |(_, s, r)| (*s, *r));
            (id, sweep, starred, rating)
        })
        .collect();
    let want = |f: &dyn Fn(&str, bool, u8) -> bool| -> Vec<i64> {
        all.iter()
            .filter(|(_, sweep, s, r)| f(sweep, *s, *r))
            .map(|(id, ..)| *id)
            .collect()
    };

    let cases: Vec<(&str, Vec<i64>)> = vec![
        ("starred", want(&|_, s, _| s)),
        ("not starred", want(&|_, s, _| !s)),
        ("starred = true", want(&|_, s, _| s)),
        ("starred = false", want(&|_, s, _| !s)),
        ("starred != false", want(&|_, s, _| s)),
        ("starred in (false)", want(&|_, s, _| !s)),
        ("rating >= 4", want(&|_, _, r| r >= 4)),
        ("rating = 0", want(&|_, _, r| r == 0)),
        (
            "rating between 1 and 3",
            want(&|_, _, r| (1..=3).contains(&r)),
        ),
        ("starred and rating >= 4", want(&|_, s, r| s && r >= 4)),
        ("starred or rating = 1", want(&|_, s, r| s || r == 1)),
        (r#"sweep = "a" and starred"#, want(&|w, s, _| w == "a" && s)),
        (
            r#"sweep = "b" and not starred and rating > 0"#,
            want(&|w, s, r| w == "b" && !s && r > 0),
        ),
        (
            "(starred) and not (rating < 5)",
            want(&|_, s, r| s && r >= 5),
        ),
    ];
    for (filter, expected) in &cases {
        assert!(
            !expected.is_empty(),
            "{filter}: a case that finds nothing proves little"
        );
        assert_eq!(&ids(&fx, filter, "").await, expected, "{filter}");
    }

    // `-rating`: most stars first, ties by id in the same (descending) direction.
    let mut rated = want(&|_, _, r| r > 0);
    let rating_of = |id: i64| all.iter().find(|c| c.0 == id).unwrap().3;
    rated.sort_by_key(|id| (std::cmp::Reverse(rating_of(*id)), std::cmp::Reverse(*id)));
    assert_eq!(ids(&fx, "rating > 0", "-rating").await, rated);
    assert_eq!(
        ids(&fx, "rating > 0", "-rating")
            .await
            .first()
            .map(|id| rating_of(*id)),
        Some(5)
    );
    // `rating, -starred`: least first, then keepers before the rest.
    let mut by = want(&|_, _, _| true);
    let starred_of = |id: i64| all.iter().find(|c| c.0 == id).unwrap().2;
    by.sort_by_key(|id| {
        (
            rating_of(*id),
            std::cmp::Reverse(starred_of(*id)),
            std::cmp::Reverse(*id),
        )
    });
    assert_eq!(
        ids(&fx, "sweep in ('a', 'b')", "rating, -starred").await,
        by
    );

    // A count is of every match, not of the page; structured filters count as well.
    let page = CellQuery {
        filter: Some(Filter::parse("starred").unwrap()),
        sorts: parse_sort("-rating").unwrap(),
        limit: 1,
        offset: 2,
        ..Default::default()
    };
    assert_eq!(fx.queue.query(&page).await.unwrap().len(), 1);
    assert_eq!(
        fx.queue.count(&page).await.unwrap(),
        want(&|_, s, _| s).len() as u64
    );
    let structured = CellQuery {
        sweep: Some(sa),
        states: vec![CellState::Available],
        filter: Some(Filter::parse("rating > 0").unwrap()),
        ..Default::default()
    };
    assert_eq!(
        fx.queue.count(&structured).await.unwrap(),
        want(&|w, _, r| w == "a" && r > 0).len() as u64
    );
    let none = CellQuery {
        filter: Some(Filter::parse(r#"sweep = "nope" or rating > 5"#).unwrap()),
        ..Default::default()
    };
    assert_eq!(fx.queue.count(&none).await.unwrap(), 0);
    assert_eq!(
        fx.queue.count(&CellQuery::default()).await.unwrap(),
        all.len() as u64
    );
    fx.finish().await;
}
