//! `serve --http-token-file`: the HTTP API answers only requests carrying
//! `Authorization: Bearer <token>`.
//!
//! Two kinds of path stay open, because their clients cannot send a token
//! and they reveal nothing about traffic: `/healthz` and `/readyz` (kubelet
//! probes) and
//! the filter module with its checksum (Envoy's remote fetch sends no
//! headers; the bytes are the public build, pinned by SHA-256).

use std::path::{Path, PathBuf};
use std::sync::Arc;

use axum::Router;
use axum::extract::{Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use sha2::{Digest, Sha256};

use crate::http::{ENFORCE_MODULE_PATH, MODULE_PATH};

/// The token the HTTP API requires; never printed.
#[derive(Clone)]
pub struct HttpToken(Arc<str>);

impl std::fmt::Debug for HttpToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("HttpToken(<redacted>)")
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TokenError {
    #[error("{flag} {}: cannot read: {source}", path.display())]
    Read {
        flag: &'static str,
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{flag} {}: {problem}", path.display())]
    Invalid {
        flag: &'static str,
        path: PathBuf,
        problem: &'static str,
    },
}

impl HttpToken {
    /// Reads the token from a file (so it stays out of `ps`); surrounding
    /// whitespace, such as the final newline, is not part of it. Errors
    /// name `flag`, the option that gave the file.
    pub fn load(flag: &'static str, path: &Path) -> Result<Self, TokenError> {
        let text = std::fs::read_to_string(path).map_err(|source| TokenError::Read {
            flag,
            path: path.to_owned(),
            source,
        })?;
        Self::new(text.trim()).map_err(|problem| TokenError::Invalid {
            flag,
            path: path.to_owned(),
            problem,
        })
    }

    /// The token itself, for a client to send.
    pub fn secret(&self) -> &str {
        &self.0
    }

    /// A token must be non-empty printable ASCII without spaces, as a header value allows.
    pub fn new(token: &str) -> Result<Self, &'static str> {
        if token.is_empty() {
            return Err("the file is empty; expected the token");
        }
        if !token.bytes().all(|b| b.is_ascii_graphic()) {
            return Err("the token must be printable ASCII without spaces");
        }
        Ok(Self(token.into()))
    }

    /// Compares in time independent of where the first difference is, so
    /// that response times do not reveal a guess's correct prefix.
    fn matches(&self, presented: &[u8]) -> bool {
        let expected = Sha256::digest(self.0.as_bytes());
        let presented = Sha256::digest(presented);
        expected
            .iter()
            .zip(presented.iter())
            .fold(0u8, |acc, (a, b)| acc | (a ^ b))
            == 0
    }
}

/// `router` with every path except the open ones requiring `token`.
pub fn require_token(router: Router, token: HttpToken) -> Router {
    router.layer(middleware::from_fn_with_state(token, check_token))
}

fn is_open(path: &str) -> bool {
    path == "/healthz"
        || path == "/readyz"
        || [MODULE_PATH, ENFORCE_MODULE_PATH].iter().any(|module| {
            path == *module
                || path
                    .strip_prefix(module)
                    .is_some_and(|rest| rest == ".sha256")
        })
}

async fn check_token(State(token): State<HttpToken>, request: Request, next: Next) -> Response {
    if is_open(request.uri().path()) {
        return next.run(request).await;
    }
    let presented = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|value| value.to_str().ok())
        .and_then(bearer_token);
    match presented {
        Some(presented) if token.matches(presented.as_bytes()) => next.run(request).await,
        _ => {
            let mut response = (
                StatusCode::UNAUTHORIZED,
                "unauthorized: send Authorization: Bearer <token>\n",
            )
                .into_response();
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"dialguard\""),
            );
            response
        }
    }
}

/// The credentials of `Bearer <token>`; the scheme is case-insensitive.
fn bearer_token(value: &str) -> Option<&str> {
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|token| !token.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_bearer_credentials() {
        assert_eq!(bearer_token("Bearer abc"), Some("abc"));
        assert_eq!(bearer_token("bearer  abc "), Some("abc"));
        assert_eq!(bearer_token("Basic abc"), None);
        assert_eq!(bearer_token("Bearer"), None);
        assert_eq!(bearer_token("Bearer "), None);
    }

    #[test]
    fn compares_whole_tokens() {
        let token = HttpToken::new("s3cret").expect("valid token");
        assert!(token.matches(b"s3cret"));
        assert!(!token.matches(b"s3cre"));
        assert!(!token.matches(b"s3cret2"));
        assert!(!token.matches(b""));
    }

    #[test]
    fn rejects_unusable_tokens() {
        assert!(HttpToken::new("").is_err());
        assert!(HttpToken::new("two words").is_err());
        assert!(HttpToken::new("ünïcode").is_err());
    }

    #[test]
    fn only_health_and_module_are_open() {
        assert!(is_open("/healthz"));
        assert!(is_open("/readyz"));
        assert!(is_open(MODULE_PATH));
        assert!(is_open(&format!("{MODULE_PATH}.sha256")));
        assert!(is_open(ENFORCE_MODULE_PATH));
        assert!(is_open(&format!("{ENFORCE_MODULE_PATH}.sha256")));
        assert!(!is_open("/metrics"));
        assert!(!is_open("/api/v1/report"));
        assert!(!is_open(&format!("{MODULE_PATH}.bak")));
        assert!(!is_open("/healthz/../api/v1/report"));
        assert!(!is_open("/readyz/x"));
    }
}
