//! A query's names checked against what is stored (`Queue::check_names`), on both backends: a
//! binding key no cell of the sweeps in question has, or a sweep that does not exist, is an
//! error that lists what exists; names that exist pass, wherever in the filter they are.

use kiln_coordinator::Error;
use kiln_coordinator::query::{Filter, parse_sort};
use kiln_coordinator::queue::QueueConfig;
use kiln_coordinator::store::{CellQuery, KeyScope};
use kiln_coordinator::sweep::CellSpec;
use kiln_proto::SweepId;

use crate::harness::{Backend, Fixture, cell, submission};

conformance!(
    unknown_keys_and_sweeps_are_errors_that_list_what_exists,
    lists_are_bounded_and_keys_are_data,
    keys_of_cells_still_in_the_intake_are_not_refused,
);

/// A cell with these bindings.
fn bound(seed: u64, bindings: &[(&str, &str)]) -> CellSpec {
    let mut c = cell(seed);
    for (k, v) in bindings {
        c.bindings.insert(k.to_string(), v.to_string());
    }
    c
}

/// Sweeps "foxes" (animal, place, `my key`), "cats" (animal, whisker) and bob's "secret".
async fn seed(fx: &Fixture) -> (SweepId, SweepId) {
    let foxes = vec![
        bound(1, &[("animal", "fox"), ("place", "forest")]),
        bound(2, &[("animal", "owl"), ("my key", "x")]),
    ];
    let foxes = fx
        .queue
        .submit(submission("foxes", foxes))
        .await
        .unwrap()
        .id;
    let cats = vec![bound(3, &[("animal", "cat"), ("whisker", "long")])];
    let cats = fx.queue.submit(submission("cats", cats)).await.unwrap().id;
    let mut secret = submission("secret", vec![bound(4, &[("hidden", "1")])]);
    secret.owner = Some("bob".into());
    fx.queue.submit(secret).await.unwrap();
    (foxes, cats)
}

/// `check_names` of `filter` and `sort` as `owner` sees them.
async fn check(fx: &Fixture, filter: &str, sort: &str, owner: Option<&str>) -> Result<(), String> {
    let (filter, located) = if filter.is_empty() {
        (None, Vec::new())
    } else {
        let (f, k) = Filter::parse_located(filter).unwrap();
        (Some(f), k)
    };
    let q = CellQuery {
        filter,
        sorts: parse_sort(sort).unwrap(),
        owner: owner.map(str::to_string),
        limit: 10,
        ..CellQuery::default()
    };
    match fx.queue.check_names(&q, &located).await {
        Ok(()) => Ok(()),
        Err(Error::Invalid(m)) => Err(m),
        Err(e) => panic!("{e}"),
    }
}

