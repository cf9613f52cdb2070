//! RFC 9457 problem details: the one error shape of the API, the problem types, the mapping from
//! `StoreError`, and the per-operation error responses declared in the OpenAPI document.
//!
//! Status rules: 400 = the request does not match the OpenAPI schema (malformed JSON, wrong types,
//! missing or unknown fields, unknown enum values, out-of-range numbers the schema bounds, bad path
//! or query parameters); 422 = it matches the schema but Faultline refuses it (control characters
//! in names, `run_at` together with `delay_seconds`, backoff cap below base, idempotency key in
//! header and body differing, ...); 413 = the body or the payload is too large.

use faultline_ports::StoreError;
use poem::http::StatusCode;
use poem::{IntoResponse, Response};
use poem_openapi::types::ToJSON;
use poem_openapi::{ApiResponse, Object, payload::Json};

/// The media type of every error body.
pub const PROBLEM_CONTENT_TYPE: &str = "application/problem+json";

/// The problem type URIs (`type` member) the API uses. Programs should switch on these, not on
/// the `detail` text.
pub mod types {
    /// The request does not match the OpenAPI schema (400).
    pub const BAD_REQUEST: &str = "https://faultline.dev/problems/bad-request";
    /// Missing or wrong bearer token (401).
    pub const UNAUTHORIZED: &str = "https://faultline.dev/problems/unauthorized";
    /// No route at this path (404).
    pub const NOT_FOUND: &str = "https://faultline.dev/problems/not-found";
    /// No job with this id (404).
    pub const JOB_NOT_FOUND: &str = "https://faultline.dev/problems/job-not-found";
    /// The path exists but not with this method (405).
    pub const METHOD_NOT_ALLOWED: &str = "https://faultline.dev/problems/method-not-allowed";
    /// The body did not arrive within the request timeout (408).
    pub const REQUEST_TIMEOUT: &str = "https://faultline.dev/problems/request-timeout";
    /// The idempotency key belongs to a job with a different request (409).
    pub const IDEMPOTENCY_CONFLICT: &str = "https://faultline.dev/problems/idempotency-conflict";
    /// The lease token no longer holds the job: stop working on it (409).
    pub const STALE_LEASE: &str = "https://faultline.dev/problems/stale-lease";
    /// The job's state does not allow this action (409).
    pub const ILLEGAL_TRANSITION: &str = "https://faultline.dev/problems/illegal-transition";
    /// The request body exceeds the configured limit (413).
    pub const BODY_TOO_LARGE: &str = "https://faultline.dev/problems/body-too-large";
    /// A job payload or result exceeds the configured limit (413).
    pub const PAYLOAD_TOO_LARGE: &str = "https://faultline.dev/problems/payload-too-large";
    /// The request line is longer than the server reads (414; the request was not parsed).
    pub const URI_TOO_LONG: &str = "https://faultline.dev/problems/uri-too-long";
    /// The request head is larger than the server reads (431; the request was not parsed).
    pub const HEADERS_TOO_LARGE: &str = "https://faultline.dev/problems/headers-too-large";
    /// The body is not `application/json` (415).
    pub const UNSUPPORTED_MEDIA_TYPE: &str =
        "https://faultline.dev/problems/unsupported-media-type";
    /// The request matches the schema but Faultline refuses it (422).
    pub const INVALID_REQUEST: &str = "https://faultline.dev/problems/invalid-request";
    /// The database is unreachable or did not answer in time; retry after `Retry-After` (503).
    pub const STORAGE_UNAVAILABLE: &str = "https://faultline.dev/problems/storage-unavailable";
    /// A server fault (500); never caused by the request's content.
    pub const INTERNAL: &str = "https://faultline.dev/problems/internal";
}

/// An RFC 9457 problem: the body of every error response.
#[derive(Debug, Clone, PartialEq, Object)]
#[oai(rename = "Problem")]
pub(crate) struct Problem {
    /// A URI identifying the problem type (see the API description for the list). Stable: switch
    /// on this, not on `detail`.
    #[oai(rename = "type")]
    pub(crate) problem_type: String,
    /// A short summary of the problem type.
    pub(crate) title: String,
    /// The HTTP status code of the response.
    pub(crate) status: u16,
    /// What went wrong with this request, for humans.
    pub(crate) detail: String,
    /// The job concerned, when there is one (for an idempotency conflict: the job that owns the key).
    #[oai(skip_serializing_if_is_none)]
    pub(crate) job_id: Option<i64>,
}

