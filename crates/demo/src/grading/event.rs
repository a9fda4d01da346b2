//! The events of the `grading` topic: the source of truth every view is built from.
//!
//! Each record's value is one JSON object whose `event` field names it
//! (docs/api/demo.md):
//!
//! ```json
//! {"event":"students_seeded","students":[{"first_name":"Ada","last_name":"Lovelace",
//!   "grades":[{"title":"Quiz 1","type":"quiz","score":95}]}]}
//! {"event":"grade_added","student_id":1,"title":"Quiz 2","type":"quiz","score":92}
//! ```

use serde::{Deserialize, Serialize};

use super::NewGrade;

/// The topic grading's events are appended to.
pub const TOPIC: &str = "grading";

/// One event of the topic.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "event", rename_all = "snake_case")]
pub enum Event {
    /// The sample students, appended by the first instance that finds the topic
    /// empty. Applied only to a view without students: when two instances start
    /// together and both append it, every view applies the first and skips the
    /// second, the same way.
    StudentsSeeded {
        /// In the order they get their ids, from 1.
        students: Vec<SeedStudent>,
    },
    /// A grade for a student.
    GradeAdded {
        /// The student's id.
        student_id: i64,
        /// The grade, as validated when it was posted.
        #[serde(flatten)]
        grade: NewGrade,
    },
}

/// A sample student.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SeedStudent {
    /// First name.
    pub first_name: String,
    /// Last name.
    pub last_name: String,
    /// Oldest first.
    pub grades: Vec<NewGrade>,
}

impl Event {
    /// The record value.
    pub fn to_bytes(&self) -> bytes::Bytes {
        // A map of strings and numbers: serializing it cannot fail.
        serde_json::to_vec(self).unwrap_or_default().into()
    }

    /// The event a record holds, if it holds one this version knows.
    ///
    /// # Errors
    ///
    /// Why the value is no event: not JSON, an unknown `event`, a missing field.
    pub fn parse(value: &[u8]) -> Result<Self, String> {
        serde_json::from_slice(value).map_err(|err| err.to_string())
    }
}

/// Sample students: first name, last name, grades (title, type, score).
type Sample = (
    &'static str,
    &'static str,
    &'static [(&'static str, &'static str, f64)],
);

const SAMPLE: [Sample; 5] = [
    (
        "Ada",
        "Lovelace",
        &[("Quiz 1", "quiz", 95.0), ("Midterm", "test", 91.0)],
    ),
    (
        "Alan",
        "Turing",
        &[("Quiz 1", "quiz", 88.0), ("Homework 1", "homework", 97.0)],
    ),
    ("Grace", "Hopper", &[("Quiz 1", "quiz", 92.0)]),
    (
        "Edsger",
        "Dijkstra",
        &[("Homework 1", "homework", 78.0), ("Midterm", "test", 85.0)],
    ),
    ("Barbara", "Liskov", &[]),
];

/// The event that seeds an empty topic with the sample students.
pub(super) fn seed() -> Event {
    Event::StudentsSeeded {
        students: SAMPLE
            .iter()
            .map(|(first, last, grades)| SeedStudent {
                first_name: (*first).to_owned(),
                last_name: (*last).to_owned(),
                grades: grades
                    .iter()
                    .map(|(title, kind, score)| NewGrade {
                        title: (*title).to_owned(),
                        kind: (*kind).to_owned(),
                        score: *score,
                    })
                    .collect(),
            })
            .collect(),
    }
}

/// How many students the seed holds.
#[cfg(test)]
pub(super) const SEEDED_STUDENTS: usize = SAMPLE.len();

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_should_read_back_as_written() {
        let added = Event::GradeAdded {
            student_id: 3,
            grade: NewGrade::parse(br#"{"title":"Quiz 2","type":"quiz","score":92}"#).unwrap(),
        };
        let bytes = added.to_bytes();
        assert_eq!(
            serde_json::from_slice::<serde_json::Value>(&bytes).unwrap(),
            serde_json::json!({
                "event": "grade_added", "student_id": 3,
                "title": "Quiz 2", "type": "quiz", "score": 92.0
            })
        );
        assert_eq!(Event::parse(&bytes).unwrap(), added);
        assert_eq!(Event::parse(&seed().to_bytes()).unwrap(), seed());
        assert!(Event::parse(br#"{"event":"grade_removed","id":1}"#).is_err());
        assert!(Event::parse(b"not json").is_err());
    }
}
