//! The running policy of one server: the ACL it was given, reloaded on `SIGHUP` and
//! when its file changes, the callers it authenticates, the decisions it counts and
//! the denials it writes to the audit log (target `keel::audit`).

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, PoisonError, RwLock, Weak};
use std::time::{Duration, SystemTime};

use keel_serve::tls::PeerPrincipal;

use crate::acl::{ANONYMOUS, Acl, AclError, Action, Principal, Resource};
use crate::targets::AllowTargets;

/// How often the ACL file is looked at for a change.
const WATCH_EVERY: Duration = Duration::from_secs(1);

/// Why a request is refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum Denied {
    /// No valid credentials, where some are needed: HTTP 401, gRPC `UNAUTHENTICATED`.
    #[error("{0}")]
    Unauthenticated(String),
    /// The principal may not do this: HTTP 403, gRPC `PERMISSION_DENIED`.
    #[error("{0}")]
    Forbidden(String),
}

impl Denied {
    /// A stable, machine-readable code: `unauthenticated` or `forbidden`.
    pub fn code(&self) -> &'static str {
        match self {
            Self::Unauthenticated(_) => "unauthenticated",
            Self::Forbidden(_) => "forbidden",
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> http::StatusCode {
        match self {
            Self::Unauthenticated(_) => http::StatusCode::UNAUTHORIZED,
            Self::Forbidden(_) => http::StatusCode::FORBIDDEN,
        }
    }
}

#[derive(Debug, Default)]
struct Counts {
    allowed: AtomicU64,
    forbidden: AtomicU64,
    unauthenticated: AtomicU64,
    reloads: AtomicU64,
    failed_reloads: AtomicU64,
}

/// One server's policy. Without an ACL every request is allowed (security off).
#[derive(Debug)]
pub struct Authorizer {
    file: Option<PathBuf>,
    acl: RwLock<Arc<Acl>>,
    /// The file's modification time and length when last read.
    seen: RwLock<Option<(SystemTime, u64)>>,
    counts: Counts,
}

impl Authorizer {
    /// No ACL: everyone may do everything, as a server on loopback does by default.
    pub fn open_to_all() -> Arc<Self> {
        Arc::new(Self {
            file: None,
            acl: RwLock::default(),
            seen: RwLock::default(),
            counts: Counts::default(),
        })
    }

    /// The ACL in `file`, denying by default.
    ///
    /// # Errors
    ///
    /// The file cannot be read or is not a valid ACL.
    pub fn from_file(file: &Path) -> Result<Arc<Self>, AclError> {
        let (acl, seen) = read(file)?;
        Ok(Arc::new(Self {
            file: Some(file.to_owned()),
            acl: RwLock::new(Arc::new(acl)),
            seen: RwLock::new(seen),
            counts: Counts::default(),
        }))
    }

    /// Whether an ACL is in force.
    pub fn enforcing(&self) -> bool {
        self.file.is_some()
    }

    fn acl(&self) -> Arc<Acl> {
        Arc::clone(&self.acl.read().unwrap_or_else(PoisonError::into_inner))
    }

    /// Reads the ACL file again; on a mistake the ACL in force stays, and the error
    /// says why.
    ///
    /// # Errors
    ///
    /// The file cannot be read or is not a valid ACL.
    pub fn reload(&self) -> Result<(), AclError> {
        let Some(file) = &self.file else {
            return Ok(());
        };
        match read(file) {
            Ok((acl, seen)) => {
                *self.acl.write().unwrap_or_else(PoisonError::into_inner) = Arc::new(acl);
                *self.seen.write().unwrap_or_else(PoisonError::into_inner) = seen;
                self.counts.reloads.fetch_add(1, Ordering::Relaxed);
                tracing::info!(target: "keel::audit", file = %file.display(), "ACL reloaded");
                Ok(())
            }
            Err(err) => {
                // Seen, so that a bad file is reported once, not every second.
                *self.seen.write().unwrap_or_else(PoisonError::into_inner) = stamp(file);
                self.counts.failed_reloads.fetch_add(1, Ordering::Relaxed);
                tracing::error!(target: "keel::audit", error = %err, "ACL not reloaded; the one in force stays");
                Err(err)
            }
        }
    }

    /// Reloads the ACL on `SIGHUP` and whenever its file changes, for as long as
    /// this authorizer lives. Call from within a Tokio runtime.
    pub fn watch(self: &Arc<Self>) {
        if self.file.is_none() {
            return;
        }
        let this = Arc::downgrade(self);
        tokio::spawn(watch(this));
    }

