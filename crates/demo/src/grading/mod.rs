//! The grading service: students and their grades, kept as events in the log
//! service's `grading` topic and served from a SQLite view of that topic.
//!
//! | route | answer |
//! | --- | --- |
//! | `GET /students` | every student with grades and average |
//! | `GET /students/{id}` | one student; 404 if unknown |
//! | `POST /students/{id}/grades` | `{"title":"Quiz 2","type":"quiz","score":92}` adds a grade: 201 with it; 400 naming the bad field; 404 for an unknown student |
//! | `GET /view` | this instance's view: its file, applied offset, lag, readiness |
//!
//! ```text
//!  POST ─> grade_added event ─> log service, topic `grading` (replicated)
//!                                   │ ConsumeStream, follow
//!           ┌───────────────────────┴──────────────────────┐
//!   instance 1: grading/grading-1.sqlite3     instance 2: grading/grading-2.sqlite3
//!   (rows + next offset, one transaction)     (the same rows, the same ids)
//! ```
//!
//! A write is acknowledged once the log has stored its event and this instance's
//! view has applied it: a client reads its own writes here, and elsewhere with
//! `?min_offset=` and the offset in the `keel-offset` header. Each instance's file
//! is its own, rebuilt from the topic when missing or damaged; until its view has
//! caught up the instance is not ready (`/readyz`) and is not registered.

mod event;
mod feed;
mod view;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::{HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use bytes::Bytes;
use keel_sdk::Readiness;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::sync::watch;

use crate::{DemoError, DiscoveredLog};
pub use event::{Event, SeedStudent, TOPIC};
pub use feed::LogLink;
pub use view::{Opened, View};

/// The header that carries a view's offset: on a `POST`, the offset of the
/// grade's event; on a `GET`, the last offset the view had applied.
pub const OFFSET_HEADER: &str = "keel-offset";

/// How long a request waits for this instance's view to apply an offset (its own
/// write, or `min_offset`) before it is answered 503.
pub const VIEW_WAIT: Duration = Duration::from_secs(5);

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
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct NewGrade {
    title: String,
    #[serde(rename = "type")]
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
        let value: Value = serde_json::from_slice(body)
            .map_err(|err| DemoError::BadRequest(format!("the body is not valid JSON: {err}")))?;
        let Some(object) = value.as_object() else {
            return Err(DemoError::BadRequest(
                "the body must be a JSON object".into(),
            ));
        };
        Self::checked(
            object.get("title").and_then(Value::as_str).map(str::trim),
            object.get("type").and_then(Value::as_str),
            object.get("score").and_then(Value::as_f64),
        )
    }

    /// Checks a grade read from an event as [`NewGrade::parse`] checks a body (an
    /// event may come from any producer the log lets write to the topic).
    ///
    /// # Errors
    ///
    /// [`DemoError::BadRequest`] naming the first bad field.
    pub fn check(&self) -> Result<(), DemoError> {
        if self.title.trim() != self.title {
            return Err(DemoError::BadRequest(
                "title: no leading or trailing spaces".into(),
            ));
        }
        Self::checked(Some(&self.title), Some(&self.kind), Some(self.score)).map(drop)
    }

    /// The grade, if each field is valid.
    fn checked(
        title: Option<&str>,
        kind: Option<&str>,
        score: Option<f64>,
    ) -> Result<Self, DemoError> {
        let bad = DemoError::BadRequest;
        let title = match title {
            Some(title) if !title.is_empty() && title.chars().count() <= MAX_TITLE => title,
            Some(title) if !title.is_empty() => {
                return Err(bad(format!("title: at most {MAX_TITLE} characters")));
            }
            _ => return Err(bad("title: a non-empty string is required".into())),
        };
        let Some(kind) = kind.filter(|kind| KINDS.contains(kind)) else {
            return Err(bad(format!(
                "type: one of {} is required",
                KINDS.join(", ")
            )));
        };
        let Some(score) = score.filter(|score| (0.0..=100.0).contains(score)) else {
            return Err(bad("score: a number from 0 to 100 is required".into()));
        };
        Ok(Self {
            title: title.to_owned(),
            kind: kind.to_owned(),
            score,
        })
    }
}

/// One instance's view, shared by its handlers and the task that keeps it up to
/// date; cheap to clone.
#[derive(Debug, Clone)]
pub struct Db {
    view: Arc<Mutex<View>>,
    /// The view's next offset, for requests waiting for it.
    applied: Arc<watch::Sender<u64>>,
    path: Arc<PathBuf>,
}

