//! img2img pictures. On both backends: a picture is checked whole and stored once per content,
//! served by its hash, required present when named, and a cell that starts from one goes only
//! to a worker of render level 2. Over gRPC (a real server on 127.0.0.1:0): `PutImage` and
//! `GetImage` in chunks with their bounds, and submits naming a picture the coordinator lacks
//! are refused before anything is stored.

use std::io::Cursor;

use kiln_coordinator::Error;
use kiln_coordinator::sweep::{CellSpec, InitSpec};
use kiln_proto::v1 as pb;
use sha2::{Digest, Sha256};
use tokio_stream::StreamExt;
use tonic::Code;

use crate::grpc::{Server, register, render_cell, submit_stream};
use crate::harness::{Backend, Fixture, cell, registration, submission};

conformance!(pictures_are_checked_stored_once_and_required,);

/// A PNG of `w`×`h` pixels; `noise` makes it incompressible (about 3 bytes a pixel).
fn png(w: u32, h: u32, noise: bool) -> Vec<u8> {
    let mut state = 0x2545_f491_u32;
    let picture = image::RgbImage::from_fn(w, h, |x, y| {
        if noise {
            state ^= state << 13;
            state ^= state >> 17;
            state ^= state << 5;
            let b = state.to_le_bytes();
            image::Rgb([b[0], b[1], b[2]])
        } else {
            image::Rgb([x as u8, y as u8, 7])
        }
    });
    let mut out = Cursor::new(Vec::new());
    picture.write_to(&mut out, image::ImageFormat::Png).unwrap();
    out.into_inner()
}

fn sha(bytes: &[u8]) -> String {
    hex::encode(Sha256::digest(bytes))
}

/// A cell that starts from the picture `sha256`.
fn img2img(seed: u64, sha256: &str) -> CellSpec {
    let mut c = cell(seed);
    c.sampler = "euler_a".parse().unwrap();
    c.init = Some(InitSpec {
        name: "cat.png".into(),
        sha256: sha256.into(),
        strength: 0.6,
    });
    c
}

async fn pictures_are_checked_stored_once_and_required(backend: Backend) {
    let fx = Fixture::new(backend).await;
    let bytes = png(24, 16, false);
    let row = fx.queue.put_image(bytes.clone()).await.unwrap();
    assert_eq!(row.sha256, sha(&bytes));
    assert_eq!(
        (row.format.as_str(), row.width, row.height, row.bytes),
        ("png", 24, 16, bytes.len() as u64)
    );
    assert_eq!(fx.queue.put_image(bytes.clone()).await.unwrap(), row);
    assert_eq!(fx.queue.image(&row.sha256).await.unwrap(), bytes);

    let absent = "0".repeat(64);
    assert!(matches!(
        fx.queue.image(&absent).await,
        Err(Error::ImageNotFound(s)) if s == absent
    ));
    assert!(matches!(
        fx.queue.image("../../etc/passwd").await,
        Err(Error::Invalid(_))
    ));
    fx.queue.require_images(&[&row.sha256]).await.unwrap();
    assert!(matches!(
        fx.queue.require_images(&[&row.sha256, &absent]).await,
        Err(Error::ImageNotFound(s)) if s == absent
    ));

    // What is not a picture, or is too large a one, is refused and nothing is stored.
    for (bad, says) in [
        (b"not a picture".to_vec(), "not a PNG, JPEG or WebP picture"),
        (
            png(4104, 1, false),
            "4104x1 pixels: each side must be 1..=4096",
        ),
        (
            png(32, 32, false)[..60].to_vec(),
            "an unreadable png picture",
        ),
    ] {
        let e = fx.queue.put_image(bad.clone()).await.unwrap_err();
        assert!(e.to_string().contains(says), "{e}");
        assert!(matches!(
            fx.queue.image(&sha(&bad)).await,
            Err(Error::ImageNotFound(_))
        ));
    }

    // An img2img cell needs render level 2: a level-1 worker is not leased it.
    let c = img2img(1, &row.sha256);
    assert_eq!(c.render_level(), 2);
    fx.queue
        .submit(submission("img2img", vec![c.clone()]))
        .await
        .unwrap();
    let mut old = registration("level-1");
    old.render_level = 1;
    let old = fx.queue.register(&old).await.unwrap().0;
    assert!(fx.queue.lease(old, 4, None).await.unwrap().is_empty());
    let new = fx.worker("level-2").await;
    let got = fx.queue.lease(new, 4, None).await.unwrap();
    assert_eq!(got.len(), 1);
    let spec: CellSpec = serde_json::from_str(&got[0].spec_json).unwrap();
    assert_eq!(spec.init, c.init);
    fx.finish().await;
}

