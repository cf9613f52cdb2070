//! The built-in `http` handler: POSTs a job's payload as JSON to the endpoint the worker's
//! configuration names for the job's kind, and maps the response onto an outcome.
//!
//! * 2xx: success; the response body (its first [`BODY_LIMIT`] bytes) is the result, as JSON when
//!   it parses, else as a string; an empty body is no result.
//! * 408, 429, 5xx, connection errors and timeouts: retry, after `Retry-After` (seconds or an
//!   HTTP-date) when the response has one, else after the job's backoff.
//! * Any other status (other 4xx, 3xx: redirects are not followed): permanent failure.
//!
//! Every request carries `Idempotency-Key: {job_id}:{fencing_token}`, unique per attempt, so the
//! receiver can drop a duplicate delivery of the same attempt, and `Faultline-*` headers
//! describing the job (queue and kind percent-encoded where they are not visible ASCII). The URL
//! never comes from the payload.

use std::fmt::Write as _;
use std::time::Duration;

use chrono::{DateTime, Utc};
use faultline_ports::domain::Limits;
use faultline_worker::{Handler, JobContext, Outcome};
use reqwest::header::{CONTENT_TYPE, HeaderMap, RETRY_AFTER};
use reqwest::{Client, StatusCode, Url};
use serde_json::Value;

/// How much of a response body is kept (as result or in the error).
pub(crate) const BODY_LIMIT: usize = 4 * 1024;

/// The longest `Retry-After` honoured; longer ones are shortened to this.
pub(crate) const MAX_RETRY_AFTER: Duration = Duration::from_secs(24 * 3_600);

/// Builds the HTTP client shared by every `http` handler of a worker: no redirects, a time limit
/// per request, and TLS by rustls with the *ring* provider (installed here, once per process).
pub(crate) fn client(timeout: Duration) -> anyhow::Result<Client> {
    // Fails only when a provider is installed already, which is what we want.
    let _ = rustls::crypto::ring::default_provider().install_default();
    Client::builder()
        .redirect(reqwest::redirect::Policy::none())
        .timeout(timeout)
        .connect_timeout(timeout.min(Duration::from_secs(10)))
        .user_agent(concat!("faultline/", env!("CARGO_PKG_VERSION")))
        .build()
        .map_err(|e| anyhow::anyhow!("build the HTTP client: {}", chain(e)))
}

/// Runs the jobs of one kind by POSTing them to one URL.
#[derive(Debug, Clone)]
pub(crate) struct HttpHandler {
    client: Client,
    url: Url,
    /// The URL as shown in errors and logs: no credentials, no query.
    shown: String,
}

impl HttpHandler {
    /// A handler POSTing to `url` with `client`.
    pub(crate) fn new(client: Client, url: Url) -> Self {
        let shown = redacted(&url);
        Self { client, url, shown }
    }

    async fn post(&self, ctx: &JobContext) -> Outcome {
        let body = match serde_json::to_vec(&ctx.payload) {
            Ok(body) => body,
            Err(e) => {
                return Outcome::Fail {
                    error: format!("cannot serialise the payload: {e}"),
                };
            }
        };
        let request = self
            .client
            .post(self.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header(
                "Idempotency-Key",
                format!("{}:{}", ctx.id, ctx.fencing_token),
            )
            .header("Faultline-Job-Id", ctx.id)
            .header("Faultline-Queue", header_text(&ctx.queue))
            .header("Faultline-Kind", header_text(&ctx.kind))
            .header("Faultline-Attempt", ctx.attempt)
            .header("Faultline-Max-Attempts", ctx.max_attempts)
            .header("Faultline-Fencing-Token", ctx.fencing_token)
            .header(
                "Faultline-Lease-Expires-At",
                ctx.lease_expires_at.to_rfc3339(),
            )
            .body(body);
        let mut response = match request.send().await {
            Ok(response) => response,
            Err(e) => return self.transport_error(e),
        };
        let status = response.status();
        let retry_after = retry_after(response.headers(), Utc::now());
        let mut body = Vec::new();
        let mut truncated = false;
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => {
                    let room = BODY_LIMIT - body.len();
                    if chunk.len() > room {
                        body.extend_from_slice(&chunk[..room]);
                        truncated = true;
                        break; // the rest is not read: dropping the response closes it
                    }
                    body.extend_from_slice(&chunk);
                }
                Ok(None) => break,
                Err(e) if status.is_success() => return self.transport_error(e),
                // The status is known: the unreadable rest of the body changes nothing.
                Err(_) => break,
            }
        }
        classify(status, retry_after, &body, truncated, &self.shown)
    }

    fn transport_error(&self, error: reqwest::Error) -> Outcome {
        if error.is_builder() {
            // The request cannot be built (nothing was sent): retrying cannot fix it.
            return Outcome::Fail {
                error: format!("POST {}: {}", self.shown, chain(error)),
            };
        }
        let what = if error.is_timeout() {
            "timed out"
        } else if error.is_connect() {
            "could not connect"
        } else {
            "failed"
        };
        Outcome::Retry {
            error: format!("POST {} {what}: {}", self.shown, chain(error)),
            delay: None,
        }
    }
}