impl Db {
    /// Opens the view at `path` (see [`View::open`]) and says how it was found.
    ///
    /// # Errors
    ///
    /// As [`View::open`].
    pub fn open(path: &Path) -> Result<(Self, Opened), DemoError> {
        let (view, opened) = View::open(path)?;
        let next = view.next_offset()?;
        Ok((
            Self {
                view: Arc::new(Mutex::new(view)),
                applied: Arc::new(watch::Sender::new(next)),
                path: Arc::new(path.to_owned()),
            },
            opened,
        ))
    }

    /// Runs `work` on the view on a blocking thread.
    async fn with<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut View) -> Result<T, DemoError> + Send + 'static,
    ) -> Result<T, DemoError> {
        let view = self.view.clone();
        tokio::task::spawn_blocking(move || {
            let mut view = view.lock().unwrap_or_else(PoisonError::into_inner);
            work(&mut view)
        })
        .await
        .map_err(|err| DemoError::Start(format!("database task failed: {err}")))?
    }

    /// The offset of the next event the view will apply.
    pub fn next_offset(&self) -> u64 {
        *self.applied.borrow()
    }

    /// Applies `records` (see [`View::apply`]) and tells those waiting.
    async fn apply(&self, records: Vec<keel_log_client::Record>) -> Result<u64, DemoError> {
        let next = self.with(move |view| view.apply(&records)).await?;
        self.applied.send_replace(next);
        Ok(next)
    }

    /// Empties the view (see [`View::reset`]).
    async fn reset(&self) -> Result<(), DemoError> {
        self.with(View::reset).await?;
        self.applied.send_replace(0);
        Ok(())
    }

    /// Every student (`None`) or one, and a next offset of the view they were
    /// read from: taken before the read, it may be lower than the view's by the
    /// time of the read, never higher (what a client may pass on as `min_offset`).
    ///
    /// # Errors
    ///
    /// [`DemoError::Database`].
    pub async fn students(&self, only: Option<i64>) -> Result<(Vec<Student>, u64), DemoError> {
        let next = self.next_offset();
        Ok((self.with(move |view| view.students(only)).await?, next))
    }

    /// Whether the view has applied `offset`, waiting up to `within` for it.
    pub async fn wait_applied(&self, offset: u64, within: Duration) -> bool {
        let mut changes = self.applied.subscribe();
        tokio::time::timeout(within, changes.wait_for(|next| *next > offset))
            .await
            .is_ok_and(|waited| waited.is_ok())
    }
}

/// What `GET /view` says of an instance's view.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ViewStatus {
    /// The instance's name.
    pub instance: String,
    /// Its SQLite file.
    pub file: String,
    /// The topic it is a view of.
    pub topic: String,
    /// The last offset applied; `None` before the first.
    pub applied_offset: Option<u64>,
    /// The topic's next offset, when the log service answered.
    pub topic_next_offset: Option<u64>,
    /// Events in the topic not yet applied, when the log service answered.
    pub lag: Option<u64>,
    /// Whether the instance takes requests (it has caught up since it started).
    pub ready: bool,
    /// Why not, when it does not.
    pub reason: Option<String>,
}

/// A grading instance's parts.
#[derive(Clone)]
struct Grading {
    db: Db,
    log: Arc<LogLink>,
    logs: DiscoveredLog,
    readiness: Readiness,
    instance: Arc<str>,
}

/// A running grading instance: its routes, its readiness (for
/// [`keel_sdk::Service::with_readiness`]) and the task that follows the topic
/// (aborted when dropped).
pub struct Started {
    /// The routes.
    pub router: Router,
    /// Ready once the view has caught up with the topic.
    pub readiness: Readiness,
    /// The task that keeps the view up to date.
    pub follower: tokio::task::JoinHandle<()>,
}

