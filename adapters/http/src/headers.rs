//! The request headers the API interprets, checked before anything else reads them, so that an
//! unusable value is refused with a problem instead of being silently skipped (the framework's
//! typed extractors skip a value that is not visible ASCII as if it were absent):
//!
//! * `Idempotency-Key`: at most one, 1 to [`MAX_KEY_BYTES`] characters of visible ASCII (spaces
//!   inside allowed). Anything else (UTF-8 or Latin-1 bytes, control characters, an empty value,
//!   two headers) is a 400; other characters can go in the body field `idempotency_key`.
//! * `Content-Type`: at most one, readable (visible ASCII); else 400.
//! * `Content-Length`: at most one value, a decimal number; else 400.
//! * `Content-Encoding`: bodies are read as sent, so any coding but `identity` is a 415.
//!
//! `Authorization` is checked by the authentication (a value that is not a configured bearer
//! token, non-ASCII bytes included, is a 401); no other request header changes what the API does.

use poem::http::header::{CONTENT_ENCODING, CONTENT_LENGTH, CONTENT_TYPE};
use poem::http::{HeaderMap, HeaderName, StatusCode};

use crate::problem::Problem;

/// The idempotency key header.
pub(crate) const IDEMPOTENCY_KEY: &str = "idempotency-key";

/// Longest idempotency key (the body field's limit too).
pub(crate) const MAX_KEY_BYTES: usize = 128;

/// Checks the headers the API reads; the problem to answer with when one is unusable.
pub(crate) fn check(headers: &HeaderMap) -> Result<(), Problem> {
    let idempotency_key = HeaderName::from_static(IDEMPOTENCY_KEY);
    if let Some(key) = single(headers, &idempotency_key, "Idempotency-Key")? {
        let bytes = key.as_bytes();
        let visible = bytes.iter().all(|b| (0x20..0x7f).contains(b));
        if !visible {
            return Err(Problem::bad_request(
                "the Idempotency-Key header must be visible ASCII (no control characters, no \
                 non-ASCII bytes); percent-encode other characters, or send the key in the \
                 body field idempotency_key",
            ));
        }
        let trimmed = key.as_bytes().trim_ascii();
        if trimmed.is_empty() || bytes.len() > MAX_KEY_BYTES {
            return Err(Problem::bad_request(format!(
                "the Idempotency-Key header must have 1 to {MAX_KEY_BYTES} characters"
            )));
        }
    }
    if let Some(content_type) = single(headers, &CONTENT_TYPE, "Content-Type")?
        && content_type.to_str().is_err()
    {
        return Err(Problem::bad_request(
            "the Content-Type header is not readable (it must be visible ASCII, e.g. \
             application/json)",
        ));
    }
    let mut lengths = headers.get_all(CONTENT_LENGTH).iter();
    if let Some(first) = lengths.next() {
        let parsed = |value: &poem::http::HeaderValue| {
            value
                .to_str()
                .ok()
                .filter(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()))
                .and_then(|v| v.parse::<u64>().ok())
        };
        let length = parsed(first);
        if length.is_none() || lengths.any(|other| parsed(other) != length) {
            return Err(Problem::bad_request(
                "the Content-Length header must be one decimal number",
            ));
        }
    }
    for coding in headers.get_all(CONTENT_ENCODING) {
        let identity = coding.to_str().is_ok_and(|value| {
            value
                .split(',')
                .all(|c| c.trim().eq_ignore_ascii_case("identity"))
        });
        if !identity {
            return Err(Problem::from_status(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "request bodies must not be encoded (Content-Encoding other than identity)",
            ));
        }
    }
    Ok(())
}

/// The one value of header `name` (shown as `shown`), if any; more than one is a 400.
fn single<'h>(
    headers: &'h HeaderMap,
    name: &HeaderName,
    shown: &str,
) -> Result<Option<&'h poem::http::HeaderValue>, Problem> {
    let mut values = headers.get_all(name).iter();
    let first = values.next();
    if values.next().is_some() {
        return Err(Problem::bad_request(format!(
            "the {shown} header must be sent at most once"
        )));
    }
    Ok(first)
}

#[cfg(test)]
mod tests {
    use poem::http::HeaderValue;

    use super::*;

    fn with(pairs: &[(&str, &[u8])]) -> HeaderMap {
        let mut headers = HeaderMap::new();
        for (name, value) in pairs {
            headers.append(
                HeaderName::from_bytes(name.as_bytes()).unwrap(),
                HeaderValue::from_bytes(value).unwrap(),
            );
        }
        headers
    }

    #[test]
    fn usable_headers_pass() {
        let ok = with(&[
            ("idempotency-key", b"order 7/x%C3%A9"),
            ("content-type", b"application/json; charset=utf-8"),
            ("content-length", b"42"),
            ("content-encoding", b"identity"),
        ]);
        assert!(check(&ok).is_ok());
        assert!(check(&HeaderMap::new()).is_ok());
        let key = "k".repeat(MAX_KEY_BYTES);
        assert!(check(&with(&[("idempotency-key", key.as_bytes())])).is_ok());
    }

    #[test]
    fn unusable_headers_are_refused() {
        let long = "k".repeat(MAX_KEY_BYTES + 1);
        let cases: [&[(&str, &[u8])]; 11] = [
            &[("idempotency-key", "été".as_bytes())],
            &[("idempotency-key", b"caf\xe9")],
            &[("idempotency-key", b"a\tb")],
            &[("idempotency-key", b"")],
            &[("idempotency-key", long.as_bytes())],
            &[("idempotency-key", b"a"), ("idempotency-key", b"a")],
            &[("content-type", "application/jsön".as_bytes())],
            &[
                ("content-type", b"application/json"),
                ("content-type", b"text/plain"),
            ],
            &[("content-length", b"+12")],
            &[("content-length", b"12"), ("content-length", b"13")],
            &[("content-encoding", b"gzip")],
        ];
        for case in cases {
            let problem = check(&with(case)).expect_err("refused");
            assert!(
                problem.status == 400 || problem.status == 415,
                "{case:?}: {problem:?}"
            );
        }
    }
}
