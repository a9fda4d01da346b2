//! Whether a service is ready to take requests.

use std::sync::Arc;

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tokio::sync::watch;

/// Whether a service is ready to take requests, and if not, why.
///
/// A service given one ([`crate::Service::with_readiness`]) registers only once it
/// is ready, so that no gateway routes to it before; and the registry checks it
/// through `GET /readyz`, which answers 503 with the reason while it is not, so
/// that an instance that stops being ready stops being routed to. Clones share the
/// state.
#[derive(Debug, Clone)]
pub struct Readiness {
    /// `None` when ready; the reason otherwise.
    state: Arc<watch::Sender<Option<String>>>,
}

impl Default for Readiness {
    /// Ready.
    fn default() -> Self {
        Self {
            state: Arc::new(watch::Sender::new(None)),
        }
    }
}

impl Readiness {
    /// Not ready, because of `reason`.
    pub fn not_ready(reason: impl Into<String>) -> Self {
        Self {
            state: Arc::new(watch::Sender::new(Some(reason.into()))),
        }
    }

    /// From now on ready.
    pub fn set_ready(&self) {
        self.state.send_if_modified(|state| state.take().is_some());
    }

    /// From now on not ready, because of `reason`.
    pub fn set_not_ready(&self, reason: impl Into<String>) {
        let reason = reason.into();
        self.state.send_if_modified(|state| {
            let changed = state.as_deref() != Some(reason.as_str());
            *state = Some(reason);
            changed
        });
    }

    /// Whether it is ready now.
    pub fn is_ready(&self) -> bool {
        self.state.borrow().is_none()
    }

    /// Why it is not ready now; `None` when it is.
    pub fn reason(&self) -> Option<String> {
        self.state.borrow().clone()
    }

    /// Completes once it is ready (at once if it is).
    pub async fn ready(&self) {
        let mut changes = self.state.subscribe();
        // The sender lives as long as `self`: this cannot fail while we wait.
        let _ = changes.wait_for(Option::is_none).await;
    }

    /// The answer of `GET /readyz`: 200 `ready`, or 503 with the reason.
    pub(crate) fn answer(&self) -> Response {
        match self.reason() {
            None => (StatusCode::OK, "ready").into_response(),
            Some(reason) => keel_serve::http::ErrorBody::new("not_ready", &reason)
                .response(StatusCode::SERVICE_UNAVAILABLE),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn readiness_should_be_shared_by_clones_and_awaitable() {
        let readiness = Readiness::not_ready("rebuilding");
        let other = readiness.clone();
        assert!(!other.is_ready());
        assert_eq!(other.reason().as_deref(), Some("rebuilding"));
        assert_eq!(other.answer().status(), StatusCode::SERVICE_UNAVAILABLE);
        let waiter = tokio::spawn(async move { other.ready().await });
        readiness.set_ready();
        tokio::time::timeout(std::time::Duration::from_secs(5), waiter)
            .await
            .unwrap()
            .unwrap();
        assert!(readiness.is_ready());
        assert_eq!(readiness.answer().status(), StatusCode::OK);
        readiness.set_not_ready("behind");
        assert!(!readiness.is_ready());
    }
}
