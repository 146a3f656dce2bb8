//! Completions on their way to the scheduler, batched.
//!
//! A finished attempt puts its completion here and frees its slot. The claim loop, which is
//! waiting for exactly that slot, carries every pending completion on its next claim, so a
//! runner refilling its slots reports and refills them in one request and one commit. While
//! the claim loop cannot carry them — its claim is long-polling, it is backing off, or it has
//! stopped claiming — the flusher sends them instead, as one batch per request
//! (`POST /internal/runners/:pod/complete`). Completions are idempotent on the scheduler, so
//! a batch whose answer was lost is simply sent again.
//!
//! A scheduler that answered registration with a protocol version before
//! [`sluice_protocol::BATCHED_COMPLETIONS`] gets neither: each completion goes alone to
//! `POST /internal/tasks/:id/complete`.

use std::sync::Mutex;

use std::time::Duration;

use sluice_protocol::{
    bounds, paths, CompleteManyRequest, CompleteManyResponse, CompleteResponse, Completion,
    CompletionResult, ErrorCode, Failure, FailureCode, JobState, Outcome,
};
use tokio::sync::{oneshot, watch, Notify};

use crate::client::{CallError, Client};
use crate::config::Secret;

/// Most completions per request (the scheduler's limit).
pub const MAX_BATCH: usize = 1000;
/// Most bytes of completions per request, well below the scheduler's body limit.
pub const MAX_BATCH_BYTES: usize = bounds::MAX_INTERNAL_BODY_BYTES / 2;

/// What became of a completion.
#[derive(Debug, Clone, PartialEq)]
pub enum Delivery {
    /// Applied (or a repeat of one applied before); the job's state after it.
    Applied(JobState),
    /// The attempt no longer held its lease.
    LeaseLost,
    /// Not delivered: the registration ended or the sidecar is stopping.
    NotDelivered(String),
}

/// One completion waiting to be sent, and where its answer goes.
pub struct Queued {
    pub completion: Completion,
    /// Its size as JSON, for batches that fit the scheduler's body limit.
    bytes: usize,
    reply: oneshot::Sender<Delivery>,
}

/// A completion the scheduler can take: one whose JSON exceeds
/// [`bounds::MAX_COMPLETION_BYTES`] becomes a failure saying so (retrying would produce the
/// same result), keeping its `final_seq`.
fn sendable(completion: Completion) -> (Completion, usize) {
    let bytes = serde_json::to_vec(&completion).map_or(usize::MAX, |v| v.len());
    if bytes <= bounds::MAX_COMPLETION_BYTES {
        return (completion, bytes);
    }
    let replaced = refused(
        completion,
        FailureCode::ResultTooLarge,
        format!(
            "the result is {bytes} bytes as JSON; at most {} are allowed",
            bounds::MAX_COMPLETION_BYTES
        ),
    );
    let bytes = serde_json::to_vec(&replaced).map_or(0, |v| v.len());
    (replaced, bytes)
}

/// `completion` replaced by a failure with `code`: what the scheduler is sent in place of a
/// result it cannot take (not retried: another attempt would produce the same).
fn refused(completion: Completion, code: FailureCode, message: String) -> Completion {
    Completion {
        outcome: Outcome::Failed,
        output: serde_json::json!({}),
        error: Some(Failure { code, message }),
        retryable: false,
        ..completion
    }
}

#[derive(Default)]
struct Inner {
    pending: Vec<Queued>,
    /// The claim loop is waiting for a slot and will carry what is pending when it gets one.
    carrier: bool,
    /// The flusher has stopped: nothing more will be sent.
    closed: bool,
}

/// The completions of one registration.
pub struct Outbox {
    inner: Mutex<Inner>,
    flush: Notify,
    /// Turns true when the registration ends: the flusher stops.
    ended: watch::Sender<bool>,
    /// The scheduler takes completions on claims and in batches (protocol 2 on); else each
    /// goes to `/internal/tasks/:id/complete` alone.
    batched: bool,
}

impl Outbox {
    /// The outbox of a registration whose scheduler does (`batched`) or does not take
    /// completions on claims and in batches.
    pub fn new(batched: bool) -> Outbox {
        Outbox {
            inner: Mutex::default(),
            flush: Notify::new(),
            ended: watch::channel(false).0,
            batched,
        }
    }

