//! What an instance says when it registers, in any of the accepted JSON shapes.
//!
//! | shape | fields | instance address | update URL | heartbeat URL |
//! | --- | --- | --- | --- | --- |
//! | canonical | `name`, `addr`, `required_services`, `update_url`, `heartbeat_url`, `meta` | `addr` (`host:port` or URL) | `update_url` | `heartbeat_url` |
//! | dialect A | `Name`, `Addr`, `RequiredServices` | `Addr` (`host:port`) | `http://{Addr}/services` | `http://{Addr}/heart-beat` |
//! | dialect B | `ServiceName`, `ServiceURL`, `RequiredServices`, `ServiceUpdateURL`, `HeartbeatURL` | `ServiceURL` | `ServiceUpdateURL` | `HeartbeatURL` |

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use crate::error::RegistryError;

/// The longest service name.
pub const MAX_NAME: usize = 128;

/// The longest URL (`addr`, `update_url`, `heartbeat_url`), in bytes.
pub const MAX_URL: usize = 2048;

/// The most bytes of metadata (keys and values together) one instance may carry.
pub const MAX_META_BYTES: usize = 4096;

/// The longest TTL an instance may ask for.
const MAX_TTL: std::time::Duration = std::time::Duration::from_secs(24 * 3600);

/// The most services one instance may require.
pub const MAX_REQUIRED: usize = 64;

/// A validated registration, whatever shape it came in.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Registration {
    /// The service's name, e.g. `grading`.
    pub name: String,
    /// The instance's base URL, normalized: `http://host:port` plus any path, no
    /// trailing slash. Identifies the instance within its service.
    pub url: String,
    /// Services this instance needs; it is told when their instances come and go.
    pub required_services: Vec<String>,
    /// Where to `POST`/`DELETE` notifications about required services, if anywhere.
    pub update_url: Option<String>,
    /// What the health checker polls, if anything.
    pub heartbeat_url: Option<String>,
    /// Free-form labels.
    pub meta: BTreeMap<String, String>,
    /// With a TTL, the instance keeps itself passing by heartbeating
    /// (`PUT /v1/services/{name}/{id}/heartbeat`) at least this often, instead of
    /// being polled. Canonical shape only: `"ttl": "15s"`.
    pub ttl_ms: Option<u64>,
}

impl Registration {
    /// The instance's id within its service: its URL without the scheme
    /// (`127.0.0.1:20003`, or `host:port/path`).
    pub fn id(&self) -> &str {
        self.url
            .split_once("://")
            .map_or(self.url.as_str(), |(_, rest)| rest)
    }

    /// The registration in the canonical shape that [`Registration::parse`] reads back
    /// (what `POST /services` takes; see docs/api/registry.md).
    pub fn to_canonical_json(&self) -> serde_json::Value {
        let mut body = serde_json::json!({
            "name": self.name,
            "addr": self.url,
            "required_services": self.required_services,
            "meta": self.meta,
        });
        for (key, value) in [
            ("update_url", &self.update_url),
            ("heartbeat_url", &self.heartbeat_url),
        ] {
            if let Some(value) = value {
                body[key] = value.as_str().into();
            }
        }
        if let Some(ttl_ms) = self.ttl_ms {
            body["ttl"] = format!("{ttl_ms}ms").into();
        }
        body
    }

    /// Parses a registration body in any accepted shape.
    ///
    /// # Errors
    ///
    /// [`RegistryError::BadRequest`] naming the field that is missing or wrong.
    pub fn parse(body: &[u8]) -> Result<Self, RegistryError> {
        let value: serde_json::Value = serde_json::from_slice(body)
            .map_err(|err| RegistryError::bad_request("body", format!("malformed JSON: {err}")))?;
        let object = value
            .as_object()
            .ok_or_else(|| RegistryError::bad_request("body", "expected a JSON object"))?;
        if object.contains_key("ServiceName") {
            Self::dialect_b(object)
        } else if object.contains_key("Name") {
            Self::dialect_a(object)
        } else if object.contains_key("name") {
            Self::canonical(object)
        } else {
            Err(RegistryError::bad_request(
                "name",
                "no service name: send \"name\" (or \"Name\", or \"ServiceName\")",
            ))
        }
    }

