//! The resolver of the registry's HTTP client under `--allow-targets`: names are
//! resolved at every connection and only allowed addresses are kept, so that a name
//! that resolved to an allowed address at registration and resolves elsewhere now
//! (DNS rebinding) reaches nothing new.

use std::net::SocketAddr;
use std::sync::Arc;

use keel_auth::AllowTargets;

/// Resolves names with the system resolver and keeps only the allowed addresses.
pub(crate) struct Guard {
    allowed: Arc<AllowTargets>,
}

impl Guard {
    pub(crate) fn new(allowed: AllowTargets) -> Arc<Self> {
        Arc::new(Self {
            allowed: Arc::new(allowed),
        })
    }
}

impl reqwest::dns::Resolve for Guard {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allowed = Arc::clone(&self.allowed);
        Box::pin(async move {
            let host = name.as_str().to_owned();
            let found: Vec<SocketAddr> = tokio::net::lookup_host((host.as_str(), 0))
                .await?
                .filter(|addr| allowed.allows_ip(addr.ip()))
                .collect();
            if found.is_empty() {
                return Err(format!(
                    "{host} resolves to no address that --allow-targets ({allowed}) allows"
                )
                .into());
            }
            let addrs: reqwest::dns::Addrs = Box::new(found.into_iter());
            Ok(addrs)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn the_resolver_should_drop_every_address_outside_the_list() {
        use reqwest::dns::Resolve;
        let name = |text: &str| text.parse::<reqwest::dns::Name>().expect("a name");
        let elsewhere = Guard::new("10.0.0.0/8".parse().expect("a list"));
        let err = elsewhere
            .resolve(name("localhost"))
            .await
            .err()
            .expect("localhost is outside 10.0.0.0/8");
        assert!(err.to_string().contains("--allow-targets"), "{err}");
        let loopback = Guard::new("loopback".parse().expect("a list"));
        let found: Vec<SocketAddr> = loopback
            .resolve(name("localhost"))
            .await
            .expect("localhost is loopback")
            .collect();
        assert!(!found.is_empty());
        assert!(
            found.iter().all(|addr| addr.ip().is_loopback()),
            "{found:?}"
        );
    }
}
