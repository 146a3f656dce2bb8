//! The agent executor: an Anthropic Messages tool-use loop run by the sidecar. Each turn
//! streams one model response ([`model`], [`stream`]); its text goes out as coalesced `text`
//! events, each `tool_use` runs through the same executors as `bash` and `tool` jobs (the
//! sandbox, the slot's uid, the workspace) and goes back as a `tool_result`; the loop ends
//! when the model answers without tool calls, or at `max_turns`, the token budget, the
//! timeout or a stop.
//!
//! The API key stays here: tools get the runner's cleared environment, and no event, output
//! or error carries it ([`model::scrub`]).

pub mod model;
pub mod stream;

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::{json, Value};
use sluice_protocol::{bounds, AgentSpec, BashSpec, EventKind, FailureCode, TaskSession, ToolName};
use tokio::time::Instant;

use super::tool::{self as confined, Answer, Call};
use super::{policy, stopped, Ended, Exec, StopReason};
use crate::config::Secret;
use crate::tools::{self, BashInput};
use model::ModelError;
use stream::{Assembler, Message, Progress, SseParser, StreamError, Usage};

/// Text is sent as an event once this much is buffered, or at the end of a block.
const TEXT_EVENT_BYTES: usize = 2048;
/// …or once the oldest buffered text is this old (checked as chunks arrive).
const TEXT_EVENT_AGE: Duration = Duration::from_millis(200);
/// Most bytes of a tool input or result shown in an event (the model gets the whole).
const EVENT_PREVIEW_BYTES: usize = 16 * 1024;

/// How the loop ended, and the turns to keep for its session when it succeeded.
pub struct AgentEnded {
    pub ended: Ended,
    /// The messages this attempt added (its prompt first), on success only.
    pub new_turns: Option<Vec<Value>>,
}

impl AgentEnded {
    fn without_turns(ended: Ended) -> AgentEnded {
        AgentEnded {
            ended,
            new_turns: None,
        }
    }
}

/// Where the loop stands, for its result.
struct Progressed {
    turns: u32,
    usage: Usage,
    text: String,
    model: String,
}

impl Progressed {
    fn output(&self, stop_reason: &str) -> Value {
        json!({
            "text": self.text,
            "turns": self.turns,
            "usage": self.usage.to_json(),
            "stop_reason": stop_reason,
            "model": self.model,
        })
    }
}

/// A turn's end that is not a model message.
enum TurnEnd {
    Stopped(StopReason),
    TimedOut,
    Failed(FailureCode, String, bool),
}

