//! Password hashing: Argon2id with the `argon2` crate's defaults (OWASP's
//! m=19 MiB, t=2, p=1), stored as PHC strings so parameters can be raised
//! later without breaking old hashes.

use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};
use argon2::Argon2;

use super::DirectoryError;

/// A valid hash of a random password: verifying against it when the login
/// does not exist takes as long as a real check, so timing does not reveal
/// which logins exist.
const DECOY_HASH: &str =
    "$argon2id$v=19$m=19456,t=2,p=1$9oBqXNvCDOmHiXPdVHPg1Q$gXhJhWcPB/aL+Q2hZqBDIwYjbThrfyakW7Tpsw0bT9c";

pub fn hash(password: &str) -> Result<String, DirectoryError> {
    let mut salt = [0u8; 16];
    getrandom::getrandom(&mut salt).map_err(|e| DirectoryError::Hash(e.to_string()))?;
    let salt = SaltString::encode_b64(&salt).map_err(|e| DirectoryError::Hash(e.to_string()))?;
    let phc =
        Argon2::default().hash_password(password.as_bytes(), &salt).map_err(|e| DirectoryError::Hash(e.to_string()))?;
    Ok(phc.to_string())
}

/// True if `password` matches the PHC string. A malformed stored hash never matches.
pub fn verify(phc: &str, password: &str) -> bool {
    match PasswordHash::new(phc) {
        Ok(parsed) => Argon2::default().verify_password(password.as_bytes(), &parsed).is_ok(),
        Err(_) => false,
    }
}

/// Burns the time of one verification; always false.
pub fn verify_decoy(password: &str) -> bool {
    let _ = verify(DECOY_HASH, password);
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hashes_are_argon2id_phc_strings_with_random_salts() {
        let a = hash("correct horse").unwrap();
        let b = hash("correct horse").unwrap();
        assert!(a.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"), "{a}");
        assert_ne!(a, b);
        assert!(verify(&a, "correct horse"));
        assert!(!verify(&a, "correct horsE"));
        assert!(!verify("not a hash", "x"));
    }

    #[test]
    fn decoy_hash_parses_and_never_matches() {
        assert!(PasswordHash::new(DECOY_HASH).is_ok());
        assert!(!verify_decoy(""));
    }
}
