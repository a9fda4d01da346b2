//! Bearer tokens: random, shown once, and stored only as their SHA-256.

use std::fmt::Write;

use ring::rand::SecureRandom;

/// What every token starts with, so that one is recognised in a config or a log.
pub const TOKEN_PREFIX: &str = "keel_";

/// A new token: [`TOKEN_PREFIX`] and 32 random bytes in hex.
///
/// # Errors
///
/// The system's random source failed.
pub fn generate() -> Result<String, ring::error::Unspecified> {
    let mut bytes = [0u8; 32];
    ring::rand::SystemRandom::new().fill(&mut bytes)?;
    Ok(format!("{TOKEN_PREFIX}{}", hex(&bytes)))
}

/// The SHA-256 of `token`, in lowercase hex: what an ACL file stores.
pub fn hash(token: &str) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, token.as_bytes()).as_ref())
}

/// The ACL file's entry for `token`, naming `principal`: what `keel token create`
/// adds, with the token's hash only.
pub fn acl_entry(principal: &str, token: &str) -> String {
    format!(
        "[[token]]\nprincipal = \"{principal}\"\nsha256 = \"{}\"\n",
        hash(token)
    )
}

/// Random bytes in hex (a per-instance secret).
///
/// # Errors
///
/// The system's random source failed.
pub fn random_hex(len: usize) -> Result<String, ring::error::Unspecified> {
    let mut bytes = vec![0u8; len];
    ring::rand::SystemRandom::new().fill(&mut bytes)?;
    Ok(hex(&bytes))
}

/// Lowercase hex of `bytes`.
pub fn hex(bytes: &[u8]) -> String {
    let mut out = String::with_capacity(bytes.len() * 2);
    for byte in bytes {
        let _ = write!(out, "{byte:02x}");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_should_differ_and_hash_to_64_hex_digits() {
        let (a, b) = (generate().expect("a token"), generate().expect("a token"));
        assert_ne!(a, b);
        assert!(a.starts_with(TOKEN_PREFIX) && a.len() == TOKEN_PREFIX.len() + 64);
        assert_eq!(hash(&a).len(), 64);
        assert_ne!(hash(&a), hash(&b));
        // The SHA-256 of "abc" (FIPS 180-2, appendix B.1).
        assert_eq!(
            hash("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }
}
