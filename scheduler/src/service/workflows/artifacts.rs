//! Workflow artifacts over the internal API (chunk upload, seal, a dependent's download) and
//! the public download. The scheduler stores chunks as they come and hands them out one at a
//! time: it never holds a whole archive, and never reads one — the sidecars pack, check
//! (SHA-256, paths, types, sizes) and unpack.

use axum::body::{Body, Bytes};
use serde_json::Value;
use sluice_protocol::{bounds, ArtifactSeal, ArtifactSealResponse, Attempt, JobId, LeaseToken};

use crate::service::Context;
use crate::store::artifacts::{self, Lease, Seal};
use crate::store::runners::RunnerIdentity;
use crate::{Error, Result};

fn lease(
    runner: &RunnerIdentity,
    job: JobId,
    attempt: Attempt,
    token: sluice_protocol::LeaseToken,
) -> Lease {
    Lease {
        runner: runner.id,
        job,
        attempt,
        lease_token: token,
    }
}

fn check_seq(seq: u32) -> Result<()> {
    if seq >= bounds::MAX_ARTIFACT_CHUNKS {
        return Err(Error::invalid(
            "seq",
            format!(
                "must be below {} (artifacts of at most {} MiB)",
                bounds::MAX_ARTIFACT_CHUNKS,
                (bounds::MAX_ARTIFACT_CHUNKS as usize * bounds::ARTIFACT_CHUNK_BYTES) >> 20
            ),
        ));
    }
    Ok(())
}

/// `PUT /internal/tasks/:id/artifacts/:seq`: stores one chunk under the attempt's lease.
pub async fn put_chunk(
    ctx: &Context,
    runner: &RunnerIdentity,
    job: JobId,
    seq: u32,
    (attempt, token): (Attempt, LeaseToken),
    data: &[u8],
) -> Result<()> {
    check_seq(seq)?;
    if data.len() > bounds::ARTIFACT_CHUNK_BYTES {
        return Err(Error::invalid(
            "body",
            format!(
                "a chunk holds at most {} bytes",
                bounds::ARTIFACT_CHUNK_BYTES
            ),
        ));
    }
    let lease = lease(runner, job, attempt, token);
    if !artifacts::put_chunk_if_leased(&ctx.pool, lease, seq, data).await? {
        return Err(Error::LeaseLost);
    }
    Ok(())
}

/// `POST /internal/tasks/:id/artifacts`: seals the uploaded chunks.
pub async fn seal(
    ctx: &Context,
    runner: &RunnerIdentity,
    job: JobId,
    seal: ArtifactSeal,
) -> Result<ArtifactSealResponse> {
    if seal.chunks > bounds::MAX_ARTIFACT_CHUNKS {
        return Err(Error::invalid(
            "chunks",
            format!("must be at most {}", bounds::MAX_ARTIFACT_CHUNKS),
        ));
    }
    if seal.bytes > seal.chunks as u64 * bounds::ARTIFACT_CHUNK_BYTES as u64 {
        return Err(Error::invalid("bytes", "exceeds what the chunks can hold"));
    }
    if seal.sha256.len() != 64 || !seal.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err(Error::invalid("sha256", "must be 64 hexadecimal digits"));
    }
    if seal.entries > i64::MAX as u64 {
        return Err(Error::invalid("entries", "is too large"));
    }
    if seal.skipped.len() > bounds::MAX_ARTIFACT_SKIPPED {
        return Err(Error::invalid(
            "skipped",
            format!("lists at most {} paths", bounds::MAX_ARTIFACT_SKIPPED),
        ));
    }
    let skipped: Vec<String> = seal
        .skipped
        .iter()
        .map(|path| path.replace('\0', "\u{FFFD}").chars().take(4096).collect())
        .collect();
    let skipped = Value::from(skipped);
    let sha256 = seal.sha256.to_ascii_lowercase();
    let found = artifacts::seal_if_leased(
        &ctx.pool,
        lease(runner, job, seal.attempt, seal.lease_token),
        Seal {
            chunks: seal.chunks,
            bytes: seal.bytes,
            sha256: &sha256,
            entries: seal.entries,
            skipped: &skipped,
        },
    )
    .await?;
    if !found.leased {
        return Err(Error::LeaseLost);
    }
    if !found.sealed {
        return Err(Error::invalid(
            "chunks",
            format!(
                "{} chunks of {} bytes are stored below chunk {}, not {} of {}",
                found.chunks, found.bytes, seal.chunks, seal.chunks, seal.bytes
            ),
        ));
    }
    tracing::debug!(job_id = %job, attempt = %seal.attempt, bytes = seal.bytes, "artifacts sealed");
    Ok(ArtifactSealResponse { sealed: true })
}

/// `GET /internal/tasks/:id/inputs/:source/:seq`: one chunk of a set of the same run, for
/// the attempt holding the lease.
pub async fn input_chunk(
    ctx: &Context,
    runner: &RunnerIdentity,
    job: JobId,
    (source, source_attempt): (JobId, Attempt),
    seq: u32,
    (attempt, token): (Attempt, LeaseToken),
) -> Result<Vec<u8>> {
    check_seq(seq)?;
    let lease = lease(runner, job, attempt, token);
    match artifacts::input_chunk_if_leased(&ctx.pool, lease, source, source_attempt, seq).await? {
        None => Err(Error::LeaseLost),
        Some(None) => Err(Error::NotFound("artifact chunk")),
        Some(Some(data)) => Ok(data),
    }
}

/// A step's artifacts for download: the archive's size and digest, and its body, streamed a
/// chunk at a time.
pub struct Download {
    pub bytes: u64,
    pub sha256: String,
    pub entries: i64,
    pub skipped: Value,
    pub body: Body,
}

/// `GET /api/runs/:id/artifacts/:step`.
pub async fn download(ctx: &Context, run: i64, step: &str) -> Result<Download> {
    let Some((job, attempt, chunks, bytes, sha256, entries, skipped)) =
        artifacts::step_set(&ctx.pool, run, step).await?
    else {
        return Err(Error::NotFound("artifacts"));
    };
    let pool = ctx.pool.clone();
    let stream = futures_util::stream::unfold(0, move |seq| {
        let pool = pool.clone();
        async move {
            if seq >= chunks {
                return None;
            }
            let chunk = match artifacts::chunk(&pool, job, attempt, seq).await {
                Ok(Some(data)) => Ok(Bytes::from(data)),
                // Pruned while it was read: the body ends short, and the client sees an error.
                Ok(None) => Err(std::io::Error::other("the artifacts were deleted")),
                Err(err) => Err(std::io::Error::other(err.to_string())),
            };
            let next = if chunk.is_ok() { seq + 1 } else { chunks };
            Some((chunk, next))
        }
    });
    Ok(Download {
        bytes: bytes as u64,
        sha256,
        entries,
        skipped,
        body: Body::from_stream(stream),
    })
}