/// Runs `spec`'s loop, continuing `session`'s conversation when there is one.
pub async fn run(exec: Exec<'_>, spec: &AgentSpec, session: Option<&TaskSession>) -> AgentEnded {
    let Exec {
        sandbox,
        config,
        task,
        workspace,
        user,
        network,
        events,
        stop,
    } = exec;
    let agent = &config.agent;
    let Some(key) = agent.api_key.as_ref() else {
        return AgentEnded::without_turns(Ended::failed(
            json!({}),
            FailureCode::Configuration,
            "agent steps need an Anthropic API key: set ANTHROPIC_API_KEY in the runner's environment (and ANTHROPIC_BASE_URL for another endpoint)",
            false,
        ));
    };
    let model_name = spec.model.clone().unwrap_or_else(|| agent.model.clone());
    let max_turns = spec
        .max_turns
        .unwrap_or(agent.max_turns)
        .clamp(1, bounds::MAX_AGENT_TURNS as u32);
    let max_tokens = spec
        .max_tokens
        .unwrap_or(agent.max_tokens)
        .clamp(1, bounds::MAX_AGENT_RESPONSE_TOKENS as u32);
    let budget = spec.token_budget.unwrap_or(agent.token_budget).max(1);
    let timeout = policy::timeout_of(config, task, spec.timeout_ms);
    let deadline = Instant::now() + timeout;
    // In the spec's order, each tool once (the API refuses a name offered twice).
    let mut offered: Vec<ToolName> = Vec::new();
    for tool in spec
        .tools
        .clone()
        .unwrap_or_else(|| tools::all().into_iter().map(|def| def.name).collect())
    {
        if !offered.contains(&tool) {
            offered.push(tool);
        }
    }
    let tool_defs: Vec<Value> = offered
        .iter()
        .map(|&name| {
            let def = tools::def(name);
            json!({"name": tools::name_of(name), "description": def.description, "input_schema": def.input_schema})
        })
        .collect();

    let mut messages: Vec<Value> = session.map(|s| s.messages.clone()).unwrap_or_default();
    let history = messages.len();
    messages.push(json!({"role": "user", "content": spec.prompt}));
    let mut progress = Progressed {
        turns: 0,
        usage: Usage::default(),
        text: String::new(),
        model: model_name.clone(),
    };
    events
        .send(
            EventKind::Started,
            json!({"agent": true, "model": model_name, "session": session.map(|s| &s.name)}),
        )
        .await;
    let mut stop_rx = stop.watch();
    loop {
        let turn = progress.turns + 1;
        let mut body = json!({
            "model": model_name,
            "max_tokens": max_tokens,
            "messages": messages,
            "stream": true,
        });
        if !tool_defs.is_empty() {
            body["tools"] = Value::Array(tool_defs.clone());
        }
        if let Some(system) = &spec.system {
            body["system"] = json!(system);
        }
        let message = tokio::select! {
            message = request(agent, key, &body, turn, events) => message,
            reason = stopped(&mut stop_rx) => Err(TurnEnd::Stopped(reason)),
            _ = tokio::time::sleep_until(deadline) => Err(TurnEnd::TimedOut),
        };
        let message = match message {
            Ok(message) => message,
            Err(end) => return AgentEnded::without_turns(ended(end, &progress, timeout)),
        };
        progress.turns = turn;
        progress.usage.add(message.usage);
        if let Some(model) = &message.model {
            progress.model = model.clone();
        }
        progress.text = message.text();
        let stop_reason = message.stop_reason.clone().unwrap_or_default();
        let mut usage = message.usage.to_json();
        usage["turn"] = json!(turn);
        usage["stop_reason"] = json!(stop_reason);
        events.send(EventKind::Usage, usage).await;
        if !message.content.is_empty() {
            messages.push(json!({"role": "assistant", "content": message.content}));
        }
        if message.tool_uses.is_empty() {
            let output = progress.output(&stop_reason);
            return AgentEnded {
                ended: Ended::succeeded(output),
                new_turns: Some(messages.split_off(history)),
            };
        }
        if turn >= max_turns {
            return AgentEnded::without_turns(Ended::failed(
                progress.output("max_turns"),
                FailureCode::MaxTurns,
                format!("the agent used its {max_turns} turns without finishing"),
                false,
            ));
        }
        if progress.usage.total() >= budget {
            return AgentEnded::without_turns(Ended::failed(
                progress.output("token_budget"),
                FailureCode::TokenBudget,
                format!(
                    "the agent used {} tokens, its budget is {budget}",
                    progress.usage.total()
                ),
                false,
            ));
        }
        // The model's tool calls, in order, each as its own confined process.
        let mut results = Vec::with_capacity(message.tool_uses.len());
        for call in &message.tool_uses {
            let (input_preview, _) = preview(call.input.as_ref().unwrap_or(&Value::Null));
            events
                .send(
                    EventKind::ToolCall,
                    json!({"turn": turn, "id": call.id, "name": call.name, "input": input_preview}),
                )
                .await;
            let remaining = deadline.saturating_duration_since(Instant::now());
            let outcome = match (&call.input, parse_tool(&call.name, &offered)) {
                (_, Err(message)) => Ok(Err(message)),
                (Err(message), _) => Ok(Err(message.clone())),
                (Ok(input), Ok(ToolName::Bash)) => {
                    let exec = Exec {
                        sandbox,
                        config,
                        task,
                        workspace,
                        user,
                        network,
                        events: &mut *events,
                        stop,
                    };
                    run_bash(exec, input, remaining).await
                }
                (Ok(input), Ok(tool)) => {
                    let call = Call {
                        tool,
                        input,
                        policy: &config.tool_policy,
                        workspace,
                        env: policy::tool_env(
                            workspace,
                            task.job_id,
                            task.attempt,
                            &BTreeMap::new(),
                        ),
                        limits: config.limits.clone(),
                        user,
                        network,
                        timeout: remaining.min(policy::timeout_of(config, task, None)),
                        kill_grace: config.kill_grace,
                    };
                    match confined::call(sandbox, call, &mut stop_rx).await {
                        Answer::Stopped(reason) => Err(reason),
                        Answer::Answered(Ok(output)) => Ok(Ok(output.to_string())),
                        Answer::Answered(Err(err)) => {
                            Ok(Err(format!("{}: {}", err.code, err.message)))
                        }
                    }
                }
            };
            let (content, is_error) = match outcome {
                Err(reason) => {
                    return AgentEnded::without_turns(Ended::Stopped {
                        reason,
                        output: progress.output("stopped"),
                    })
                }
                Ok(Ok(content)) => (content, false),
                Ok(Err(content)) => (content, true),
            };
            let content = model::scrub(&content, key);
            let (content, cut) = truncate(&content, agent.tool_result_max_bytes);
            let (shown, _) = preview(&Value::String(content.clone()));
            events
                .send(
                    EventKind::ToolResult,
                    json!({"turn": turn, "id": call.id, "name": call.name, "is_error": is_error,
                           "content": shown, "truncated": cut || content.len() > EVENT_PREVIEW_BYTES}),
                )
                .await;
            let mut result =
                json!({"type": "tool_result", "tool_use_id": call.id, "content": content});
            if is_error {
                result["is_error"] = json!(true);
            }
            results.push(result);
        }
        messages.push(json!({"role": "user", "content": results}));
        if Instant::now() >= deadline {
            return AgentEnded::without_turns(ended(TurnEnd::TimedOut, &progress, timeout));
        }
    }
}

