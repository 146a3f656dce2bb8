//! The Messages API over HTTP (hyper, and rustls with the compiled-in roots for https, as
//! `web_fetch` uses): `POST {ANTHROPIC_BASE_URL}/v1/messages` with the key in `x-api-key`,
//! `anthropic-version` and `stream: true`; an error answer classified as worth a
//! retry (429, 529, 5xx, 408: with its `retry-after`) or not (any other 4xx). The key never
//! leaves this module but in that header: messages built from answers have it replaced.

use std::time::Duration;

use serde_json::Value;

use crate::config::{AgentConfig, Secret};

/// The API version sent in `anthropic-version`.
pub const API_VERSION: &str = "2023-06-01";
/// Longest wait between two chunks of a response (the API sends pings meanwhile).
const READ_TIMEOUT: Duration = Duration::from_secs(120);
/// Longest wait for a connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(30);
/// Most bytes of an error answer read for its message.
const ERROR_BODY_BYTES: usize = 64 * 1024;
/// Longest `retry-after` honoured.
pub const MAX_RETRY_AFTER: Duration = Duration::from_secs(60);

/// How a model request failed.
#[derive(Debug, Clone, PartialEq)]
pub enum ModelError {
    /// Worth another try: overloaded, rate-limited, a server error, no answer, a cut stream.
    Retryable {
        status: Option<u16>,
        message: String,
        retry_after: Option<Duration>,
    },
    /// Refused for good (400, 401, 403, 404, 413, …).
    Refused { status: u16, message: String },
    /// An answer the protocol does not allow, or one past a cap.
    Protocol(String),
}

impl ModelError {
    pub fn message(&self) -> &str {
        match self {
            ModelError::Retryable { message, .. }
            | ModelError::Refused { message, .. }
            | ModelError::Protocol(message) => message,
        }
    }
}

/// A response whose status said a stream follows; its body read a chunk at a time.
pub struct Streaming {
    body: hyper::body::Incoming,
    driver: tokio::task::JoinHandle<()>,
}

impl Streaming {
    /// The next chunk of the body; `None` at its end. A chunk that takes longer than
    /// [`READ_TIMEOUT`] (the API pings meanwhile) is an error.
    pub async fn chunk(&mut self) -> Result<Option<hyper::body::Bytes>, String> {
        use http_body_util::BodyExt;
        loop {
            let frame = tokio::time::timeout(READ_TIMEOUT, self.body.frame())
                .await
                .map_err(|_| format!("no data for {} s", READ_TIMEOUT.as_secs()))?;
            match frame {
                None => return Ok(None),
                Some(Err(err)) => return Err(chain(&err)),
                Some(Ok(frame)) => {
                    if let Ok(data) = frame.into_data() {
                        return Ok(Some(data));
                    }
                }
            }
        }
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        self.driver.abort();
    }
}

