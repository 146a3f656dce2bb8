//! [`Secret`]: a string that never prints itself.
//!
//! API tokens, runner tokens and the registration secret travel through config structs and
//! error paths; wrapping them makes `{:?}` and `{}` print `***`, so a log line or a panic
//! message cannot leak one by accident.

use std::fmt;

/// A secret string; `Debug` and `Display` print `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    /// Wraps a secret value.
    pub fn new(value: impl Into<String>) -> Self {
        Secret(value.into())
    }

    /// The secret itself, for the one place that must send or compare it.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// A fresh random token (256 bits from the OS generator) with a readable prefix, so that
    /// leaked tokens are easy to find with grep.
    pub fn generate(prefix: &str) -> Self {
        let a = uuid::Uuid::new_v4().simple().to_string();
        let b = uuid::Uuid::new_v4().simple().to_string();
        Secret(format!("{prefix}{a}{b}"))
    }

    /// Compares in time independent of where the first difference is.
    pub fn matches(&self, candidate: &str) -> bool {
        let a = self.0.as_bytes();
        let b = candidate.as_bytes();
        if a.len() != b.len() {
            return false;
        }
        a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl std::str::FromStr for Secret {
    type Err = std::convert::Infallible;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Ok(Secret(s.to_string()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn secrets_do_not_print() {
        let s = Secret::new("CANARY-1");
        assert_eq!(format!("{s:?} {s}"), "*** ***");
        assert!(s.matches("CANARY-1"));
        assert!(!s.matches("CANARY-2"));
        assert!(!s.matches("CANARY-1x"));
    }

    #[test]
    fn generated_tokens_are_distinct_and_prefixed() {
        let a = Secret::generate("sk_");
        let b = Secret::generate("sk_");
        assert!(a.expose().starts_with("sk_"));
        assert_eq!(a.expose().len(), 3 + 64);
        assert_ne!(a, b);
    }
}
