//! The portal: one server-rendered page.
//!
//! `GET /` shows the students and their grades (from grading), a form to add a
//! grade (`POST /grades`, then a redirect back that shows the new grade: it asks
//! grading with `min_offset`), each grading instance's view (applied offset and
//! lag), the registry's table of instances with their health, and the last 50
//! lines of the `logs` topic. Each section that cannot be loaded says why; the
//! others still show.
//!
//! Behind the gateway with a stripped prefix, links follow `X-Forwarded-Prefix`.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use axum::Router;
use axum::extract::{Form, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::{Html, IntoResponse, Response};
use axum::routing::{get, post};
use keel_sdk::{Discovery, RegistryClient, WatchedInstance};
use serde_json::json;

use crate::discovered_log::LogLine;
use crate::grading::{KINDS, OFFSET_HEADER, Student, ViewStatus};
use crate::html::escape;
use crate::{DemoError, DiscoveredLog, get_json, pick_url};

/// How many lines of the `logs` topic the page shows.
pub const LOG_LINES: u64 = 50;
/// How long the page waits for each source.
const SOURCE_TIMEOUT: Duration = Duration::from_secs(2);

/// The portal's state: where to find grading, the registry and the log service.
#[derive(Debug, Clone)]
pub struct Portal {
    discovery: Discovery,
    http: reqwest::Client,
    registry: RegistryClient,
    logs: DiscoveredLog,
}

impl Portal {
    /// A portal that finds grading through `discovery` and reads the registry (with
    /// the token, when the registry has an ACL).
    pub fn new(
        discovery: Discovery,
        http: reqwest::Client,
        (registry, token): (&str, Option<&str>),
        logs: DiscoveredLog,
    ) -> Self {
        Self {
            discovery,
            registry: RegistryClient::new(registry, http.clone()).with_token(token),
            http,
            logs,
        }
    }

    /// The students, from a view that has applied `min_offset` when given.
    async fn students(&self, min_offset: Option<u64>) -> Result<Vec<Student>, DemoError> {
        let grading = pick_url(&self.discovery, "grading")?;
        let url = match min_offset {
            Some(offset) => format!("{grading}/students?min_offset={offset}"),
            None => format!("{grading}/students"),
        };
        let request = self.http.get(url);
        // A view waits up to 5 s for the offset.
        get_json(request.timeout(SOURCE_TIMEOUT * 3), "grading").await
    }

    /// Each grading instance's view, by URL (an error for one that did not answer).
    async fn views(&self) -> Vec<(String, Result<ViewStatus, DemoError>)> {
        let mut urls: Vec<String> = self
            .discovery
            .instances("grading")
            .into_iter()
            .map(|instance| instance.url)
            .collect();
        urls.sort();
        let asks = urls.into_iter().map(|url| async move {
            let request = self.http.get(format!("{url}/view"));
            let status = get_json(request.timeout(SOURCE_TIMEOUT * 2), "grading").await;
            (url, status)
        });
        futures::future::join_all(asks).await
    }

    async fn instances(&self) -> Result<Vec<WatchedInstance>, DemoError> {
        let table = match tokio::time::timeout(SOURCE_TIMEOUT, self.registry.services()).await {
            Ok(answer) => answer
                .map_err(|err| DemoError::Unavailable(format!("the registry failed: {err}")))?,
            Err(_) => {
                return Err(DemoError::Unavailable(
                    "the registry failed: timed out".into(),
                ));
            }
        };
        let mut instances = table.instances;
        instances.sort_by(|a, b| (&a.name, &a.url).cmp(&(&b.name, &b.url)));
        Ok(instances)
    }

    async fn log_lines(&self) -> Result<Vec<LogLine>, DemoError> {
        tokio::time::timeout(SOURCE_TIMEOUT, self.logs.last("logs", LOG_LINES))
            .await
            .unwrap_or_else(|_| Err(DemoError::Unavailable("the log service timed out".into())))
    }
}

/// The portal's routes.
pub fn router(portal: Portal) -> Router {
    Router::new()
        .route("/", get(page))
        .route("/grades", post(add_grade))
        .with_state(portal)
}

/// The path prefix the gateway stripped, if it says so and it is a plain segment.
fn prefix(headers: &HeaderMap) -> String {
    headers
        .get("x-forwarded-prefix")
        .and_then(|v| v.to_str().ok())
        .filter(|p| {
            p.len() > 1
                && p.starts_with('/')
                && p[1..]
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"-._~".contains(&b))
        })
        .unwrap_or_default()
        .to_owned()
}