    /// Queues a completion; the receiver gets its fate.
    pub fn submit(&self, completion: Completion) -> oneshot::Receiver<Delivery> {
        let (reply, answer) = oneshot::channel();
        let mut inner = self.inner.lock().expect("lock");
        if inner.closed {
            let _ = reply.send(Delivery::NotDelivered("the registration ended".into()));
            return answer;
        }
        let (completion, bytes) = sendable(completion);
        inner.pending.push(Queued {
            completion,
            bytes,
            reply,
        });
        if !inner.carrier {
            self.flush.notify_one();
        }
        answer
    }

    /// The claim loop is about to wait for a slot: it will carry what is pending.
    pub fn await_carrier(&self) {
        self.inner.lock().expect("lock").carrier = true;
    }

    /// The claim loop will not carry anything soon (it claims, backs off or stops): pending
    /// and later completions go through the flusher.
    pub fn release_carrier(&self) {
        let mut inner = self.inner.lock().expect("lock");
        inner.carrier = false;
        if !inner.pending.is_empty() {
            self.flush.notify_one();
        }
    }

    /// Takes up to `max` pending completions for the claim about to be sent. A claim that
    /// carries completions is answered at once, so the claim loop stays the carrier for what
    /// comes in meanwhile; a claim that carries none may wait long, so the flusher takes
    /// over for its time.
    pub fn carry(&self, max: usize) -> Vec<Queued> {
        let mut inner = self.inner.lock().expect("lock");
        let taken = take_front(&mut inner.pending, max);
        inner.carrier = !taken.is_empty();
        if !inner.carrier && !inner.pending.is_empty() {
            self.flush.notify_one();
        }
        taken
    }

    /// How many completions the next claim may carry (none for a scheduler that would not
    /// apply them).
    pub fn carry_limit(&self) -> usize {
        if self.batched {
            MAX_BATCH
        } else {
            0
        }
    }

    /// Hands the completions a claim carried their answers. A claim answered without any
    /// broke the protocol it agreed to: they go back to the flusher, which sends them again
    /// (completions are idempotent).
    pub fn answered_by_claim(&self, carried: Vec<Queued>, results: Vec<CompletionResult>) {
        if !carried.is_empty() && results.is_empty() {
            tracing::error!("the scheduler answered a claim without its completions' results; sending them again");
            self.release_carrier();
            self.put_back(carried);
            return;
        }
        resolve(carried, results);
    }

    /// Returns completions whose request failed, to be sent again by the flusher.
    pub fn put_back(&self, mut items: Vec<Queued>) {
        if items.is_empty() {
            return;
        }
        let mut inner = self.inner.lock().expect("lock");
        items.append(&mut inner.pending);
        inner.pending = items;
        if !inner.carrier {
            self.flush.notify_one();
        }
    }

    fn take_for_flush(&self) -> Vec<Queued> {
        let mut inner = self.inner.lock().expect("lock");
        if inner.carrier {
            return Vec::new();
        }
        take_front(&mut inner.pending, MAX_BATCH)
    }

    /// The registration has ended: the flusher stops sending.
    pub fn end(&self) {
        self.ended.send_replace(true);
    }

    /// Sends pending completions whenever the claim loop cannot carry them, until the
    /// registration [ends](Outbox::end) or `hard_stop` turns true; then answers what is left,
    /// and anything submitted later, as not delivered. A request is retried for `budget` at
    /// most.
    pub async fn flusher(
        &self,
        client: Client,
        path: String,
        token: Secret,
        budget: Duration,
        hard_stop: watch::Receiver<bool>,
    ) {
        let session_end = self.ended.subscribe();
        self.flush_until(client, path, token, budget, hard_stop, session_end)
            .await;
        let left = {
            let mut inner = self.inner.lock().expect("lock");
            inner.closed = true;
            std::mem::take(&mut inner.pending)
        };
        for pending in left {
            let _ = pending
                .reply
                .send(Delivery::NotDelivered("the registration ended".into()));
        }
    }

