//! The grading service: students and their grades in SQLite.
//!
//! | route | answer |
//! | --- | --- |
//! | `GET /students` | every student with grades and average |
//! | `GET /students/{id}` | one student; 404 if unknown |
//! | `POST /students/{id}/grades` | `{"title":"Quiz 2","type":"quiz","score":92}` adds a grade: 201 with it; 400 naming the bad field; 404 for an unknown student |
//!
//! The database is one file; several instances may share it (WAL mode, a busy
//! timeout). It is seeded with sample students on first start.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};
use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::{DemoError, DiscoveredLog};

/// The kinds of grade.
pub const KINDS: [&str; 3] = ["test", "quiz", "homework"];
/// The longest grade title, in characters.
pub const MAX_TITLE: usize = 100;

/// A student and their grades.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Student {
    /// The student's id.
    pub id: i64,
    /// First name.
    pub first_name: String,
    /// Last name.
    pub last_name: String,
    /// The mean score, if there are grades.
    pub average: Option<f64>,
    /// Oldest first.
    pub grades: Vec<Grade>,
}

/// One grade.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Grade {
    /// The grade's id.
    pub id: i64,
    /// What was graded, e.g. `Quiz 2`.
    pub title: String,
    /// One of [`KINDS`].
    #[serde(rename = "type")]
    pub kind: String,
    /// 0 to 100.
    pub score: f64,
}

/// A grade to add, validated.
#[derive(Debug, Clone, PartialEq)]
pub struct NewGrade {
    title: String,
    kind: String,
    score: f64,
}

impl NewGrade {
    /// Validates a request body: `title` (1 to [`MAX_TITLE`] characters), `type`
    /// (one of [`KINDS`]) and `score` (a number from 0 to 100).
    ///
    /// # Errors
    ///
    /// [`DemoError::BadRequest`] naming the first bad field.
    pub fn parse(body: &[u8]) -> Result<Self, DemoError> {
        let bad = |message: String| DemoError::BadRequest(message);
        let value: Value = serde_json::from_slice(body)
            .map_err(|err| bad(format!("the body is not valid JSON: {err}")))?;
        let Some(object) = value.as_object() else {
            return Err(bad("the body must be a JSON object".into()));
        };
        let title = match object.get("title").and_then(Value::as_str).map(str::trim) {
            Some(title) if !title.is_empty() && title.chars().count() <= MAX_TITLE => title,
            Some(title) if !title.is_empty() => {
                return Err(bad(format!("title: at most {MAX_TITLE} characters")));
            }
            _ => return Err(bad("title: a non-empty string is required".into())),
        };
        let kind = match object.get("type").and_then(Value::as_str) {
            Some(kind) if KINDS.contains(&kind) => kind,
            _ => {
                return Err(bad(format!(
                    "type: one of {} is required",
                    KINDS.join(", ")
                )));
            }
        };
        let score = match object.get("score").and_then(Value::as_f64) {
            Some(score) if (0.0..=100.0).contains(&score) => score,
            _ => return Err(bad("score: a number from 0 to 100 is required".into())),
        };
        Ok(Self {
            title: title.to_owned(),
            kind: kind.to_owned(),
            score,
        })
    }
}

