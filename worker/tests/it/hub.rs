//! `hf:` and URL references through [`Hub`] against a real HTTP server in the hub's URL
//! layout ([`super::hubserver`]): URLs refused unless allowed, downloads resumed with `Range`,
//! bounded in size, the token sent, and references that could leave the cache refused.

use std::collections::BTreeMap;
use std::path::Path;

use kiln_worker::hub::{Hub, HubConfig, HubError};

use super::hubserver::HubServer;

fn config(server: &HubServer, dir: &Path) -> HubConfig {
    HubConfig {
        endpoint: server.endpoint.clone(),
        token: Some("hf_secret".into()),
        hub_cache: dir.join("hf/hub"),
        kiln_cache: dir.join("kiln"),
        offline: false,
        prefer_f16: false,
        allow_urls: false,
        max_bytes: 1 << 20,
    }
}

#[test]
fn a_url_is_fetched_only_when_allowed_resumed_and_bounded() {
    let server = HubServer::start();
    let dir = tempfile::tempdir().unwrap();
    let bytes: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
    let url = server.add_file("style.safetensors", bytes.clone());

    let hub = Hub::new(config(&server, dir.path()));
    let e = hub.resolve_blocking(&url, false).unwrap_err();
    assert!(matches!(e, HubError::Refused { .. }), "{e}");
    assert!(e.to_string().contains("--allow-url-models"), "{e}");
    assert_eq!(server.count("/files/"), 0, "nothing fetched when refused");

    // A download broken off halfway resumes from where it stopped.
    let allowed = Hub::new(HubConfig {
        allow_urls: true,
        ..config(&server, dir.path())
    });
    let dest_dir = dir
        .path()
        .join("kiln/urls")
        .join(hex::encode(sha2_digest(&url)));
    std::fs::create_dir_all(&dest_dir).unwrap();
    std::fs::write(
        dest_dir.join("style.safetensors.incomplete"),
        &bytes[..40_000],
    )
    .unwrap();
    let path = allowed.resolve_blocking(&url, false).unwrap();
    assert_eq!(path, dest_dir.join("style.safetensors"));
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    let seen = server.seen();
    let last = seen.last().unwrap();
    assert_eq!(last.range.as_deref(), Some("bytes=40000-"));
    // A URL never gets the hub token.
    assert!(seen.iter().all(|s| s.authorization.is_none()), "{seen:?}");
    // Cached: no second request, and the owner's policy (AnyPath) allows it too.
    let before = server.seen().len();
    assert_eq!(hub.resolve_blocking(&url, true).unwrap(), path);
    assert_eq!(server.seen().len(), before);

    // Past the size bound: stopped, nothing left behind.
    let big = server.add_file("big.safetensors", vec![0u8; 300_000]);
    let small = Hub::new(HubConfig {
        allow_urls: true,
        max_bytes: 100_000,
        ..config(&server, dir.path())
    });
    let e = small.resolve_blocking(&big, false).unwrap_err();
    assert!(e.to_string().contains("download limit"), "{e}");
    let big_dir = dir
        .path()
        .join("kiln/urls")
        .join(hex::encode(sha2_digest(&big)));
    let left: Vec<_> = std::fs::read_dir(&big_dir)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert!(left.is_empty(), "{left:?}");
}

fn sha2_digest(text: &str) -> Vec<u8> {
    use sha2::Digest;
    sha2::Sha256::digest(text.as_bytes()).to_vec()
}

#[test]
fn a_lora_repo_is_its_file_fetched_with_the_token_and_bad_references_are_refused() {
    let server = HubServer::start();
    let dir = tempfile::tempdir().unwrap();
    let lora = b"not really a lora, but bytes".to_vec();
    server.add_repo(
        "latent-consistency/lcm-lora-sdv1-5",
        BTreeMap::from([
            ("README.md".to_string(), b"# readme".to_vec()),
            ("pytorch_lora_weights.safetensors".to_string(), lora.clone()),
        ]),
    );
    let hub = Hub::new(config(&server, dir.path()));
    let path = hub
        .resolve_blocking("hf:latent-consistency/lcm-lora-sdv1-5", false)
        .unwrap();
    assert_eq!(std::fs::read(&path).unwrap(), lora);
    assert!(
        path.starts_with(
            dir.path()
                .join("hf/hub/models--latent-consistency--lcm-lora-sdv1-5/snapshots")
        )
    );
    assert_eq!(
        server.resolved("latent-consistency/lcm-lora-sdv1-5"),
        vec!["pytorch_lora_weights.safetensors".to_string()]
    );
    let hub_requests: Vec<_> = server
        .seen()
        .into_iter()
        .filter(|s| !s.path.starts_with("/cdn/"))
        .collect();
    assert!(
        hub_requests
            .iter()
            .all(|s| s.authorization.as_deref() == Some("Bearer hf_secret")),
        "{hub_requests:?}"
    );
    // A missing repo says so.
    let e = hub
        .resolve_blocking("hf:nobody/nothing", false)
        .unwrap_err();
    assert!(e.to_string().contains("404"), "{e}");
    // References that could leave the cache are refused before any request.
    let before = server.seen().len();
    for bad in [
        "hf:../x",
        "hf:a/b/../../c",
        "hf:a/b@../../c",
        "hf:/etc/passwd",
    ] {
        let e = hub.resolve_blocking(bad, true).unwrap_err();
        assert!(matches!(e, HubError::Refused { .. }), "{bad}: {e}");
    }
    assert_eq!(server.seen().len(), before);
}
