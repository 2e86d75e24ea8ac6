//! Authentication, in one place for every RPC: a tower layer that resolves the request's
//! `authorization: Bearer <token>` to a [`Principal`] (or answers UNAUTHENTICATED) and hands it
//! to the handlers in the request's extensions; handlers then check scope and owner
//! ([`principal`]). On a coordinator that requires no tokens every caller is
//! [`Principal::open`]. The health service answers without a token (it says nothing but
//! "serving"). A worker's session credential travels as [`SESSION_HEADER`]. Paths outside the
//! gRPC services (the web UI's) pass through untouched: the web UI resolves its callers from
//! the same tokens itself, and a gRPC handler never runs without a principal (it fails closed).

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use tonic::Status;
use tonic::codegen::http;
use tower::{Layer, Service};

use crate::domain::auth::Principal;
use crate::queue::Queue;
use crate::{Error, Result};

/// The metadata key of a worker's session credential (`RegisterResponse.session`).
pub const SESSION_HEADER: &str = "x-kiln-session";

/// The caller of `request`, as the layer resolved it; refused when the layer did not run (a
/// service served without it fails closed).
pub(super) fn principal<T>(request: &tonic::Request<T>) -> Result<Principal> {
    request
        .extensions()
        .get::<Principal>()
        .cloned()
        .ok_or_else(|| Error::Unauthenticated("no credentials".into()))
}

/// The session credential a worker call carries, if any.
pub(super) fn session<T>(request: &tonic::Request<T>) -> Option<&str> {
    request.metadata().get(SESSION_HEADER)?.to_str().ok()
}

/// Resolves every request's caller: with `queue`, from its token; without, as open.
#[derive(Clone, Debug)]
pub struct AuthLayer {
    tokens: Option<Queue>,
}

impl AuthLayer {
    /// Callers need a live token, looked up through `queue`.
    pub fn tokens(queue: Queue) -> Self {
        Self {
            tokens: Some(queue),
        }
    }

    /// No tokens: every caller may do everything (a loopback or trusted-LAN coordinator).
    pub fn open() -> Self {
        Self { tokens: None }
    }
}

impl<S> Layer<S> for AuthLayer {
    type Service = Auth<S>;
    fn layer(&self, inner: S) -> Auth<S> {
        Auth {
            inner,
            tokens: self.tokens.clone(),
        }
    }
}

/// The service [`AuthLayer`] makes.
#[derive(Clone, Debug)]
pub struct Auth<S> {
    inner: S,
    tokens: Option<Queue>,
}

type BoxFuture<T> = Pin<Box<dyn Future<Output = T> + Send>>;

impl<S, B, R> Service<http::Request<B>> for Auth<S>
where
    S: Service<http::Request<B>, Response = http::Response<R>> + Clone + Send + 'static,
    S::Future: Send + 'static,
    B: Send + 'static,
    R: Default + Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = BoxFuture<std::result::Result<S::Response, S::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<std::result::Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut request: http::Request<B>) -> Self::Future {
        // The clone that was made ready serves this call; a fresh clone waits for the next.
        let clone = self.inner.clone();
        let mut inner = std::mem::replace(&mut self.inner, clone);
        let tokens = self.tokens.clone();
        Box::pin(async move {
            let path = request.uri().path();
            let health = path.starts_with("/grpc.health.");
            // The web UI's paths resolve their caller themselves, from the same tokens
            // (`web::auth`); only gRPC paths are answered with a gRPC status here.
            if !path.starts_with("/kiln.") && !path.starts_with("/grpc.") {
                return inner.call(request).await;
            }
            let caller = match tokens {
                None => Ok(Principal::open()),
                Some(_) if health => Ok(Principal::open()),
                Some(queue) => match bearer(request.headers()) {
                    Some(token) => queue.principal(token).await,
                    None => Err(Error::Unauthenticated(
                        "this coordinator requires a token (authorization: Bearer …; \
                         kiln --token or KILN_TOKEN)"
                            .into(),
                    )),
                },
            };
            match caller {
                Ok(p) => {
                    request.extensions_mut().insert(p);
                    inner.call(request).await
                }
                Err(e) => Ok(Status::from(e).into_http()),
            }
        })
    }
}

/// The token of an `authorization: Bearer …` header (also read by `/metrics`).
pub(crate) fn bearer(headers: &http::HeaderMap) -> Option<&str> {
    let value = headers.get("authorization")?.to_str().ok()?;
    let token = value.strip_prefix("Bearer ")?.trim();
    (!token.is_empty()).then_some(token)
}
