//! Who is asking, for the web UI: the same tokens as the gRPC API, no second door.
//!
//! On a coordinator without tokens every caller is [`Principal::open`] (it serves only where
//! the gRPC API serves: loopback unless told otherwise). With tokens, `/login` takes a token
//! once and keeps it in a cookie (`HttpOnly`, `SameSite=Strict`, `Secure` under TLS); each
//! request resolves it through [`Queue::principal`](crate::queue::Queue::principal), so a
//! revoked token stops working at once. Changes (star, pause, …) are `POST`s that must carry
//! the `x-kiln-csrf` header, which a cross-site form cannot send, and need a `submit` token.

use axum::Router;
use axum::extract::{Form, FromRequestParts, Query, State};
use axum::http::request::Parts;
use axum::http::{HeaderMap, HeaderValue, header};
use axum::response::{IntoResponse, Redirect, Response};
use axum::routing::{get, post};
use serde::Deserialize;

use super::page::{self, local, login_form};
use super::state::{Web, WebError};
use crate::domain::auth::Principal;
use crate::domain::state::Scope;

/// The cookie that holds the signed-in token.
const COOKIE: &str = "kiln_token";
/// The header every change must carry.
pub const CSRF_HEADER: &str = "x-kiln-csrf";
/// Longest token accepted (a kiln token is 69 bytes).
const MAX_TOKEN: usize = 256;

pub(super) fn routes() -> Router<Web> {
    Router::new()
        .route("/login", get(login_page).post(login))
        .route("/logout", post(logout))
}

/// The caller of a request: any scope that can read.
pub(crate) struct Caller(pub Principal);

impl FromRequestParts<Web> for Caller {
    type Rejection = WebError;

    async fn from_request_parts(parts: &mut Parts, web: &Web) -> Result<Self, WebError> {
        if !web.require_tokens {
            return Ok(Self(Principal::open()));
        }
        let token = cookie(&parts.headers, COOKIE).ok_or(WebError::Unauthenticated)?;
        let p = web
            .queue
            .principal(&token)
            .await
            .map_err(|_| WebError::Unauthenticated)?;
        p.require(Scope::Read)?;
        Ok(Self(p))
    }
}

/// The caller of a change: a `submit` (or `admin`) token, and the CSRF header present.
pub(crate) struct Changer(pub Principal);

impl FromRequestParts<Web> for Changer {
    type Rejection = WebError;

    async fn from_request_parts(parts: &mut Parts, web: &Web) -> Result<Self, WebError> {
        if parts.headers.get(CSRF_HEADER).is_none() {
            return Err(WebError::Forbidden(format!(
                "changes need the {CSRF_HEADER} header (use the page's buttons)"
            )));
        }
        let Caller(p) = Caller::from_request_parts(parts, web).await?;
        p.require(Scope::Submit)?;
        Ok(Self(p))
    }
}

/// The value of cookie `name`, if the request has it.
fn cookie(headers: &HeaderMap, name: &str) -> Option<String> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|kv| kv.trim().split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
        .filter(|v| !v.is_empty() && v.len() <= MAX_TOKEN)
}

#[derive(Deserialize)]
struct Next {
    next: Option<String>,
}

async fn login_page(State(web): State<Web>, Query(q): Query<Next>) -> Response {
    if !web.require_tokens {
        return Redirect::to(local(q.next.as_deref())).into_response();
    }
    page::frame("Sign in", login_form(q.next.as_deref(), None)).into_response()
}

#[derive(Deserialize)]
struct Login {
    token: String,
    next: Option<String>,
}

async fn login(State(web): State<Web>, Form(f): Form<Login>) -> Response {
    let token = f.token.trim();
    let ok = token.len() <= MAX_TOKEN
        && !token.is_empty()
        && token
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b';' && b != b',')
        && web.queue.principal(token).await.is_ok();
    if !ok {
        let form = login_form(f.next.as_deref(), Some("unknown or revoked token"));
        return (
            axum::http::StatusCode::UNAUTHORIZED,
            page::frame("Sign in", form),
        )
            .into_response();
    }
    let secure = if web.tls { "; Secure" } else { "" };
    let cookie = format!("{COOKIE}={token}; Path=/; HttpOnly; SameSite=Strict{secure}");
    let mut r = Redirect::to(local(f.next.as_deref())).into_response();
    if let Ok(v) = HeaderValue::from_str(&cookie) {
        r.headers_mut().insert(header::SET_COOKIE, v);
    }
    r
}

async fn logout() -> Response {
    let mut r = Redirect::to("/login").into_response();
    r.headers_mut().insert(
        header::SET_COOKIE,
        HeaderValue::from_static("kiln_token=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0"),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn next_stays_on_this_site() {
        assert_eq!(local(Some("/gallery?q=x")), "/gallery?q=x");
        assert_eq!(local(Some("//evil.example/")), "/");
        assert_eq!(local(Some("https://evil.example/")), "/");
        assert_eq!(local(Some("/\\evil.example")), "/");
        assert_eq!(local(None), "/");
    }

    #[test]
    fn cookie_is_found_among_others() {
        let mut h = HeaderMap::new();
        h.insert(
            header::COOKIE,
            HeaderValue::from_static("a=1; kiln_token=kiln_ab; b=2"),
        );
        assert_eq!(cookie(&h, COOKIE).as_deref(), Some("kiln_ab"));
        assert_eq!(cookie(&h, "c"), None);
    }
}
