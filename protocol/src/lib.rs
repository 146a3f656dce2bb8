//! The contracts of sluice, as plain serde types with public fields and no behaviour beyond
//! parsing: the runner wire contract between scheduler and sidecar, and the public API.
//!
//! This crate is the API boundary between the processes. It does no I/O and depends on
//! neither side, so a change here is a change of a contract: of the wire
//! ([`PROTOCOL_VERSION`]) or of the public API.
//!
//! # Layout
//!
//! - [`ids`](crate::JobId): ids and the fencing triple ([`JobId`], [`Attempt`], [`LeaseToken`],
//!   [`RunnerId`], [`LeaseRef`], [`AttemptRef`]), the job states, and [`Secret`], the
//!   redacting wrapper both sides keep tokens in;
//! - job specs, tagged by `kind`: [`JobSpec`] and its variants, [`parse_spec`];
//! - [`wire`]: the internal runner endpoints ([`paths`]), the version, their bodies, and the
//!   names both sides match on ([`CancelReason`], [`EventKind`], [`ErrorCode`],
//!   [`FailureCode`]);
//! - [`api`]: the public API's paths and bodies;
//! - [`bounds`]: the documented range of every input, and the NUL checks both sides share.

#![forbid(unsafe_code)]

pub mod api;
pub mod bounds;
mod ids;
mod session;
mod spec;
pub mod wire;

pub use ids::*;
pub use session::cap_history;
pub use spec::*;
pub use wire::*;
