//! One instance's view of the `grading` topic: a SQLite file of its own.
//!
//! The view holds the students and grades the topic's events describe, and the
//! offset of the next event to apply, written in the same transaction as the rows
//! that event made: each event is applied once, also across a crash (a transaction
//! is all or nothing). The file is the instance's alone (a lock file next to it
//! keeps a second process out); it is a cache of the topic, so a missing, damaged
//! or foreign file is set aside and the view is built again from offset 0.

use std::fs::File;
use std::path::{Path, PathBuf};

use keel_log_client::Record;
use rusqlite::{Connection, OptionalExtension, TransactionBehavior, params};

use super::event::Event;
use super::{Grade, NewGrade, Student};
use crate::DemoError;

/// The layout this version writes (`PRAGMA user_version`); a file with another is
/// rebuilt.
const VERSION: i64 = 1;

const SCHEMA: &str = "
CREATE TABLE view_state (
    id          INTEGER PRIMARY KEY CHECK (id = 1),
    next_offset INTEGER NOT NULL,
    -- The timestamp of the topic's record 0: which topic the view was built from.
    origin_ms   INTEGER
);
INSERT INTO view_state (id, next_offset) VALUES (1, 0);
CREATE TABLE students (
    id         INTEGER PRIMARY KEY,
    first_name TEXT NOT NULL,
    last_name  TEXT NOT NULL
);
CREATE TABLE grades (
    id           INTEGER PRIMARY KEY,
    student_id   INTEGER NOT NULL REFERENCES students(id),
    title        TEXT NOT NULL,
    kind         TEXT NOT NULL CHECK (kind IN ('test', 'quiz', 'homework')),
    score        REAL NOT NULL CHECK (score BETWEEN 0 AND 100),
    event_offset INTEGER NOT NULL
);
CREATE INDEX grades_by_student ON grades (student_id);
CREATE INDEX grades_by_event ON grades (event_offset);
";

/// How the file was found when the view opened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Opened {
    /// It held a view: applying goes on from its offset.
    Kept,
    /// There was none: the view is built from offset 0.
    Created,
    /// It could not be used (the reason); it was set aside as the named file, and
    /// the view is built from offset 0.
    Rebuilt {
        /// Why it could not be used.
        reason: String,
        /// Where the old file is now.
        set_aside: PathBuf,
    },
}

/// The view: its connection, and the lock that keeps it this process's.
#[derive(Debug)]
pub struct View {
    connection: Connection,
    _lock: File,
}

impl View {
    /// Opens the view at `path`, creating it, or setting aside a file that cannot
    /// be used and starting a new one.
    ///
    /// # Errors
    ///
    /// Another process holds the view ([`DemoError::Start`]); the directory cannot
    /// be written.
    pub fn open(path: &Path) -> Result<(Self, Opened), DemoError> {
        let lock = lock(path)?;
        let existed = path.exists();
        let (connection, opened) = match existed.then(|| open_existing(path)) {
            None => (create(path)?, Opened::Created),
            Some(Ok(connection)) => (connection, Opened::Kept),
            Some(Err(reason)) => {
                let set_aside = set_aside(path)?;
                (create(path)?, Opened::Rebuilt { reason, set_aside })
            }
        };
        Ok((
            Self {
                connection,
                _lock: lock,
            },
            opened,
        ))
    }

    /// The offset of the next event to apply: every event before it is applied.
    ///
    /// # Errors
    ///
    /// [`DemoError::Database`].
    pub fn next_offset(&self) -> Result<u64, DemoError> {
        next_offset(&self.connection)
    }

    /// The timestamp of the record at offset 0 of the topic the view was built
    /// from; `None` before it is applied.
    ///
    /// # Errors
    ///
    /// [`DemoError::Database`].
    pub fn origin_ms(&self) -> Result<Option<u64>, DemoError> {
        let origin: Option<i64> =
            self.connection
                .query_row("SELECT origin_ms FROM view_state", [], |r| r.get(0))?;
        Ok(origin.and_then(|ms| u64::try_from(ms).ok()))
    }

    /// Forgets every row and starts again from offset 0 (the topic is not the one
    /// this view was built from).
    ///
    /// # Errors
    ///
    /// [`DemoError::Database`].
    pub fn reset(&mut self) -> Result<(), DemoError> {
        let tx = self.connection.transaction()?;
        tx.execute_batch(
            "DELETE FROM grades; DELETE FROM students;
             UPDATE view_state SET next_offset = 0, origin_ms = NULL;",
        )?;
        tx.commit()?;
        Ok(())
    }

