//! Names matched against patterns where `*` stands for any run of characters (none
//! included) and `?` for any one.

/// Whether `name` matches `pattern`.
pub(crate) fn matches(pattern: &str, name: &str) -> bool {
    let (pattern, name): (Vec<char>, Vec<char>) =
        (pattern.chars().collect(), name.chars().collect());
    // The classic two-pointer match: on a mismatch, the last `*` takes one more
    // character. Linear in practice, and never exponential.
    let (mut p, mut n) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while n < name.len() {
        match pattern.get(p) {
            Some('*') => {
                star = Some((p, n));
                p += 1;
            }
            Some(&c) if c == '?' || c == name[n] => {
                p += 1;
                n += 1;
            }
            _ => match star {
                Some((at, taken)) => {
                    p = at + 1;
                    n = taken + 1;
                    star = Some((at, taken + 1));
                }
                None => return false,
            },
        }
    }
    pattern[p..].iter().all(|c| *c == '*')
}

#[cfg(test)]
mod tests {
    use super::matches;

    #[test]
    fn stars_and_question_marks_should_match_as_in_a_shell() {
        for (pattern, name) in [
            ("*", ""),
            ("*", "anything"),
            ("logs", "logs"),
            ("grading-*", "grading-"),
            ("grading-*", "grading-2026"),
            ("*-events", "visit-events"),
            ("a*b*c", "aXbYc"),
            ("a*b*c", "abc"),
            ("node-?", "node-1"),
        ] {
            assert!(matches(pattern, name), "{pattern} should match {name}");
        }
        for (pattern, name) in [
            ("logs", "logs2"),
            ("logs", "log"),
            ("grading-*", "grading"),
            ("*-events", "visit-event"),
            ("a*b*c", "aXbY"),
            ("node-?", "node-10"),
            ("", "x"),
        ] {
            assert!(!matches(pattern, name), "{pattern} should not match {name}");
        }
    }
}
