//! What the serving threads share (config, the instance table, passive health,
//! counters, the access log) and what each keeps to itself (its upstream pool).

use std::collections::BTreeSet;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock};

use keel_registry::client::{Discovery, Picked, Policy};
use keel_serve::http::Prometheus;

use crate::config::{Balance, GatewayConfig};
use crate::error::GatewayError;
use crate::passive::Ejections;
use crate::route::no_instance;

/// How long a request waits for the registry's table in a gateway that has not read
/// it yet (one that just started).
const TABLE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);
use crate::upstream::Upstreams;

/// Counts for `/metrics`.
#[derive(Debug, Default)]
pub(crate) struct Stats {
    pub(crate) requests: AtomicU64,
    pub(crate) retries: AtomicU64,
    /// Client connections closed, while waiting for a request, to make room for a
    /// new client at `max_connections`.
    pub(crate) shed: Arc<AtomicU64>,
    /// Responses by status class: `[1]` counts 1xx, ..., `[5]` 5xx.
    by_status: [AtomicU64; 6],
    /// From a request's head to its upstream response's head, retries included.
    pub(crate) upstream_latency: keel_serve::http::Histogram,
}

impl Stats {
    /// Counts a response with `status`.
    pub(crate) fn count(&self, status: u16) {
        if let Some(counter) = self.by_status.get(usize::from(status / 100)) {
            counter.fetch_add(1, Ordering::Relaxed);
        }
    }
}

/// What every serving thread of the gateway shares.
#[derive(Debug)]
pub(crate) struct Shared {
    pub(crate) config: GatewayConfig,
    pub(crate) discovery: Discovery,
    /// Every service name the registry knows (passing or not): tells 404 from 503.
    pub(crate) known: RwLock<BTreeSet<String>>,
    /// Set once the registry's table has been read.
    pub(crate) synced: tokio::sync::watch::Sender<bool>,
    pub(crate) ejections: Ejections,
    pub(crate) stats: Stats,
    next_id: AtomicU64,
    pub(crate) access_log: Option<keel_log_client::Shipper>,
    /// The TLS of `https` upstreams, shared by every thread's pool.
    upstream_tls: Arc<rustls::ClientConfig>,
}

/// One serving thread's view of the gateway: the shared state, and its own pool of
/// upstream connections, so that a request and its upstream connection are driven by
/// the same thread.
#[derive(Debug)]
pub(crate) struct Gateway {
    shared: Arc<Shared>,
    pub(crate) upstreams: Upstreams,
}

impl std::ops::Deref for Gateway {
    type Target = Shared;

    fn deref(&self) -> &Shared {
        &self.shared
    }
}

impl Gateway {
    /// The first serving thread's view.
    ///
    /// # Errors
    ///
    /// The TLS files of `config.client_tls` cannot be used.
    pub(crate) fn new(
        config: GatewayConfig,
        discovery: Discovery,
    ) -> Result<Self, keel_serve::tls::TlsError> {
        let upstream_tls = crate::upstream::tls_config(config.client_tls.as_ref())?;
        let upstreams = Upstreams::new(config.connect_timeout, Arc::clone(&upstream_tls));
        let access_log = config.log_service.as_deref().map(|url| {
            keel_log_client::Shipper::new_as(
                url,
                "access",
                8192,
                (
                    config.log_service_token.as_deref(),
                    config.client_tls.as_ref(),
                ),
            )
        });
        Ok(Self {
            shared: Arc::new(Shared {
                ejections: Ejections::new(config.eject_after, config.eject_for),
                config,
                discovery,
                known: RwLock::default(),
                synced: tokio::sync::watch::channel(false).0,
                stats: Stats::default(),
                next_id: AtomicU64::new(1),
                access_log,
                upstream_tls,
            }),
            upstreams,
        })
    }

    /// The view of another serving thread: the same shared state, its own pool.
    pub(crate) fn for_another_thread(&self) -> Self {
        Self {
            shared: Arc::clone(&self.shared),
            upstreams: Upstreams::new(self.config.connect_timeout, Arc::clone(&self.upstream_tls)),
        }
    }
}

impl Shared {
    /// A new request id.
    pub(crate) fn next_id(&self) -> u64 {
        self.next_id.fetch_add(1, Ordering::Relaxed)
    }

    /// An instance of `service` to send a request to: neither ejected nor in `tried`.
    pub(crate) fn pick(&self, service: &str, tried: &[String]) -> Option<Picked> {
        let ejected = self.ejections.ejected();
        let policy = match self.config.balance {
            Balance::RoundRobin => Policy::RoundRobin,
            Balance::Random => Policy::Random,
            Balance::PowerOfTwoChoices => Policy::PowerOfTwoChoices,
        };
        self.discovery.pick_where(service, policy, |instance| {
            !tried.contains(&instance.url) && !ejected.contains(&instance.url)
        })
    }

    /// Waits (at most [`TABLE_WAIT`]) for the registry's table, if it has not been
    /// read yet; true if it was read meanwhile.
    pub(crate) async fn wait_for_table(&self) -> bool {
        if *self.synced.borrow() {
            return false;
        }
        let mut synced = self.synced.subscribe();
        matches!(
            tokio::time::timeout(TABLE_WAIT, synced.wait_for(|synced| *synced)).await,
            Ok(Ok(_))
        )
    }

    /// Why a request for `service` finds no instance at all: 404 or 503 (also 503
    /// while the registry's table has not been read: the service may well exist).
    pub(crate) fn no_instance(&self, service: &str) -> GatewayError {
        if !*self.synced.borrow() {
            return GatewayError::NoHealthyInstance {
                service: service.to_owned(),
            };
        }
        let known = self
            .known
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .contains(service);
        no_instance(
            service,
            known || !self.discovery.instances(service).is_empty(),
        )
    }

    /// The gateway's figures in the Prometheus text format.
    pub(crate) fn metrics(&self) -> Prometheus {
        let stats = &self.stats;
        let mut out = Prometheus::default();
        out.family(
            "keel_gateway_requests_total",
            "counter",
            "Requests received.",
        )
        .sample(&[], stats.requests.load(Ordering::Relaxed))
        .family(
            "keel_gateway_responses_total",
            "counter",
            "Responses by status class.",
        );
        for (class, counter) in ["1xx", "2xx", "3xx", "4xx", "5xx"]
            .iter()
            .zip(&stats.by_status[1..])
        {
            out.sample(&[("class", class)], counter.load(Ordering::Relaxed));
        }
        out.family(
            "keel_gateway_retries_total",
            "counter",
            "Attempts on another instance.",
        )
        .sample(&[], stats.retries.load(Ordering::Relaxed))
        .family(
            "keel_gateway_ejections_total",
            "counter",
            "Instances ejected after consecutive failures.",
        )
        .sample(&[], self.ejections.count())
        .family(
            "keel_gateway_connections_shed_total",
            "counter",
            "Client connections closed while waiting for a request, to make room for a new client at max_connections.",
        )
        .sample(&[], stats.shed.load(Ordering::Relaxed))
        .family(
            "keel_gateway_upstream_seconds",
            "histogram",
            "Time from a request's head to the head of its upstream's response, retries on other instances included.",
        );
        stats.upstream_latency.write(&mut out, &[]);
        out
    }
}
