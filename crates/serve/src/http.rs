//! The HTTP plumbing every keel server shares: the JSON error envelope, bounded body
//! reading, the Prometheus text format, and serving until shutdown.
//!
//! Each server maps its own error type to a status and a code; this module only
//! writes what every server writes the same way, so that a client sees one shape of
//! error and one behaviour at a body limit whichever part it talks to.

use std::fmt::Write as _;
use std::future::Future;

use axum::body::{Body, Bytes};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use futures::StreamExt as _;

/// How much of a body over its limit is read (and dropped) before the 413 is sent,
/// so that a client still sending gets the answer instead of a reset connection: 64
/// times the limit, and never more than this. Past it the connection is given up on.
pub const DRAIN_LIMIT: u64 = 256 * 1024 * 1024;

/// The body of every HTTP error keel answers:
/// `{"error":{"code":"...","message":"..."}}`, with `"field"` when one input field is
/// to blame.
#[derive(Debug, Clone, Copy)]
pub struct ErrorBody<'a> {
    /// A stable, machine-readable code (`offset_out_of_range`, `bad_request`...).
    pub code: &'a str,
    /// What went wrong and what to change, for a person.
    pub message: &'a str,
    /// The input field to blame, if one is.
    pub field: Option<&'a str>,
}

impl<'a> ErrorBody<'a> {
    /// An error with a code and a message.
    pub fn new(code: &'a str, message: &'a str) -> Self {
        Self {
            code,
            message,
            field: None,
        }
    }

    /// The same error, blaming `field`.
    #[must_use]
    pub fn field(self, field: &'a str) -> Self {
        Self {
            field: Some(field),
            ..self
        }
    }

    /// The JSON text of the envelope.
    pub fn to_json(&self) -> String {
        let mut error = serde_json::Map::new();
        error.insert("code".into(), self.code.into());
        if let Some(field) = self.field {
            error.insert("field".into(), field.into());
        }
        error.insert("message".into(), self.message.into());
        serde_json::json!({ "error": error }).to_string()
    }

    /// An HTTP response with `status` and this envelope as its JSON body.
    pub fn response(&self, status: StatusCode) -> Response {
        (
            status,
            [(axum::http::header::CONTENT_TYPE, "application/json")],
            self.to_json(),
        )
            .into_response()
    }
}

/// Why [`read_body`] gave up.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum BodyError {
    /// The body could not be read: the client went away or sent a malformed body.
    #[error("reading the request body failed: {0}")]
    Read(#[source] axum::Error),
    /// The body is larger than the limit.
    #[error("request body of {len} bytes is larger than the limit of {max} bytes")]
    TooLarge {
        /// The body's size, as far as it was read.
        len: u64,
        /// The limit.
        max: u64,
    },
}

