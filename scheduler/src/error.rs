//! The scheduler's one error type. Variants are what a caller can act on; the HTTP layer maps
//! each to a status in one place (`api::AppError`).

use sluice_protocol::error_code;

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
    /// The request is JSON but a field is wrong.
    #[error("invalid {field}: {reason}")]
    Invalid { field: &'static str, reason: String },
    /// The job spec is not one the runners can run.
    #[error("{0}")]
    InvalidSpec(String),
    /// The body exceeds the size limit.
    #[error("request body is larger than {limit_bytes} bytes")]
    TooLarge { limit_bytes: usize },
    /// The request conflicts with stored state (other than a lost lease).
    #[error("{0}")]
    Conflict(String),
    /// Postgres cannot be reached; retry later.
    #[error("database unavailable: {0}")]
    Unavailable(String),
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
    pub fn code(&self) -> &'static str {
        match self {
            Error::NotFound(_) => error_code::NOT_FOUND,
            Error::LeaseLost => error_code::LEASE_LOST,
            Error::Unauthorized(_) => error_code::UNAUTHORIZED,
            Error::Forbidden(_) => error_code::FORBIDDEN,
            Error::Malformed(_) => error_code::MALFORMED,
            Error::Invalid { .. } => error_code::INVALID,
            Error::InvalidSpec(_) => error_code::INVALID_SPEC,
            Error::TooLarge { .. } => error_code::TOO_LARGE,
            Error::Conflict(_) => error_code::CONFLICT,
            Error::Unavailable(_) => error_code::UNAVAILABLE,
            Error::Setup(_) | Error::Internal(_) => error_code::INTERNAL,
        }
    }

    /// Shorthand for [`Error::Invalid`].
    pub fn invalid(field: &'static str, reason: impl Into<String>) -> Self {
        Error::Invalid {
            field,
            reason: reason.into(),
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
