//! A client of the public API, typed with [`sluice_protocol::api`]'s requests and answers:
//! behind `sluice enqueue`, and usable from tests and tools.

use std::time::Duration;

use serde::de::DeserializeOwned;
use serde::Serialize;
use sluice_protocol::api::{
    paths, BatchRequest, BatchResponse, EnqueueRequest, EnqueueResponse, Job, JobList,
    JobStateChange, QueueList, QueuePaused, RetryManyRequest, RetryManyResponse, Run, RunRequest,
    RunStarted, RunStateChange, Schedule, ScheduleList, ScheduleRequest, Workflow, WorkflowList,
};
use sluice_protocol::{ErrorBody, ErrorCode, JobId, Secret};

/// Errors talking to the public API.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The scheduler answered with an error body (or, from something in between, without one:
    /// then the code is `Other("http_error")`).
    #[error("{status}: {code}: {message}")]
    Api {
        status: u16,
        code: ErrorCode,
        message: String,
        /// Particulars where there are several (each problem of a definition).
        details: Option<serde_json::Value>,
    },
    /// The scheduler could not be reached.
    #[error("cannot reach the scheduler at {url}: {reason}")]
    Unreachable { url: String, reason: String },
    /// The answer was not what the API promises.
    #[error("unexpected answer from the scheduler: {0}")]
    Protocol(String),
}

/// A client of one scheduler's public API.
/// The error an answer of `status` with body `bytes` (the API's JSON shape, or not) carries.
fn api_error(status: u16, bytes: &[u8]) -> ClientError {
    let (code, message, details) = match serde_json::from_slice::<ErrorBody>(bytes) {
        Ok(body) => (body.error.code, body.error.message, body.error.details),
        Err(_) => (
            ErrorCode::Other("http_error".into()),
            String::from_utf8_lossy(bytes).into_owned(),
            None,
        ),
    };
    ClientError::Api {
        status,
        code,
        message,
        details,
    }
}

#[derive(Clone)]
pub struct ApiClient {
    base: String,
    token: Secret,
    http: reqwest::Client,
    /// For event streams: no overall deadline (a stream lasts as long as its job), but a
    /// connect timeout, and a read timeout well past the server's keep-alive.
    stream_http: reqwest::Client,
}

/// One Server-Sent Event.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct StreamEvent {
    /// `id:` (the event's position); the terminal event has none.
    pub id: Option<i64>,
    /// `event:`.
    pub event: String,
    /// `data:`, parsed (a string when it is not JSON).
    pub data: serde_json::Value,
}

/// An open event stream.
pub struct EventStream {
    response: reqwest::Response,
    buffer: Vec<u8>,
    done: bool,
}

impl EventStream {
    /// The next event; `Ok(None)` when the server ended the stream. Comments (keep-alives)
    /// and `retry:` lines are skipped.
    pub async fn next(&mut self) -> Result<Option<StreamEvent>, ClientError> {
        loop {
            if let Some(end) = find_blank_line(&self.buffer) {
                let block: Vec<u8> = self.buffer.drain(..end).collect();
                if let Some(event) = parse_event(&String::from_utf8_lossy(&block)) {
                    return Ok(Some(event));
                }
                continue;
            }
            if self.done {
                return Ok(None);
            }
            match self.response.chunk().await {
                Ok(Some(bytes)) => {
                    // A stream that never sends a blank line must not grow without bound.
                    if self.buffer.len() + bytes.len() > 64 << 20 {
                        return Err(ClientError::Protocol("an event larger than 64 MiB".into()));
                    }
                    self.buffer.extend_from_slice(&bytes);
                }
                Ok(None) => self.done = true,
                Err(e) => return Err(ClientError::Protocol(format!("the stream broke: {e}"))),
            }
        }
    }
}

/// Where the first event block ends (after its blank line).
fn find_blank_line(buffer: &[u8]) -> Option<usize> {
    buffer
        .windows(2)
        .position(|w| w == b"\n\n")
        .map(|at| at + 2)
}