    /// Applies `records` (consecutive, from the topic) in one transaction, those
    /// before the view's offset skipped; returns the new next offset. An event this
    /// version cannot read, or one that does not fit the view (a grade for an
    /// unknown student), is skipped the same way by every view, and logged.
    ///
    /// # Errors
    ///
    /// [`DemoError::Database`]; [`DemoError::Unavailable`] when the records start
    /// past the view's offset (a gap: records the view needs are gone).
    pub fn apply(&mut self, records: &[Record]) -> Result<u64, DemoError> {
        let tx = self
            .connection
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let mut next = next_offset(&tx)?;
        for record in records {
            if record.offset < next {
                continue;
            }
            if record.offset > next {
                return Err(DemoError::Unavailable(format!(
                    "the grading topic has no records from offset {next} to {}: the view cannot apply them",
                    record.offset
                )));
            }
            if record.offset == 0 {
                tx.execute(
                    "UPDATE view_state SET origin_ms = ?1",
                    [to_sql(record.timestamp_ms)],
                )?;
            }
            apply_one(&tx, record)?;
            next += 1;
        }
        tx.execute("UPDATE view_state SET next_offset = ?1", [to_sql(next)])?;
        tx.commit()?;
        Ok(next)
    }

    /// Every student (`None`) or one, by id.
    ///
    /// # Errors
    ///
    /// [`DemoError::Database`].
    pub fn students(&self, only: Option<i64>) -> Result<Vec<Student>, DemoError> {
        load_students(&self.connection, only)
    }

    /// The grade the `grade_added` event at `offset` made, if it made one.
    ///
    /// # Errors
    ///
    /// [`DemoError::Database`].
    pub fn grade_at(&self, offset: u64) -> Result<Option<Grade>, DemoError> {
        Ok(self
            .connection
            .query_row(
                "SELECT id, title, kind, score FROM grades WHERE event_offset = ?1",
                [to_sql(offset)],
                grade_row,
            )
            .optional()?)
    }

    /// Whether student `id` exists.
    ///
    /// # Errors
    ///
    /// [`DemoError::Database`].
    pub fn has_student(&self, id: i64) -> Result<bool, DemoError> {
        Ok(has_student(&self.connection, id)?)
    }
}

/// Offsets are `u64`; SQLite's integers `i64`. No topic reaches 2^63 records.
fn to_sql(offset: u64) -> i64 {
    i64::try_from(offset).unwrap_or(i64::MAX)
}

fn next_offset(c: &Connection) -> Result<u64, DemoError> {
    let next: i64 = c
        .prepare_cached("SELECT next_offset FROM view_state")?
        .query_row([], |r| r.get(0))?;
    Ok(u64::try_from(next).unwrap_or(0))
}

fn has_student(c: &Connection, id: i64) -> rusqlite::Result<bool> {
    Ok(
        c.query_row("SELECT 1 FROM students WHERE id = ?1", [id], |_| Ok(()))
            .optional()?
            .is_some(),
    )
}

fn apply_one(tx: &Connection, record: &Record) -> Result<(), DemoError> {
    let offset = to_sql(record.offset);
    let skip = |why: &str| {
        tracing::warn!(offset, why, "grading event skipped");
    };
    match Event::parse(&record.value) {
        Err(err) => skip(&format!("not an event this version reads: {err}")),
        Ok(Event::StudentsSeeded { students }) => {
            let count: i64 = tx.query_row("SELECT count(*) FROM students", [], |r| r.get(0))?;
            if count > 0 {
                tracing::debug!(offset, "the students are seeded already; seed skipped");
                return Ok(());
            }
            for student in students {
                tx.execute(
                    "INSERT INTO students (first_name, last_name) VALUES (?1, ?2)",
                    params![student.first_name, student.last_name],
                )?;
                let id = tx.last_insert_rowid();
                for grade in &student.grades {
                    insert_grade(tx, id, grade, offset)?;
                }
            }
        }
        Ok(Event::GradeAdded { student_id, grade }) => {
            if let Err(err) = grade.check() {
                skip(&err.to_string());
            } else if !has_student(tx, student_id)? {
                skip(&format!("no student with id {student_id}"));
            } else {
                insert_grade(tx, student_id, &grade, offset)?;
            }
        }
    }
    Ok(())
}

