//! Coordinator configuration. [`Settings`] is the raw, all-optional layer read from a TOML file
//! and from flags/`KILN_*` environment (the CLI fills one from clap); layers merge in the order
//! defaults → file → env → flags, and [`Settings::validate`] turns the result into a typed
//! [`Config`] once. Nothing below `main` reads the environment.

use std::fmt;
use std::net::SocketAddr;
use std::str::FromStr;
use std::time::Duration;

use serde::Deserialize;

use crate::queue::QueueConfig;
use crate::{Error, Result};

/// Default listen address.
pub const DEFAULT_LISTEN: &str = "127.0.0.1:7450";
/// Default database.
pub const DEFAULT_DB: &str = "sqlite://kiln.db";

/// Where the database is.
#[derive(Clone, PartialEq, Eq)]
pub enum DatabaseUrl {
    /// `sqlite://path` (created if missing).
    Sqlite(String),
    /// `postgres://…` or `postgresql://…`.
    Postgres(String),
}

impl FromStr for DatabaseUrl {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self> {
        if s.starts_with("postgres://") || s.starts_with("postgresql://") {
            Ok(DatabaseUrl::Postgres(s.to_string()))
        } else if let Some(path) = s.strip_prefix("sqlite://") {
            if path.is_empty() {
                return Err(Error::Config("database url: sqlite:// needs a path".into()));
            }
            Ok(DatabaseUrl::Sqlite(s.to_string()))
        } else if s.starts_with("sqlite:") {
            Ok(DatabaseUrl::Sqlite(s.to_string()))
        } else {
            Err(Error::Config(format!(
                "database url {s:?}: expected sqlite://PATH or postgres://…"
            )))
        }
    }
}

impl DatabaseUrl {
    /// Where the web UI caches thumbnails by default: `<file>.thumbs` beside a SQLite file
    /// (`kiln.db.thumbs`), else `kiln-thumbs` under the system's temporary folder.
    pub fn thumbs_dir(&self) -> std::path::PathBuf {
        match self {
            DatabaseUrl::Sqlite(s) => {
                let path = s
                    .strip_prefix("sqlite://")
                    .or_else(|| s.strip_prefix("sqlite:"))
                    .unwrap_or(s);
                let path = path.split('?').next().unwrap_or(path);
                if path.is_empty() || path.starts_with(':') {
                    std::env::temp_dir().join("kiln-thumbs")
                } else {
                    std::path::PathBuf::from(format!("{path}.thumbs"))
                }
            }
            DatabaseUrl::Postgres(_) => std::env::temp_dir().join("kiln-thumbs"),
        }
    }
}

impl fmt::Debug for DatabaseUrl {
    // Never print a password.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DatabaseUrl::Sqlite(s) => write!(f, "{s}"),
            DatabaseUrl::Postgres(s) => {
                let redacted = match (s.find("://"), s.rfind('@')) {
                    (Some(a), Some(b)) if b > a => format!("{}://…@{}", &s[..a], &s[b + 1..]),
                    _ => s.clone(),
                };
                write!(f, "{redacted}")
            }
        }
    }
}

/// Connection settings.
#[derive(Clone, Debug)]
pub struct StoreOptions {
    /// Most Postgres connections (SQLite always has one writer and a few readers).
    pub max_connections: u32,
}

impl Default for StoreOptions {
    fn default() -> Self {
        Self {
            max_connections: 16,
        }
    }
}

/// Raw settings; every field optional so layers can be merged.
#[derive(Clone, Debug, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Settings {
    /// gRPC listen address, e.g. `0.0.0.0:7450`.
    pub listen: Option<String>,
    /// `sqlite://PATH` or `postgres://…`.
    pub db: Option<String>,
    /// Lease time-to-live without a heartbeat, seconds.
    pub lease_ttl_secs: Option<u64>,
    /// Heartbeat interval told to workers, seconds.
    pub heartbeat_secs: Option<u64>,
    /// Attempts per cell when a sweep does not say.
    pub max_attempts: Option<u32>,
    /// Most cells per sweep.
    pub max_cells_per_sweep: Option<usize>,
    /// Maintenance pass interval, milliseconds.
    pub maintenance_interval_ms: Option<u64>,
    /// Postgres pool size.
    pub pg_max_connections: Option<u32>,
    /// Backoff after the first failure, milliseconds.
    pub retry_base_ms: Option<u64>,
    /// Refuse every call without a live token (`kiln token create`).
    pub require_tokens: Option<bool>,
    /// TLS server certificate chain, PEM file.
    pub tls_cert: Option<String>,
    /// TLS private key, PEM file.
    pub tls_key: Option<String>,
    /// CA (PEM file) whose client certificates are required of every caller.
    pub tls_client_ca: Option<String>,
    /// Listen on a non-loopback address without TLS and tokens anyway.
    pub insecure_lan: Option<bool>,
    /// Serve the web UI on the listen port (default: on).
    pub web: Option<bool>,
    /// Storages the web UI reads result images from (`file://DIR`, `s3://BUCKET/PREFIX`): the
    /// ones the workers write to.
    pub images: Option<Vec<String>>,
    /// Folder of the web UI's thumbnail cache.
    pub thumbs_dir: Option<String>,
    /// The pool's model storage (`file:///DIR` or `s3://BUCKET/PREFIX`, no credentials), where
    /// `kiln model add` uploads registry models and workers fetch them.
    pub model_storage: Option<String>,
}