    async fn flush_until(
        &self,
        client: Client,
        path: String,
        token: Secret,
        budget: Duration,
        mut hard_stop: watch::Receiver<bool>,
        mut session_end: watch::Receiver<bool>,
    ) {
        let mut stopping = hard_stop.clone();
        loop {
            if *session_end.borrow() || *stopping.borrow() {
                return;
            }
            loop {
                let batch = self.take_for_flush();
                if batch.is_empty() {
                    break;
                }
                if !self.batched {
                    tokio::select! {
                        _ = send_one_by_one(&client, &token, budget, &mut hard_stop, batch) => {}
                        _ = session_end.changed() => return,
                        _ = stopping.changed() => return,
                    }
                    continue;
                }
                let request = CompleteManyRequest {
                    completions: batch.iter().map(|p| p.completion.clone()).collect(),
                };
                let answer = tokio::select! {
                    answer = client.post_retrying::<_, CompleteManyResponse>(
                        &path,
                        &token,
                        &request,
                        Duration::from_secs(30),
                        budget,
                        &mut hard_stop,
                    ) => answer,
                    _ = session_end.changed() => {
                        self.put_back(batch);
                        return;
                    }
                    _ = stopping.changed() => {
                        self.put_back(batch);
                        return;
                    }
                };
                match answer {
                    Ok(response) => resolve(batch, response.completed),
                    // The batch as a whole was refused: find out which completion, and send
                    // the others, one by one (a refused one is sent again as the failure it
                    // earned).
                    Err(
                        err @ CallError::Status {
                            status: 400..=499, ..
                        },
                    ) if !err.is_lease_lost() && !err.is_unauthorized() => {
                        tracing::warn!(error = %err, "a completion batch was refused; sending its completions one by one");
                        tokio::select! {
                            _ = send_one_by_one(&client, &token, budget, &mut hard_stop, batch) => {}
                            _ = session_end.changed() => return,
                            _ = stopping.changed() => return,
                        }
                    }
                    Err(err) => fail(batch, &err),
                }
            }
            tokio::select! {
                _ = self.flush.notified() => {}
                _ = session_end.changed() => {}
                _ = stopping.changed() => {}
            }
        }
    }
}

/// The pre-batching protocol: one `POST /internal/tasks/:id/complete` per completion. A
/// completion the scheduler refuses (a 4xx other than a lost lease) is replaced by a failure
/// naming the refusal and sent once more, so the attempt still ends with a reason.
async fn send_one_by_one(
    client: &Client,
    token: &Secret,
    budget: Duration,
    hard_stop: &mut watch::Receiver<bool>,
    batch: Vec<Queued>,
) {
    for pending in batch {
        let mut completion = pending.completion;
        // The job goes in the path; a body without `job_id` is what every version takes.
        let Some(job) = completion.job_id.take() else {
            let _ = pending
                .reply
                .send(Delivery::NotDelivered("a completion without a job".into()));
            continue;
        };
        let mut replaced = false;
        let delivery = loop {
            let answer: Result<CompleteResponse, CallError> = client
                .post_retrying(
                    &paths::complete(job),
                    token,
                    &completion,
                    Duration::from_secs(30),
                    budget,
                    hard_stop,
                )
                .await;
            match answer {
                Ok(response) => break Delivery::Applied(response.state),
                Err(err) if err.is_lease_lost() => break Delivery::LeaseLost,
                Err(
                    err @ CallError::Status {
                        status: 400..=499, ..
                    },
                ) if !replaced && !err.is_unauthorized() => {
                    tracing::warn!(job_id = %job, attempt = %completion.attempt, error = %err, "the scheduler refused a completion; reporting the refusal instead");
                    let message = format!("the scheduler refused the attempt's result: {err}");
                    completion = refused(completion, FailureCode::ResultRefused, message);
                    replaced = true;
                }
                Err(err) => break Delivery::NotDelivered(err.to_string()),
            }
        };
        let _ = pending.reply.send(delivery);
    }
}

/// The first completions, at most `max` of them and [`MAX_BATCH_BYTES`] together (at least
/// one, which alone is within [`bounds::MAX_COMPLETION_BYTES`]).
fn take_front(pending: &mut Vec<Queued>, max: usize) -> Vec<Queued> {
    let mut bytes = 0;
    let mut count = 0;
    for item in pending.iter().take(max) {
        if count > 0 && bytes + item.bytes > MAX_BATCH_BYTES {
            break;
        }
        bytes += item.bytes;
        count += 1;
    }
    let rest = pending.split_off(count);
    std::mem::replace(pending, rest)
}