    /// The caller: named by its token (`Authorization: Bearer <token>` in
    /// `headers`), else by its verified client certificate (`peer`), else
    /// [`Principal::Anonymous`]. Without an ACL, every caller is anonymous.
    ///
    /// # Errors
    ///
    /// [`Denied::Unauthenticated`] for a token the ACL does not list (unknown or
    /// revoked) or a malformed `Authorization` header.
    pub fn authenticate(
        &self,
        headers: &http::HeaderMap,
        peer: Option<&PeerPrincipal>,
    ) -> Result<Principal, Denied> {
        if !self.enforcing() {
            return Ok(Principal::Anonymous);
        }
        let Some(value) = headers.get(http::header::AUTHORIZATION) else {
            return Ok(match peer {
                Some(PeerPrincipal(name)) if **name != *ANONYMOUS => {
                    Principal::Named(name.to_string())
                }
                _ => Principal::Anonymous,
            });
        };
        let token = value
            .to_str()
            .ok()
            .and_then(|value| value.strip_prefix("Bearer "))
            .map(str::trim)
            .ok_or_else(|| {
                self.counts.unauthenticated.fetch_add(1, Ordering::Relaxed);
                Denied::Unauthenticated("the Authorization header is not `Bearer <token>`".into())
            })?;
        match self.acl().principal_of_token(token) {
            Some(name) => Ok(Principal::Named(name.to_owned())),
            None => {
                self.counts.unauthenticated.fetch_add(1, Ordering::Relaxed);
                tracing::warn!(target: "keel::audit", decision = "deny", reason = "unknown token", "unauthenticated");
                Err(Denied::Unauthenticated("unknown or revoked token".into()))
            }
        }
    }

    /// Whether `principal` may do `action` to `resource`; a denial is counted and
    /// written to the audit log.
    ///
    /// # Errors
    ///
    /// [`Denied::Unauthenticated`] for an anonymous caller no rule allows (it may
    /// be allowed with credentials), [`Denied::Forbidden`] for a named one.
    pub fn authorize(
        &self,
        principal: &Principal,
        action: Action,
        resource: Resource<'_>,
    ) -> Result<(), Denied> {
        if !self.enforcing() {
            return Ok(());
        }
        if self.acl().allows(principal, action, resource) {
            self.counts.allowed.fetch_add(1, Ordering::Relaxed);
            tracing::debug!(target: "keel::audit", %principal, action = action.name(), %resource, decision = "allow");
            return Ok(());
        }
        tracing::warn!(target: "keel::audit", %principal, action = action.name(), %resource, decision = "deny");
        let what = format!("{} on {resource}", action.name());
        Err(match principal {
            Principal::Anonymous => {
                self.counts.unauthenticated.fetch_add(1, Ordering::Relaxed);
                Denied::Unauthenticated(format!(
                    "{what} needs credentials: a token (Authorization: Bearer <token>) or a client certificate"
                ))
            }
            Principal::Named(_) => {
                self.counts.forbidden.fetch_add(1, Ordering::Relaxed);
                Denied::Forbidden(format!("{principal} may not {what}"))
            }
        })
    }

    /// [`Authorizer::authenticate`], then [`Authorizer::authorize`]: the caller, if
    /// allowed.
    ///
    /// # Errors
    ///
    /// As those two.
    pub fn check(
        &self,
        headers: &http::HeaderMap,
        peer: Option<&PeerPrincipal>,
        action: Action,
        resource: Resource<'_>,
    ) -> Result<Principal, Denied> {
        let principal = self.authenticate(headers, peer)?;
        self.authorize(&principal, action, resource)?;
        Ok(principal)
    }

    /// Whether `principal` may act on every instance of `service`, not only its own.
    pub fn is_admin_of(&self, principal: &Principal, service: &str) -> bool {
        !self.enforcing()
            || self
                .acl()
                .allows(principal, Action::Admin, Resource::Service(service))
    }

    /// The addresses `principal` may register instances of `service` at, beyond the
    /// registry's own list (see [`Acl::register_targets`]); `None` without an ACL.
    pub fn register_targets(&self, principal: &Principal, service: &str) -> Option<AllowTargets> {
        if !self.enforcing() {
            return None;
        }
        self.acl().register_targets(principal, service)
    }