impl Problem {
    /// A problem of type `problem_type` with `status` and `detail`.
    pub(crate) fn new(
        status: StatusCode,
        problem_type: &str,
        title: &str,
        detail: impl Into<String>,
    ) -> Problem {
        Problem {
            problem_type: problem_type.to_owned(),
            title: title.to_owned(),
            status: status.as_u16(),
            detail: detail.into(),
            job_id: None,
        }
    }

    /// Attaches the job concerned.
    pub(crate) fn job(mut self, id: i64) -> Problem {
        self.job_id = Some(id);
        self
    }

    /// 400: the request does not match the schema.
    pub(crate) fn bad_request(detail: impl Into<String>) -> Problem {
        Problem::new(
            StatusCode::BAD_REQUEST,
            types::BAD_REQUEST,
            "Bad request",
            detail,
        )
    }

    /// 422: the request matches the schema but is refused.
    pub(crate) fn invalid(detail: impl Into<String>) -> Problem {
        Problem::new(
            StatusCode::UNPROCESSABLE_ENTITY,
            types::INVALID_REQUEST,
            "Invalid request",
            detail,
        )
    }

    /// 413: a payload or result over the configured limit.
    pub(crate) fn payload_too_large(field: &str, size: usize, limit: usize) -> Problem {
        Problem::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            types::PAYLOAD_TOO_LARGE,
            "Payload too large",
            format!("{field} is {size} bytes of JSON; the limit is {limit} bytes"),
        )
    }

    /// 503: the store failed or did not answer.
    pub(crate) fn unavailable(detail: impl Into<String>) -> Problem {
        Problem::new(
            StatusCode::SERVICE_UNAVAILABLE,
            types::STORAGE_UNAVAILABLE,
            "Storage unavailable",
            detail,
        )
    }

    /// 401: missing or wrong bearer token.
    pub(crate) fn unauthorized(detail: impl Into<String>) -> Problem {
        Problem::new(
            StatusCode::UNAUTHORIZED,
            types::UNAUTHORIZED,
            "Unauthorized",
            detail,
        )
    }

    /// A problem for a framework error (routing, parsing, content type, ...) with `status`.
    pub(crate) fn from_status(status: StatusCode, detail: impl Into<String>) -> Problem {
        let (problem_type, title) = match status {
            StatusCode::BAD_REQUEST => (types::BAD_REQUEST, "Bad request"),
            StatusCode::UNAUTHORIZED => (types::UNAUTHORIZED, "Unauthorized"),
            StatusCode::NOT_FOUND => (types::NOT_FOUND, "Not found"),
            StatusCode::METHOD_NOT_ALLOWED => (types::METHOD_NOT_ALLOWED, "Method not allowed"),
            StatusCode::REQUEST_TIMEOUT => (types::REQUEST_TIMEOUT, "Request timeout"),
            StatusCode::PAYLOAD_TOO_LARGE => (types::BODY_TOO_LARGE, "Body too large"),
            StatusCode::URI_TOO_LONG => (types::URI_TOO_LONG, "URI too long"),
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => {
                (types::HEADERS_TOO_LARGE, "Request headers too large")
            }
            StatusCode::UNSUPPORTED_MEDIA_TYPE => {
                (types::UNSUPPORTED_MEDIA_TYPE, "Unsupported media type")
            }
            StatusCode::UNPROCESSABLE_ENTITY => (types::INVALID_REQUEST, "Invalid request"),
            StatusCode::SERVICE_UNAVAILABLE => (types::STORAGE_UNAVAILABLE, "Storage unavailable"),
            status if status.is_server_error() => (types::INTERNAL, "Internal error"),
            // RFC 9457: "about:blank" when the status code says it all.
            status => ("about:blank", status.canonical_reason().unwrap_or("Error")),
        };
        Problem::new(status, problem_type, title, detail)
    }

    /// The HTTP response carrying this problem (headers such as `Retry-After` are added by the
    /// finishing middleware).
    pub(crate) fn into_http(self) -> Response {
        let status = StatusCode::from_u16(self.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let body = self
            .to_json()
            .map(|value| value.to_string())
            .unwrap_or_default();
        Response::builder()
            .status(status)
            .content_type(PROBLEM_CONTENT_TYPE)
            .body(body)
    }
}

