//! The scheduler's two HTTP listeners. Only this module knows HTTP: status codes, headers and
//! JSON error bodies are chosen here, in [`AppError`]'s one `IntoResponse` impl.
//!
//! - [`public`] — `/api/*` for applications and operators, bearer `SLUICE_API_TOKEN`, plus
//!   `/healthz` and `/readyz`.
//! - [`internal`] — `/internal/*` for runners: registration with the pool's secret, then
//!   per-runner tokens. Served on its own listener, never on the public one.
//! - [`openapi`] — `/openapi.json`, generated from the handlers' annotations and the
//!   protocol's types.
//! - [`listener`] — serving either on a TCP listener: header and idle timeouts, a connection
//!   cap per listener, the descriptor limit.

pub mod internal;
pub mod listener;
pub mod openapi;
pub mod public;

use axum::body::Bytes;
use axum::extract::{FromRequest, Request};
use axum::http::{header, HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::de::DeserializeOwned;
use sluice_protocol::api::Health;
use sluice_protocol::{ErrorBody, ErrorCode, ErrorDetail};

use crate::Error;

/// Largest request body the public listener accepts.
pub const BODY_LIMIT_BYTES: usize = 1 << 20;
/// Largest request body the internal listener accepts (a batch of completions).
pub const INTERNAL_BODY_LIMIT_BYTES: usize = sluice_protocol::bounds::MAX_INTERNAL_BODY_BYTES;
/// How long a client may take to send a request body, once its headers are in.
pub const BODY_READ_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Shared state of both listeners: the services' context.
pub type AppState = crate::service::Context;

/// The HTTP face of [`Error`].
#[derive(Debug)]
pub struct AppError(pub Error);

impl From<Error> for AppError {
    fn from(err: Error) -> Self {
        AppError(err)
    }
}

impl From<sqlx::Error> for AppError {
    fn from(err: sqlx::Error) -> Self {
        AppError(err.into())
    }
}

impl IntoResponse for AppError {
    fn into_response(self) -> Response {
        let err = self.0;
        let status = match &err {
            Error::NotFound(_) => StatusCode::NOT_FOUND,
            Error::LeaseLost | Error::Conflict(_) => StatusCode::CONFLICT,
            Error::Unauthorized(_) => StatusCode::UNAUTHORIZED,
            Error::Forbidden(_) => StatusCode::FORBIDDEN,
            Error::Malformed(_)
            | Error::Invalid { .. }
            | Error::InvalidSpec(_)
            | Error::ProtocolMismatch(_) => StatusCode::BAD_REQUEST,
            Error::InvalidDefinition(_) => StatusCode::UNPROCESSABLE_ENTITY,
            Error::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            Error::Timeout(_) => StatusCode::REQUEST_TIMEOUT,
            Error::Unavailable(_) | Error::Busy(_) | Error::Overloaded(_) => {
                StatusCode::SERVICE_UNAVAILABLE
            }
            Error::Setup(_) | Error::Internal(_) => StatusCode::INTERNAL_SERVER_ERROR,
        };
        let message = match &err {
            // Database error texts can name tables and values; keep them in the log.
            Error::Setup(_) | Error::Internal(_) => {
                tracing::error!(error = %err, "internal error");
                "internal error; see the scheduler log".to_string()
            }
            Error::Unavailable(_) => {
                tracing::warn!(error = %err, "database unavailable");
                "the database is unavailable; retry later".to_string()
            }
            Error::Busy(_) => {
                // A deadlock or a serialization failure: rare by design, so worth a line.
                tracing::warn!(error = %err, "statement rolled back; the client retries");
                "the database rolled the statement back; retry".to_string()
            }
            _ => err.to_string(),
        };
        let details = match &err {
            Error::InvalidDefinition(problems) => Some(serde_json::Value::Array(
                problems
                    .iter()
                    .map(|(at, what)| serde_json::json!({"at": at, "message": what}))
                    .collect(),
            )),
            _ => None,
        };
        let body = ErrorBody {
            error: ErrorDetail {
                code: err.code(),
                message,
                details,
            },
        };
        let mut response = (status, Json(body)).into_response();
        match status {
            StatusCode::SERVICE_UNAVAILABLE => {
                response
                    .headers_mut()
                    .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
            }
            StatusCode::UNAUTHORIZED => {
                response
                    .headers_mut()
                    .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            }
            // The rest of the body was never read (or never came): the connection cannot
            // carry another request, and saying so keeps clients from reusing it.
            StatusCode::PAYLOAD_TOO_LARGE | StatusCode::REQUEST_TIMEOUT => {
                response
                    .headers_mut()
                    .insert(header::CONNECTION, HeaderValue::from_static("close"));
            }
            _ => {}
        }
        response
    }
}

/// `Result` for handlers.
pub type ApiResult<T> = std::result::Result<T, AppError>;

/// A JSON request body, whatever its `Content-Type` (so `curl -d` works), with errors in the
/// API's own JSON shape: 413 over [`BODY_LIMIT_BYTES`], 400 for bad JSON or bad fields.
pub struct JsonBody<T>(pub T);

impl<S, T> FromRequest<S> for JsonBody<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let limit_bytes = if req.uri().path().starts_with("/internal/") {
            INTERNAL_BODY_LIMIT_BYTES
        } else {
            BODY_LIMIT_BYTES
        };
        // A body trickling in byte by byte holds a connection and a task: it gets a deadline.
        let bytes = read_body(req, state, limit_bytes).await?;
        parse_json(&bytes).map(JsonBody).map_err(AppError)
    }
}

