//! Topic names: what a name may be (names are directory names).

use crate::error::LogServiceError;

/// The longest topic name.
pub const MAX_TOPIC_NAME: usize = 128;

/// Checks a topic name: 1 to 128 characters of `A-Z a-z 0-9 . _ -`, not starting
/// with a dot (names are directory names).
///
/// # Errors
///
/// [`LogServiceError::InvalidTopic`] naming the rule that is broken.
pub fn validate_topic_name(name: &str) -> Result<(), LogServiceError> {
    let invalid = |reason| {
        Err(LogServiceError::InvalidTopic {
            name: name.chars().take(MAX_TOPIC_NAME + 8).collect(),
            reason,
        })
    };
    if name.is_empty() {
        return invalid("it is empty");
    }
    if name.len() > MAX_TOPIC_NAME {
        return invalid("it is longer than 128 characters");
    }
    if name.starts_with('.') {
        return invalid("it starts with a dot");
    }
    if !name
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return invalid("only letters, digits, '.', '_' and '-' are allowed");
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn topic_names_should_be_safe_directory_names() {
        for good in ["a", "orders", "orders.v2", "a_b-c", &"x".repeat(128)] {
            assert!(validate_topic_name(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            ".",
            "..",
            ".hidden",
            "a/b",
            "a b",
            "é",
            "../etc",
            &"x".repeat(129),
        ] {
            assert!(
                matches!(
                    validate_topic_name(bad),
                    Err(LogServiceError::InvalidTopic { .. })
                ),
                "{bad:?}"
            );
        }
    }
}
