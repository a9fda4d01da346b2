//! Routing: which service a request is for, the target its instance gets, and why a
//! request that cannot be routed is a 404 or a 503. Pure: no I/O, no state.

use crate::error::GatewayError;

/// Where a request goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Route {
    /// The service: the first segment of the path.
    pub(crate) service: String,
    /// Whether the `/{service}` prefix is stripped before the request is forwarded.
    pub(crate) stripped: bool,
}

impl Route {
    /// Routes the request target `target` (origin form, `/{service}/...?query`);
    /// `strip_prefix` lists the services whose prefix is stripped.
    ///
    /// # Errors
    ///
    /// [`GatewayError::NoService`] when the path names none;
    /// [`GatewayError::InvalidService`] when its first segment is no service name.
    pub(crate) fn parse(target: &str, strip_prefix: &[String]) -> Result<Self, GatewayError> {
        let path = target.split_once('?').map_or(target, |(path, _)| path);
        let Some(segment) = path.split('/').nth(1).filter(|s| !s.is_empty()) else {
            return Err(GatewayError::NoService);
        };
        let service =
            keel_registry::validate_service_name(segment.to_owned(), "service").map_err(|_| {
                GatewayError::InvalidService {
                    segment: segment.to_owned(),
                }
            })?;
        let stripped = strip_prefix.contains(&service);
        Ok(Self { service, stripped })
    }

    /// Appends the target the instance gets for the client's `target`: the same, or
    /// without the `/{service}` prefix (and then at least `/`).
    pub(crate) fn write_target(&self, target: &str, out: &mut Vec<u8>) {
        if !self.stripped {
            out.extend_from_slice(target.as_bytes());
            return;
        }
        let rest = &target[self.service.len() + 1..];
        if rest.is_empty() || rest.starts_with('?') {
            out.push(b'/');
        }
        out.extend_from_slice(rest.as_bytes());
    }
}

/// Why no instance of `service` can take a request: a service the registry does not
/// know is a 404, one it knows (all instances unhealthy or ejected) a 503.
pub(crate) fn no_instance(service: &str, registered: bool) -> GatewayError {
    let service = service.to_owned();
    if registered {
        GatewayError::NoHealthyInstance { service }
    } else {
        GatewayError::UnknownService { service }
    }
}

/// An instance URL's `host:port` and base path (without its leading `/`).
pub(crate) fn split_url(url: &str) -> (&str, &str) {
    let without_scheme = url.split_once("://").map_or(url, |(_, rest)| rest);
    without_scheme
        .split_once('/')
        .unwrap_or((without_scheme, ""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn forwarded(target: &str, strip: &[&str]) -> String {
        let strip: Vec<String> = strip.iter().map(|s| (*s).to_owned()).collect();
        let route = Route::parse(target, &strip).unwrap();
        let mut out = Vec::new();
        route.write_target(target, &mut out);
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn the_first_segment_should_name_the_service() {
        let route = Route::parse("/grading/students/1?x=1", &[]).unwrap();
        assert_eq!(route.service, "grading");
        assert!(!route.stripped);
        assert_eq!(Route::parse("/visit", &[]).unwrap().service, "visit");
    }

    #[test]
    fn a_path_without_a_service_name_should_be_refused() {
        assert!(matches!(
            Route::parse("/", &[]),
            Err(GatewayError::NoService)
        ));
        assert!(matches!(
            Route::parse("/?q=1", &[]),
            Err(GatewayError::NoService)
        ));
        assert!(matches!(
            Route::parse("/no%20such/x", &[]),
            Err(GatewayError::InvalidService { .. })
        ));
    }

    #[test]
    fn a_stripped_prefix_should_leave_at_least_a_slash_and_keep_the_query() {
        assert_eq!(forwarded("/portal/a/b?c=1", &["portal"]), "/a/b?c=1");
        assert_eq!(forwarded("/portal", &["portal"]), "/");
        assert_eq!(forwarded("/portal?c=1", &["portal"]), "/?c=1");
        assert_eq!(forwarded("/portal/?c=1", &["portal"]), "/?c=1");
        assert_eq!(forwarded("/visit/x?y", &["portal"]), "/visit/x?y");
    }

    #[test]
    fn an_unknown_service_should_be_404_and_a_known_one_without_instances_503() {
        assert_eq!(no_instance("s", false).status().as_u16(), 404);
        assert_eq!(no_instance("s", true).status().as_u16(), 503);
    }

    #[test]
    fn an_instance_url_should_split_into_authority_and_base_path() {
        assert_eq!(split_url("http://h:1"), ("h:1", ""));
        assert_eq!(split_url("http://h:1/base/"), ("h:1", "base/"));
        assert_eq!(split_url("h:1/x"), ("h:1", "x"));
    }
}