/// Hands each completion its answer from the scheduler's results (matched by job and
/// attempt; one the scheduler did not answer is reported as not delivered).
pub fn resolve(batch: Vec<Queued>, results: Vec<CompletionResult>) {
    for pending in batch {
        let c = &pending.completion;
        let result = results
            .iter()
            .find(|r| Some(r.job_id) == c.job_id && r.attempt == c.attempt);
        let delivery = match result {
            Some(CompletionResult {
                state: Some(state), ..
            }) => Delivery::Applied(*state),
            Some(CompletionResult { error: Some(e), .. }) if e.code == ErrorCode::LeaseLost => {
                Delivery::LeaseLost
            }
            Some(CompletionResult { error: Some(e), .. }) => {
                Delivery::NotDelivered(format!("{}: {}", e.code, e.message))
            }
            _ => Delivery::NotDelivered("the scheduler did not answer this completion".into()),
        };
        let _ = pending.reply.send(delivery);
    }
}

/// Answers a batch whose request failed for good.
pub fn fail(batch: Vec<Queued>, err: &CallError) {
    for pending in batch {
        let delivery = if err.is_lease_lost() {
            Delivery::LeaseLost
        } else {
            Delivery::NotDelivered(err.to_string())
        };
        let _ = pending.reply.send(delivery);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use sluice_protocol::{Attempt, JobId, LeaseToken, Outcome};

    fn completion(id: i64) -> Completion {
        Completion {
            job_id: Some(JobId(id)),
            attempt: Attempt(1),
            lease_token: LeaseToken(uuid::Uuid::new_v4()),
            outcome: Outcome::Succeeded,
            output: serde_json::json!({}),
            error: None,
            retryable: true,
            final_seq: None,
        }
    }

    #[test]
    fn the_carrier_takes_in_order_and_put_back_goes_first() {
        let outbox = Outbox::new(true);
        outbox.await_carrier();
        let _a = outbox.submit(completion(1));
        let _b = outbox.submit(completion(2));
        let _c = outbox.submit(completion(3));
        // While the claim loop is the carrier the flusher takes nothing.
        assert!(outbox.take_for_flush().is_empty());
        let first = outbox.carry(2);
        let ids: Vec<i64> = first
            .iter()
            .map(|p| p.completion.job_id.unwrap().0)
            .collect();
        assert_eq!(ids, [1, 2]);
        // A claim carrying completions is answered at once: the loop stays the carrier.
        assert!(outbox.take_for_flush().is_empty());
        // The claim failed: the completions go back, first, and to the flusher.
        outbox.release_carrier();
        outbox.put_back(first);
        let all: Vec<i64> = outbox
            .take_for_flush()
            .iter()
            .map(|p| p.completion.job_id.unwrap().0)
            .collect();
        assert_eq!(all, [1, 2, 3]);
    }

    #[test]
    fn the_version_the_scheduler_answered_decides_the_forms() {
        let old = Outbox::new(false);
        assert_eq!(
            old.carry_limit(),
            0,
            "a version-1 scheduler gets nothing on claims"
        );
        let batched = Outbox::new(true);
        batched.await_carrier();
        let _a = batched.submit(completion(1));
        assert_eq!(batched.carry_limit(), MAX_BATCH);
        let carried = batched.carry(batched.carry_limit());
        assert_eq!(carried.len(), 1);
        // A claim answered without results for what it carried: sent again, not lost.
        batched.answered_by_claim(carried, Vec::new());
        let back = batched.take_for_flush();
        assert_eq!(
            back.len(),
            1,
            "the completion goes to the flusher, not lost"
        );
        assert_eq!(
            batched.carry_limit(),
            MAX_BATCH,
            "the agreed version still holds"
        );
    }

    #[tokio::test]
    async fn results_are_matched_by_job_and_attempt() {
        let outbox = Outbox::new(true);
        let applied = outbox.submit(completion(1));
        let lost = outbox.submit(completion(2));
        let unanswered = outbox.submit(completion(3));
        let batch = outbox.take_for_flush();
        resolve(
            batch,
            vec![
                CompletionResult {
                    job_id: JobId(2),
                    attempt: Attempt(1),
                    state: None,
                    error: Some(sluice_protocol::ErrorDetail {
                        code: ErrorCode::LeaseLost,
                        message: String::new(),
                        details: None,
                    }),
                },
                CompletionResult {
                    job_id: JobId(1),
                    attempt: Attempt(1),
                    state: Some(JobState::Succeeded),
                    error: None,
                },
            ],
        );
        assert_eq!(
            applied.await.unwrap(),
            Delivery::Applied(JobState::Succeeded)
        );
        assert_eq!(lost.await.unwrap(), Delivery::LeaseLost);
        assert!(matches!(
            unanswered.await.unwrap(),
            Delivery::NotDelivered(_)
        ));
    }
}
