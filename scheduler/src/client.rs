//! A small client of the public API, behind `sluice enqueue` (and usable from tests).

use std::time::Duration;

use serde_json::Value;
use sluice_protocol::{ErrorBody, JobState};

use crate::secret::Secret;

/// Errors talking to the public API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The scheduler answered with an error body.
    #[error("{status}: {code}: {message}")]
    Api {
        status: u16,
        code: String,
        message: String,
    },
    /// The scheduler could not be reached.
    #[error("cannot reach the scheduler at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    /// The answer was not what the API promises.
    #[error("unexpected answer from the scheduler: {0}")]
    Protocol(String),
}

/// A client of one scheduler's public API.
#[derive(Clone)]
pub struct ApiClient {
    base: String,
    token: Secret,
    http: reqwest::Client,
}

impl ApiClient {
    /// A client for `base` (e.g. `http://127.0.0.1:7070`) with the API token.
    pub fn new(base: &str, token: Secret) -> Self {
        ApiClient {
            base: base.trim_end_matches('/').to_string(),
            token,
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(30))
                .build()
                .expect("a plain HTTP client always builds"),
        }
    }

    async fn send(
        &self,
        request: reqwest::RequestBuilder,
        url: &str,
    ) -> Result<(u16, Value), ClientError> {
        let response = request
            .bearer_auth(self.token.expose())
            .send()
            .await
            .map_err(|e| ClientError::Unreachable {
                url: url.to_string(),
                reason: e.to_string(),
            })?;
        let status = response.status().as_u16();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        if status >= 400 {
            let (code, message) = match serde_json::from_slice::<ErrorBody>(&bytes) {
                Ok(body) => (body.error.code, body.error.message),
                Err(_) => (
                    "http_error".into(),
                    String::from_utf8_lossy(&bytes).into_owned(),
                ),
            };
            return Err(ClientError::Api {
                status,
                code,
                message,
            });
        }
        let value =
            serde_json::from_slice(&bytes).map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok((status, value))
    }

    /// `POST /api/jobs` with a full request body; returns the status and `{id, state}`.
    pub async fn enqueue(&self, request: &Value) -> Result<(u16, Value), ClientError> {
        let url = format!("{}/api/jobs", self.base);
        self.send(self.http.post(&url).json(request), &url).await
    }

    /// `GET /api/jobs/:id`.
    pub async fn get_job(&self, id: i64) -> Result<Value, ClientError> {
        let url = format!("{}/api/jobs/{id}", self.base);
        Ok(self.send(self.http.get(&url), &url).await?.1)
    }

    /// Polls the job until it is terminal, backing off from 20 ms to 500 ms between looks.
    pub async fn wait_terminal(&self, id: i64) -> Result<Value, ClientError> {
        let mut pause = Duration::from_millis(20);
        loop {
            let job = self.get_job(id).await?;
            let state = job
                .get("state")
                .and_then(Value::as_str)
                .and_then(JobState::parse)
                .ok_or_else(|| ClientError::Protocol(format!("job without a state: {job}")))?;
            if state.is_terminal() {
                return Ok(job);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }
}
