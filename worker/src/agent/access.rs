//! What a call to the coordinator carries, for the worker and for every client command: TLS
//! (the system's roots, or a CA file for a self-signed coordinator), the token
//! (`authorization: Bearer …`) and, for a worker, the session credential it got at
//! registration (`x-kiln-session`).

use std::path::PathBuf;
use std::sync::{Arc, RwLock};

use anyhow::Context;
use tonic::metadata::AsciiMetadataValue;
use tonic::service::Interceptor;
use tonic::transport::{Certificate, ClientTlsConfig, Endpoint};

/// The metadata key of a worker's session credential (the coordinator's `SESSION_HEADER`).
pub const SESSION_HEADER: &str = "x-kiln-session";

/// How to reach a coordinator that requires tokens or TLS.
#[derive(Clone, Debug, Default)]
pub struct Access {
    /// The token (`kiln token create`); none for an open coordinator.
    pub token: Option<String>,
    /// A CA certificate (PEM) to trust beside the system's roots: a self-signed coordinator's.
    pub tls_ca: Option<PathBuf>,
}

/// The coordinator's endpoint: `http://HOST:PORT`, `https://HOST:PORT`, or `HOST:PORT` (taken as
/// http, or https when a CA is given). The one check of a `--coordinator` value, made before
/// anything starts.
pub fn endpoint(url: &str, access: &Access) -> anyhow::Result<Endpoint> {
    let full = if url.contains("://") {
        url.to_string()
    } else if access.tls_ca.is_some() {
        format!("https://{url}")
    } else {
        format!("http://{url}")
    };
    let bad = || anyhow::anyhow!("coordinator {url:?} is not a URL like http://192.168.1.10:7450");
    let endpoint = Endpoint::from_shared(full).map_err(|_| bad())?;
    let uri = endpoint.uri().clone();
    if !matches!(uri.scheme_str(), Some("http" | "https")) || uri.host().is_none_or(str::is_empty) {
        return Err(bad());
    }
    if uri.scheme_str() == Some("http") {
        anyhow::ensure!(
            access.tls_ca.is_none(),
            "--tls-ca needs an https:// coordinator URL"
        );
        return Ok(endpoint);
    }
    let mut tls = ClientTlsConfig::new().with_native_roots();
    if let Some(path) = &access.tls_ca {
        let pem = std::fs::read(path).with_context(|| format!("--tls-ca {}", path.display()))?;
        tls = tls.ca_certificate(Certificate::from_pem(pem));
    }
    endpoint.tls_config(tls).context("TLS settings")
}

/// Adds the token and the session (once there is one) to every call.
#[derive(Clone, Debug, Default)]
pub struct Credentials {
    token: Option<AsciiMetadataValue>,
    session: Arc<RwLock<Option<AsciiMetadataValue>>>,
}

impl Credentials {
    /// The credentials of `access`.
    pub fn new(access: &Access) -> anyhow::Result<Self> {
        let token = access
            .token
            .as_deref()
            .map(|t| format!("Bearer {}", t.trim()).parse())
            .transpose()
            .map_err(|_| anyhow::anyhow!("the token is not printable ASCII"))?;
        Ok(Self {
            token,
            session: Arc::default(),
        })
    }

    /// Sends `session` from now on (a worker, after registering).
    pub fn set_session(&self, session: &str) -> anyhow::Result<()> {
        let value = session
            .parse()
            .map_err(|_| anyhow::anyhow!("the coordinator sent a malformed session"))?;
        *self.session.write().unwrap_or_else(|e| e.into_inner()) = Some(value);
        Ok(())
    }
}

impl Interceptor for Credentials {
    fn call(
        &mut self,
        mut request: tonic::Request<()>,
    ) -> Result<tonic::Request<()>, tonic::Status> {
        if let Some(t) = &self.token {
            request.metadata_mut().insert("authorization", t.clone());
        }
        let session = self.session.read().unwrap_or_else(|e| e.into_inner());
        if let Some(s) = session.as_ref() {
            request.metadata_mut().insert(SESSION_HEADER, s.clone());
        }
        Ok(request)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn coordinator_urls_are_checked_before_anything_starts() {
        let open = Access::default();
        for ok in [
            "http://127.0.0.1:7450",
            "https://farm:7450",
            "farm:7450",
            "http://[::1]:7450",
        ] {
            assert!(endpoint(ok, &open).is_ok(), "{ok}");
        }
        for bad in ["not a url", "http://[::1", "ftp://farm:7450", "http://", ""] {
            let err = endpoint(bad, &open).unwrap_err().to_string();
            assert!(err.contains("is not a URL like http://"), "{bad}: {err}");
        }
        let with_ca = Access {
            tls_ca: Some("/no/such/ca.pem".into()),
            ..Default::default()
        };
        let err = endpoint("farm:7450", &with_ca).unwrap_err().to_string();
        assert!(err.contains("--tls-ca /no/such/ca.pem"), "{err}");
        let err = endpoint("http://farm:7450", &with_ca)
            .unwrap_err()
            .to_string();
        assert!(err.contains("needs an https://"), "{err}");
    }

    #[test]
    fn calls_carry_the_token_and_the_session_once_there_is_one() {
        let mut c = Credentials::new(&Access {
            token: Some(" kiln_abc ".into()),
            ..Default::default()
        })
        .unwrap();
        let r = c.call(tonic::Request::new(())).unwrap();
        assert_eq!(
            r.metadata().get("authorization").unwrap(),
            "Bearer kiln_abc"
        );
        assert!(r.metadata().get(SESSION_HEADER).is_none());
        c.set_session("kiln_s").unwrap();
        let r = c.call(tonic::Request::new(())).unwrap();
        assert_eq!(r.metadata().get(SESSION_HEADER).unwrap(), "kiln_s");
    }
}
