//! Bearer-token authentication of `/v1`: the token check (constant time) and the security scheme
//! declared in the OpenAPI document so that Swagger UI's "Authorize" button works.
//!
//! Enforcement lives in the front middleware (`front.rs`), which checks every request outside the
//! open routes before its body is read, whatever the route; the [`BearerAuth`] parameter that
//! each `/v1` operation takes only declares the scheme in the document (a test checks that every
//! `/v1` operation declares it).

use poem::http::HeaderMap;
use poem::http::header::AUTHORIZATION;
use poem::{Request, RequestBody};
use poem_openapi::registry::{MetaSecurityScheme, Registry};
use poem_openapi::{ApiExtractor, ApiExtractorType, ExtractParamOptions};

/// The name of the security scheme in the OpenAPI document.
pub(crate) const SCHEME_NAME: &str = "bearerAuth";

/// Marks an operation as requiring `Authorization: Bearer <token>` in the OpenAPI document.
/// Extraction always succeeds: the front middleware has already checked the token.
pub(crate) struct BearerAuth;

impl<'a> ApiExtractor<'a> for BearerAuth {
    const TYPES: &'static [ApiExtractorType] = &[ApiExtractorType::SecurityScheme];
    type ParamType = ();
    type ParamRawType = ();

    fn register(registry: &mut Registry) {
        registry.create_security_scheme(
            SCHEME_NAME,
            MetaSecurityScheme {
                ty: "http",
                description: Some(
                    "One of the server's API tokens (`FAULTLINE_API_TOKENS`), as \
                     `Authorization: Bearer <token>`. Required on every `/v1` route when the server \
                     is configured with tokens; without tokens the server accepts any request.",
                ),
                name: None,
                key_in: None,
                scheme: Some("bearer"),
                bearer_format: None,
                flows: None,
                openid_connect_url: None,
            },
        );
    }

    fn security_schemes() -> Vec<&'static str> {
        vec![SCHEME_NAME]
    }

    async fn from_request(
        _request: &'a Request,
        _body: &mut RequestBody,
        _param_opts: ExtractParamOptions<Self::ParamType>,
    ) -> poem::Result<Self> {
        Ok(BearerAuth)
    }
}

/// Whether `path` needs no token: `/health`, `/metrics`, `/openapi.json` and `/docs`. Every other
/// path (`/v1/...`, and unknown paths, which then get 401 rather than 404) needs one when tokens
/// are configured: an allowlist fails closed on odd spellings such as `//v1/jobs`.
pub(crate) fn is_open(path: &str) -> bool {
    matches!(
        path,
        "/health" | "/metrics" | "/openapi.json" | "/docs" | "/docs/"
    ) || (path.starts_with("/docs/") && !path.contains(".."))
}

/// The accepted tokens.
pub(crate) struct Tokens(Vec<Vec<u8>>);

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// No `Authorization: Bearer` header.
    Missing,
    /// A bearer token that is not one of the configured ones.
    Wrong,
}

impl Tokens {
    pub(crate) fn new(tokens: &[String]) -> Tokens {
        Tokens(tokens.iter().map(|t| t.as_bytes().to_vec()).collect())
    }

    pub(crate) fn is_empty(&self) -> bool {
        self.0.is_empty()
    }

    /// Checks the request's bearer token. With no configured tokens everything is accepted.
    pub(crate) fn check(&self, headers: &HeaderMap) -> Result<(), Refusal> {
        if self.is_empty() {
            return Ok(());
        }
        let presented = headers
            .get(AUTHORIZATION)
            .and_then(|value| bearer_token(value.as_bytes()))
            .ok_or(Refusal::Missing)?;
        // Compare against every token, so the time taken does not say which one came close.
        let mut accepted = false;
        for token in &self.0 {
            accepted |= constant_time_eq(token, presented);
        }
        if accepted {
            Ok(())
        } else {
            Err(Refusal::Wrong)
        }
    }
}

/// The token of an `Authorization: Bearer <token>` header value (scheme case-insensitive).
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    const SCHEME: &[u8] = b"bearer ";
    if value.len() <= SCHEME.len() || !value[..SCHEME.len()].eq_ignore_ascii_case(SCHEME) {
        return None;
    }
    let token = value[SCHEME.len()..].trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Equality whose running time depends only on the lengths: after the length check, every byte
/// pair is XORed into one accumulator (kept opaque to the optimiser), with no early exit.
pub(crate) fn constant_time_eq(expected: &[u8], presented: &[u8]) -> bool {
    if expected.len() != presented.len() {
        return false;
    }
    let diff = expected
        .iter()
        .zip(presented)
        .fold(0_u8, |acc, (a, b)| std::hint::black_box(acc | (a ^ b)));
    diff == 0
}

#[cfg(test)]
mod tests {
    use super::*;
    use poem::http::HeaderValue;

    #[test]
    fn constant_time_eq_is_equality() {
        assert!(constant_time_eq(b"", b""));
        assert!(constant_time_eq(b"abc", b"abc"));
        assert!(!constant_time_eq(b"abc", b"abd"));
        assert!(!constant_time_eq(b"abc", b"ab"));
        assert!(!constant_time_eq(b"abc", b"abcd"));
        assert!(!constant_time_eq(b"\x00", b"\x01"));
    }

    #[test]
    fn bearer_header_parsing() {
        assert_eq!(bearer_token(b"Bearer abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"bearer   abc "), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"BEARER abc"), Some(&b"abc"[..]));
        assert_eq!(bearer_token(b"Bearer "), None);
        assert_eq!(bearer_token(b"Bearer    "), None);
        assert_eq!(bearer_token(b"Basic abc"), None);
        assert_eq!(bearer_token(b"Bearerabc"), None);
        assert_eq!(bearer_token(b""), None);
    }

    #[test]
    fn tokens_check_every_configured_token() {
        let tokens = Tokens::new(&["one".into(), "two".into()]);
        let with = |value: &str| {
            let mut headers = HeaderMap::new();
            headers.insert(AUTHORIZATION, HeaderValue::from_str(value).unwrap());
            headers
        };
        assert_eq!(tokens.check(&with("Bearer one")), Ok(()));
        assert_eq!(tokens.check(&with("Bearer two")), Ok(()));
        assert_eq!(tokens.check(&with("Bearer three")), Err(Refusal::Wrong));
        assert_eq!(tokens.check(&with("Basic b25lOg==")), Err(Refusal::Missing));
        assert_eq!(tokens.check(&HeaderMap::new()), Err(Refusal::Missing));
        assert_eq!(Tokens::new(&[]).check(&HeaderMap::new()), Ok(()));
    }

    #[test]
    fn only_the_operational_routes_are_open() {
        for open in [
            "/health",
            "/metrics",
            "/openapi.json",
            "/docs",
            "/docs/",
            "/docs/x.js",
        ] {
            assert!(is_open(open), "{open}");
        }
        for closed in [
            "/v1",
            "/v1/jobs",
            "//v1/jobs",
            "/v10/jobs",
            "/healthz",
            "/docs/../v1/jobs",
            "/",
        ] {
            assert!(!is_open(closed), "{closed}");
        }
    }
}