/// Sends one request (a connection of its own: turns are seconds apart) and returns the
/// response once its status says a stream follows.
pub async fn open(
    config: &AgentConfig,
    key: &Secret,
    body: &Value,
) -> Result<Streaming, ModelError> {
    let unanswered = |what: String| ModelError::Retryable {
        status: None,
        message: scrub(&format!("the model API did not answer: {what}"), key),
        retry_after: None,
    };
    let url = url::Url::parse(&format!("{}/v1/messages", config.base_url))
        .map_err(|e| ModelError::Protocol(format!("ANTHROPIC_BASE_URL is not a URL: {e}")))?;
    let host = url
        .host_str()
        .ok_or_else(|| ModelError::Protocol("ANTHROPIC_BASE_URL has no host".into()))?
        .trim_start_matches('[')
        .trim_end_matches(']')
        .to_string();
    let port = url.port_or_known_default().unwrap_or(443);
    let tcp = tokio::time::timeout(
        CONNECT_TIMEOUT,
        tokio::net::TcpStream::connect((host.as_str(), port)),
    )
    .await
    .map_err(|_| {
        unanswered(format!(
            "no connection within {} s",
            CONNECT_TIMEOUT.as_secs()
        ))
    })?
    .map_err(|e| unanswered(format!("cannot connect: {e}")))?;
    let _ = tcp.set_nodelay(true);
    let host_header = match url.port() {
        Some(port) => format!("{}:{port}", url.host_str().unwrap_or_default()),
        None => url.host_str().unwrap_or_default().to_string(),
    };
    let request = hyper::Request::post(url.path())
        .header(hyper::header::HOST, host_header)
        .header("x-api-key", key.expose())
        .header("anthropic-version", API_VERSION)
        .header(hyper::header::CONTENT_TYPE, "application/json")
        .header(hyper::header::ACCEPT, "text/event-stream")
        .header(hyper::header::USER_AGENT, "sluice-runner")
        .body(http_body_util::Full::new(hyper::body::Bytes::from(
            serde_json::to_vec(body).unwrap_or_default(),
        )))
        .map_err(|e| ModelError::Protocol(format!("cannot build the request: {e}")))?;
    let exchange = async {
        if url.scheme() == "https" {
            let name = rustls::pki_types::ServerName::try_from(host.clone())
                .map_err(|e| ModelError::Protocol(format!("ANTHROPIC_BASE_URL's host: {e}")))?;
            let tls =
                crate::tools::fetch::tls_config().map_err(|e| ModelError::Protocol(e.message))?;
            let tls = tokio_rustls::TlsConnector::from(tls)
                .connect(name, tcp)
                .await
                .map_err(|e| unanswered(format!("TLS handshake failed: {e}")))?;
            send(hyper_util::rt::TokioIo::new(tls), request)
                .await
                .map_err(|e| unanswered(chain(&e)))
        } else {
            send(hyper_util::rt::TokioIo::new(tcp), request)
                .await
                .map_err(|e| unanswered(chain(&e)))
        }
    };
    // The TLS handshake and the response's head, within the read timeout.
    let (response, driver) = tokio::time::timeout(READ_TIMEOUT, exchange)
        .await
        .map_err(|_| unanswered(format!("no response within {} s", READ_TIMEOUT.as_secs())))??;
    let status = response.status().as_u16();
    let retry_after = response
        .headers()
        .get("retry-after")
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.trim().parse::<f64>().ok())
        .filter(|s| s.is_finite() && *s >= 0.0)
        .map(|s| Duration::from_secs_f64(s.min(MAX_RETRY_AFTER.as_secs_f64())));
    let mut streaming = Streaming {
        body: response.into_body(),
        driver,
    };
    if (200..300).contains(&status) {
        return Ok(streaming);
    }
    let mut bytes = Vec::new();
    while bytes.len() < ERROR_BODY_BYTES {
        match streaming.chunk().await {
            Ok(Some(chunk)) => bytes.extend_from_slice(&chunk),
            _ => break,
        }
    }
    bytes.truncate(ERROR_BODY_BYTES);
    let detail = error_detail(&bytes, key);
    let message = format!("the model API answered {status}: {detail}");
    if status == 429 || status == 408 || status >= 500 {
        Err(ModelError::Retryable {
            status: Some(status),
            message,
            retry_after,
        })
    } else {
        Err(ModelError::Refused { status, message })
    }
}

/// Sends `request` on a fresh HTTP/1 connection over `io`; the response and the task that
/// drives the connection.
async fn send<T>(
    io: T,
    request: hyper::Request<http_body_util::Full<hyper::body::Bytes>>,
) -> Result<
    (
        hyper::Response<hyper::body::Incoming>,
        tokio::task::JoinHandle<()>,
    ),
    hyper::Error,
>
where
    T: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let (mut sender, connection) = hyper::client::conn::http1::handshake(io).await?;
    let driver = tokio::spawn(async move {
        let _ = connection.await;
    });
    match sender.send_request(request).await {
        Ok(response) => Ok((response, driver)),
        Err(err) => {
            driver.abort();
            Err(err)
        }
    }
}

/// `error.type: error.message` of an error answer, or the start of its body; the key is
/// replaced before anything is cut, so no part of it can survive.
fn error_detail(body: &[u8], key: &Secret) -> String {
    if let Ok(value) = serde_json::from_slice::<Value>(body) {
        let error = value.get("error").unwrap_or(&value);
        let kind = scrub(
            error.get("type").and_then(Value::as_str).unwrap_or("error"),
            key,
        );
        let message = scrub(
            error.get("message").and_then(Value::as_str).unwrap_or(""),
            key,
        );
        let kind: String = kind.chars().take(100).collect();
        return format!("{kind}: {}", message.chars().take(1000).collect::<String>());
    }
    scrub(&String::from_utf8_lossy(body), key)
        .chars()
        .take(500)
        .collect()
}

/// An error with its sources, for a message.
pub fn chain(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(cause) = source {
        text.push_str(": ");
        text.push_str(&cause.to_string());
        source = cause.source();
    }
    text
}

/// `text` with every occurrence of the key replaced.
pub fn scrub(text: &str, key: &Secret) -> String {
    let key = key.expose();
    if key.is_empty() {
        return text.to_string();
    }
    text.replace(key, "***")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_answers_are_read_for_their_message_and_the_key_is_scrubbed() {
        let key = Secret::new("sk-canary-123");
        let body = br#"{"type":"error","error":{"type":"authentication_error","message":"invalid x-api-key sk-canary-123"}}"#;
        let detail = error_detail(body, &key);
        assert_eq!(detail, "authentication_error: invalid x-api-key ***");
        assert_eq!(error_detail(b"<html>oops", &key), "<html>oops");
        // A key that a cut would split is replaced before the cut.
        let long = format!("{}sk-canary-123", "x".repeat(495));
        assert!(!error_detail(long.as_bytes(), &key).contains("sk-can"));
    }
}