/// A message shown above the form.
enum Flash {
    Added(String),
    Failed(String),
}

/// What the form sent, kept to fill it again after an error.
#[derive(Default)]
struct Draft {
    student: String,
    title: String,
    kind: String,
    score: String,
}

async fn page(
    State(portal): State<Portal>,
    headers: HeaderMap,
    Query(query): Query<HashMap<String, String>>,
) -> Html<String> {
    let flash = query.get("added").map(|who| Flash::Added(who.clone()));
    let min_offset = query.get("min_offset").and_then(|o| o.parse().ok());
    Html(
        render(
            &portal,
            &prefix(&headers),
            (flash, min_offset),
            &Draft::default(),
        )
        .await,
    )
}

async fn add_grade(
    State(portal): State<Portal>,
    headers: HeaderMap,
    Form(form): Form<HashMap<String, String>>,
) -> Response {
    let field = |name: &str| form.get(name).cloned().unwrap_or_default();
    let draft = Draft {
        student: field("student"),
        title: field("title"),
        kind: field("type"),
        score: field("score"),
    };
    let prefix = prefix(&headers);
    match post_grade(&portal, &draft).await {
        Ok((name, offset)) => {
            let mut location = format!("{prefix}/?added={}", percent_encode(&name));
            if let Some(offset) = offset {
                let _ = write!(location, "&min_offset={offset}");
            }
            (StatusCode::SEE_OTHER, [(header::LOCATION, location)]).into_response()
        }
        Err((status, message)) => {
            let page = render(
                &portal,
                &prefix,
                (Some(Flash::Failed(message)), None),
                &draft,
            )
            .await;
            (status, Html(page)).into_response()
        }
    }
}