/// A text request body (a YAML or JSON definition), UTF-8, within the route's body limit and
/// the body deadline, with errors in the API's JSON shape.
pub struct TextBody(pub String);

impl<S: Send + Sync> FromRequest<S> for TextBody {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        let bytes = read_body(req, state, crate::service::workflows::MAX_DEFINITION_BYTES).await?;
        String::from_utf8(bytes.to_vec())
            .map(TextBody)
            .map_err(|_| AppError(Error::Malformed("the body is not UTF-8".into())))
    }
}

/// A raw request body (an artifact chunk), within the internal body limit and the body
/// deadline, with errors in the API's JSON shape.
pub struct RawBody(pub Bytes);

impl<S: Send + Sync> FromRequest<S> for RawBody {
    type Rejection = AppError;

    async fn from_request(req: Request, state: &S) -> Result<Self, Self::Rejection> {
        read_body(req, state, INTERNAL_BODY_LIMIT_BYTES)
            .await
            .map(RawBody)
    }
}

/// Reads a body within `BODY_READ_TIMEOUT`; over the route's limit (`limit_bytes`, as
/// reported) is 413.
async fn read_body<S: Send + Sync>(
    req: Request,
    state: &S,
    limit_bytes: usize,
) -> Result<Bytes, AppError> {
    let read = tokio::time::timeout(BODY_READ_TIMEOUT, Bytes::from_request(req, state))
        .await
        .map_err(|_| AppError(Error::Timeout("reading the request body")))?;
    read.map_err(|rejection| {
        if rejection.status() == StatusCode::PAYLOAD_TOO_LARGE {
            AppError(Error::TooLarge {
                what: "request body",
                limit_bytes,
            })
        } else {
            AppError(Error::Malformed(rejection.body_text()))
        }
    })
}

/// Path parameters, with a path that cannot be read (not UTF-8, a bad number) answered in
/// the API's JSON shape instead of axum's plain text.
pub struct JsonPath<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for JsonPath<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Path::<T>::from_request_parts(parts, state)
            .await
            .map(|path| JsonPath(path.0))
            .map_err(|rejection| AppError(Error::invalid("path", rejection.body_text())))
    }
}

/// A query string, with one that cannot be read (an unknown parameter, a bad number)
/// answered in the API's JSON shape instead of axum's plain text.
pub struct JsonQuery<T>(pub T);

impl<S, T> axum::extract::FromRequestParts<S> for JsonQuery<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Send,
{
    type Rejection = AppError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|query| JsonQuery(query.0))
            .map_err(|rejection| AppError(Error::invalid("query", rejection.body_text())))
    }
}

/// Parses a body: syntax errors are `Malformed`, shape errors are `Invalid` naming the field
/// (`timeout_ms`, `jobs[3].priority`) whose value does not fit.
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> crate::Result<T> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Err(Error::Malformed("the request body is empty".into()));
    }
    let classify = |field: String, e: serde_json::Error| match e.classify() {
        serde_json::error::Category::Data => Error::invalid(field, e.to_string()),
        _ => Error::Malformed(e.to_string()),
    };
    let mut deserializer = serde_json::Deserializer::from_slice(bytes);
    let value = serde_path_to_error::deserialize(&mut deserializer).map_err(|e| {
        let field = match e.path().to_string() {
            path if path == "." => "body".to_string(),
            path => path,
        };
        classify(field, e.into_inner())
    })?;
    // Trailing characters after the document.
    deserializer.end().map_err(|e| classify("body".into(), e))?;
    Ok(value)
}

/// The bearer token of a request, if it has one.
pub fn bearer_token(headers: &HeaderMap) -> Option<&str> {
    let value = headers.get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The JSON 404 for unknown paths on either listener.
pub async fn not_found() -> AppError {
    AppError(Error::NotFound("route"))
}

/// The JSON 405 for a known path with the wrong method.
pub async fn method_not_allowed() -> Response {
    let body = ErrorBody {
        error: ErrorDetail {
            code: ErrorCode::MethodNotAllowed,
            message: "method not allowed on this path".into(),
            details: None,
        },
    };
    (StatusCode::METHOD_NOT_ALLOWED, Json(body)).into_response()
}

/// Counts and times each request of a matched route (`sluice_http_requests_total`,
/// `sluice_http_request_seconds`), labelled by the route's pattern, never its raw path.
pub async fn track_public(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    track(&state, "public", request, next).await
}

/// [`track_public`] for the internal listener.
pub async fn track_internal(
    axum::extract::State(state): axum::extract::State<AppState>,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    track(&state, "internal", request, next).await
}

async fn track(
    state: &AppState,
    listener: &'static str,
    request: Request,
    next: axum::middleware::Next,
) -> Response {
    let started = std::time::Instant::now();
    let route = request
        .extensions()
        .get::<axum::extract::MatchedPath>()
        .map_or("unmatched", |p| p.as_str())
        .to_string();
    let method: &'static str = match request.method().as_str() {
        "GET" => "GET",
        "POST" => "POST",
        "PUT" => "PUT",
        "DELETE" => "DELETE",
        "HEAD" => "HEAD",
        _ => "other",
    };
    let response = next.run(request).await;
    state.metrics.http(
        listener,
        method,
        &route,
        response.status().as_u16(),
        started.elapsed(),
    );
    response
}

/// `GET /healthz` on either listener: the process answers.
#[utoipa::path(
    get,
    path = sluice_protocol::api::paths::HEALTHZ,
    tag = "operations",
    responses((status = 200, description = "The process answers", body = Health))
)]
pub async fn healthz() -> Json<Health> {
    Json(Health {
        status: "ok".into(),
    })
}