/// Validated configuration.
#[derive(Clone, Debug)]
pub struct Config {
    /// Listen address.
    pub listen: SocketAddr,
    /// Database.
    pub db: DatabaseUrl,
    /// Connection settings.
    pub store: StoreOptions,
    /// Lifecycle settings.
    pub queue: QueueConfig,
    /// Maintenance pass interval.
    pub maintenance_interval: Duration,
    /// Who may call, and over what.
    pub security: Security,
    /// The web UI.
    pub web: WebConfig,
}

/// The web UI's settings.
#[derive(Clone, Debug)]
pub struct WebConfig {
    /// Whether it is served.
    pub enabled: bool,
    /// Storage URLs it reads images from (checked by whoever opens them).
    pub images: Vec<String>,
    /// The thumbnail cache.
    pub thumbs_dir: std::path::PathBuf,
}

/// Who may call the coordinator, and over what.
#[derive(Clone, Debug, Default)]
pub struct Security {
    /// Every call needs a live token; without, every caller may do everything.
    pub require_tokens: bool,
    /// TLS; `None` serves plain HTTP/2.
    pub tls: Option<Tls>,
}

/// TLS material, read from the configured files once, at validation.
#[derive(Clone)]
pub struct Tls {
    /// Certificate chain, PEM.
    pub cert_pem: Vec<u8>,
    /// Private key, PEM.
    pub key_pem: Vec<u8>,
    /// CA of required client certificates, PEM.
    pub client_ca_pem: Option<Vec<u8>>,
}

impl std::fmt::Debug for Tls {
    // Never print the key.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tls")
            .field("client_certificates", &self.client_ca_pem.is_some())
            .finish_non_exhaustive()
    }
}

/// A `model_storage` URL: `file:///DIR` or `s3://BUCKET[/PREFIX]`, at most 1024 bytes, no
/// credentials (`user@`, a query): every client may read it, and each uploads with its own.
fn check_model_storage(url: String) -> Result<String> {
    let rest = url
        .strip_prefix("file://")
        .or_else(|| url.strip_prefix("s3://"));
    match rest {
        Some(r)
            if !r.is_empty()
                && url.len() <= 1024
                && !url.contains(['@', '?', '#'])
                && !url.chars().any(char::is_control) =>
        {
            Ok(url)
        }
        _ => Err(Error::Config(format!(
            "model_storage {url:?}: must be file:///DIR or s3://BUCKET[/PREFIX] (1..=1024 bytes, \
             no credentials)"
        ))),
    }
}

/// The contents of the PEM file `path`, named `setting` in errors.
fn read_pem(setting: &str, path: &str) -> Result<Vec<u8>> {
    let bytes = std::fs::read(path).map_err(|e| Error::Config(format!("{setting} {path}: {e}")))?;
    if !bytes.starts_with(b"-----BEGIN") && !String::from_utf8_lossy(&bytes).contains("-----BEGIN")
    {
        return Err(Error::Config(format!("{setting} {path}: not a PEM file")));
    }
    Ok(bytes)
}

impl Settings {
    /// Parses a TOML config file's text; `origin` names it in errors.
    pub fn from_toml(text: &str, origin: &str) -> Result<Settings> {
        toml::from_str(text).map_err(|e| Error::Config(format!("{origin}: {e}")))
    }

