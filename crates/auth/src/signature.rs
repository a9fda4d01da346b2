//! Signed notifications: the registry signs what it sends to an instance's update
//! URL with the secret the instance got when it registered, and the instance checks
//! the signature, so that nobody else can rewrite its discovery table.
//!
//! `Keel-Signature: v1=<hex HMAC-SHA256(secret, METHOD "\n" INDEX "\n" BODY)>`, where
//! `INDEX` is the `Keel-Index` header's value: a signature fits one method, change
//! and body only.

/// The header that carries the signature.
pub const SIGNATURE_HEADER: &str = "keel-signature";

/// The header that carries an instance's secret in the answer to its registration.
pub const SECRET_HEADER: &str = "keel-instance-secret";

fn key(secret: &str) -> ring::hmac::Key {
    ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret.as_bytes())
}

fn message(method: &str, index: u64, body: &[u8]) -> Vec<u8> {
    let mut message = format!("{method}\n{index}\n").into_bytes();
    message.extend_from_slice(body);
    message
}

/// The `Keel-Signature` value of a notification.
pub fn sign(secret: &str, method: &str, index: u64, body: &[u8]) -> String {
    let tag = ring::hmac::sign(&key(secret), &message(method, index, body));
    format!("v1={}", crate::token::hex(tag.as_ref()))
}

/// Whether `header` is the signature of this notification under `secret` (compared
/// in constant time).
pub fn verify(secret: &str, header: &str, method: &str, index: u64, body: &[u8]) -> bool {
    let Some(tag) = header.strip_prefix("v1=").and_then(unhex) else {
        return false;
    };
    ring::hmac::verify(&key(secret), &message(method, index, body), &tag).is_ok()
}

fn unhex(text: &str) -> Option<Vec<u8>> {
    if !text.len().is_multiple_of(2) {
        return None;
    }
    (0..text.len())
        .step_by(2)
        .map(|at| u8::from_str_radix(text.get(at..at + 2)?, 16).ok())
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_signature_should_fit_its_secret_method_index_and_body_only() {
        let signature = sign("s3cret", "POST", 7, b"{\"id\":\"a\"}");
        assert!(verify("s3cret", &signature, "POST", 7, b"{\"id\":\"a\"}"));
        assert!(!verify("other", &signature, "POST", 7, b"{\"id\":\"a\"}"));
        assert!(!verify(
            "s3cret",
            &signature,
            "DELETE",
            7,
            b"{\"id\":\"a\"}"
        ));
        assert!(!verify("s3cret", &signature, "POST", 8, b"{\"id\":\"a\"}"));
        assert!(!verify("s3cret", &signature, "POST", 7, b"{\"id\":\"b\"}"));
        assert!(!verify("s3cret", "v1=zz", "POST", 7, b"{\"id\":\"a\"}"));
        assert!(!verify("s3cret", "", "POST", 7, b"{\"id\":\"a\"}"));
        // RFC 4231, test case 2.
        let tag = ring::hmac::sign(
            &ring::hmac::Key::new(ring::hmac::HMAC_SHA256, b"Jefe"),
            b"what do ya want for nothing?",
        );
        assert_eq!(
            crate::token::hex(tag.as_ref()),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