    fn canonical(
        object: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self, RegistryError> {
        let name = validate_service_name(string(object, "name")?.unwrap_or_default(), "name")?;
        let addr = string(object, "addr")?.ok_or_else(|| {
            RegistryError::bad_request("addr", "missing: give host:port or an http URL")
        })?;
        let meta = match object.get("meta") {
            None | Some(serde_json::Value::Null) => BTreeMap::new(),
            Some(meta) => serde_json::from_value(meta.clone())
                .map_err(|_| RegistryError::bad_request("meta", "expected an object of strings"))?,
        };
        let meta_bytes: usize = meta
            .iter()
            .map(|(k, v): (&String, &String)| k.len() + v.len())
            .sum();
        if meta_bytes > MAX_META_BYTES {
            return Err(RegistryError::bad_request(
                "meta",
                format!("{meta_bytes} bytes of keys and values; at most {MAX_META_BYTES}"),
            ));
        }
        let ttl_ms = string(object, "ttl")?
            .map(|text| {
                humantime::parse_duration(&text)
                    .ok()
                    .filter(|ttl| ttl.as_millis() > 0 && *ttl <= MAX_TTL)
                    .map(|ttl| ttl.as_millis().try_into().unwrap_or(u64::MAX))
                    .ok_or_else(|| {
                        RegistryError::bad_request(
                            "ttl",
                            format!("{text:?} is not a duration from 1ms to 24h such as \"15s\""),
                        )
                    })
            })
            .transpose()?;
        Ok(Self {
            name,
            url: base_url(&addr, "addr")?,
            required_services: names(object, "required_services")?,
            update_url: optional_url(object, "update_url")?,
            heartbeat_url: optional_url(object, "heartbeat_url")?,
            meta,
            ttl_ms,
        })
    }

    fn dialect_a(
        object: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self, RegistryError> {
        let name = validate_service_name(string(object, "Name")?.unwrap_or_default(), "Name")?;
        let addr = string(object, "Addr")?
            .ok_or_else(|| RegistryError::bad_request("Addr", "missing: give host:port"))?;
        let url = base_url(&addr, "Addr")?;
        Ok(Self {
            name,
            // Derived URLs are held to the same rules as given ones.
            update_url: Some(base_url(&format!("{url}/services"), "Addr")?),
            heartbeat_url: Some(base_url(&format!("{url}/heart-beat"), "Addr")?),
            url,
            required_services: names(object, "RequiredServices")?,
            meta: BTreeMap::new(),
            ttl_ms: None,
        })
    }

    fn dialect_b(
        object: &serde_json::Map<String, serde_json::Value>,
    ) -> Result<Self, RegistryError> {
        let name = validate_service_name(
            string(object, "ServiceName")?.unwrap_or_default(),
            "ServiceName",
        )?;
        let url = string(object, "ServiceURL")?.ok_or_else(|| {
            RegistryError::bad_request("ServiceURL", "missing: give the instance's URL")
        })?;
        Ok(Self {
            name,
            url: base_url(&url, "ServiceURL")?,
            required_services: names(object, "RequiredServices")?,
            update_url: optional_url(object, "ServiceUpdateURL")?,
            heartbeat_url: optional_url(object, "HeartbeatURL")?,
            meta: BTreeMap::new(),
            ttl_ms: None,
        })
    }
}

/// What identifies an instance for deregistration: its service name and address,
/// in any of the shapes registration accepts.
///
/// # Errors
///
/// As [`Registration::parse`].
pub fn parse_identity(body: &[u8]) -> Result<(String, String), RegistryError> {
    let registration = Registration::parse(body)?;
    let id = registration.id().to_owned();
    Ok((registration.name, id))
}

fn string(
    object: &serde_json::Map<String, serde_json::Value>,
    field: &'static str,
) -> Result<Option<String>, RegistryError> {
    match object.get(field) {
        None | Some(serde_json::Value::Null) => Ok(None),
        Some(serde_json::Value::String(text)) if text.is_empty() => Ok(None),
        Some(serde_json::Value::String(text)) => Ok(Some(text.clone())),
        Some(_) => Err(RegistryError::bad_request(field, "expected a string")),
    }
}

/// Checks a service name (`field` names it in errors): 1 to 128 characters of letters, digits, `.`, `_`, `-`
/// (names appear in gateway paths).
pub fn validate_service_name(text: String, field: &'static str) -> Result<String, RegistryError> {
    if text.is_empty() {
        return Err(RegistryError::bad_request(field, "missing or empty"));
    }
    // A name is a path segment at the gateway (`/{service}/...`): `.` and `..` would
    // be read as "here" and "up" by anything that normalizes paths.
    if text.len() > MAX_NAME
        || text.starts_with('.')
        || !text
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
    {
        return Err(RegistryError::bad_request(
            field,
            format!(
                "{text:?} is not a service name: use 1 to {MAX_NAME} letters, digits, '.', '_' or '-', not starting with '.'"
            ),
        ));
    }
    Ok(text)
}

fn names(
    object: &serde_json::Map<String, serde_json::Value>,
    field: &'static str,
) -> Result<Vec<String>, RegistryError> {
    let list = match object.get(field) {
        None | Some(serde_json::Value::Null) => return Ok(Vec::new()),
        Some(serde_json::Value::Array(list)) => list,
        Some(_) => {
            return Err(RegistryError::bad_request(
                field,
                "expected a list of service names",
            ));
        }
    };
    if list.len() > MAX_REQUIRED {
        return Err(RegistryError::bad_request(
            field,
            format!("{} services; at most {MAX_REQUIRED}", list.len()),
        ));
    }
    let mut names = Vec::with_capacity(list.len());
    for item in list {
        let text = item
            .as_str()
            .ok_or_else(|| RegistryError::bad_request(field, "expected a list of service names"))?;
        let checked = validate_service_name(text.to_owned(), field)?;
        if !names.contains(&checked) {
            names.push(checked);
        }
    }
    Ok(names)
}

fn optional_url(
    object: &serde_json::Map<String, serde_json::Value>,
    field: &'static str,
) -> Result<Option<String>, RegistryError> {
    string(object, field)?
        .map(|text| base_url(&text, field))
        .transpose()
}

/// Normalizes `host:port` or `http(s)://host:port[/path]` to a URL without a
/// trailing slash.
pub fn base_url(text: &str, field: &'static str) -> Result<String, RegistryError> {
    let bad = || {
        RegistryError::bad_request(
            field,
            format!("{text:?} is neither host:port nor an http URL (http://host:port/...)"),
        )
    };
    let text = text.trim();
    if text.len() > MAX_URL {
        return Err(RegistryError::bad_request(
            field,
            format!("a URL of {} bytes; at most {MAX_URL}", text.len()),
        ));
    }
    let (scheme, rest, explicit) = match text.split_once("://") {
        Some((scheme @ ("http" | "https"), rest)) => (scheme, rest, true),
        Some(_) => return Err(bad()),
        None => ("http", text, false),
    };
    let (authority, path) = rest.split_once('/').map_or((rest, ""), |(a, p)| (a, p));
    // A port is required, except in a URL with a scheme (which implies 80 or 443).
    let (host, port) = match authority.rsplit_once(':') {
        Some((host, port)) if !port.contains(']') => {
            let port: u16 = port.parse().map_err(|_| bad())?;
            if port == 0 {
                return Err(bad());
            }
            (host, Some(port))
        }
        _ if explicit => (authority, None),
        _ => return Err(bad()),
    };
    // A name or an IPv4 address, or an IPv6 address in brackets; no longer than a DNS
    // name may be.
    let host_ok = host.len() <= 253
        && match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
            Some(v6) => {
                !v6.is_empty()
                    && v6
                        .bytes()
                        .all(|b| b.is_ascii_hexdigit() || matches!(b, b':' | b'.'))
            }
            None => {
                !host.is_empty()
                    && host
                        .bytes()
                        .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-'))
            }
        };
    if !host_ok || text.chars().any(char::is_whitespace) {
        return Err(bad());
    }
    let authority = match port {
        Some(port) => format!("{host}:{port}"),
        None => host.to_owned(),
    };
    // The path goes into the gateway's request line as is: only the characters a URL
    // path may hold (RFC 3986 pchar, `/`, percent escapes), no query, no fragment, and
    // never a control byte.
    if !path
        .bytes()
        .all(|b| b.is_ascii_alphanumeric() || b"-._~!$&'()*+,;=:@/%".contains(&b))
    {
        return Err(bad());
    }
    let path = path.trim_end_matches('/');
    Ok(if path.is_empty() {
        format!("{scheme}://{authority}")
    } else {
        format!("{scheme}://{authority}/{path}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(json: &str) -> Result<Registration, RegistryError> {
        Registration::parse(json.as_bytes())
    }

    fn field_of(err: RegistryError) -> &'static str {
        match err {
            RegistryError::BadRequest { field, .. } => field,
            other => panic!("expected BadRequest, got {other:?}"),
        }
    }

    #[test]
    fn canonical_form_should_parse_every_field() {
        let r = parse(
            r#"{"name":"grading","addr":"127.0.0.1:20004","required_services":["log","log"],
                "update_url":"http://127.0.0.1:20004/updates/","heartbeat_url":"127.0.0.1:20004/health","meta":{"zone":"a"}}"#,
        )
        .unwrap();
        assert_eq!(r.name, "grading");
        assert_eq!(r.url, "http://127.0.0.1:20004");
        assert_eq!(r.id(), "127.0.0.1:20004");
        assert_eq!(r.required_services, ["log"], "duplicates are dropped");
        assert_eq!(
            r.update_url.as_deref(),
            Some("http://127.0.0.1:20004/updates")
        );
        assert_eq!(
            r.heartbeat_url.as_deref(),
            Some("http://127.0.0.1:20004/health")
        );
        assert_eq!(r.meta["zone"], "a");
        assert_eq!(r.ttl_ms, None);
        let ttl = parse(r#"{"name":"x","addr":"h:1","ttl":"15s"}"#).unwrap();
        assert_eq!(ttl.ttl_ms, Some(15_000));
    }

    #[test]
    fn ttls_and_hosts_found_by_fuzzing_should_be_refused() {
        // "1us" was taken as a TTL of 0 ms, which the canonical form then wrote as
        // "0ms" and refused to read back; a TTL of centuries overflowed on the way
        // back; a host with a stray bracket was taken for a name.
        for ttl in ["1us", "12121212121215s", "25h"] {
            let body = format!(r#"{{"name":"x","addr":"h:1","ttl":"{ttl}"}}"#);
            assert_eq!(field_of(parse(&body).unwrap_err()), "ttl", "{ttl}");
        }
        let long_host = format!("{}:9", "h".repeat(254));
        for addr in ["102].0.0.1:9", "[::1:9", "[]:9", "a[b]:9", &long_host] {
            let body = format!(r#"{{"name":"x","addr":"{addr}"}}"#);
            assert_eq!(field_of(parse(&body).unwrap_err()), "addr", "{addr}");
        }
        assert_eq!(
            parse(r#"{"name":"x","addr":"[::1]:9"}"#).unwrap().url,
            "http://[::1]:9"
        );
        // Dialect A derives its update and heartbeat URLs: they keep to the limits too.
        let long_path = format!(r#"{{"Name":"x","Addr":"h:9/{}"}}"#, "p".repeat(2030));
        assert_eq!(field_of(parse(&long_path).unwrap_err()), "Addr");
        assert_eq!(
            parse(r#"{"name":"x","addr":"h:1","ttl":"1ms"}"#)
                .unwrap()
                .ttl_ms,
            Some(1)
        );
    }

    #[test]
    fn canonical_json_should_parse_back_to_the_same_registration() {
        let full = parse(
            r#"{"name":"grading","addr":"127.0.0.1:20004","required_services":["log"],
                "update_url":"127.0.0.1:20004/services","heartbeat_url":"127.0.0.1:20004/health",
                "meta":{"zone":"a"},"ttl":"1500ms"}"#,
        )
        .unwrap();
        let bare = parse(r#"{"name":"visit","addr":"127.0.0.1:20003"}"#).unwrap();
        for registration in [full, bare] {
            let body = registration.to_canonical_json().to_string();
            assert_eq!(parse(&body).unwrap(), registration, "{body}");
        }
    }

    #[test]
    fn dialect_a_should_derive_update_and_heartbeat_urls_from_addr() {
        let r = parse(r#"{"Name":"visit","Addr":"localhost:20003","RequiredServices":["log"]}"#)
            .unwrap();
        assert_eq!(r.url, "http://localhost:20003");
        assert_eq!(
            r.update_url.as_deref(),
            Some("http://localhost:20003/services")
        );
        assert_eq!(
            r.heartbeat_url.as_deref(),
            Some("http://localhost:20003/heart-beat")
        );
        assert_eq!(r.required_services, ["log"]);
    }

    #[test]
    fn dialect_b_should_take_its_urls_as_given() {
        let r = parse(
            r#"{"ServiceName":"Portal","ServiceURL":"http://localhost:5000","RequiredServices":["LoggerService","GradeService"],
                "ServiceUpdateURL":"http://localhost:5000/services","HeartbeatURL":"http://localhost:5000/heartbeat"}"#,
        )
        .unwrap();
        assert_eq!(
            (r.name.as_str(), r.url.as_str()),
            ("Portal", "http://localhost:5000")
        );
        assert_eq!(r.required_services, ["LoggerService", "GradeService"]);
        assert_eq!(
            r.heartbeat_url.as_deref(),
            Some("http://localhost:5000/heartbeat")
        );
    }

    #[test]
    fn bad_input_should_name_the_field() {
        let cases = [
            ("{not json", "body"),
            ("[1,2]", "body"),
            (r#"{"addr":"127.0.0.1:1"}"#, "name"),
            (r#"{"name":"","addr":"127.0.0.1:1"}"#, "name"),
            (r#"{"name":"a b","addr":"127.0.0.1:1"}"#, "name"),
            (r#"{"name":"x"}"#, "addr"),
            (r#"{"name":"x","addr":"no-port"}"#, "addr"),
            (r#"{"name":"x","addr":"ftp://h:1"}"#, "addr"),
            (r#"{"name":"x","addr":"h:99999"}"#, "addr"),
            (r#"{"name":"x","addr":"h:0"}"#, "addr"),
            (r#"{"name":"x","addr":5}"#, "addr"),
            (
                r#"{"name":"x","addr":"h:1","required_services":"log"}"#,
                "required_services",
            ),
            (
                r#"{"name":"x","addr":"h:1","required_services":["bad name"]}"#,
                "required_services",
            ),
            (r#"{"name":"x","addr":"h:1","meta":{"a":1}}"#, "meta"),
            (r#"{"name":"x","addr":"h:1","ttl":"soon"}"#, "ttl"),
            (r#"{"name":"x","addr":"h:1","ttl":"0s"}"#, "ttl"),
            (r#"{"Name":"x","Addr":"not an address"}"#, "Addr"),
            (r#"{"ServiceName":"x"}"#, "ServiceURL"),
            (
                r#"{"ServiceName":"x","ServiceURL":"http://h:1","HeartbeatURL":"::"}"#,
                "HeartbeatURL",
            ),
        ];
        for (json, field) in cases {
            assert_eq!(field_of(parse(json).unwrap_err()), field, "{json}");
        }
    }

    #[test]
    fn base_url_should_normalize() {
        assert_eq!(base_url("h:1", "f").unwrap(), "http://h:1");
        assert_eq!(
            base_url("https://h:443/x/", "f").unwrap(),
            "https://h:443/x"
        );
        assert_eq!(base_url("[::1]:8080", "f").unwrap(), "http://[::1]:8080");
        assert_eq!(
            base_url("http://example.com/", "f").unwrap(),
            "http://example.com"
        );
        assert!(
            base_url("example.com", "f").is_err(),
            "host:port needs the port"
        );
        assert!(base_url("h:1 /x", "f").is_err());
    }
}