#[async_trait::async_trait]
impl Handler for HttpHandler {
    async fn run(&self, ctx: JobContext) -> Outcome {
        tokio::select! {
            biased;
            () = ctx.cancel.cancelled() => Outcome::Retry {
                error: format!("POST {} cancelled before a response", self.shown),
                delay: None,
            },
            outcome = self.post(&ctx) => outcome,
        }
    }
}

/// The outcome for a response: see the module docs.
fn classify(
    status: StatusCode,
    retry_after: Option<Duration>,
    body: &[u8],
    truncated: bool,
    shown: &str,
) -> Outcome {
    if status.is_success() {
        return Outcome::Complete(result_of(body, truncated));
    }
    let mut error = format!("POST {shown}: HTTP {status}");
    if !body.is_empty() {
        let text = Limits::storable_text(&String::from_utf8_lossy(body));
        let _ = write!(error, ": {text}");
        if truncated {
            let _ = write!(error, " [truncated at {BODY_LIMIT} bytes]");
        }
    }
    let retryable = status == StatusCode::REQUEST_TIMEOUT
        || status == StatusCode::TOO_MANY_REQUESTS
        || status.is_server_error();
    if retryable {
        Outcome::Retry {
            error,
            delay: retry_after,
        }
    } else {
        Outcome::Fail { error }
    }
}

/// A success's result: JSON if the (complete) body parses and can be stored, else the text.
fn result_of(body: &[u8], truncated: bool) -> Option<Value> {
    if body.is_empty() {
        return None;
    }
    if !truncated
        && let Ok(json) = serde_json::from_slice::<Value>(body)
        && Limits::check_json("result", &json).is_ok()
    {
        return Some(json);
    }
    let text = Limits::storable_text(&String::from_utf8_lossy(body));
    Some(Value::String(text))
}

/// The delay a `Retry-After` header asks for: whole seconds, or an HTTP-date (relative to `now`;
/// a date in the past is no delay), at most [`MAX_RETRY_AFTER`]. Unparseable: `None`.
fn retry_after(headers: &HeaderMap, now: DateTime<Utc>) -> Option<Duration> {
    let value = headers.get(RETRY_AFTER)?.to_str().ok()?.trim();
    let delay = if let Ok(seconds) = value.parse::<u64>() {
        Duration::from_secs(seconds)
    } else {
        let date = DateTime::parse_from_rfc2822(value)
            .ok()?
            .with_timezone(&Utc);
        (date - now).to_std().unwrap_or(Duration::ZERO)
    };
    Some(delay.min(MAX_RETRY_AFTER))
}

/// An error and its sources on one line, without the URL (which may carry credentials).
fn chain(error: reqwest::Error) -> String {
    let error = error.without_url();
    let mut text = error.to_string();
    let mut source = std::error::Error::source(&error);
    while let Some(e) = source {
        let _ = write!(text, ": {e}");
        source = e.source();
    }
    text
}

/// `text` as a header value: visible ASCII stays as it is; `%` and every other byte of its UTF-8
/// form are percent-encoded (queue and kind names may hold any non-control character).
fn header_text(text: &str) -> String {
    let mut value = String::with_capacity(text.len());
    for byte in text.bytes() {
        if (0x20..0x7f).contains(&byte) && byte != b'%' {
            value.push(char::from(byte));
        } else {
            let _ = write!(value, "%{byte:02X}");
        }
    }
    value
}

/// `scheme://host[:port]/path` of `url`: no user, password, query or fragment.
pub(crate) fn redacted(url: &Url) -> String {
    let mut shown = format!("{}://{}", url.scheme(), url.host_str().unwrap_or(""));
    if let Some(port) = url.port() {
        let _ = write!(shown, ":{port}");
    }
    shown.push_str(url.path());
    shown
}

#[cfg(test)]
mod tests;