    /// The decisions and reloads, as Prometheus families.
    pub fn render(&self, out: &mut keel_serve::http::Prometheus) {
        let load = |count: &AtomicU64| count.load(Ordering::Relaxed);
        out.family(
            "keel_auth_decisions_total",
            "counter",
            "Requests allowed and denied by the ACL (denied: forbidden, or unauthenticated).",
        )
        .sample(&[("decision", "allow")], load(&self.counts.allowed))
        .sample(&[("decision", "forbidden")], load(&self.counts.forbidden))
        .sample(
            &[("decision", "unauthenticated")],
            load(&self.counts.unauthenticated),
        );
        out.family(
            "keel_auth_acl_reloads_total",
            "counter",
            "ACL reloads, by outcome (a failed one keeps the ACL in force).",
        )
        .sample(&[("outcome", "ok")], load(&self.counts.reloads))
        .sample(&[("outcome", "failed")], load(&self.counts.failed_reloads));
    }
}

fn stamp(file: &Path) -> Option<(SystemTime, u64)> {
    let metadata = std::fs::metadata(file).ok()?;
    Some((metadata.modified().ok()?, metadata.len()))
}

fn read(file: &Path) -> Result<(Acl, Option<(SystemTime, u64)>), AclError> {
    let seen = stamp(file);
    let name = file.display().to_string();
    let text = std::fs::read_to_string(file).map_err(|err| AclError::unreadable(&name, &err))?;
    Ok((Acl::parse(&text, &name)?, seen))
}

async fn watch(this: Weak<Authorizer>) {
    #[cfg(unix)]
    let mut hangups = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut every = tokio::time::interval(WATCH_EVERY);
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hangups.as_mut() {
                Some(signals) => signals.recv().await,
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<Option<()>>();
        let asked = tokio::select! {
            _ = hangup => true,
            _ = every.tick() => false,
        };
        let Some(authorizer) = this.upgrade() else {
            return;
        };
        let changed = authorizer.file.as_deref().map(stamp)
            != Some(
                *authorizer
                    .seen
                    .read()
                    .unwrap_or_else(PoisonError::into_inner),
            );
        if asked || changed {
            let _ = authorizer.reload();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn acl_file(dir: &Path, principal: &str) -> PathBuf {
        let file = dir.join("acl.toml");
        let text = format!(
            "[[token]]\nprincipal = \"{principal}\"\nsha256 = \"{}\"\n\n[[allow]]\nprincipals = [\"{principal}\"]\ntopics = [\"logs\"]\nactions = [\"produce\"]\n",
            crate::token::hash("secret-token")
        );
        std::fs::write(&file, text).expect("written");
        file
    }

    fn bearer(token: &str) -> http::HeaderMap {
        let mut headers = http::HeaderMap::new();
        headers.insert(
            http::header::AUTHORIZATION,
            format!("Bearer {token}").parse().expect("a header"),
        );
        headers
    }

    #[test]
    fn callers_should_be_named_by_their_token_or_refused() {
        let dir = tempfile::tempdir().expect("a dir");
        let authorizer = Authorizer::from_file(&acl_file(dir.path(), "alice")).expect("an ACL");
        let logs = Resource::Topic("logs");
        assert_eq!(
            authorizer.check(&bearer("secret-token"), None, Action::Produce, logs),
            Ok(Principal::Named("alice".into()))
        );
        let denied = authorizer.check(&bearer("secret-token"), None, Action::Consume, logs);
        assert!(matches!(denied, Err(Denied::Forbidden(_))), "{denied:?}");
        let unknown = authorizer.check(&bearer("guessed"), None, Action::Produce, logs);
        assert!(
            matches!(unknown, Err(Denied::Unauthenticated(_))),
            "{unknown:?}"
        );
        let anonymous = authorizer.check(&http::HeaderMap::new(), None, Action::Produce, logs);
        assert!(
            matches!(anonymous, Err(Denied::Unauthenticated(_))),
            "{anonymous:?}"
        );
        let mut basic = http::HeaderMap::new();
        basic.insert(
            http::header::AUTHORIZATION,
            "Basic eDp5".parse().expect("a header"),
        );
        let malformed = authorizer.check(&basic, None, Action::Produce, logs);
        assert!(
            matches!(malformed, Err(Denied::Unauthenticated(_))),
            "{malformed:?}"
        );
        let mut text = String::new();
        let mut out = keel_serve::http::Prometheus::default();
        authorizer.render(&mut out);
        text.push_str(&out.finish());
        assert!(
            text.contains("keel_auth_decisions_total{decision=\"forbidden\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("keel_auth_decisions_total{decision=\"unauthenticated\"} 3"),
            "{text}"
        );
    }

    #[test]
    fn without_an_acl_every_caller_should_be_allowed() {
        let open = Authorizer::open_to_all();
        assert_eq!(
            open.check(&bearer("anything"), None, Action::Admin, Resource::Cluster),
            Ok(Principal::Anonymous)
        );
    }

    #[tokio::test]
    async fn a_changed_file_should_take_effect_and_a_broken_one_should_not() {
        let dir = tempfile::tempdir().expect("a dir");
        let file = acl_file(dir.path(), "alice");
        let authorizer = Authorizer::from_file(&file).expect("an ACL");
        authorizer.watch();
        let token = bearer("secret-token");
        let principal = |authorizer: &Authorizer| authorizer.authenticate(&token, None).ok();
        // Another principal for the same token; a different length, so that the
        // change shows even where modification times are coarse.
        acl_file(dir.path(), "bob-the-builder");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while principal(&authorizer) != Some(Principal::Named("bob-the-builder".into())) {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the change was not picked up"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        std::fs::write(&file, "[[allow]\nbroken").expect("written");
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        while authorizer.counts.failed_reloads.load(Ordering::Relaxed) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the broken file was not seen"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        assert_eq!(
            principal(&authorizer),
            Some(Principal::Named("bob-the-builder".into()))
        );
    }
}