/// Reads a whole body of at most `max` bytes. A larger body is read on (and dropped)
/// up to 64 times `max` or [`DRAIN_LIMIT`], whichever is less, before the error
/// returns, so that the client gets the 413 rather than a connection reset while it is
/// still sending.
///
/// # Errors
///
/// [`BodyError::TooLarge`] past `max`; [`BodyError::Read`] when the body breaks off.
pub async fn read_body(body: Body, max: u64) -> Result<Bytes, BodyError> {
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let mut len: u64 = 0;
    while let Some(chunk) = stream.next().await {
        let chunk = chunk.map_err(BodyError::Read)?;
        len += chunk.len() as u64;
        if len > max {
            let drain = max.saturating_mul(64).min(DRAIN_LIMIT);
            while len <= drain {
                match stream.next().await {
                    Some(Ok(chunk)) => len += chunk.len() as u64,
                    _ => break,
                }
            }
            return Err(BodyError::TooLarge { len, max });
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}

/// How much of a refused request's body [`discard_body`] reads, and for how long.
pub const DISCARD_LIMIT: u64 = 64 * 1024;
/// See [`DISCARD_LIMIT`].
pub const DISCARD_WITHIN: std::time::Duration = std::time::Duration::from_secs(1);

/// Reads and drops the body of a request refused before its body was read (401,
/// 403), up to [`DISCARD_LIMIT`] bytes and [`DISCARD_WITHIN`]. An HTTP/2 client still
/// sending a small body then gets the refusal, not a reset stream: some clients
/// (curl 7.x) report an early answer followed by a reset as a framing error.
pub async fn discard_body(body: Body) {
    let mut stream = body.into_data_stream();
    let drain = async {
        let mut len: u64 = 0;
        while len <= DISCARD_LIMIT {
            match stream.next().await {
                Some(Ok(chunk)) => len += chunk.len() as u64,
                _ => break,
            }
        }
    };
    let _ = tokio::time::timeout(DISCARD_WITHIN, drain).await;
}

/// The content type of the Prometheus text format.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// Writes metrics in the Prometheus text format: a family's `# HELP` and `# TYPE`
/// lines, then its samples.
///
/// ```
/// let mut metrics = keel_serve::http::Prometheus::default();
/// metrics
///     .family("keel_requests_total", "counter", "Requests received.")
///     .sample(&[], 3)
///     .family("keel_responses_total", "counter", "Responses by class.")
///     .sample(&[("class", "2xx")], 2);
/// let text = metrics.finish();
/// let lines: Vec<&str> = text.lines().collect();
/// assert_eq!(lines[0], "# HELP keel_requests_total Requests received.");
/// assert_eq!(lines[1], "# TYPE keel_requests_total counter");
/// assert_eq!(lines[2], "keel_requests_total 3");
/// assert_eq!(lines[5], r#"keel_responses_total{class="2xx"} 2"#);
/// ```
#[derive(Debug, Default)]
pub struct Prometheus {
    out: String,
    /// The name of the family being written.
    family: String,
}

impl Prometheus {
    /// Starts a family: its name, kind (`counter`, `gauge`, `histogram`) and help.
    pub fn family(&mut self, name: &str, kind: &str, help: &str) -> &mut Self {
        let _ = writeln!(self.out, "# HELP {name} {help}\n# TYPE {name} {kind}");
        name.clone_into(&mut self.family);
        self
    }

    /// A sample of the current family, with its labels.
    pub fn sample(&mut self, labels: &[(&str, &str)], value: impl std::fmt::Display) -> &mut Self {
        self.sample_suffixed("", labels, value)
    }

    /// A sample whose name is the family's with `suffix` (`_bucket`, `_sum`, `_count`
    /// of a histogram).
    pub fn sample_suffixed(
        &mut self,
        suffix: &str,
        labels: &[(&str, &str)],
        value: impl std::fmt::Display,
    ) -> &mut Self {
        let _ = write!(self.out, "{}{suffix}", self.family);
        if let Some(((first, value_of_first), rest)) = labels.split_first() {
            let _ = write!(self.out, "{{{first}=\"{value_of_first}\"");
            for (label, value) in rest {
                let _ = write!(self.out, ",{label}=\"{value}\"");
            }
            self.out.push('}');
        }
        let _ = writeln!(self.out, " {value}");
        self
    }

    /// The text written.
    pub fn finish(self) -> String {
        self.out
    }

    /// The text as an HTTP response with the Prometheus content type.
    pub fn response(self) -> Response {
        (
            [(axum::http::header::CONTENT_TYPE, PROMETHEUS_CONTENT_TYPE)],
            self.out,
        )
            .into_response()
    }
}

/// Upper bounds of [`Histogram`]'s buckets, in seconds (100 µs to 1 s), and as
/// their `le` labels.
const LATENCY_BOUNDS: [(f64, &str); 12] = [
    (0.000_1, "0.0001"),
    (0.000_25, "0.00025"),
    (0.000_5, "0.0005"),
    (0.001, "0.001"),
    (0.002_5, "0.0025"),
    (0.005, "0.005"),
    (0.01, "0.01"),
    (0.025, "0.025"),
    (0.05, "0.05"),
    (0.1, "0.1"),
    (0.25, "0.25"),
    (1.0, "1"),
];

/// A latency histogram with fixed buckets from 100 µs to 1 s, recorded from any
/// thread without a lock, written as a Prometheus histogram.
#[derive(Debug, Default)]
pub struct Histogram {
    buckets: [std::sync::atomic::AtomicU64; LATENCY_BOUNDS.len()],
    count: std::sync::atomic::AtomicU64,
    sum_nanos: std::sync::atomic::AtomicU64,
}

impl Histogram {
    /// Counts one duration.
    pub fn record(&self, elapsed: std::time::Duration) {
        use std::sync::atomic::Ordering::Relaxed;
        let seconds = elapsed.as_secs_f64();
        if let Some(bucket) = LATENCY_BOUNDS
            .iter()
            .position(|&(bound, _)| seconds <= bound)
        {
            self.buckets[bucket].fetch_add(1, Relaxed);
        }
        self.count.fetch_add(1, Relaxed);
        self.sum_nanos
            .fetch_add(elapsed.as_nanos().try_into().unwrap_or(u64::MAX), Relaxed);
    }

    /// Writes the histogram's samples (`_bucket`, `_sum`, `_count`) with `labels`
    /// into the current family of `out`, which must be of kind `histogram`.
    pub fn write(&self, out: &mut Prometheus, labels: &[(&str, &str)]) {
        use std::sync::atomic::Ordering::Relaxed;
        let mut with_le = labels.to_vec();
        with_le.push(("le", ""));
        let mut cumulative = 0;
        for ((_, bound), bucket) in LATENCY_BOUNDS.iter().zip(&self.buckets) {
            cumulative += bucket.load(Relaxed);
            if let Some(le) = with_le.last_mut() {
                *le = ("le", bound);
            }
            out.sample_suffixed("_bucket", &with_le, cumulative);
        }
        let count = self.count.load(Relaxed);
        if let Some(le) = with_le.last_mut() {
            *le = ("le", "+Inf");
        }
        out.sample_suffixed("_bucket", &with_le, count)
            .sample_suffixed("_sum", labels, self.sum_nanos.load(Relaxed) as f64 / 1e9)
            .sample_suffixed("_count", labels, count);
    }
}

/// Runs `serving` until `shutdown` completes, then `stop` (which tells `serving` to
/// end: cancel its token, mark the server not ready...), then waits for `serving` to
/// end and returns what it returned. When `serving` ends first (a serving thread
/// failed), `stop` still runs, so that the tasks beside it end too.
pub async fn serve_until<T>(
    serving: impl Future<Output = T>,
    shutdown: impl Future<Output = ()>,
    stop: impl AsyncFnOnce(),
) -> T {
    let serving = std::pin::pin!(serving);
    let mut serving = serving;
    let early = tokio::select! {
        () = shutdown => None,
        served = &mut serving => Some(served),
    };
    stop().await;
    match early {
        Some(served) => served,
        None => serving.await,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn histogram_should_count_each_duration_in_its_bucket_and_cumulate() {
        let histogram = super::Histogram::default();
        histogram.record(std::time::Duration::from_micros(50));
        histogram.record(std::time::Duration::from_millis(3));
        histogram.record(std::time::Duration::from_secs(5));
        let mut out = super::Prometheus::default();
        out.family("t_seconds", "histogram", "Test.");
        histogram.write(&mut out, &[("topic", "a")]);
        let text = out.finish();
        assert!(
            text.contains("t_seconds_bucket{topic=\"a\",le=\"0.0001\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("t_seconds_bucket{topic=\"a\",le=\"0.0025\"} 1\n"),
            "{text}"
        );
        assert!(
            text.contains("t_seconds_bucket{topic=\"a\",le=\"0.005\"} 2\n"),
            "{text}"
        );
        assert!(
            text.contains("t_seconds_bucket{topic=\"a\",le=\"1\"} 2\n"),
            "5 s is past 1 s: {text}"
        );
        assert!(
            text.contains("t_seconds_bucket{topic=\"a\",le=\"+Inf\"} 3\n"),
            "{text}"
        );
        assert!(text.contains("t_seconds_count{topic=\"a\"} 3\n"), "{text}");
        assert!(
            text.contains("t_seconds_sum{topic=\"a\"} 5.00305\n"),
            "{text}"
        );
    }

    use super::*;

    #[test]
    fn error_body_should_hold_the_code_the_message_and_the_field_if_any() {
        let plain: serde_json::Value =
            serde_json::from_str(&ErrorBody::new("bad_request", "no \"x\"").to_json()).unwrap();
        assert_eq!(
            plain,
            serde_json::json!({"error": {"code": "bad_request", "message": "no \"x\""}})
        );
        let blamed: serde_json::Value =
            serde_json::from_str(&ErrorBody::new("bad_request", "m").field("name").to_json())
                .unwrap();
        assert_eq!(blamed["error"]["field"], "name");
    }

    #[tokio::test]
    async fn discard_body_should_stop_at_its_limit_and_deadline() {
        discard_body(Body::from(vec![7u8; 16])).await;
        let endless =
            futures::stream::repeat_with(|| Ok::<_, std::io::Error>(Bytes::from(vec![0u8; 1024])));
        discard_body(Body::from_stream(endless)).await;
        let silent = futures::stream::pending::<Result<Bytes, std::io::Error>>();
        let started = std::time::Instant::now();
        discard_body(Body::from_stream(silent)).await;
        assert!(started.elapsed() >= DISCARD_WITHIN);
    }

    #[tokio::test]
    async fn read_body_should_take_a_body_at_the_limit_and_refuse_one_past_it() {
        let at = read_body(Body::from(vec![7u8; 16]), 16).await.unwrap();
        assert_eq!(at.len(), 16);
        let past = read_body(Body::from(vec![7u8; 17]), 16).await;
        assert!(
            matches!(past, Err(BodyError::TooLarge { len: 17, max: 16 })),
            "{past:?}"
        );
    }

    #[tokio::test]
    async fn serve_until_should_stop_serving_on_shutdown_and_when_serving_ends_first() {
        let token = tokio_util::sync::CancellationToken::new();
        let serving = {
            let token = token.clone();
            async move {
                token.cancelled().await;
                "stopped"
            }
        };
        let ended = serve_until(serving, async {}, async || token.cancel()).await;
        assert_eq!(ended, "stopped");

        let stopped = std::sync::atomic::AtomicBool::new(false);
        let ended = serve_until(async { "failed" }, std::future::pending(), async || {
            stopped.store(true, std::sync::atomic::Ordering::Relaxed);
        })
        .await;
        assert_eq!(ended, "failed");
        assert!(stopped.load(std::sync::atomic::Ordering::Relaxed));
    }
}