fn parse_event(block: &str) -> Option<StreamEvent> {
    let (mut id, mut event, mut data) = (None, None, Vec::new());
    for line in block.lines() {
        let (field, value) = line.split_once(':').unwrap_or((line, ""));
        let value = value.strip_prefix(' ').unwrap_or(value);
        match field {
            "id" => id = value.parse().ok(),
            "event" => event = Some(value.to_string()),
            "data" => data.push(value),
            _ => {}
        }
    }
    let event = event.or_else(|| (!data.is_empty()).then(|| "message".to_string()))?;
    let data = data.join("\n");
    let data = serde_json::from_str(&data).unwrap_or(serde_json::Value::String(data));
    Some(StreamEvent { id, event, data })
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
            stream_http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(10))
                .read_timeout(Duration::from_secs(120))
                .build()
                .expect("a plain HTTP client always builds"),
        }
    }

    async fn call<B: Serialize, T: DeserializeOwned>(
        &self,
        method: reqwest::Method,
        path: &str,
        body: Option<&B>,
    ) -> Result<(u16, T), ClientError> {
        let url = format!("{}{path}", self.base);
        let mut request = self
            .http
            .request(method, &url)
            .bearer_auth(self.token.expose());
        if let Some(body) = body {
            request = request.json(body);
        }
        self.exchange(request, url).await
    }

    async fn exchange<T: DeserializeOwned>(
        &self,
        request: reqwest::RequestBuilder,
        url: String,
    ) -> Result<(u16, T), ClientError> {
        let response = request.send().await.map_err(|e| ClientError::Unreachable {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        let status = response.status().as_u16();
        let bytes = response
            .bytes()
            .await
            .map_err(|e| ClientError::Protocol(e.to_string()))?;
        if status >= 400 {
            return Err(api_error(status, &bytes));
        }
        // An empty answer (204) reads as JSON null, which `()` takes.
        let bytes: &[u8] = if bytes.is_empty() { b"null" } else { &bytes };
        let value =
            serde_json::from_slice(bytes).map_err(|e| ClientError::Protocol(e.to_string()))?;
        Ok((status, value))
    }

    /// `POST /api/jobs`: the job, and whether this call created it (201) rather than finding
    /// its idempotency key stored (200).
    pub async fn enqueue(
        &self,
        request: &EnqueueRequest,
    ) -> Result<(EnqueueResponse, bool), ClientError> {
        let (status, response) = self
            .call(reqwest::Method::POST, paths::JOBS, Some(request))
            .await?;
        Ok((response, status == 201))
    }

    /// `POST /api/jobs/batch`: all or none, in order.
    pub async fn enqueue_batch(
        &self,
        jobs: Vec<EnqueueRequest>,
    ) -> Result<Vec<EnqueueResponse>, ClientError> {
        let request = BatchRequest::Wrapped { jobs };
        let (_, response): (_, BatchResponse) = self
            .call(reqwest::Method::POST, paths::JOBS_BATCH, Some(&request))
            .await?;
        Ok(response.jobs)
    }

    /// `GET /api/jobs/:id`.
    pub async fn get_job(&self, id: JobId) -> Result<Job, ClientError> {
        let path = paths::job(id);
        Ok(self
            .call::<(), _>(reqwest::Method::GET, &path, None)
            .await?
            .1)
    }

    /// `POST /api/jobs/:id/cancel`.
    pub async fn cancel(&self, id: JobId) -> Result<JobStateChange, ClientError> {
        let path = paths::cancel(id);
        Ok(self
            .call::<(), _>(reqwest::Method::POST, &path, None)
            .await?
            .1)
    }

    /// `POST /api/jobs/:id/retry`.
    pub async fn retry(&self, id: JobId) -> Result<JobStateChange, ClientError> {
        let path = paths::retry(id);
        Ok(self
            .call::<(), _>(reqwest::Method::POST, &path, None)
            .await?
            .1)
    }

    /// `GET /api/jobs` with `filter`'s query (`queue`, `state`, `since`, `before`, `limit`).
    pub async fn list_jobs(&self, filter: &[(&str, String)]) -> Result<JobList, ClientError> {
        let mut query = url::form_urlencoded::Serializer::new(String::new());
        for (name, value) in filter {
            query.append_pair(name, value);
        }
        let query = query.finish();
        let path = if query.is_empty() {
            paths::JOBS.to_string()
        } else {
            format!("{}?{query}", paths::JOBS)
        };
        Ok(self
            .call::<(), _>(reqwest::Method::GET, &path, None)
            .await?
            .1)
    }

    /// `POST /api/jobs/retry`: one bulk-retry batch.
    pub async fn retry_many(
        &self,
        request: &RetryManyRequest,
    ) -> Result<RetryManyResponse, ClientError> {
        Ok(self
            .call(reqwest::Method::POST, paths::JOBS_RETRY, Some(request))
            .await?
            .1)
    }

    /// Opens the live event stream at `path` (SSE), after `last_event_id` when given.
    pub async fn events(
        &self,
        path: &str,
        last_event_id: Option<i64>,
    ) -> Result<EventStream, ClientError> {
        let url = format!("{}{path}", self.base);
        let mut request = self
            .stream_http
            .get(&url)
            .bearer_auth(self.token.expose())
            .header("accept", "text/event-stream");
        if let Some(id) = last_event_id {
            request = request.header("last-event-id", id.to_string());
        }
        let response = request.send().await.map_err(|e| ClientError::Unreachable {
            url: url.clone(),
            reason: e.to_string(),
        })?;
        let status = response.status().as_u16();
        if status >= 400 {
            let bytes = response.bytes().await.unwrap_or_default();
            return Err(api_error(status, &bytes));
        }
        Ok(EventStream {
            response,
            buffer: Vec::new(),
            done: false,
        })
    }

    /// `GET /api/queues`.
    pub async fn queues(&self) -> Result<QueueList, ClientError> {
        Ok(self
            .call::<(), _>(reqwest::Method::GET, paths::QUEUES, None)
            .await?
            .1)
    }

    /// `POST /api/queues/:name/pause` or `…/resume`.
    pub async fn set_paused(&self, queue: &str, paused: bool) -> Result<QueuePaused, ClientError> {
        let path = if paused {
            paths::pause(queue)
        } else {
            paths::resume(queue)
        };
        Ok(self
            .call::<(), _>(reqwest::Method::POST, &path, None)
            .await?
            .1)
    }

    /// `PUT /api/workflows/:name` with a YAML or JSON definition: the version, and whether it
    /// was new.
    pub async fn put_workflow(
        &self,
        name: &str,
        definition: String,
    ) -> Result<(Workflow, bool), ClientError> {
        let url = format!("{}{}", self.base, paths::workflow(name));
        let request = self
            .http
            .put(&url)
            .bearer_auth(self.token.expose())
            .body(definition);
        let (status, workflow) = self.exchange(request, url).await?;
        Ok((workflow, status == 201))
    }

    /// `GET /api/workflows`.
    pub async fn workflows(&self) -> Result<WorkflowList, ClientError> {
        Ok(self
            .call::<(), _>(reqwest::Method::GET, paths::WORKFLOWS, None)
            .await?
            .1)
    }

    /// `POST /api/workflows/run`.
    pub async fn start_run(&self, request: &RunRequest) -> Result<RunStarted, ClientError> {
        Ok(self
            .call(reqwest::Method::POST, paths::WORKFLOWS_RUN, Some(request))
            .await?
            .1)
    }

    /// `GET /api/runs/:id`.
    pub async fn get_run(&self, id: i64) -> Result<Run, ClientError> {
        Ok(self
            .call::<(), _>(reqwest::Method::GET, &paths::run(id), None)
            .await?
            .1)
    }

    /// `GET /api/runs/:id/artifacts/:step`, written to `out` as it arrives (never held
    /// whole); returns its bytes and SHA-256, checked against the scheduler's digest.
    pub async fn download_artifacts(
        &self,
        run: i64,
        step: &str,
        out: &mut impl std::io::Write,
    ) -> Result<(u64, String), ClientError> {
        use sha2::{Digest, Sha256};
        let url = format!("{}{}", self.base, paths::run_artifacts(run, step));
        let unreachable = |e: reqwest::Error| ClientError::Unreachable {
            url: url.clone(),
            reason: e.to_string(),
        };
        let mut response = self
            .http
            .get(&url)
            .bearer_auth(self.token.expose())
            // A large archive takes longer than a call: an hour at most.
            .timeout(Duration::from_secs(3600))
            .send()
            .await
            .map_err(unreachable)?;
        let status = response.status().as_u16();
        if status >= 400 {
            let bytes = response.bytes().await.map_err(unreachable)?;
            return Err(api_error(status, &bytes));
        }
        let expected = response
            .headers()
            .get("x-sluice-sha256")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        let mut hasher = Sha256::new();
        let mut written = 0u64;
        while let Some(chunk) = response.chunk().await.map_err(unreachable)? {
            hasher.update(&chunk);
            out.write_all(&chunk)
                .map_err(|e| ClientError::Protocol(format!("cannot write the archive: {e}")))?;
            written += chunk.len() as u64;
        }
        let digest: String = hasher
            .finalize()
            .iter()
            .map(|b| format!("{b:02x}"))
            .collect();
        if expected.is_some_and(|e| !e.eq_ignore_ascii_case(&digest)) {
            return Err(ClientError::Protocol(
                "the archive does not match the digest the scheduler sent".into(),
            ));
        }
        Ok((written, digest))
    }

    /// `POST /api/runs/:id/cancel`.
    pub async fn cancel_run(&self, id: i64) -> Result<RunStateChange, ClientError> {
        Ok(self
            .call::<(), _>(reqwest::Method::POST, &paths::cancel_run(id), None)
            .await?
            .1)
    }

    /// `PUT /api/schedules/:name`: the schedule, and whether it was new.
    pub async fn put_schedule(
        &self,
        name: &str,
        request: &ScheduleRequest,
    ) -> Result<(Schedule, bool), ClientError> {
        let (status, schedule) = self
            .call(reqwest::Method::PUT, &paths::schedule(name), Some(request))
            .await?;
        Ok((schedule, status == 201))
    }

    /// `GET /api/schedules/:name`, with its recent ticks.
    pub async fn get_schedule(&self, name: &str) -> Result<Schedule, ClientError> {
        Ok(self
            .call::<(), _>(reqwest::Method::GET, &paths::schedule(name), None)
            .await?
            .1)
    }

    /// `GET /api/runners`.
    pub async fn runners(&self) -> Result<sluice_protocol::api::RunnerList, ClientError> {
        Ok(self
            .call::<(), _>(reqwest::Method::GET, paths::RUNNERS, None)
            .await?
            .1)
    }

    /// `GET /api/schedules`.
    pub async fn schedules(&self) -> Result<ScheduleList, ClientError> {
        Ok(self
            .call::<(), _>(reqwest::Method::GET, paths::SCHEDULES, None)
            .await?
            .1)
    }

    /// `POST /api/schedules/:name/pause` or `…/resume`.
    pub async fn set_schedule_paused(
        &self,
        name: &str,
        paused: bool,
    ) -> Result<Schedule, ClientError> {
        let path = if paused {
            paths::pause_schedule(name)
        } else {
            paths::resume_schedule(name)
        };
        Ok(self
            .call::<(), _>(reqwest::Method::POST, &path, None)
            .await?
            .1)
    }

    /// `DELETE /api/schedules/:name`.
    pub async fn delete_schedule(&self, name: &str) -> Result<(), ClientError> {
        self.call::<(), ()>(reqwest::Method::DELETE, &paths::schedule(name), None)
            .await?;
        Ok(())
    }

    /// Polls the job until it is terminal, backing off from 20 ms to 500 ms between looks.
    pub async fn wait_terminal(&self, id: JobId) -> Result<Job, ClientError> {
        let mut pause = Duration::from_millis(20);
        loop {
            let job = self.get_job(id).await?;
            if job.state.is_terminal() {
                return Ok(job);
            }
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(Duration::from_millis(500));
        }
    }
}
