//! A private cluster's scheduler role and database: the role the scheduler logs in as, the
//! database it owns, and the SCRAM-SHA-256 verifiers that keep passwords off the server. The
//! statements are [`crate::store::provision`]'s.

use sluice::store::{connect_options, PoolConfig};
use sluice::Result;
use sluice_protocol::Secret;

use crate::store::provision::{ensure_database, ensure_role, take_schema};

/// The role the scheduler logs in as, and the database it owns (see [`crate::store::provision`]).
pub const APP_ROLE: &str = "sluice";
pub const APP_DATABASE: &str = "sluice";

/// The scheduler's role and its database, made (or taken over from an earlier sluice's
/// superuser-owned one) with the superuser.
pub async fn provision_app_database(
    superuser: &Secret,
    superuser_in_app_db: &Secret,
    password: &Secret,
) -> Result<()> {
    let options = connect_options(superuser.expose())?;
    let pool = sluice::store::pool(options, &PoolConfig::default());
    ensure_role(&pool, APP_ROLE, password).await?;
    ensure_database(&pool, APP_DATABASE, APP_ROLE).await?;
    pool.close().await;
    let options = connect_options(superuser_in_app_db.expose())?;
    let pool = sluice::store::pool(options, &PoolConfig::default());
    take_schema(&pool, APP_ROLE).await?;
    pool.close().await;
    Ok(())
}

/// The SCRAM-SHA-256 verifier Postgres stores for `password` (RFC 5802 / 7677, as Postgres
/// builds it: 4096 iterations, a random 16-byte salt). `ALTER ROLE … PASSWORD '<verifier>'`
/// stores it as is.
pub fn scram_verifier(password: &str) -> String {
    use base64::Engine;
    use sha2::{Digest, Sha256};
    const ITERATIONS: u32 = 4096;
    let salt = *uuid::Uuid::new_v4().as_bytes();
    // Hi(): PBKDF2 with HMAC-SHA-256, one block.
    let mut block = salt.to_vec();
    block.extend_from_slice(&1u32.to_be_bytes());
    let mut u = hmac_sha256(password.as_bytes(), &block);
    let mut salted = u;
    for _ in 1..ITERATIONS {
        u = hmac_sha256(password.as_bytes(), &u);
        for (s, x) in salted.iter_mut().zip(u) {
            *s ^= x;
        }
    }
    let client_key = hmac_sha256(&salted, b"Client Key");
    let stored_key: [u8; 32] = Sha256::digest(client_key).into();
    let server_key = hmac_sha256(&salted, b"Server Key");
    let b64 = |bytes: &[u8]| base64::engine::general_purpose::STANDARD.encode(bytes);
    format!(
        "SCRAM-SHA-256${ITERATIONS}:{}${}:{}",
        b64(&salt),
        b64(&stored_key),
        b64(&server_key)
    )
}

/// HMAC-SHA-256 (RFC 2104).
fn hmac_sha256(key: &[u8], message: &[u8]) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut block = [0u8; 64];
    if key.len() > 64 {
        block[..32].copy_from_slice(&Sha256::digest(key));
    } else {
        block[..key.len()].copy_from_slice(key);
    }
    let pad = |byte: u8| block.map(|b| b ^ byte);
    let inner = Sha256::new()
        .chain_update(pad(0x36))
        .chain_update(message)
        .finalize();
    Sha256::new()
        .chain_update(pad(0x5c))
        .chain_update(inner)
        .finalize()
        .into()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hmac_matches_rfc_4231() {
        // Test case 2.
        let mac = hmac_sha256(b"Jefe", b"what do ya want for nothing?");
        let hex: String = mac.iter().map(|b| format!("{b:02x}")).collect();
        assert_eq!(
            hex,
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }

    #[test]
    fn a_verifier_has_postgres_shape_and_never_the_password() {
        let verifier = scram_verifier("CANARY-password");
        assert!(verifier.starts_with("SCRAM-SHA-256$4096:"), "{verifier}");
        assert!(!verifier.contains("CANARY"));
        assert_ne!(verifier, scram_verifier("CANARY-password"), "salted");
    }
}