/// `bytes` as a PutImage stream of `chunk`-byte messages.
fn chunks(bytes: &[u8], chunk: usize) -> Vec<pb::ImageChunk> {
    bytes
        .chunks(chunk)
        .map(|c| pb::ImageChunk { data: c.to_vec() })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn put_and_get_image_over_grpc() {
    let mut s = Server::start().await;
    // About 1.4 MiB: more than one GetImage chunk.
    let bytes = png(800, 600, true);
    assert!(bytes.len() > 1 << 20);
    let info = s
        .sweeps
        .put_image(tokio_stream::iter(chunks(&bytes, 256 << 10)))
        .await
        .unwrap()
        .into_inner();
    assert_eq!(info.sha256, sha(&bytes));
    assert_eq!(
        (info.format.as_str(), info.width, info.height, info.bytes),
        ("png", 800, 600, bytes.len() as u64)
    );

    let worker = register(&mut s).await;
    let mut stream = s
        .workers
        .get_image(pb::GetImageRequest {
            sha256: info.sha256.clone(),
            worker_id: worker,
        })
        .await
        .unwrap()
        .into_inner();
    let mut got = Vec::new();
    let mut messages = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.unwrap();
        assert!(chunk.data.len() <= 1 << 20);
        got.extend_from_slice(&chunk.data);
        messages += 1;
    }
    assert_eq!((got == bytes, messages), (true, 2));

    for (sha256, code) in [
        ("1".repeat(64), Code::NotFound),
        ("nope".to_string(), Code::InvalidArgument),
    ] {
        let e = s
            .workers
            .get_image(pb::GetImageRequest {
                sha256,
                worker_id: worker,
            })
            .await
            .unwrap_err();
        assert_eq!(e.code(), code, "{e:?}");
    }
    // Only a registered worker with its session fetches pictures.
    let e = s
        .workers
        .get_image(pb::GetImageRequest {
            sha256: info.sha256.clone(),
            worker_id: worker + 1,
        })
        .await
        .unwrap_err();
    assert_ne!(e.code(), Code::Ok);

    // Oversized chunks and what is not a picture are refused with a clear message.
    let e = s
        .sweeps
        .put_image(tokio_stream::iter(chunks(&png(600, 600, true), 1100 << 10)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument, "{e:?}");
    let e = s
        .sweeps
        .put_image(tokio_stream::iter(chunks(b"GIF89a and so on", 1024)))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::InvalidArgument);
    assert!(
        e.message().contains("not a PNG, JPEG or WebP picture"),
        "{e:?}"
    );

    // A submit naming a picture the coordinator lacks stores nothing: by its cells ...
    let absent = "2".repeat(64);
    let mut c = render_cell(1);
    (c.sampler, c.init_image_sha256, c.strength) =
        (pb::Sampler::EulerA as i32, absent.clone(), 0.5);
    let e = s
        .sweeps
        .submit_sweep(tokio_stream::iter(submit_stream("lacking", vec![vec![c]])))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    assert!(e.message().contains(&absent), "{e:?}");
    // ... or by the header's `images`.
    let mut msgs = submit_stream("lacking-too", vec![vec![render_cell(2)]]);
    if let Some(pb::submit_sweep_request::Part::Header(h)) = msgs[0].part.as_mut() {
        h.images = [("cat.png".to_string(), absent.clone())].into();
    }
    let e = s
        .sweeps
        .submit_sweep(tokio_stream::iter(msgs))
        .await
        .unwrap_err();
    assert_eq!(e.code(), Code::NotFound, "{e:?}");
    let listed = s
        .sweeps
        .list_sweeps(pb::ListSweepsRequest::default())
        .await
        .unwrap()
        .into_inner();
    assert!(listed.sweeps.is_empty(), "{listed:?}");

    // With the picture stored, the cell goes through and its lease carries the picture's hash;
    // a strength of 0 on the wire is A1111's default.
    let mut c = render_cell(3);
    (c.sampler, c.init_image_sha256, c.init_image_name) = (
        pb::Sampler::EulerA as i32,
        info.sha256.clone(),
        "cat.png".into(),
    );
    s.sweeps
        .submit_sweep(tokio_stream::iter(submit_stream("with", vec![vec![c]])))
        .await
        .unwrap();
    let task = crate::grpc::lease_one(&mut s, worker).await;
    let leased = task.cell.unwrap();
    assert_eq!(
        (
            leased.init_image_sha256.as_str(),
            leased.init_image_name.as_str(),
            leased.strength
        ),
        (info.sha256.as_str(), "cat.png", 0.75)
    );
    s.shutdown().await;
}
