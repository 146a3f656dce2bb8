//! The HTTP client of the scheduler's internal API: JSON in and out, the runner token in the
//! `Authorization` header, and retries with jittered exponential back-off for what a retry can
//! fix (connection errors, 5xx, 429).

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use sluice_protocol::{ErrorBody, ErrorCode};
use tokio::sync::watch;

use crate::config::Secret;

/// How a call failed.
#[derive(Debug, Clone, thiserror::Error)]
pub enum CallError {
    /// The scheduler answered with an error status.
    #[error("{status} {code}: {message}")]
    Status {
        status: u16,
        code: ErrorCode,
        message: String,
    },
    /// No answer: connection refused or reset, timeout.
    #[error("transport: {0}")]
    Transport(String),
    /// An answer the protocol does not allow.
    #[error("bad response: {0}")]
    Decode(String),
    /// The sidecar is shutting down; the retry loop gave up.
    #[error("shutting down")]
    Shutdown,
    /// Every try failed with a retryable error until the retry budget ran out.
    #[error("gave up after {seconds} s: {last}")]
    GaveUp { seconds: u64, last: Box<CallError> },
}

impl CallError {
    /// Whether the same request may succeed later.
    pub fn is_retryable(&self) -> bool {
        match self {
            // 408: the request did not reach the scheduler in time — a retry may.
            CallError::Status { status, .. } => *status >= 500 || *status == 429 || *status == 408,
            CallError::Transport(_) => true,
            CallError::Decode(_) | CallError::Shutdown | CallError::GaveUp { .. } => false,
        }
    }

    /// The scheduler says this attempt's lease is gone.
    pub fn is_lease_lost(&self) -> bool {
        matches!(self, CallError::Status { status: 409, .. })
    }

    /// The runner's token is no longer valid: register again.
    pub fn is_unauthorized(&self) -> bool {
        matches!(self, CallError::Status { status: 401, .. })
    }
}

/// A client of one scheduler's internal API.
#[derive(Clone)]
pub struct Client {
    base: String,
    http: reqwest::Client,
}

/// Jittered exponential back-off: 50 ms doubling to 5 s, full jitter.
#[derive(Debug, Clone)]
pub struct Backoff {
    next: Duration,
}

impl Default for Backoff {
    fn default() -> Self {
        Backoff {
            next: Duration::from_millis(50),
        }
    }
}

impl Backoff {
    /// The next pause.
    pub fn pause(&mut self) -> Duration {
        let cap = self.next;
        self.next = (self.next * 2).min(Duration::from_secs(5));
        let millis = cap.as_millis() as u64;
        Duration::from_millis(fastrand::u64(millis / 2..=millis.max(1)))
    }
}

impl Client {
    /// A client for `base` (the internal listener's URL).
    pub fn new(base: &str) -> Client {
        Client {
            base: base.trim_end_matches('/').to_string(),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                // Below the scheduler's idle timeout for runner connections (30 s), so an
                // idle pooled connection is dropped here before the server closes it.
                .pool_idle_timeout(Duration::from_secs(20))
                .build()
                .expect("a plain HTTP client always builds"),
        }
    }