/// Starts the instance named `instance` on the view `db`: follows the topic
/// through `log` in the background, and logs additions through `logs`.
pub fn start(db: Db, instance: &str, log: LogLink, logs: DiscoveredLog) -> Started {
    let readiness = Readiness::not_ready("building the view from the grading topic");
    let log = Arc::new(log);
    let follower = tokio::spawn(feed::follow(db.clone(), log.clone(), readiness.clone()));
    let router = Router::new()
        .route("/students", get(list))
        .route("/students/{id}", get(one))
        .route("/students/{id}/grades", post(add))
        .route("/view", get(status))
        .with_state(Grading {
            db,
            log,
            logs,
            readiness: readiness.clone(),
            instance: instance.into(),
        });
    Started {
        router,
        readiness,
        follower,
    }
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

/// `min_offset` from a query string, if given.
fn min_offset(query: &HashMap<String, String>) -> Result<Option<u64>, DemoError> {
    query
        .get("min_offset")
        .map(|text| {
            text.parse::<u64>().map_err(|_| {
                DemoError::BadRequest(format!(
                    "min_offset must be an offset (a whole number from 0), got {text:?}"
                ))
            })
        })
        .transpose()
}

impl Grading {
    /// Waits for the view to apply `min_offset`, if the query names one.
    async fn caught_up(&self, query: &HashMap<String, String>) -> Result<(), DemoError> {
        match min_offset(query)? {
            Some(offset) if !self.db.wait_applied(offset, VIEW_WAIT).await => {
                Err(DemoError::Unavailable(format!(
                    "this instance's view has not applied offset {offset} within {} s (it has applied up to {}); try again, or another instance",
                    VIEW_WAIT.as_secs(),
                    applied(self.db.next_offset()).map_or_else(|| "none".into(), |o| o.to_string()),
                )))
            }
            _ => Ok(()),
        }
    }
}

/// The last offset applied, from the next one.
fn applied(next: u64) -> Option<u64> {
    next.checked_sub(1)
}

/// `answer` with the `keel-offset` header, when there is an offset.
fn with_offset(answer: impl IntoResponse, offset: Option<u64>) -> Response {
    let mut response = answer.into_response();
    if let Some(offset) = offset {
        response
            .headers_mut()
            .insert(OFFSET_HEADER, HeaderValue::from(offset));
    }
    response
}

async fn list(
    State(grading): State<Grading>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, DemoError> {
    grading.caught_up(&query).await?;
    let (students, next) = grading.db.students(None).await?;
    Ok(with_offset(Json(students), applied(next)))
}

async fn one(
    State(grading): State<Grading>,
    UrlPath(id): UrlPath<String>,
    Query(query): Query<HashMap<String, String>>,
) -> Result<Response, DemoError> {
    let id = student_id(&id)?;
    grading.caught_up(&query).await?;
    let (mut students, next) = grading.db.students(Some(id)).await?;
    let student = students
        .pop()
        .ok_or_else(|| DemoError::NotFound(format!("no student with id {id}")))?;
    Ok(with_offset(Json(student), applied(next)))
}

async fn add(
    State(grading): State<Grading>,
    UrlPath(id): UrlPath<String>,
    body: Bytes,
) -> Result<Response, DemoError> {
    let id = student_id(&id)?;
    let grade = NewGrade::parse(&body)?;
    if let Some(reason) = grading.readiness.reason() {
        return Err(DemoError::Unavailable(format!(
            "this instance is not ready: {reason}"
        )));
    }
    if !grading.db.with(move |view| view.has_student(id)).await? {
        return Err(DemoError::NotFound(format!("no student with id {id}")));
    }
    let started = std::time::Instant::now();
    let offset = grading
        .log
        .append(&Event::GradeAdded {
            student_id: id,
            grade,
        })
        .await?;
    let appended = started.elapsed();
    let applied = grading.db.wait_applied(offset, VIEW_WAIT).await;
    tracing::debug!(
        offset,
        append_us = appended.as_micros(),
        apply_us = (started.elapsed() - appended).as_micros(),
        "grade added"
    );
    if !applied {
        let err = DemoError::Unavailable(format!(
            "the grade is stored (offset {offset} of the grading topic), but this instance's view has not applied it within {} s; read it with ?min_offset={offset}",
            VIEW_WAIT.as_secs()
        ));
        return Ok(with_offset(err, Some(offset)));
    }
    let db = grading.db.clone();
    let added = db
        .with(move |view| view.grade_at(offset))
        .await?
        .ok_or_else(|| {
            DemoError::Start(format!(
                "the event at offset {offset} of the grading topic added no grade"
            ))
        })?;
    grading.logs.line(format!(
        "grade added: student {id}, {} ({}), {} at offset {offset}",
        added.title, added.kind, added.score
    ));
    Ok(with_offset(
        (StatusCode::CREATED, Json(added)),
        Some(offset),
    ))
}

async fn status(State(grading): State<Grading>) -> Json<ViewStatus> {
    let end = feed::topic_end(&grading.log).await;
    let next = grading.db.next_offset();
    Json(ViewStatus {
        instance: grading.instance.to_string(),
        file: grading.db.path.display().to_string(),
        topic: TOPIC.to_owned(),
        applied_offset: applied(next),
        topic_next_offset: end,
        lag: end.map(|end| end.saturating_sub(next)),
        ready: grading.readiness.is_ready(),
        reason: grading.readiness.reason(),
    })
}

/// Whether `name` can name an instance (and its file): 1 to 64 letters, digits,
/// `.`, `_` or `-`, not starting with `.`.
pub fn valid_instance(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
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

    #[test]
    fn instance_names_should_be_safe_file_names() {
        for good in ["grading-1", "web.host_2", "a"] {
            assert!(valid_instance(good), "{good}");
        }
        for bad in ["", ".hidden", "a/b", "../x", "a b", &"x".repeat(65)] {
            assert!(!valid_instance(bad), "{bad}");
        }
    }
}
