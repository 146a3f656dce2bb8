//! The scheduler's one error type. Variants are what a caller can act on; the HTTP layer maps
//! each to a status in one place (`api::AppError`).

use sluice_protocol::ErrorCode;

/// Errors of the scheduler library.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The job, runner or route does not exist (or is not the caller's to see).
    #[error("{0} not found")]
    NotFound(&'static str),
    /// The attempt named by a runner write no longer holds the lease.
    #[error("the attempt no longer holds the lease")]
    LeaseLost,
    /// Missing or wrong credentials.
    #[error("{0}")]
    Unauthorized(&'static str),
    /// Valid credentials, but not for this.
    #[error("{0}")]
    Forbidden(String),
    /// The body is not JSON at all.
    #[error("malformed JSON: {0}")]
    Malformed(String),
    /// The request is JSON but a field is wrong; `field` names it (a path such as
    /// `jobs[3].spec.env.FOO` where it is nested).
    #[error("invalid {field}: {reason}")]
    Invalid { field: String, reason: String },
    /// The job spec is not one the runners can run.
    #[error("{0}")]
    InvalidSpec(String),
    /// A workflow definition with problems: each as (where, what).
    #[error("the definition has {} problem(s): {}", .0.len(), .0.iter().map(|(at, what)| format!("{at}: {what}")).collect::<Vec<_>>().join("; "))]
    InvalidDefinition(Vec<(String, String)>),
    /// The body, or a part of it (`what`: "request body", "spec"), exceeds its size limit.
    #[error("{what} is larger than {limit_bytes} bytes")]
    TooLarge {
        what: &'static str,
        limit_bytes: usize,
    },
    /// The client took too long to send its request.
    #[error("timed out {0}")]
    Timeout(&'static str),
    /// No wire version both the runner and this scheduler speak; the message names both.
    #[error("{0}")]
    ProtocolMismatch(String),
    /// The request conflicts with stored state (other than a lost lease).
    #[error("{0}")]
    Conflict(String),
    /// Postgres cannot be reached; retry later.
    #[error("database unavailable: {0}")]
    Unavailable(String),
    /// The scheduler is at a limit of its own (event streams open); retry later.
    #[error("{0}")]
    Overloaded(String),
    /// The statement lost a deadlock or a serialization conflict and was rolled back whole;
    /// the same request may be retried at once. (Not an outage: runners do not ride it out.)
    #[error("the database rolled the statement back ({0}); retry")]
    Busy(String),
    /// The machine lacks something a command needs (Postgres binaries, `sluice-runner`); the
    /// message says what to install or set.
    #[error("{0}")]
    Setup(String),
    /// A bug or an unexpected database error.
    #[error("internal error: {0}")]
    Internal(String),
}

/// `Result` with the scheduler's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The stable machine-readable code sent in `{"error":{"code"}}`.
    pub fn code(&self) -> ErrorCode {
        match self {
            Error::NotFound(_) => ErrorCode::NotFound,
            Error::LeaseLost => ErrorCode::LeaseLost,
            Error::Unauthorized(_) => ErrorCode::Unauthorized,
            Error::Forbidden(_) => ErrorCode::Forbidden,
            Error::Malformed(_) => ErrorCode::Malformed,
            Error::Invalid { .. } => ErrorCode::Invalid,
            Error::InvalidSpec(_) => ErrorCode::InvalidSpec,
            Error::InvalidDefinition(_) => ErrorCode::InvalidDefinition,
            Error::TooLarge { .. } => ErrorCode::TooLarge,
            Error::Timeout(_) => ErrorCode::Timeout,
            Error::Conflict(_) => ErrorCode::Conflict,
            Error::ProtocolMismatch(_) => ErrorCode::ProtocolMismatch,
            Error::Unavailable(_) | Error::Overloaded(_) => ErrorCode::Unavailable,
            Error::Busy(_) => ErrorCode::Busy,
            Error::Setup(_) | Error::Internal(_) => ErrorCode::Internal,
        }
    }

    /// Shorthand for [`Error::Invalid`].
    pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Error::Invalid {
            field: field.into(),
            reason: reason.into(),
        }
    }

    /// [`Error::Invalid`] for the first NUL character in `value` (Postgres stores NUL neither
    /// in `text` nor in `jsonb`), if it holds one.
    pub fn if_nul(field: &str, value: &serde_json::Value) -> Result<(), Error> {
        match sluice_protocol::bounds::nul_path(value) {
            Some(path) => Err(Error::invalid(
                sluice_protocol::bounds::field_path(field, &path),
                "must not contain NUL characters",
            )),
            None => Ok(()),
        }
    }

    /// [`Error::Invalid`] if the string `value` holds a NUL character.
    pub fn if_nul_str(field: &str, value: &str) -> Result<(), Error> {
        if value.contains('\0') {
            Err(Error::invalid(field, "must not contain NUL characters"))
        } else {
            Ok(())
        }
    }
}

impl From<sqlx::Error> for Error {
    fn from(err: sqlx::Error) -> Self {
        match &err {
            sqlx::Error::Io(_)
            | sqlx::Error::Tls(_)
            | sqlx::Error::PoolTimedOut
            | sqlx::Error::PoolClosed
            | sqlx::Error::WorkerCrashed => Error::Unavailable(err.to_string()),
            sqlx::Error::Database(db) => match db.code().as_deref() {
                // check_violation: the jobs trigger and the CHECK constraints.
                Some("23514") => {
                    let message = db.message().trim_start_matches("sluice: ").to_string();
                    if message.contains("kind") || message.contains("spec") {
                        Error::InvalidSpec(message)
                    } else {
                        Error::invalid("request", message)
                    }
                }
                // The server is shutting down or restarting, or the connection was cut.
                Some(code) if code.starts_with("57P") || code.starts_with("08") => {
                    Error::Unavailable(db.message().to_string())
                }
                // A deadlock or serialization failure rolled the statement back whole: the
                // same request may well succeed, so it is a 503 (retried), never a 500.
                Some("40P01" | "40001") => Error::Busy(db.message().to_string()),
                // Values Postgres cannot store or compute with (a NUL byte, a timestamp or a
                // number out of range): they come from the request, whose fields are checked
                // before any statement, so this is the backstop — the request cannot be
                // applied as it is.
                Some("22021" | "22P05" | "22008" | "22003" | "22007" | "22P02") => {
                    Error::invalid("request", db.message().to_string())
                }
                _ => Error::Internal(err.to_string()),
            },
            _ => Error::Internal(err.to_string()),
        }
    }
}

impl From<sqlx::migrate::MigrateError> for Error {
    fn from(err: sqlx::migrate::MigrateError) -> Self {
        match err {
            sqlx::migrate::MigrateError::Execute(inner) => inner.into(),
            other => Error::Internal(other.to_string()),
        }
    }
}