/// Sends the grade to grading; its validation is the one that counts. Answers the
/// student's name and the grade's offset, or the status and message to show.
async fn post_grade(
    portal: &Portal,
    draft: &Draft,
) -> Result<(String, Option<u64>), (StatusCode, String)> {
    let unavailable = |err: String| (StatusCode::SERVICE_UNAVAILABLE, err);
    let Ok(id) = draft.student.parse::<i64>() else {
        return Err((StatusCode::BAD_REQUEST, "choose a student".into()));
    };
    let score = draft
        .score
        .trim()
        .parse::<f64>()
        .map_or_else(|_| json!(draft.score), |n| json!(n));
    let grading =
        pick_url(&portal.discovery, "grading").map_err(|err| unavailable(err.to_string()))?;
    let response = portal
        .http
        .post(format!("{grading}/students/{id}/grades"))
        .json(&json!({"title": draft.title, "type": draft.kind, "score": score}))
        .send()
        .await
        .map_err(|err| unavailable(format!("grading failed: {err}")))?;
    let status = response.status();
    let offset = response
        .headers()
        .get(OFFSET_HEADER)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    let body: serde_json::Value = response.json().await.unwrap_or_default();
    if status.is_success() {
        // Only for the message: the grade is in, whatever this answers.
        let student = portal.http.get(format!("{grading}/students/{id}"));
        let name = match get_json::<Student>(student.timeout(SOURCE_TIMEOUT), "grading").await {
            Ok(s) => format!("{} {}", s.first_name, s.last_name),
            Err(_) => format!("student {id}"),
        };
        return Ok((name, offset));
    }
    let message = body["error"]["message"]
        .as_str()
        .map_or_else(|| format!("grading answered {status}"), str::to_owned);
    let status = StatusCode::from_u16(status.as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
    Err((status, message))
}

fn percent_encode(text: &str) -> String {
    let mut out = String::new();
    for b in text.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

const STYLE: &str = r#"
:root { --ink:#1d2330; --muted:#5f6b7a; --line:#e3e7ee; --bg:#f5f7fa; --accent:#2f5bd3;
        --ok:#1f8a4c; --bad:#c0392b; --warn:#b7791f; }
* { box-sizing: border-box; }
body { margin:0; font: 15px/1.5 system-ui, -apple-system, "Segoe UI", Roboto, sans-serif;
       color:var(--ink); background:var(--bg); }
header { background:#16213e; color:#fff; padding:18px 32px; display:flex; align-items:baseline; gap:16px; }
header h1 { margin:0; font-size:22px; letter-spacing:.5px; }
header span { color:#b8c2d9; }
main { max-width:1180px; margin:24px auto; padding:0 24px; display:grid;
       grid-template-columns: 2fr 1fr; gap:20px; }
section { background:#fff; border:1px solid var(--line); border-radius:10px; padding:18px 20px; }
section.wide { grid-column: 1 / -1; }
h2 { margin:0 0 12px; font-size:17px; }
table { width:100%; border-collapse:collapse; }
th, td { text-align:left; padding:8px 10px; border-bottom:1px solid var(--line); vertical-align:top; }
th { color:var(--muted); font-weight:600; font-size:13px; text-transform:uppercase; letter-spacing:.4px; }
td.num { text-align:right; font-variant-numeric: tabular-nums; }
.chip { display:inline-block; margin:2px 4px 2px 0; padding:1px 8px; border-radius:12px;
        background:#eef2fb; color:#2a3d73; font-size:13px; white-space:nowrap; }
.badge { padding:1px 8px; border-radius:12px; font-size:12px; font-weight:600; color:#fff; }
.passing { background:var(--ok); } .critical { background:var(--bad); } .unknown, .warning { background:var(--warn); }
form { display:grid; gap:10px; }
label { display:grid; gap:4px; font-size:13px; color:var(--muted); }
input, select { font:inherit; padding:7px 9px; border:1px solid #cfd6e2; border-radius:6px; background:#fff; }
button { font:inherit; font-weight:600; padding:9px; border:0; border-radius:6px; background:var(--accent); color:#fff; cursor:pointer; }
.flash { padding:10px 12px; border-radius:6px; margin-bottom:12px; }
.flash.ok { background:#e6f4ec; color:var(--ok); } .flash.bad { background:#fbeaea; color:var(--bad); }
.unavailable { color:var(--bad); }
pre { margin:0; max-height:360px; overflow:auto; background:#0f1524; color:#d6deeb; padding:12px 14px;
      border-radius:8px; font: 12.5px/1.55 ui-monospace, SFMono-Regular, Menlo, monospace; }
pre .t { color:#7f8ea3; }
.muted { color:var(--muted); }
"#;

async fn render(
    portal: &Portal,
    prefix: &str,
    (flash, min_offset): (Option<Flash>, Option<u64>),
    draft: &Draft,
) -> String {
    let (students, views, instances, lines) = tokio::join!(
        portal.students(min_offset),
        portal.views(),
        portal.instances(),
        portal.log_lines()
    );
    let mut page = String::with_capacity(16 * 1024);
    let _ = write!(
        page,
        r#"<!doctype html><html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>keel portal</title><style>{STYLE}</style></head><body>
<header><h1>keel portal</h1><span>students, grades and the system behind them</span></header>
<main>"#
    );

    page.push_str(r#"<section><h2>Students</h2>"#);
    match &students {
        Ok(students) => students_table(&mut page, students),
        Err(err) => unavailable(&mut page, err),
    }
    page.push_str("</section>");

    page.push_str(r#"<section><h2>Add a grade</h2>"#);
    match &flash {
        Some(Flash::Added(who)) => {
            let _ = write!(
                page,
                r#"<div class="flash ok">Grade added for {}.</div>"#,
                escape(who)
            );
        }
        Some(Flash::Failed(message)) => {
            let _ = write!(page, r#"<div class="flash bad">{}</div>"#, escape(message));
        }
        None => {}
    }
    grade_form(&mut page, prefix, students.as_deref().unwrap_or(&[]), draft);
    page.push_str("</section>");

    page.push_str(
        r#"<section class="wide"><h2>Grading views <span class="muted">(each instance's SQLite view of the <code>grading</code> topic)</span></h2>"#,
    );
    views_table(&mut page, &views);
    page.push_str("</section>");

    page.push_str(r#"<section class="wide"><h2>Services</h2>"#);
    match &instances {
        Ok(instances) => services_table(&mut page, instances),
        Err(err) => unavailable(&mut page, err),
    }
    page.push_str("</section>");

    let _ = write!(
        page,
        r#"<section class="wide"><h2>Log <span class="muted">(last {LOG_LINES} lines of the <code>logs</code> topic)</span></h2>"#
    );
    match &lines {
        Ok(lines) => log_box(&mut page, lines),
        Err(err) => unavailable(&mut page, err),
    }
    page.push_str("</section></main></body></html>\n");
    page
}

fn unavailable(page: &mut String, err: &DemoError) {
    let _ = write!(
        page,
        r#"<p class="unavailable">{}</p>"#,
        escape(&err.to_string())
    );
}

fn students_table(page: &mut String, students: &[Student]) {
    page.push_str(
        r#"<table id="students"><thead><tr><th>Student</th><th>Grades</th><th class="num">Average</th></tr></thead><tbody>"#,
    );
    for s in students {
        let _ = write!(
            page,
            "<tr><td>{} {}</td><td>",
            escape(&s.first_name),
            escape(&s.last_name)
        );
        if s.grades.is_empty() {
            page.push_str(r#"<span class="muted">no grades yet</span>"#);
        }
        for g in &s.grades {
            let _ = write!(
                page,
                r#"<span class="chip" title="{}">{} · {}</span>"#,
                escape(&g.kind),
                escape(&g.title),
                g.score
            );
        }
        let average = s
            .average
            .map_or_else(|| "–".to_owned(), |a| format!("{a:.1}"));
        let _ = write!(page, r#"</td><td class="num">{average}</td></tr>"#);
    }
    page.push_str("</tbody></table>");
}

fn grade_form(page: &mut String, prefix: &str, students: &[Student], draft: &Draft) {
    let _ = write!(
        page,
        r#"<form method="post" action="{}/grades"><label>Student<select name="student" required>"#,
        escape(prefix)
    );
    for s in students {
        let selected = if draft.student == s.id.to_string() {
            " selected"
        } else {
            ""
        };
        let _ = write!(
            page,
            r#"<option value="{}"{selected}>{} {}</option>"#,
            s.id,
            escape(&s.first_name),
            escape(&s.last_name)
        );
    }
    let _ = write!(
        page,
        r#"</select></label><label>Title<input name="title" maxlength="100" placeholder="Quiz 2" value="{}" required></label><label>Type<select name="type">"#,
        escape(&draft.title)
    );
    for kind in KINDS {
        let selected = if draft.kind == kind { " selected" } else { "" };
        let _ = write!(page, r#"<option value="{kind}"{selected}>{kind}</option>"#);
    }
    let _ = write!(
        page,
        r#"</select></label><label>Score (0–100)<input name="score" inputmode="decimal" placeholder="92" value="{}" required></label><button type="submit">Add grade</button></form>"#,
        escape(&draft.score)
    );
}

fn services_table(page: &mut String, instances: &[WatchedInstance]) {
    page.push_str(
        r#"<table id="services"><thead><tr><th>Service</th><th>Instance</th><th>Health</th></tr></thead><tbody>"#,
    );
    for i in instances {
        let class = match i.health.as_str() {
            "passing" | "critical" | "warning" => i.health.as_str(),
            _ => "unknown",
        };
        let _ = write!(
            page,
            r#"<tr><td>{}</td><td><code>{}</code></td><td><span class="badge {class}">{}</span></td></tr>"#,
            escape(&i.name),
            escape(&i.url),
            escape(&i.health)
        );
    }
    if instances.is_empty() {
        page.push_str(r#"<tr><td colspan="3" class="muted">no instances registered</td></tr>"#);
    }
    page.push_str("</tbody></table>");
}

fn views_table(page: &mut String, views: &[(String, Result<ViewStatus, DemoError>)]) {
    page.push_str(
        r#"<table id="views"><thead><tr><th>Instance</th><th>URL</th><th class="num">Applied offset</th><th class="num">Lag</th><th>State</th></tr></thead><tbody>"#,
    );
    let or_dash = |n: Option<u64>| n.map_or_else(|| "–".to_owned(), |n| n.to_string());
    for (url, view) in views {
        match view {
            Ok(view) => {
                let (class, state) = if view.ready {
                    ("passing", "ready".to_owned())
                } else {
                    (
                        "warning",
                        view.reason.clone().unwrap_or_else(|| "not ready".into()),
                    )
                };
                let _ = write!(
                    page,
                    r#"<tr><td>{}</td><td><code>{}</code></td><td class="num">{}</td><td class="num">{}</td><td><span class="badge {class}">{}</span></td></tr>"#,
                    escape(&view.instance),
                    escape(url),
                    or_dash(view.applied_offset),
                    or_dash(view.lag),
                    escape(&state)
                );
            }
            Err(err) => {
                let _ = write!(
                    page,
                    r#"<tr><td class="muted">?</td><td><code>{}</code></td><td colspan="3" class="unavailable">{}</td></tr>"#,
                    escape(url),
                    escape(&err.to_string())
                );
            }
        }
    }
    if views.is_empty() {
        page.push_str(
            r#"<tr><td colspan="5" class="muted">no grading instance is available</td></tr>"#,
        );
    }
    page.push_str("</tbody></table>");
}

fn log_box(page: &mut String, lines: &[LogLine]) {
    page.push_str(r#"<pre id="log">"#);
    if lines.is_empty() {
        page.push_str(r#"<span class="t">no log lines yet</span>"#);
    }
    for line in lines {
        let _ = writeln!(
            page,
            r#"<span class="t">{} #{}</span> {}"#,
            clock(line.timestamp_ms),
            line.offset,
            escape(line.text.as_deref().unwrap_or("(binary)"))
        );
    }
    page.push_str("</pre>");
}

/// `HH:MM:SS` (UTC) of a Unix time in milliseconds.
fn clock(ms: i64) -> String {
    let secs = ms.div_euclid(1000).rem_euclid(86_400);
    format!("{:02}:{:02}:{:02}", secs / 3600, secs / 60 % 60, secs % 60)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_plain_forwarded_prefix_should_be_used() {
        let mut headers = HeaderMap::new();
        assert_eq!(prefix(&headers), "");
        headers.insert("x-forwarded-prefix", "/portal".parse().unwrap());
        assert_eq!(prefix(&headers), "/portal");
        headers.insert("x-forwarded-prefix", "/a\"><script>".parse().unwrap());
        assert_eq!(prefix(&headers), "");
        headers.insert("x-forwarded-prefix", "//evil.example".parse().unwrap());
        assert_eq!(prefix(&headers), "");
    }

    #[test]
    fn clock_should_show_utc_time_of_day() {
        assert_eq!(clock(0), "00:00:00");
        assert_eq!(clock((13 * 3600 + 5 * 60 + 9) * 1000 + 999), "13:05:09");
    }
}