impl From<StoreError> for Problem {
    fn from(err: StoreError) -> Problem {
        match &err {
            StoreError::NotFound { id } => Problem::new(
                StatusCode::NOT_FOUND,
                types::JOB_NOT_FOUND,
                "Job not found",
                err.to_string(),
            )
            .job(*id),
            StoreError::StaleLease { lease } => Problem::new(
                StatusCode::CONFLICT,
                types::STALE_LEASE,
                "Stale lease",
                format!(
                    "lease token {} no longer holds job {}: it expired, was taken over or the job \
                     finished; stop working on it",
                    lease.token, lease.job_id
                ),
            )
            .job(lease.job_id),
            StoreError::Conflict { existing_id, .. } => Problem::new(
                StatusCode::CONFLICT,
                types::IDEMPOTENCY_CONFLICT,
                "Idempotency conflict",
                err.to_string(),
            )
            .job(*existing_id),
            StoreError::IllegalTransition { id, .. } => Problem::new(
                StatusCode::CONFLICT,
                types::ILLEGAL_TRANSITION,
                "Illegal transition",
                err.to_string(),
            )
            .job(*id),
            StoreError::Invalid(message) => Problem::invalid(message.clone()),
            StoreError::Backend(source) => {
                // The backend's message stays in the log: it may name hosts or internals.
                tracing::warn!(error = %source, "storage backend error");
                Problem::unavailable("the database is unavailable; retry later")
            }
        }
    }
}