fn insert_grade(
    tx: &Connection,
    student: i64,
    grade: &NewGrade,
    offset: i64,
) -> rusqlite::Result<()> {
    tx.execute(
        "INSERT INTO grades (student_id, title, kind, score, event_offset) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![student, grade.title, grade.kind, grade.score, offset],
    )?;
    Ok(())
}

/// Takes the lock file next to `path`: one process per view.
fn lock(path: &Path) -> Result<File, DemoError> {
    let lock_path = path.with_extension("lock");
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&lock_path)
        .map_err(|err| DemoError::Start(format!("opening {}: {err}", lock_path.display())))?;
    match file.try_lock() {
        Ok(()) => Ok(file),
        Err(std::fs::TryLockError::WouldBlock) => Err(DemoError::Start(format!(
            "{} is in use by another grading process: give each instance its own --instance name",
            path.display()
        ))),
        Err(std::fs::TryLockError::Error(err)) => Err(DemoError::Start(format!(
            "locking {}: {err}",
            lock_path.display()
        ))),
    }
}

fn configure(connection: &Connection) -> rusqlite::Result<()> {
    connection.pragma_update(None, "journal_mode", "WAL")?;
    // The topic is the source of truth: a view that loses its last transactions
    // to a power cut applies them again, from the offset it kept.
    connection.pragma_update(None, "synchronous", "NORMAL")?;
    connection.pragma_update(None, "foreign_keys", "ON")
}

/// The file at `path`, if it holds a sound view of this version; else why not.
fn open_existing(path: &Path) -> Result<Connection, String> {
    let connection = Connection::open(path).map_err(|err| err.to_string())?;
    let check: String = connection
        .query_row("PRAGMA quick_check", [], |r| r.get(0))
        .map_err(|err| err.to_string())?;
    if check != "ok" {
        return Err(format!("SQLite's check failed: {check}"));
    }
    let version: i64 = connection
        .query_row("PRAGMA user_version", [], |r| r.get(0))
        .map_err(|err| err.to_string())?;
    if version != VERSION {
        return Err(format!(
            "its layout is version {version}; this version writes {VERSION}"
        ));
    }
    configure(&connection).map_err(|err| err.to_string())?;
    next_offset(&connection).map_err(|err| err.to_string())?;
    Ok(connection)
}

fn create(path: &Path) -> Result<Connection, DemoError> {
    let mut connection = Connection::open(path)?;
    configure(&connection)?;
    let tx = connection.transaction()?;
    tx.execute_batch(SCHEMA)?;
    tx.pragma_update(None, "user_version", VERSION)?;
    tx.commit()?;
    Ok(connection)
}

/// Moves the file at `path` (and its WAL) aside, as `<name>.damaged-<ms>`.
fn set_aside(path: &Path) -> Result<PathBuf, DemoError> {
    let ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis());
    let mut aside = path.as_os_str().to_owned();
    aside.push(format!(".damaged-{ms}"));
    let aside = PathBuf::from(aside);
    std::fs::rename(path, &aside)
        .map_err(|err| DemoError::Start(format!("setting {} aside: {err}", path.display())))?;
    for suffix in ["-wal", "-shm"] {
        let mut side = path.as_os_str().to_owned();
        side.push(suffix);
        // A WAL belongs to the file set aside; it must not be replayed into the new one.
        let _ = std::fs::remove_file(PathBuf::from(side));
    }
    Ok(aside)
}

fn grade_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<Grade> {
    Ok(Grade {
        id: row.get(0)?,
        title: row.get(1)?,
        kind: row.get(2)?,
        score: row.get(3)?,
    })
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
        for row in grades.query_map([student.id], grade_row)? {
            student.grades.push(row?);
        }
        if !student.grades.is_empty() {
            let sum: f64 = student.grades.iter().map(|g| g.score).sum();
            student.average = Some(sum / student.grades.len() as f64);
        }
    }
    Ok(students)
}

#[cfg(test)]
mod tests {
    use super::super::event::{SEEDED_STUDENTS, seed};
    use super::*;

    fn record(offset: u64, event: &Event) -> Record {
        Record {
            offset,
            timestamp_ms: 1_000 + offset,
            value: event.to_bytes(),
        }
    }