    /// One POST, no retry. `timeout` bounds the whole exchange.
    pub async fn post<B: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        path: &str,
        token: &Secret,
        body: &B,
        timeout: Duration,
    ) -> Result<R, CallError> {
        let request = self.http.post(format!("{}{path}", self.base)).json(body);
        let bytes = self.exchange(request, token, timeout).await?;
        serde_json::from_slice(&bytes).map_err(|e| CallError::Decode(e.to_string()))
    }

    /// One PUT of raw bytes with `headers`, no retry; the answer's body is not read.
    pub async fn put_bytes(
        &self,
        path: &str,
        token: &Secret,
        headers: &[(&'static str, String)],
        body: Vec<u8>,
        timeout: Duration,
    ) -> Result<(), CallError> {
        let mut request = self
            .http
            .put(format!("{}{path}", self.base))
            .header("content-type", "application/octet-stream")
            .body(body);
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        self.exchange(request, token, timeout).await.map(drop)
    }

    /// One GET of raw bytes with `headers`, no retry.
    pub async fn get_bytes(
        &self,
        path: &str,
        token: &Secret,
        headers: &[(&'static str, String)],
        timeout: Duration,
    ) -> Result<Vec<u8>, CallError> {
        let mut request = self.http.get(format!("{}{path}", self.base));
        for (name, value) in headers {
            request = request.header(*name, value);
        }
        self.exchange(request, token, timeout).await
    }

    /// Sends `request` with the token; the body of a success, the error of anything else.
    async fn exchange(
        &self,
        request: reqwest::RequestBuilder,
        token: &Secret,
        timeout: Duration,
    ) -> Result<Vec<u8>, CallError> {
        let response = request
            .bearer_auth(token.expose())
            .timeout(timeout)
            .send()
            .await
            .map_err(|e| CallError::Transport(without_url(&e)))?;
        let status = response.status().as_u16();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| CallError::Transport(without_url(&e)))?;
        if status >= 400 {
            let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(body) => (body.error.code, body.error.message),
                Err(_) => (
                    ErrorCode::Other("http_error".into()),
                    String::from_utf8_lossy(&bytes).chars().take(200).collect(),
                ),
            };
            return Err(CallError::Status {
                status,
                code,
                message,
            });
        }
        Ok(bytes.to_vec())
    }

    /// POSTs until it succeeds or fails for good, backing off between tries. Only what a
    /// retry can fix is retried (no answer, 5xx, 429), and only for `budget`: then the call
    /// fails with [`CallError::GaveUp`], so that a request the scheduler can never apply ends
    /// its attempt with a clear error instead of holding a slot forever. A 4xx is never
    /// retried. Gives up at once when `stop` turns true.
    pub async fn post_retrying<B: Serialize + ?Sized, R: DeserializeOwned>(
        &self,
        path: &str,
        token: &Secret,
        body: &B,
        timeout: Duration,
        budget: Duration,
        stop: &mut watch::Receiver<bool>,
    ) -> Result<R, CallError> {
        retrying(path, budget, stop, || self.post(path, token, body, timeout)).await
    }
}

/// Calls `call` until it succeeds or fails for good (see [`Client::post_retrying`]).
pub async fn retrying<T, F: std::future::Future<Output = Result<T, CallError>>>(
    what: &str,
    budget: Duration,
    stop: &mut watch::Receiver<bool>,
    mut call: impl FnMut() -> F,
) -> Result<T, CallError> {
    let started = tokio::time::Instant::now();
    let mut backoff = Backoff::default();
    loop {
        match call().await {
            Err(err) if err.is_retryable() => {
                if *stop.borrow() {
                    return Err(CallError::Shutdown);
                }
                let pause = backoff.pause();
                if started.elapsed() + pause > budget {
                    tracing::warn!(path = what, error = %err, "giving up");
                    return Err(CallError::GaveUp {
                        seconds: started.elapsed().as_secs(),
                        last: Box::new(err),
                    });
                }
                tracing::warn!(path = what, error = %err, "retrying");
                tokio::select! {
                    _ = tokio::time::sleep(pause) => {}
                    _ = stop.changed() => {}
                }
            }
            other => return other,
        }
    }
}

/// A short description of a transport error, without the URL reqwest would print.
fn without_url(err: &reqwest::Error) -> String {
    let kind = if err.is_timeout() {
        "timed out"
    } else if err.is_connect() {
        "cannot connect"
    } else if err.is_body() || err.is_decode() {
        "bad body"
    } else {
        "request failed"
    };
    let mut text = kind.to_string();
    let mut source = std::error::Error::source(err);
    while let Some(inner) = source {
        text.push_str(": ");
        text.push_str(&inner.to_string());
        source = inner.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_grows_to_a_cap_with_jitter() {
        let mut backoff = Backoff::default();
        let first = backoff.pause();
        assert!(first <= Duration::from_millis(50));
        for _ in 0..20 {
            assert!(backoff.pause() <= Duration::from_secs(5));
        }
    }

    #[test]
    fn retryable_errors_are_the_ones_a_retry_can_fix() {
        let status = |status| CallError::Status {
            status,
            code: ErrorCode::Internal,
            message: String::new(),
        };
        assert!(status(503).is_retryable());
        assert!(status(429).is_retryable());
        assert!(!status(409).is_retryable());
        assert!(status(409).is_lease_lost());
        assert!(status(401).is_unauthorized());
        assert!(CallError::Transport("x".into()).is_retryable());
    }
}