/// The end of a loop that a turn did not finish.
fn ended(end: TurnEnd, progress: &Progressed, timeout: Duration) -> Ended {
    match end {
        TurnEnd::Stopped(reason) => Ended::Stopped {
            reason,
            output: progress.output("stopped"),
        },
        TurnEnd::TimedOut => Ended::failed(
            progress.output("timeout"),
            FailureCode::TimedOut,
            format!("the agent ran longer than {} ms", timeout.as_millis()),
            false,
        ),
        TurnEnd::Failed(code, message, retryable) => {
            Ended::failed(progress.output("error"), code, message, retryable)
        }
    }
}

/// One turn's request, tried again on what a retry may fix (429, 529, 5xx, a cut stream),
/// waiting `retry-after` or a doubling back-off between tries.
async fn request(
    agent: &crate::config::AgentConfig,
    key: &Secret,
    body: &Value,
    turn: u32,
    events: &mut super::events::Events,
) -> Result<Message, TurnEnd> {
    let mut retry = 0u32;
    loop {
        let error = match read_response(agent, key, body, turn, events).await {
            Ok(message) => return Ok(message),
            Err(error) => error,
        };
        match error {
            ModelError::Refused { message, .. } => {
                return Err(TurnEnd::Failed(FailureCode::ModelRefused, message, false))
            }
            ModelError::Protocol(message) => {
                return Err(TurnEnd::Failed(FailureCode::ModelProtocol, message, false))
            }
            ModelError::Retryable {
                status,
                message,
                retry_after,
            } => {
                if retry >= agent.max_retries {
                    return Err(TurnEnd::Failed(
                        FailureCode::ModelUnavailable,
                        format!("{message} (after {retry} retries)"),
                        true,
                    ));
                }
                retry += 1;
                let backoff = agent
                    .retry_base
                    .saturating_mul(1u32 << (retry - 1).min(16))
                    .min(model::MAX_RETRY_AFTER);
                let jittered = backoff.mul_f64(0.5 + fastrand::f64() / 2.0);
                let delay = retry_after.unwrap_or(jittered);
                events
                    .send(
                        EventKind::ModelRetry,
                        json!({"turn": turn, "status": status, "error": message,
                               "retry": retry, "delay_ms": delay.as_millis() as u64}),
                    )
                    .await;
                tracing::info!(
                    turn,
                    retry,
                    status,
                    delay_ms = delay.as_millis() as u64,
                    "model request retried"
                );
                tokio::time::sleep(delay).await;
            }
        }
    }
}

/// Sends the request and reads its stream into a message, sending text as it comes.
async fn read_response(
    agent: &crate::config::AgentConfig,
    key: &Secret,
    body: &Value,
    turn: u32,
    events: &mut super::events::Events,
) -> Result<Message, ModelError> {
    let mut response = model::open(agent, key, body).await?;
    let mut parser = SseParser::default();
    let mut assembler = Assembler::default();
    let mut text = String::new();
    let mut since: Option<Instant> = None;
    loop {
        let chunk = match response.chunk().await {
            Ok(Some(chunk)) => chunk,
            Ok(None) => break,
            Err(err) => {
                flush(events, turn, &mut text, &mut since).await;
                return Err(ModelError::Retryable {
                    status: None,
                    message: model::scrub(&format!("the model's stream broke: {err}"), key),
                    retry_after: None,
                });
            }
        };
        let parsed = parser.push(&chunk).and_then(|events| {
            events
                .iter()
                .map(|event| assembler.apply(event))
                .collect::<Result<Vec<_>, _>>()
        });
        let progress = match parsed {
            Ok(progress) => progress,
            Err(err) => {
                flush(events, turn, &mut text, &mut since).await;
                return Err(stream_error(err, key));
            }
        };
        for step in progress {
            match step {
                Progress::Text(piece) => {
                    text.push_str(&piece);
                    since.get_or_insert_with(Instant::now);
                }
                Progress::BlockEnd => flush(events, turn, &mut text, &mut since).await,
                Progress::None => {}
            }
        }
        if text.len() >= TEXT_EVENT_BYTES || since.is_some_and(|at| at.elapsed() >= TEXT_EVENT_AGE)
        {
            flush(events, turn, &mut text, &mut since).await;
        }
        if assembler.is_complete() {
            break;
        }
    }
    flush(events, turn, &mut text, &mut since).await;
    if !assembler.is_complete() {
        return Err(ModelError::Retryable {
            status: None,
            message: "the model's stream ended before message_stop".into(),
            retry_after: None,
        });
    }
    Ok(assembler.finish())
}