async fn unknown_keys_and_sweeps_are_errors_that_list_what_exists(b: Backend) {
    let fx = Fixture::new(b).await;
    let (_, cats) = seed(&fx).await;
    let ok = [
        r#"sweep = "foxes" and animal = "fox""#,
        r#"sweep = "foxes" and `my key` = "x" and not place ~ "city""#,
        // Not restricted to one sweep: keys of any sweep will do.
        r#"whisker = "long""#,
        r#"sweep = "foxes" or whisker = "long""#,
        r#"seed = 1 and cfg >= 1"#,
        "",
    ];
    for f in ok {
        assert_eq!(check(&fx, f, "", None).await, Ok(()), "{f}");
    }
    assert_eq!(check(&fx, "", "-animal, seed", None).await, Ok(()));

    let m = check(&fx, r#"sweep = "foxes" and animl = "fox""#, "", None)
        .await
        .unwrap_err();
    assert!(
        m.starts_with(
            "filter: 1:21: unknown field animl: no column has that name and no cell of sweep \
             \"foxes\" has a binding of that name (did you mean animal?); the columns are sweep,"
        ),
        "{m}"
    );
    assert!(
        m.ends_with(
            "the bindings of sweep \"foxes\" are animal, `my key`, place (see docs/query.md)"
        ),
        "{m}"
    );
    // A key of another sweep is not a key of this one.
    let m = check(&fx, r#"sweep = "foxes" and whisker = "long""#, "", None)
        .await
        .unwrap_err();
    assert!(m.starts_with("filter: 1:21: unknown field whisker"), "{m}");
    let m = check(&fx, r#"sweep = "foxes""#, "animal, -plac", None)
        .await
        .unwrap_err();
    assert!(
        m.starts_with("sort: unknown field plac") && m.contains("(did you mean place?)"),
        "{m}"
    );
    // The request's own sweep is a scope too.
    let (f, located) = Filter::parse_located(r#"place = "forest""#).unwrap();
    let q = CellQuery {
        sweep: Some(cats),
        filter: Some(f),
        limit: 10,
        ..CellQuery::default()
    };
    let m = fx
        .queue
        .check_names(&q, &located)
        .await
        .unwrap_err()
        .to_string();
    assert!(
        m.contains(&format!("no cell of sweep {} has a binding", cats.0)),
        "{m}"
    );

    let m = check(&fx, r#"sweep = "fxoes" and animal = "fox""#, "", None)
        .await
        .unwrap_err();
    assert_eq!(
        m,
        "filter: no sweep is named \"fxoes\" (did you mean \"foxes\"?); the sweeps are \
         1 \"foxes\", 2 \"cats\", 3 \"secret\" (`kiln sweeps` lists them)"
    );
    let m = check(&fx, r#"seed = 1 or not sweep in (2, 99)"#, "", None)
        .await
        .unwrap_err();
    assert!(m.starts_with("filter: there is no sweep 99; "), "{m}");
    // Another owner's sweeps and keys are not there for alice, and not listed.
    let m = check(&fx, r#"sweep = "secret""#, "", Some("alice"))
        .await
        .unwrap_err();
    assert_eq!(
        m,
        "filter: no sweep is named \"secret\"; there are no sweeps (`kiln sweeps` lists them)"
    );
    assert!(
        check(&fx, r#"hidden = "1""#, "", Some("alice"))
            .await
            .is_err()
    );
    assert_eq!(check(&fx, r#"hidden = "1""#, "", Some("bob")).await, Ok(()));
    assert_eq!(check(&fx, r#"hidden = "1""#, "", None).await, Ok(()));
    fx.finish().await;
}

async fn lists_are_bounded_and_keys_are_data(b: Backend) {
    let fx = Fixture::new(b).await;
    let many: Vec<(String, String)> = (0..60).map(|i| (format!("k{i:02}"), "v".into())).collect();
    let pairs: Vec<(&str, &str)> = many.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let hostile = [
        ("it's \"q\"", "1"),
        ("$.k00", "2"),
        ("a[0]", "3"),
        ("'; DROP TABLE cells; --", "4"),
    ];
    let mut cells = vec![bound(1, &pairs), bound(2, &hostile)];
    cells.push(bound(3, &[]));
    let id = fx.queue.submit(submission("wide", cells)).await.unwrap().id;
    let m = check(&fx, r#"sweep = "wide" and k60 = "v""#, "", None)
        .await
        .unwrap_err();
    assert!(m.contains("(did you mean k"), "{m}");
    let listed = m
        .split("the bindings of sweep \"wide\" are ")
        .nth(1)
        .unwrap();
    assert!(listed.ends_with(", … (see docs/query.md)"), "{m}");
    assert_eq!(
        listed.matches(", ").count(),
        50,
        "50 keys and the ellipsis: {m}"
    );
    // Keys that look like SQL or JSON paths are looked up as they are.
    for (k, _) in hostile {
        let f = format!("sweep = \"wide\" and `{}` = \"1\"", k.replace('`', "``"));
        assert_eq!(check(&fx, &f, "", None).await, Ok(()), "{f}");
    }
    assert!(
        check(&fx, r#"binding("$.k00x") = 1"#, "", None)
            .await
            .is_err()
    );
    let store = fx.queue.store();
    let scope = KeyScope {
        sweeps: Some(vec![id]),
        owner: None,
    };
    let keys = store.binding_keys(&scope, 100).await.unwrap();
    assert_eq!(keys.len(), 64);
    assert_eq!(keys[0], "$.k00", "by code point: {keys:?}");
    assert!(store.binding_key_exists(&scope, "a[0]").await.unwrap());
    assert!(!store.binding_key_exists(&scope, "a").await.unwrap());
    let nobody = KeyScope {
        sweeps: Some(vec![]),
        owner: None,
    };
    assert!(!store.binding_key_exists(&nobody, "k00").await.unwrap());
    assert!(store.binding_keys(&nobody, 10).await.unwrap().is_empty());
    fx.finish().await;
}

async fn keys_of_cells_still_in_the_intake_are_not_refused(b: Backend) {
    let cfg = QueueConfig {
        intake_chunk: 2,
        move_intake: false,
        ..QueueConfig::default()
    };
    let fx = Fixture::with_config(b, cfg).await;
    let mut cells: Vec<CellSpec> = (0..5).map(|i| bound(i, &[("animal", "fox")])).collect();
    cells[4].bindings.insert("late".into(), "yes".into());
    fx.queue.submit(submission("big", cells)).await.unwrap();
    // Only the first chunk is queryable; the key of a later cell is not refused meanwhile.
    assert_eq!(
        check(&fx, r#"sweep = "big" and late = "yes""#, "", None).await,
        Ok(())
    );
    fx.queue.take_in(None).await.unwrap();
    assert_eq!(
        check(&fx, r#"sweep = "big" and late = "yes""#, "", None).await,
        Ok(())
    );
    assert!(
        check(&fx, r#"sweep = "big" and early = "yes""#, "", None)
            .await
            .is_err()
    );
    fx.finish().await;
}
