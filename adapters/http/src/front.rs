//! The front of every request: authentication, the checks of the headers the API reads
//! (`headers.rs`), the body limit and timeout, the conversion of every error (the framework's own
//! routing, method, parsing and content-type errors included) into an RFC 9457 problem with the
//! right headers (`Retry-After` on 503, `WWW-Authenticate` on 401), and the request metrics (by
//! method, route template and status).

use std::sync::Arc;
use std::time::{Duration, Instant};

use poem::error::ReadBodyError;
use poem::http::header::{CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE};
use poem::http::{HeaderValue, StatusCode};
use poem::{Endpoint, IntoResponse, Request, Response};

use crate::auth::{self, Refusal, Tokens};
use crate::headers;
use crate::problem::{PROBLEM_CONTENT_TYPE, Problem};
use crate::telemetry::{self, RouteTable};

/// Longest framework error text kept as a problem's `detail`.
const MAX_DETAIL_BYTES: usize = 4096;

/// Settings of the front.
pub(crate) struct FrontConfig {
    pub(crate) tokens: Tokens,
    pub(crate) max_body_bytes: usize,
    pub(crate) body_timeout: Duration,
    pub(crate) retry_after_secs: u64,
    /// The route templates, for the `route` label.
    pub(crate) routes: RouteTable,
}

/// Wraps the application endpoint; see the module docs.
pub(crate) struct Front<E> {
    pub(crate) inner: E,
    pub(crate) config: Arc<FrontConfig>,
}

impl<E: Endpoint> Endpoint for Front<E> {
    type Output = Response;

    async fn call(&self, req: Request) -> poem::Result<Response> {
        let started = Instant::now();
        let method = req.method().clone();
        let path = req.uri().path().to_owned();
        let response = match self.guarded(req).await {
            Ok(response) => response,
            Err(err) => error_response(err),
        };
        let response = self.finish(response).await;
        let status = response.status();
        telemetry::request(
            telemetry::method_label(&method),
            self.config.routes.template(&path),
            status.as_u16(),
            started.elapsed(),
        );
        if status.is_server_error() {
            tracing::warn!(%method, %path, status = status.as_u16(), "request failed");
        } else {
            tracing::debug!(%method, %path, status = status.as_u16(), "request");
        }
        Ok(response)
    }
}

impl<E: Endpoint> Front<E> {
    async fn guarded(&self, mut req: Request) -> poem::Result<Response> {
        let config = &self.config;
        if !auth::is_open(req.uri().path()) {
            match config.tokens.check(req.headers()) {
                Ok(()) => {}
                Err(Refusal::Missing) => {
                    return Ok(Problem::unauthorized(
                        "this route needs an `Authorization: Bearer <token>` header",
                    )
                    .into_http());
                }
                Err(Refusal::Wrong) => {
                    return Ok(
                        Problem::unauthorized("the bearer token is not accepted").into_http()
                    );
                }
            }
        }

        if let Err(problem) = headers::check(req.headers()) {
            return Ok(problem.into_http());
        }

        let too_large = || {
            Problem::from_status(
                StatusCode::PAYLOAD_TOO_LARGE,
                format!(
                    "the request body exceeds the limit of {} bytes",
                    config.max_body_bytes
                ),
            )
            .into_http()
        };
        let declared = req
            .headers()
            .get(CONTENT_LENGTH)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|len| len > config.max_body_bytes as u64) {
            return Ok(too_large());
        }
        // Read the body here, bounded in size and time, so that no handler ever waits on a slow
        // or endless upload.
        let body = req.take_body();
        match tokio::time::timeout(
            config.body_timeout,
            body.into_bytes_limit(config.max_body_bytes),
        )
        .await
        {
            Err(_) => {
                return Ok(Problem::from_status(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "the request body did not arrive within {} s",
                        config.body_timeout.as_secs_f64()
                    ),
                )
                .into_http());
            }
            Ok(Err(ReadBodyError::PayloadTooLarge)) => return Ok(too_large()),
            Ok(Err(err)) => {
                return Ok(
                    Problem::bad_request(format!("could not read the body: {err}")).into_http(),
                );
            }
            Ok(Ok(bytes)) => req.set_body(bytes),
        }
        self.inner.call(req).await.map(IntoResponse::into_response)
    }

    /// Turns any non-JSON error response into a problem and adds the headers errors carry.
    async fn finish(&self, mut response: Response) -> Response {
        let status = response.status();
        if (status.is_client_error() || status.is_server_error()) && !is_json(&response) {
            let detail = match response
                .take_body()
                .into_bytes_limit(MAX_DETAIL_BYTES)
                .await
            {
                Ok(bytes) if !bytes.is_empty() => String::from_utf8_lossy(&bytes).trim().to_owned(),
                _ => status.canonical_reason().unwrap_or("error").to_owned(),
            };
            let headers = std::mem::take(response.headers_mut());
            response = Problem::from_status(status, detail).into_http();
            // Keep what the framework set (e.g. `Allow`), except the body's own headers.
            for (name, value) in headers.iter() {
                if name != CONTENT_TYPE && name != CONTENT_LENGTH {
                    response.headers_mut().insert(name.clone(), value.clone());
                }
            }
        }
        if status == StatusCode::SERVICE_UNAVAILABLE
            && !response.headers().contains_key(RETRY_AFTER)
        {
            response
                .headers_mut()
                .insert(RETRY_AFTER, HeaderValue::from(self.config.retry_after_secs));
        }
        if status == StatusCode::UNAUTHORIZED && !response.headers().contains_key(WWW_AUTHENTICATE)
        {
            response.headers_mut().insert(
                WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"faultline\""),
            );
        }
        response
    }
}

/// A framework error as a response; poem-openapi's own errors carry their message in the body,
/// which [`Front::finish`] turns into the problem's detail.
fn error_response(err: poem::Error) -> Response {
    if err.is_from_response() {
        return err.into_response();
    }
    Problem::from_status(err.status(), err.to_string()).into_http()
}

/// Whether the response is JSON (`application/json` or any `application/*+json`, which includes
/// problems): such bodies are the API's own and are left alone.
fn is_json(response: &Response) -> bool {
    let Some(content_type) = response.headers().get(CONTENT_TYPE) else {
        return false;
    };
    let Ok(content_type) = content_type.to_str() else {
        return false;
    };
    let essence = content_type
        .split(';')
        .next()
        .unwrap_or_default()
        .trim()
        .to_ascii_lowercase();
    essence == "application/json"
        || essence == PROBLEM_CONTENT_TYPE
        || (essence.starts_with("application/") && essence.ends_with("+json"))
}