    /// `self` with every field that `over` sets replaced.
    pub fn merge(self, over: Settings) -> Settings {
        Settings {
            listen: over.listen.or(self.listen),
            db: over.db.or(self.db),
            lease_ttl_secs: over.lease_ttl_secs.or(self.lease_ttl_secs),
            heartbeat_secs: over.heartbeat_secs.or(self.heartbeat_secs),
            max_attempts: over.max_attempts.or(self.max_attempts),
            max_cells_per_sweep: over.max_cells_per_sweep.or(self.max_cells_per_sweep),
            maintenance_interval_ms: over
                .maintenance_interval_ms
                .or(self.maintenance_interval_ms),
            pg_max_connections: over.pg_max_connections.or(self.pg_max_connections),
            retry_base_ms: over.retry_base_ms.or(self.retry_base_ms),
            require_tokens: over.require_tokens.or(self.require_tokens),
            tls_cert: over.tls_cert.or(self.tls_cert),
            tls_key: over.tls_key.or(self.tls_key),
            tls_client_ca: over.tls_client_ca.or(self.tls_client_ca),
            insecure_lan: over.insecure_lan.or(self.insecure_lan),
            web: over.web.or(self.web),
            images: over.images.or(self.images),
            thumbs_dir: over.thumbs_dir.or(self.thumbs_dir),
            model_storage: over.model_storage.or(self.model_storage),
        }
    }

