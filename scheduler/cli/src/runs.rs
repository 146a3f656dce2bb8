//! Following a workflow run as it goes: each step's state changes printed as they happen,
//! with the step's output once it is done. Behind `sluice run --wait` and `sluice dev`.

use std::collections::HashMap;
use std::time::Duration;

use serde_json::Value;
use sluice_protocol::api::{Run, RunState};

use crate::client::{ApiClient, ClientError};

/// Polls run `id` until it has finished, calling `say` with a line per step change; returns
/// the finished run.
pub async fn follow(
    client: &ApiClient,
    id: i64,
    mut say: impl FnMut(String),
) -> Result<Run, ClientError> {
    let mut seen: HashMap<String, String> = HashMap::new();
    let mut pause = Duration::from_millis(20);
    loop {
        let run = client.get_run(id).await?;
        for step in &run.steps {
            if seen.get(&step.id) == Some(&step.state) {
                continue;
            }
            seen.insert(step.id.clone(), step.state.clone());
            let jobs: Vec<String> = step.jobs.iter().map(|j| j.id.to_string()).collect();
            let detail = match step.state.as_str() {
                "running" => format!("(job {})", jobs.join(", ")),
                "succeeded" => summary(step.output.as_ref()),
                "waiting" => continue,
                _ => String::new(),
            };
            say(format!("[run {id}] {} {} {detail}", step.id, step.state)
                .trim_end()
                .to_string());
        }
        if run.state != RunState::Running {
            let how = match &run.error {
                Some(error) => format!(": {error}"),
                None => String::new(),
            };
            let state = format!("{:?}", run.state).to_lowercase();
            say(format!("[run {id}] {state}{how}"));
            return Ok(run);
        }
        tokio::time::sleep(pause).await;
        pause = (pause * 2).min(Duration::from_millis(250));
    }
}

/// A step's output in one line: a bash step's last line of stdout (and its `value`), else
/// the JSON, cut at 200 characters.
fn summary(output: Option<&Value>) -> String {
    let Some(output) = output else {
        return String::new();
    };
    let text = match output.get("stdout_tail").and_then(Value::as_str) {
        Some(stdout) => {
            let last = stdout
                .trim_end()
                .lines()
                .last()
                .unwrap_or_default()
                .to_string();
            match output.get("value") {
                Some(value) => format!("{last} → {value}"),
                None => last,
            }
        }
        None => output.to_string(),
    };
    let cut: String = text.chars().take(200).collect();
    if cut.len() < text.len() {
        format!("{cut}…")
    } else {
        cut
    }
}