    fn grade(student_id: i64, title: &str) -> Event {
        Event::GradeAdded {
            student_id,
            grade: NewGrade {
                title: title.into(),
                kind: "quiz".into(),
                score: 80.0,
            },
        }
    }

    #[test]
    fn each_event_should_be_applied_once_and_every_view_should_agree() {
        let dir = tempfile::tempdir().unwrap();
        let events = [
            record(0, &seed()),
            record(1, &seed()),
            record(2, &grade(1, "Final")),
            record(3, &grade(99, "Nobody")),
            Record {
                offset: 4,
                timestamp_ms: 0,
                value: bytes::Bytes::from_static(b"{\"event\":\"unknown\"}"),
            },
            record(5, &grade(2, "Essay")),
        ];
        let (mut a, opened) = View::open(&dir.path().join("a.sqlite3")).unwrap();
        assert_eq!(opened, Opened::Created);
        // In two batches, the second overlapping the first: applied once.
        assert_eq!(a.apply(&events[..3]).unwrap(), 3);
        assert_eq!(a.apply(&events[1..]).unwrap(), 6);
        assert_eq!(a.apply(&events[..]).unwrap(), 6);
        let (mut b, _) = View::open(&dir.path().join("b.sqlite3")).unwrap();
        assert_eq!(b.apply(&events).unwrap(), 6);

        let students = a.students(None).unwrap();
        // The second seed changed nothing; the grade for student 99 was skipped.
        assert_eq!(students.len(), SEEDED_STUDENTS);
        let grades = |s: &[Student]| -> Vec<(i64, i64, String)> {
            s.iter()
                .flat_map(|st| st.grades.iter().map(|g| (st.id, g.id, g.title.clone())))
                .collect()
        };
        assert_eq!(grades(&students), grades(&b.students(None).unwrap()));
        assert_eq!(a.grade_at(2).unwrap().unwrap().title, "Final");
        assert!(a.grade_at(3).unwrap().is_none());
        assert_eq!(
            a.grade_at(5).unwrap().unwrap().id,
            b.grade_at(5).unwrap().unwrap().id
        );

        // A gap is refused, and nothing of the batch is applied.
        let err = a.apply(&[record(7, &grade(1, "Late"))]).unwrap_err();
        assert!(err.to_string().contains("from offset 6 to 7"), "{err}");
        assert_eq!(a.next_offset().unwrap(), 6);
    }

    #[test]
    fn a_reopened_view_should_go_on_from_its_offset() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.sqlite3");
        let (mut view, _) = View::open(&path).unwrap();
        view.apply(&[record(0, &seed()), record(1, &grade(1, "Final"))])
            .unwrap();
        // One process per file.
        let err = View::open(&path).unwrap_err().to_string();
        assert!(err.contains("--instance"), "{err}");
        drop(view);
        let (view, opened) = View::open(&path).unwrap();
        assert_eq!(opened, Opened::Kept);
        assert_eq!(view.next_offset().unwrap(), 2);
        assert!(view.has_student(1).unwrap());
        // Which topic it was built from: record 0's timestamp.
        assert_eq!(view.origin_ms().unwrap(), Some(1_000));
        let mut view = view;
        view.reset().unwrap();
        assert_eq!(view.origin_ms().unwrap(), None);
        assert_eq!(view.next_offset().unwrap(), 0);
        assert!(view.students(None).unwrap().is_empty());
    }

    #[test]
    fn a_damaged_or_foreign_file_should_be_set_aside_and_the_view_started_again() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("g.sqlite3");
        std::fs::write(&path, vec![0x5a; 8192]).unwrap();
        let (view, opened) = View::open(&path).unwrap();
        let Opened::Rebuilt { reason, set_aside } = opened else {
            panic!("{opened:?}")
        };
        assert!(reason.contains("not a database"), "{reason}");
        assert_eq!(std::fs::read(&set_aside).unwrap(), vec![0x5a; 8192]);
        assert_eq!(view.next_offset().unwrap(), 0);
        drop(view);

        // A database of another layout (the one every instance once shared).
        std::fs::remove_file(&path).unwrap();
        let old = Connection::open(&path).unwrap();
        old.execute_batch("CREATE TABLE students (id INTEGER PRIMARY KEY);")
            .unwrap();
        drop(old);
        let (_view, opened) = View::open(&path).unwrap();
        assert!(
            matches!(&opened, Opened::Rebuilt { reason, .. } if reason.contains("version 0")),
            "{opened:?}"
        );
    }
}