    /// Fills defaults and checks every value; the error names the setting.
    pub fn validate(self) -> Result<Config> {
        let listen_text = self.listen.as_deref().unwrap_or(DEFAULT_LISTEN);
        let listen: SocketAddr = listen_text
            .parse()
            .map_err(|e| Error::Config(format!("listen {listen_text:?}: {e}")))?;
        let db: DatabaseUrl = self.db.as_deref().unwrap_or(DEFAULT_DB).parse()?;
        let mut queue = QueueConfig::default();
        if let Some(s) = self.lease_ttl_secs {
            if !(5..=86_400).contains(&s) {
                return Err(Error::Config(format!(
                    "lease_ttl_secs {s}: must be 5..=86400"
                )));
            }
            queue.lease_ttl_ms = s as i64 * 1000;
        }
        if let Some(s) = self.heartbeat_secs {
            queue.heartbeat_interval_ms = s as i64 * 1000;
        } else {
            queue.heartbeat_interval_ms = queue.lease_ttl_ms / 4;
        }
        if queue.heartbeat_interval_ms <= 0 || queue.heartbeat_interval_ms * 2 > queue.lease_ttl_ms
        {
            return Err(Error::Config(format!(
                "heartbeat_secs: must be positive and at most half of lease_ttl_secs ({} s)",
                queue.lease_ttl_ms / 1000
            )));
        }
        if let Some(n) = self.max_attempts {
            if !(1..=100).contains(&n) {
                return Err(Error::Config(format!("max_attempts {n}: must be 1..=100")));
            }
            queue.default_max_attempts = n as i32;
        }
        if let Some(n) = self.max_cells_per_sweep {
            if n == 0 {
                return Err(Error::Config(
                    "max_cells_per_sweep: must be positive".into(),
                ));
            }
            queue.max_cells_per_sweep = n;
        }
        if let Some(url) = self.model_storage {
            queue.model_storage = Some(check_model_storage(url)?);
        }
        if let Some(ms) = self.retry_base_ms {
            queue.retry.base_ms = ms as i64;
        }
        let maintenance_interval =
            Duration::from_millis(self.maintenance_interval_ms.unwrap_or(1_000).max(10));
        let store = StoreOptions {
            max_connections: self.pg_max_connections.unwrap_or(16),
        };
        let tls = match (&self.tls_cert, &self.tls_key) {
            (Some(cert), Some(key)) => Some(Tls {
                cert_pem: read_pem("tls_cert", cert)?,
                key_pem: read_pem("tls_key", key)?,
                client_ca_pem: self
                    .tls_client_ca
                    .as_deref()
                    .map(|p| read_pem("tls_client_ca", p))
                    .transpose()?,
            }),
            (None, None) if self.tls_client_ca.is_some() => {
                return Err(Error::Config(
                    "tls_client_ca: needs tls_cert and tls_key".into(),
                ));
            }
            (None, None) => None,
            _ => {
                return Err(Error::Config(
                    "tls_cert and tls_key: give both or neither".into(),
                ));
            }
        };
        let security = Security {
            require_tokens: self.require_tokens.unwrap_or(false),
            tls,
        };
        let guarded = security.require_tokens && security.tls.is_some();
        if !listen.ip().is_loopback() && !guarded && !self.insecure_lan.unwrap_or(false) {
            return Err(Error::Config(format!(
                "listen {listen}: other machines can reach this address, and without TLS and \
                 tokens anyone on the network could submit, cancel, read every sweep and act as \
                 a worker. Give --tls-cert, --tls-key and --require-tokens (README: \"Running a \
                 pool safely\"), or --insecure-lan on a network you trust"
            )));
        }
        let images = self.images.unwrap_or_default();
        if images.len() > 16 || images.iter().any(|u| u.is_empty() || u.len() > 1024) {
            return Err(Error::Config(
                "images: at most 16 storage URLs of 1..=1024 bytes".into(),
            ));
        }
        let web = WebConfig {
            enabled: self.web.unwrap_or(true),
            images,
            thumbs_dir: match self.thumbs_dir {
                Some(d) if d.is_empty() => {
                    return Err(Error::Config("thumbs_dir: empty".into()));
                }
                Some(d) => d.into(),
                None => db.thumbs_dir(),
            },
        };
        Ok(Config {
            listen,
            db,
            store,
            queue,
            maintenance_interval,
            security,
            web,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn model_storage_is_a_url_without_credentials() {
        let file = Settings::from_toml("model_storage = \"file:///srv/models\"", "f").unwrap();
        let flags = Settings {
            model_storage: Some("s3://models/pool".into()),
            ..Default::default()
        };
        let cfg = file.clone().merge(flags).validate().unwrap();
        assert_eq!(cfg.queue.model_storage.as_deref(), Some("s3://models/pool"));
        let cfg = file.validate().unwrap();
        assert_eq!(
            cfg.queue.model_storage.as_deref(),
            Some("file:///srv/models")
        );
        for bad in [
            "",
            "s3://",
            "ftp://x",
            "s3://key:secret@host/b",
            "file:///x?y",
            "dir",
        ] {
            let e = Settings {
                model_storage: Some(bad.into()),
                ..Default::default()
            }
            .validate()
            .unwrap_err();
            assert!(e.to_string().contains("model_storage"), "{bad}: {e}");
        }
    }

    #[test]
    fn later_layers_win_and_validation_names_the_setting() {
        let file = Settings::from_toml("listen = \"0.0.0.0:1\"\nlease_ttl_secs = 30", "f").unwrap();
        let flags = Settings {
            listen: Some("127.0.0.1:9".into()),
            ..Default::default()
        };
        let cfg = file.merge(flags).validate().unwrap();
        assert_eq!(cfg.listen.port(), 9);
        assert_eq!(cfg.queue.lease_ttl_ms, 30_000);
        assert_eq!(cfg.queue.heartbeat_interval_ms, 7_500);
        let e = Settings::from_toml("bogus = 1", "kiln.toml")
            .unwrap_err()
            .to_string();
        assert!(e.contains("kiln.toml") && e.contains("bogus"), "{e}");
        let e = Settings {
            db: Some("mysql://x".into()),
            ..Default::default()
        }
        .validate()
        .unwrap_err()
        .to_string();
        assert!(e.contains("mysql"), "{e}");
    }

    #[test]
    fn a_network_listen_needs_tls_and_tokens_or_says_why() {
        let lan = |more: Settings| {
            Settings {
                listen: Some("0.0.0.0:7450".into()),
                ..Default::default()
            }
            .merge(more)
            .validate()
        };
        let e = lan(Settings::default()).unwrap_err().to_string();
        assert!(
            e.contains("0.0.0.0:7450") && e.contains("--insecure-lan"),
            "{e}"
        );
        let e = lan(Settings {
            require_tokens: Some(true),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("--tls-cert"), "{e}");
        let ok = lan(Settings {
            insecure_lan: Some(true),
            ..Default::default()
        })
        .unwrap();
        assert!(!ok.security.require_tokens && ok.security.tls.is_none());
        // Loopback needs neither.
        assert!(Settings::default().validate().is_ok());
        let e = lan(Settings {
            tls_cert: Some("/no/such.pem".into()),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("give both or neither"), "{e}");
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = (dir.path().join("c.pem"), dir.path().join("k.pem"));
        std::fs::write(&cert, "-----BEGIN CERTIFICATE-----\n").unwrap();
        std::fs::write(&key, "not pem").unwrap();
        let e = lan(Settings {
            tls_cert: Some(cert.display().to_string()),
            tls_key: Some(key.display().to_string()),
            require_tokens: Some(true),
            ..Default::default()
        })
        .unwrap_err()
        .to_string();
        assert!(e.contains("tls_key") && e.contains("not a PEM file"), "{e}");
    }
}
