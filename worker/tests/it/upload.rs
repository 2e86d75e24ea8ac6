//! Storage over the real S3 protocol (s3s-fs on loopback) and on a local folder.

use std::time::Duration;

use kiln_worker::upload::{RetryPolicy, S3Options, S3Store, Storage, StorageUrl, UploadError};

use crate::s3server::S3Server;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn s3_round_trip_outage_and_recovery() {
    let mut server = S3Server::start();
    let url: StorageUrl = "s3://renders/farm".parse().unwrap();
    let StorageUrl::S3 { bucket, prefix } = &url else {
        unreachable!()
    };
    S3Store::new(bucket.clone(), prefix.clone(), &server.options())
        .unwrap()
        .create_bucket()
        .await
        .unwrap();
    let storage = Storage::open(&url, &server.options()).await.unwrap();
    let png = vec![0x89, b'P', b'N', b'G', 1, 2, 3];
    storage.put("sweeps/1/2/1.png", png.clone()).await.unwrap();
    assert_eq!(storage.get("sweeps/1/2/1.png").await.unwrap(), png);
    assert!(matches!(
        storage.get("sweeps/1/2/9.png").await,
        Err(UploadError::NotFound(_))
    ));
    let Storage::S3(s3) = &storage else {
        unreachable!()
    };
    assert_eq!(
        s3.list().await.unwrap(),
        vec!["sweeps/1/2/1.png".to_string()]
    );

    // Wrong secret: the server enforces SigV4.
    let bad = Storage::open(
        &url,
        &S3Options {
            secret_key: Some("wrong".into()),
            ..server.options()
        },
    )
    .await
    .unwrap();
    assert!(matches!(
        bad.put("sweeps/x.png", vec![1]).await,
        Err(UploadError::S3 { .. })
    ));

    // Storage down: retries give up with an error, nothing is reported stored.
    server.stop();
    let quick = RetryPolicy {
        attempts: 3,
        first_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(100),
    };
    let err = storage
        .put_with_retry("sweeps/1/3/1.png", png.clone(), &quick)
        .await
        .unwrap_err();
    assert!(matches!(err, UploadError::S3 { .. }), "{err}");
    // Back up while retrying: the put lands.
    let slow = RetryPolicy {
        attempts: 20,
        first_backoff: Duration::from_millis(100),
        max_backoff: Duration::from_millis(200),
    };
    let retrying = {
        let storage = storage.clone();
        let png = png.clone();
        tokio::spawn(async move { storage.put_with_retry("sweeps/1/3/1.png", png, &slow).await })
    };
    tokio::time::sleep(Duration::from_millis(400)).await;
    server.resume();
    retrying.await.unwrap().unwrap();
    assert_eq!(storage.get("sweeps/1/3/1.png").await.unwrap(), png);
}

#[tokio::test]
async fn file_storage_is_atomic_and_scoped() {
    let dir = tempfile::tempdir().unwrap();
    let url: StorageUrl = format!("file://{}", dir.path().display()).parse().unwrap();
    let storage = Storage::open(&url, &S3Options::default()).await.unwrap();
    storage.put("sweeps/7/8/2.png", vec![9; 100]).await.unwrap();
    assert_eq!(storage.get("sweeps/7/8/2.png").await.unwrap(), vec![9; 100]);
    let leftovers: Vec<_> = std::fs::read_dir(dir.path().join("sweeps").join("7").join("8"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    assert_eq!(
        leftovers,
        vec!["2.png".to_string()],
        "no temp files left behind"
    );
}