/// Declares an error response enum: the listed statuses (each `application/problem+json` with a
/// description for the OpenAPI document) plus `4XX` and `5XX` problem responses for any other
/// error, and the conversion from [`Problem`] that picks the variant by status. (Ranges rather
/// than `default`: OpenAPI generators such as progenitor read `default` as a possible success.)
macro_rules! problem_responses {
    (
        $(#[doc = $edoc:literal])*
        $name:ident {
            $(
                $(#[doc = $doc:literal])*
                $variant:ident = $status:tt $(, header($($header:tt)*))?;
            )*
        }
    ) => {
        $(#[doc = $edoc])*
        #[derive(Debug, ApiResponse)]
        pub(crate) enum $name {
            $(
                $(#[doc = $doc])*
                #[oai(status = $status, content_type = "application/problem+json" $(, header($($header)*))?)]
                $variant(Json<Problem>),
            )*
            /// Any other client error (e.g. 404 for an unknown route, 405 for a wrong method,
            /// 408 for a body that does not arrive in time), as a problem.
            #[oai(status_range = "4XX", content_type = "application/problem+json")]
            OtherClientError(StatusCode, Json<Problem>),
            /// Any other server error, as a problem.
            #[oai(status_range = "5XX", content_type = "application/problem+json")]
            OtherServerError(StatusCode, Json<Problem>),
        }

        impl From<Problem> for $name {
            fn from(problem: Problem) -> Self {
                match problem.status {
                    $($status => $name::$variant(Json(problem)),)*
                    status => match StatusCode::from_u16(status) {
                        Ok(status) if status.is_client_error() => {
                            $name::OtherClientError(status, Json(problem))
                        }
                        Ok(status) if status.is_server_error() => {
                            $name::OtherServerError(status, Json(problem))
                        }
                        _ => $name::OtherServerError(StatusCode::INTERNAL_SERVER_ERROR, Json(problem)),
                    },
                }
            }
        }

        impl From<StoreError> for $name {
            fn from(err: StoreError) -> Self {
                Problem::from(err).into()
            }
        }
    };
}

problem_responses! {
    /// Errors of `POST /v1/jobs`.
    EnqueueError {
        /// The body does not match the schema (malformed JSON, wrong type, missing or unknown
        /// field, number out of the declared range).
        BadRequest = 400;
        /// Missing or wrong bearer token (only when the server is configured with tokens).
        Unauthorized = 401, header(name = "WWW-Authenticate", ty = "String");
        /// The idempotency key belongs to a job with a different request
        /// (`.../idempotency-conflict`; `job_id` names that job). Nothing was created.
        Conflict = 409;
        /// The body or a payload exceeds the configured limit.
        TooLarge = 413;
        /// The body is not `application/json`.
        UnsupportedMediaType = 415;
        /// The request is well-formed but refused (the detail says which field and why).
        Invalid = 422;
        /// The database is unavailable or did not answer in time; retry after `Retry-After`
        /// seconds with the same idempotency key.
        Unavailable = 503, header(name = "Retry-After", ty = "u64");
    }
}

problem_responses! {
    /// Errors of `POST /v1/jobs/batch` (idempotency conflicts are per-item outcomes, not errors).
    BatchError {
        /// The body does not match the schema (including an empty batch or more than 1000 jobs).
        BadRequest = 400;
        /// Missing or wrong bearer token (only when the server is configured with tokens).
        Unauthorized = 401, header(name = "WWW-Authenticate", ty = "String");
        /// The body or an item's payload exceeds the configured limit (the detail names the item
        /// as `item <index>`); nothing was created.
        TooLarge = 413;
        /// The body is not `application/json`.
        UnsupportedMediaType = 415;
        /// An item is well-formed but refused (the detail names it as `item <index>` and says
        /// why); nothing was created.
        Invalid = 422;
        /// The database is unavailable or did not answer in time; nothing was created. Retry after
        /// `Retry-After` seconds (items with idempotency keys are then safe to resend).
        Unavailable = 503, header(name = "Retry-After", ty = "u64");
    }
}

problem_responses! {
    /// Errors of `GET /v1/jobs/{id}`.
    ReadError {
        /// The id is not an integer.
        BadRequest = 400;
        /// Missing or wrong bearer token (only when the server is configured with tokens).
        Unauthorized = 401, header(name = "WWW-Authenticate", ty = "String");
        /// No job with this id (never created, or deleted after its retention).
        NotFound = 404;
        /// The database is unavailable or did not answer in time; retry after `Retry-After` seconds.
        Unavailable = 503, header(name = "Retry-After", ty = "u64");
    }
}

problem_responses! {
    /// Errors of `GET /v1/jobs`.
    ListError {
        /// A query parameter does not match the schema (unknown state, limit out of range, ...).
        BadRequest = 400;
        /// Missing or wrong bearer token (only when the server is configured with tokens).
        Unauthorized = 401, header(name = "WWW-Authenticate", ty = "String");
        /// A filter is refused (e.g. a name with control characters).
        Invalid = 422;
        /// The database is unavailable or did not answer in time; retry after `Retry-After` seconds.
        Unavailable = 503, header(name = "Retry-After", ty = "u64");
    }
}

problem_responses! {
    /// Errors of `GET /v1/queues`.
    StatsError {
        /// Missing or wrong bearer token (only when the server is configured with tokens).
        Unauthorized = 401, header(name = "WWW-Authenticate", ty = "String");
        /// The database is unavailable or did not answer in time; retry after `Retry-After` seconds.
        Unavailable = 503, header(name = "Retry-After", ty = "u64");
    }
}

problem_responses! {
    /// Errors of `POST /v1/queues/{name}/pause` and `POST /v1/queues/{name}/resume`.
    QueueActionError {
        /// The name is empty, longer than 128 characters or not UTF-8 once percent-decoded.
        BadRequest = 400;
        /// Missing or wrong bearer token (only when the server is configured with tokens).
        Unauthorized = 401, header(name = "WWW-Authenticate", ty = "String");
        /// The name is refused (it contains control characters).
        Invalid = 422;
        /// The database is unavailable or did not answer in time (the change may or may not have
        /// been applied); retry after `Retry-After` seconds: both operations are idempotent.
        Unavailable = 503, header(name = "Retry-After", ty = "u64");
    }
}

problem_responses! {
    /// Errors of `PUT /v1/queues/{name}/limits`.
    QueueLimitsError {
        /// The body or the name does not match the schema (an unknown field, a bound below 1 or
        /// above 1000000, a name empty or longer than 128 characters).
        BadRequest = 400;
        /// Missing or wrong bearer token (only when the server is configured with tokens).
        Unauthorized = 401, header(name = "WWW-Authenticate", ty = "String");
        /// The body exceeds the configured limit.
        TooLarge = 413;
        /// The body is not `application/json`.
        UnsupportedMediaType = 415;
        /// The name is refused (it contains control characters).
        Invalid = 422;
        /// The database is unavailable or did not answer in time (the change may or may not have
        /// been applied); retry after `Retry-After` seconds: setting limits is idempotent.
        Unavailable = 503, header(name = "Retry-After", ty = "u64");
    }
}

problem_responses! {
    /// Errors of `GET /v1/workers`.
    ProcessListError {
        /// Missing or wrong bearer token (only when the server is configured with tokens).
        Unauthorized = 401, header(name = "WWW-Authenticate", ty = "String");
        /// The database is unavailable or did not answer in time; retry after `Retry-After` seconds.
        Unavailable = 503, header(name = "Retry-After", ty = "u64");
    }
}

problem_responses! {
    /// Errors of `POST /v1/jobs/{id}/cancel`, `POST /v1/jobs/{id}/retry` and
    /// `POST /v1/jobs/{id}/expire-lease`.
    ActionError {
        /// The id is not an integer.
        BadRequest = 400;
        /// Missing or wrong bearer token (only when the server is configured with tokens).
        Unauthorized = 401, header(name = "WWW-Authenticate", ty = "String");
        /// No job with this id.
        NotFound = 404;
        /// The job's state does not allow it (`.../illegal-transition`): cancelling a finished
        /// job, retrying a job that is not `failed` or `cancelled`, expiring the lease of a job
        /// that is not `running`. Nothing changed.
        Conflict = 409;
        /// The database is unavailable or did not answer in time; retry after `Retry-After` seconds.
        Unavailable = 503, header(name = "Retry-After", ty = "u64");
    }
}

problem_responses! {
    /// Errors of `POST /v1/leases`.
    ClaimError {
        /// The body does not match the schema.
        BadRequest = 400;
        /// Missing or wrong bearer token (only when the server is configured with tokens).
        Unauthorized = 401, header(name = "WWW-Authenticate", ty = "String");
        /// The body exceeds the configured limit.
        TooLarge = 413;
        /// The body is not `application/json`.
        UnsupportedMediaType = 415;
        /// The request is well-formed but refused (e.g. a queue name with control characters).
        Invalid = 422;
        /// The database is unavailable or did not answer in time; retry after `Retry-After` seconds.
        Unavailable = 503, header(name = "Retry-After", ty = "u64");
    }
}

problem_responses! {
    /// Errors of the lease-holder writes: heartbeat, complete, fail, snooze.
    LeaseError {
        /// The body or the id does not match the schema.
        BadRequest = 400;
        /// Missing or wrong bearer token (only when the server is configured with tokens).
        Unauthorized = 401, header(name = "WWW-Authenticate", ty = "String");
        /// The lease token no longer holds the job (`.../stale-lease`): the lease expired and the
        /// job was rescued or taken by another worker, was cancelled, or finished. Nothing
        /// changed; stop working on the job. Also the answer for a job that does not exist.
        Conflict = 409;
        /// The body or the result exceeds the configured limit.
        TooLarge = 413;
        /// The body is not `application/json`.
        UnsupportedMediaType = 415;
        /// The request is well-formed but refused (e.g. a result containing `\u0000`).
        Invalid = 422;
        /// The database is unavailable or did not answer in time; retry after `Retry-After`
        /// seconds (the lease may expire meanwhile; a retry then gets 409).
        Unavailable = 503, header(name = "Retry-After", ty = "u64");
    }
}

impl IntoResponse for Problem {
    fn into_response(self) -> Response {
        self.into_http()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use faultline_ports::LeaseRef;
    use faultline_ports::domain::{EventKind, JobState};

    #[test]
    fn store_errors_map_to_statuses_and_types() {
        let cases = [
            (StoreError::NotFound { id: 7 }, 404, types::JOB_NOT_FOUND),
            (
                StoreError::StaleLease {
                    lease: LeaseRef {
                        job_id: 7,
                        token: 2,
                    },
                },
                409,
                types::STALE_LEASE,
            ),
            (
                StoreError::Conflict {
                    key: "k".into(),
                    existing_id: 7,
                },
                409,
                types::IDEMPOTENCY_CONFLICT,
            ),
            (
                StoreError::IllegalTransition {
                    id: 7,
                    from: JobState::Succeeded,
                    event: EventKind::Cancel,
                },
                409,
                types::ILLEGAL_TRANSITION,
            ),
            (
                StoreError::Invalid("bad".into()),
                422,
                types::INVALID_REQUEST,
            ),
            (
                StoreError::Backend("connection refused to 10.0.0.1".into()),
                503,
                types::STORAGE_UNAVAILABLE,
            ),
        ];
        for (err, status, problem_type) in cases {
            let problem = Problem::from(err);
            assert_eq!(problem.status, status);
            assert_eq!(problem.problem_type, problem_type);
            assert!(!problem.detail.contains("10.0.0.1"), "{problem:?}");
        }
    }

    #[test]
    fn problems_pick_the_variant_of_their_status() {
        let conflict = LeaseError::from(Problem::from(StoreError::StaleLease {
            lease: LeaseRef {
                job_id: 1,
                token: 1,
            },
        }));
        assert!(matches!(conflict, LeaseError::Conflict(_)));
        let other = ReadError::from(Problem::from_status(StatusCode::IM_A_TEAPOT, "tea"));
        match other {
            ReadError::OtherClientError(status, Json(problem)) => {
                assert_eq!(status, StatusCode::IM_A_TEAPOT);
                assert_eq!(problem.problem_type, "about:blank");
                assert_eq!(problem.title, "I'm a teapot");
            }
            other => panic!("{other:?}"),
        }
    }
}