/// The grading database.
#[derive(Debug, Clone)]
pub struct Db {
    connection: Arc<Mutex<Connection>>,
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS students (
    id         INTEGER PRIMARY KEY,
    first_name TEXT NOT NULL,
    last_name  TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS grades (
    id         INTEGER PRIMARY KEY,
    student_id INTEGER NOT NULL REFERENCES students(id),
    title      TEXT NOT NULL,
    kind       TEXT NOT NULL CHECK (kind IN ('test', 'quiz', 'homework')),
    score      REAL NOT NULL CHECK (score BETWEEN 0 AND 100)
);
CREATE INDEX IF NOT EXISTS grades_by_student ON grades (student_id);
";

/// A sample grade: title, kind, score.
type SeedGrade = (&'static str, &'static str, f64);

/// Sample students: first name, last name, grades.
const SEED: [(&str, &str, &[SeedGrade]); 5] = [
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

impl Db {
    /// Opens (creating if needed) the database at `path`, and seeds it when it has
    /// no students.
    ///
    /// # Errors
    ///
    /// [`DemoError::Database`] when the file cannot be opened or written.
    pub fn open(path: &Path) -> Result<Self, DemoError> {
        let mut connection = Connection::open(path)?;
        connection.busy_timeout(Duration::from_secs(5))?;
        connection.pragma_update(None, "journal_mode", "WAL")?;
        connection.pragma_update(None, "foreign_keys", "ON")?;
        connection.execute_batch(SCHEMA)?;
        // IMMEDIATE: two instances starting together seed once.
        let tx = connection.transaction_with_behavior(TransactionBehavior::Immediate)?;
        let students: i64 = tx.query_row("SELECT count(*) FROM students", [], |r| r.get(0))?;
        if students == 0 {
            for (first, last, grades) in SEED {
                tx.execute(
                    "INSERT INTO students (first_name, last_name) VALUES (?1, ?2)",
                    params![first, last],
                )?;
                let id = tx.last_insert_rowid();
                for (title, kind, score) in grades {
                    tx.execute(
                        "INSERT INTO grades (student_id, title, kind, score) VALUES (?1, ?2, ?3, ?4)",
                        params![id, title, kind, score],
                    )?;
                }
            }
        }
        tx.commit()?;
        Ok(Self {
            connection: Arc::new(Mutex::new(connection)),
        })
    }

    /// Runs `work` on the connection on a blocking thread.
    async fn with<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Connection) -> Result<T, DemoError> + Send + 'static,
    ) -> Result<T, DemoError> {
        let connection = self.connection.clone();
        tokio::task::spawn_blocking(move || {
            let mut connection = connection.lock().unwrap_or_else(PoisonError::into_inner);
            work(&mut connection)
        })
        .await
        .map_err(|err| DemoError::Start(format!("database task failed: {err}")))?
    }

    /// Every student, by id.
    ///
    /// # Errors
    ///
    /// [`DemoError::Database`].
    pub async fn students(&self) -> Result<Vec<Student>, DemoError> {
        self.with(|c| load_students(c, None)).await
    }

    /// One student, if known.
    ///
    /// # Errors
    ///
    /// [`DemoError::Database`].
    pub async fn student(&self, id: i64) -> Result<Option<Student>, DemoError> {
        self.with(move |c| Ok(load_students(c, Some(id))?.pop()))
            .await
    }

    /// Adds `grade` to student `id`; `None` if there is no such student.
    ///
    /// # Errors
    ///
    /// [`DemoError::Database`].
    pub async fn add_grade(&self, id: i64, grade: NewGrade) -> Result<Option<Grade>, DemoError> {
        self.with(move |c| {
            let tx = c.transaction_with_behavior(TransactionBehavior::Immediate)?;
            let known = tx
                .query_row("SELECT 1 FROM students WHERE id = ?1", [id], |_| Ok(()))
                .optional()?;
            if known.is_none() {
                return Ok(None);
            }
            tx.execute(
                "INSERT INTO grades (student_id, title, kind, score) VALUES (?1, ?2, ?3, ?4)",
                params![id, grade.title, grade.kind, grade.score],
            )?;
            let added = Grade {
                id: tx.last_insert_rowid(),
                title: grade.title,
                kind: grade.kind,
                score: grade.score,
            };
            tx.commit()?;
            Ok(Some(added))
        })
        .await
    }
}

fn load_students(c: &Connection, only: Option<i64>) -> Result<Vec<Student>, DemoError> {
    let mut students = Vec::new();
    let mut query = c.prepare_cached(
        "SELECT id, first_name, last_name FROM students WHERE ?1 IS NULL OR id = ?1 ORDER BY id",
    )?;
    let rows = query.query_map([only], |row| {
        Ok(Student {
            id: row.get(0)?,
            first_name: row.get(1)?,
            last_name: row.get(2)?,
            average: None,
            grades: Vec::new(),
        })
    })?;
    for row in rows {
        students.push(row?);
    }
    let mut grades = c.prepare_cached(
        "SELECT id, title, kind, score FROM grades WHERE student_id = ?1 ORDER BY id",
    )?;
    for student in &mut students {
        let rows = grades.query_map([student.id], |row| {
            Ok(Grade {
                id: row.get(0)?,
                title: row.get(1)?,
                kind: row.get(2)?,
                score: row.get(3)?,
            })
        })?;
        for row in rows {
            student.grades.push(row?);
        }
        if !student.grades.is_empty() {
            let sum: f64 = student.grades.iter().map(|g| g.score).sum();
            student.average = Some(sum / student.grades.len() as f64);
        }
    }
    Ok(students)
}

#[derive(Clone)]
struct Grading {
    db: Db,
    logs: DiscoveredLog,
}

/// The grading service's routes over `db`; additions are logged through `logs`.
pub fn router(db: Db, logs: DiscoveredLog) -> Router {
    Router::new()
        .route("/students", get(list))
        .route("/students/{id}", get(one))
        .route("/students/{id}/grades", post(add))
        .with_state(Grading { db, logs })
}

fn student_id(text: &str) -> Result<i64, DemoError> {
    text.parse::<i64>()
        .ok()
        .filter(|id| *id > 0)
        .ok_or_else(|| {
            DemoError::BadRequest(format!(
                "student id must be a positive integer, got {text:?}"
            ))
        })
}

async fn list(State(grading): State<Grading>) -> Result<Json<Vec<Student>>, DemoError> {
    Ok(Json(grading.db.students().await?))
}

async fn one(
    State(grading): State<Grading>,
    UrlPath(id): UrlPath<String>,
) -> Result<Json<Student>, DemoError> {
    let id = student_id(&id)?;
    grading
        .db
        .student(id)
        .await?
        .map(Json)
        .ok_or_else(|| DemoError::NotFound(format!("no student with id {id}")))
}

async fn add(
    State(grading): State<Grading>,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> Result<(StatusCode, Json<Grade>), DemoError> {
    let id = student_id(&id)?;
    let grade = NewGrade::parse(&body)?;
    let added = grading
        .db
        .add_grade(id, grade)
        .await?
        .ok_or_else(|| DemoError::NotFound(format!("no student with id {id}")))?;
    grading.logs.line(format!(
        "grade added: student {id}, {} ({}), {}",
        added.title, added.kind, added.score
    ));
    Ok((StatusCode::CREATED, Json(added)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grades_should_be_validated_field_by_field() {
        let ok = NewGrade::parse(br#"{"title":" Quiz 2 ","type":"quiz","score":92.5}"#).unwrap();
        assert_eq!(ok.title, "Quiz 2");
        assert_eq!(ok.score, 92.5);
        for (body, field) in [
            (&b"not json"[..], "valid JSON"),
            (b"[]", "JSON object"),
            (br#"{"type":"quiz","score":1}"#, "title"),
            (br#"{"title":"  ","type":"quiz","score":1}"#, "title"),
            (br#"{"title":"x","type":"exam","score":1}"#, "type"),
            (br#"{"title":"x","type":"quiz","score":101}"#, "score"),
            (br#"{"title":"x","type":"quiz","score":"90"}"#, "score"),
            (br#"{"title":"x","type":"quiz","score":-1}"#, "score"),
        ] {
            let err = NewGrade::parse(body).unwrap_err().to_string();
            assert!(err.contains(field), "{err} should name {field}");
        }
        let long = format!(
            r#"{{"title":"{}","type":"test","score":1}}"#,
            "x".repeat(101)
        );
        assert!(NewGrade::parse(long.as_bytes()).is_err());
    }

    #[tokio::test]
    async fn the_database_should_seed_once_and_keep_added_grades() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("grading.sqlite3");
        let db = Db::open(&path).unwrap();
        let students = db.students().await.unwrap();
        assert_eq!(students.len(), SEED.len());
        let grade = NewGrade::parse(br#"{"title":"Final","type":"test","score":70}"#).unwrap();
        let added = db.add_grade(1, grade.clone()).await.unwrap().unwrap();
        assert_eq!(added.title, "Final");
        assert!(db.add_grade(999, grade).await.unwrap().is_none());
        drop(db);

        // Reopened: not seeded again, and the grade is still there.
        let db = Db::open(&path).unwrap();
        assert_eq!(db.students().await.unwrap().len(), SEED.len());
        let ada = db.student(1).await.unwrap().unwrap();
        assert_eq!(ada.grades.last().unwrap().title, "Final");
        assert_eq!(ada.average, Some((95.0 + 91.0 + 70.0) / 3.0));
        assert!(db.student(999).await.unwrap().is_none());
    }
}