/// Sends the buffered text as one event.
async fn flush(
    events: &mut super::events::Events,
    turn: u32,
    text: &mut String,
    since: &mut Option<Instant>,
) {
    *since = None;
    if text.is_empty() {
        return;
    }
    let piece = std::mem::take(text);
    events
        .send(EventKind::Text, json!({"turn": turn, "text": piece}))
        .await;
}

/// A stream error as a model error: an overloaded or failed API is worth a retry, a
/// malformed or oversized stream is not.
fn stream_error(err: StreamError, key: &Secret) -> ModelError {
    match err {
        StreamError::Api { kind, message } => {
            let message = model::scrub(&format!("the model API sent {kind}: {message}"), key);
            match kind.as_str() {
                "overloaded_error" | "api_error" | "rate_limit_error" | "timeout_error" => {
                    ModelError::Retryable {
                        status: None,
                        message,
                        retry_after: None,
                    }
                }
                _ => ModelError::Refused {
                    status: 400,
                    message,
                },
            }
        }
        StreamError::TooLarge(message) | StreamError::Malformed(message) => {
            ModelError::Protocol(format!("the model's stream was refused: {message}"))
        }
    }
}

/// The tool a call names, if it was offered.
fn parse_tool(name: &str, offered: &[ToolName]) -> Result<ToolName, String> {
    offered
        .iter()
        .copied()
        .find(|&tool| tools::name_of(tool) == name)
        .ok_or_else(|| {
            let shown: String = name.chars().take(64).collect();
            format!("unknown_tool: {shown:?} is not one of the offered tools")
        })
}

/// A `bash` call through the bash executor (its output streams as the job's events); its
/// result is the executor's output as JSON, with the failure when it failed.
async fn run_bash(
    exec: Exec<'_>,
    input: &Value,
    remaining: Duration,
) -> Result<Result<String, String>, StopReason> {
    let input: BashInput = match serde_json::from_value(input.clone()) {
        Ok(input) => input,
        Err(err) => {
            return Ok(Err(
                tools::ToolError::invalid_input(ToolName::Bash, err).message
            ))
        }
    };
    let remaining_ms = remaining.as_millis().clamp(1, u64::MAX as u128) as u64;
    let spec = BashSpec {
        script: input.command,
        env: Default::default(),
        timeout_ms: Some(
            input
                .timeout_ms
                .unwrap_or(remaining_ms)
                .clamp(1, remaining_ms),
        ),
        limits: None,
        network: Some(exec.network),
    };
    match super::bash::run(exec, &spec).await {
        Ended::Stopped { reason, .. } => Err(reason),
        Ended::Finished {
            mut output,
            failure,
            ..
        } => match failure {
            None => Ok(Ok(output.to_string())),
            Some(failure) => {
                output["error"] = json!({"code": failure.code, "message": failure.message});
                Ok(Err(output.to_string()))
            }
        },
    }
}

/// `text` cut to `max` bytes (at a character boundary) with a marker; whether it was cut.
fn truncate(text: &str, max: usize) -> (String, bool) {
    if text.len() <= max {
        return (text.to_string(), false);
    }
    let mut end = max;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    (
        format!(
            "{}\n[truncated: {} of {} bytes shown]",
            &text[..end],
            end,
            text.len()
        ),
        true,
    )
}

/// A value for an event: itself when small, else the start of its JSON; whether it was cut.
fn preview(value: &Value) -> (Value, bool) {
    let text = match value {
        Value::String(text) => text.clone(),
        other => other.to_string(),
    };
    if text.len() <= EVENT_PREVIEW_BYTES {
        return (value.clone(), false);
    }
    let (cut, _) = truncate(&text, EVENT_PREVIEW_BYTES);
    (Value::String(cut), true)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn truncation_keeps_characters_whole_and_says_so() {
        let (cut, was) = truncate("ééééé", 3);
        assert!(was);
        assert!(cut.starts_with('é'));
        assert!(cut.contains("[truncated: 2 of 10 bytes shown]"), "{cut}");
        assert_eq!(truncate("short", 10), ("short".into(), false));
    }

    #[test]
    fn only_offered_tools_run() {
        assert_eq!(
            parse_tool("read_file", &[ToolName::ReadFile]),
            Ok(ToolName::ReadFile)
        );
        assert!(parse_tool("bash", &[ToolName::ReadFile])
            .unwrap_err()
            .contains("not one of the offered tools"));
    }
}
