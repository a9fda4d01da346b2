//! Shipping a service's log lines to the log service.
//!
//! [`log_shipping`] (a fixed log service) and [`log_shipping_discovered`] (whichever
//! `log` instance discovery offers at each batch) return a `tracing` layer and a
//! handle. The layer formats each event as one line and hands it to a
//! [`keel_log_client::Shipper`] for the `logs` topic: a bounded buffer that never waits, sent
//! in batches, with dropped lines counted.

use std::fmt::Write as _;

use keel_log_client::{Shipper, ShipperStats};
use keel_registry::client::{Discovery, Policy};
use tracing::field::{Field, Visit};
use tracing_subscriber::layer::Context;

/// What shipping did so far: lines sent, lines dropped.
pub type LogShipping = ShipperStats;

/// The `tracing` layer that feeds the shipper.
#[derive(Debug)]
pub struct LogLayer {
    service: String,
    shipper: Shipper,
}

/// A layer that ships `service`'s log lines to the `logs` topic of the log service at
/// `log_url` (its base URL) through a buffer of `capacity` lines, and a handle with
/// its counts. Must be called within a tokio runtime.
pub fn log_shipping(service: &str, log_url: &str, capacity: usize) -> (LogLayer, LogShipping) {
    layer(service, Shipper::new(log_url, "logs", capacity))
}

/// Like [`log_shipping`], but each batch goes to an instance of the `log` service that
/// `discovery` offers at that moment (in turn, when there are several), so shipping
/// follows the log service as it moves, restarts or scales. While there is none,
/// lines wait in the buffer, and what does not fit is dropped and counted. A service that lists `log` among its requirements
/// keeps `discovery` current. Must be called within a tokio runtime.
pub fn log_shipping_discovered(
    service: &str,
    discovery: Discovery,
    capacity: usize,
) -> (LogLayer, LogShipping) {
    let resolve = move || {
        discovery
            .pick("log", Policy::RoundRobin)
            .map(|picked| picked.url.clone())
    };
    layer(service, Shipper::resolving(resolve, "logs", capacity))
}

fn layer(service: &str, shipper: Shipper) -> (LogLayer, LogShipping) {
    let stats = shipper.stats().clone();
    (
        LogLayer {
            service: service.to_owned(),
            shipper,
        },
        stats,
    )
}

/// Events of the HTTP stack would be shipped by the HTTP stack: a feedback loop.
fn is_shipping_noise(target: &str) -> bool {
    [
        "hyper",
        "h2",
        "reqwest",
        "tower",
        "keel_log_client::shipper",
    ]
    .iter()
    .any(|prefix| target.starts_with(prefix))
}

#[derive(Default)]
struct Line(String);

impl Visit for Line {
    fn record_debug(&mut self, field: &Field, value: &dyn std::fmt::Debug) {
        if field.name() == "message" {
            let _ = write!(self.0, " {value:?}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }

    fn record_str(&mut self, field: &Field, value: &str) {
        if field.name() == "message" {
            let _ = write!(self.0, " {value}");
        } else {
            let _ = write!(self.0, " {}={value:?}", field.name());
        }
    }
}

impl<S: tracing::Subscriber> tracing_subscriber::Layer<S> for LogLayer {
    fn on_event(&self, event: &tracing::Event<'_>, _ctx: Context<'_, S>) {
        let metadata = event.metadata();
        if is_shipping_noise(metadata.target()) {
            return;
        }
        let mut line = Line(format!(
            "{} {} {}:",
            metadata.level(),
            self.service,
            metadata.target()
        ));
        event.record(&mut line);
        self.shipper.ship(line.0);
    }
}
