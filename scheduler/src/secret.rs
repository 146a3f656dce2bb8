//! [`Secret`]: a string that never prints itself (defined in the protocol crate, which both
//! the scheduler and the sidecar share).

pub use sluice_protocol::Secret;
