//! Each HTTP API's OpenAPI document, served at [`PATH`] and kept in step with the
//! routes that serve the API.
//!
//! A server builds its routes through [`Routes`], which records every path it is
//! given. Two checks hold the document to them, so that neither can drift:
//! - [`path_drift`]: every path routed is in the document, and the reverse;
//! - [`probe_methods`] (against a running server): every operation in the
//!   document is answered by a route, and every other method of its path is
//!   refused with 405; [`check_served`] adds that the server serves the document
//!   kept in `docs/api/`.

use std::collections::BTreeSet;

use axum::Router;
use axum::http::header::CONTENT_TYPE;
use axum::routing::MethodRouter;

/// Where every keel HTTP API serves its document.
pub const PATH: &str = "/openapi.json";

/// An axum router that remembers the path of every route, and serves the API's
/// OpenAPI document at [`PATH`].
#[derive(Debug)]
pub struct Routes<S> {
    router: Router<S>,
    paths: Vec<&'static str>,
}

impl<S: Clone + Send + Sync + 'static> Routes<S> {
    /// Routes serving `document` (the API's OpenAPI document, JSON) at [`PATH`].
    pub fn new(document: &'static str) -> Self {
        let serve =
            axum::routing::get(
                move || async move { ([(CONTENT_TYPE, "application/json")], document) },
            );
        Self {
            router: Router::new().route(PATH, serve),
            paths: vec![PATH],
        }
    }

    /// Adds a route, as [`Router::route`] does.
    #[must_use]
    pub fn route(mut self, path: &'static str, route: MethodRouter<S>) -> Self {
        self.router = self.router.route(path, route);
        self.paths.push(path);
        self
    }

    /// The path of every route, [`PATH`] among them.
    pub fn paths(&self) -> &[&'static str] {
        &self.paths
    }

    /// The router.
    pub fn into_router(self) -> Router<S> {
        self.router
    }
}

/// The methods an OpenAPI path item may hold operations for.
const METHODS: [&str; 5] = ["get", "post", "put", "delete", "patch"];

/// The operations of an OpenAPI document: `(method, path)`, the method in upper
/// case and the path as a template (`/v1/topics/{topic}`).
///
/// # Errors
///
/// When `document` is not JSON or has no `paths` object.
pub fn operations(document: &str) -> Result<Vec<(String, String)>, String> {
    let document: serde_json::Value =
        serde_json::from_str(document).map_err(|err| format!("not JSON: {err}"))?;
    let paths = document["paths"]
        .as_object()
        .ok_or("the document has no paths")?;
    let mut operations = Vec::new();
    for (path, item) in paths {
        for method in METHODS {
            if item.get(method).is_some() {
                operations.push((method.to_uppercase(), path.clone()));
            }
        }
    }
    Ok(operations)
}

/// What differs between the paths routed and those of the document: `Ok` when
/// nothing does, else a message naming each path on one side only.
///
/// # Errors
///
/// The message, or why `document` could not be read.
pub fn path_drift(document: &str, routed: &[&str]) -> Result<(), String> {
    let documented: BTreeSet<String> = operations(document)?
        .into_iter()
        .map(|(_, path)| path)
        .collect();
    let routed: BTreeSet<String> = routed.iter().map(|path| (*path).to_owned()).collect();
    let undocumented: Vec<&String> = routed.difference(&documented).collect();
    let unrouted: Vec<&String> = documented.difference(&routed).collect();
    if undocumented.is_empty() && unrouted.is_empty() {
        return Ok(());
    }
    Err(format!(
        "routed but not in the OpenAPI document: {undocumented:?}; in the document but not routed: {unrouted:?}"
    ))
}

/// Asks a running server at `base` (`http://host:port`) every method of every path
/// of `document`, with each path parameter set from `samples` (`("topic", "t")`) and
/// an empty body: a documented operation must not be answered as an unknown route
/// or method (404 whose message starts `no such route`, or 405), and any other method
/// must be answered 405. Returns what did not hold, one line each; streaming answers
/// are not read past their head.
///
/// # Errors
///
/// When `document` cannot be read, a path parameter has no sample, or a request
/// fails.
pub async fn probe_methods(
    base: &str,
    document: &str,
    samples: &[(&str, &str)],
) -> Result<Vec<String>, String> {
    let operations = operations(document)?;
    let paths: BTreeSet<&String> = operations.iter().map(|(_, path)| path).collect();
    let client = crate::client::new();
    let mut wrong = Vec::new();
    for template in paths {
        let mut path = template.clone();
        for (name, value) in samples {
            path = path.replace(&format!("{{{name}}}"), value);
        }
        if path.contains('{') {
            return Err(format!("no sample for a parameter of {template}"));
        }
        for method in METHODS {
            let method = method.to_uppercase();
            let documented = operations
                .iter()
                .any(|(m, p)| *m == method && p == template);
            let verb = reqwest::Method::from_bytes(method.as_bytes())
                .map_err(|err| format!("{method}: {err}"))?;
            let answer = client
                .request(verb, format!("{base}{path}"))
                .header(CONTENT_TYPE, "application/json")
                .send()
                .await
                .map_err(|err| format!("{method} {path}: {err}"))?;
            let status = answer.status().as_u16();
            let body = if status == 404 {
                answer.text().await.unwrap_or_default()
            } else {
                String::new()
            };
            let no_route = status == 404 && body.contains("\"message\":\"no such route");
            match (documented, status, no_route) {
                (true, 405, _) | (true, _, true) => wrong.push(format!(
                    "{method} {template}: documented, but the server has no such route ({status})"
                )),
                (false, 405, _) => {}
                (false, status, _) => wrong.push(format!(
                    "{method} {template}: answered {status}, but the document has no such operation"
                )),
                (true, _, false) => {}
            }
        }
    }
    Ok(wrong)
}

/// Fetches the document the server at `base` serves at [`PATH`], checks that it is
/// `kept` (the file in `docs/api/`) served as JSON, then [`probe_methods`] with it.
/// Returns what did not hold, one line each.
///
/// # Errors
///
/// As [`probe_methods`], and when the document cannot be fetched.
pub async fn check_served(
    base: &str,
    kept: &str,
    samples: &[(&str, &str)],
) -> Result<Vec<String>, String> {
    let answer = crate::client::new()
        .get(format!("{base}{PATH}"))
        .send()
        .await
        .map_err(|err| format!("GET {PATH}: {err}"))?;
    let mut wrong = Vec::new();
    let content_type = answer.headers().get(CONTENT_TYPE).cloned();
    if answer.status() != reqwest::StatusCode::OK
        || content_type
            .as_ref()
            .is_none_or(|v| v != "application/json")
    {
        wrong.push(format!(
            "GET {PATH}: {} with content type {content_type:?}, not 200 JSON",
            answer.status()
        ));
    }
    let served = answer
        .text()
        .await
        .map_err(|err| format!("GET {PATH}: {err}"))?;
    if served != kept {
        wrong.push(format!("GET {PATH} is not the document kept in docs/api/"));
    }
    wrong.extend(probe_methods(base, &served, samples).await?);
    Ok(wrong)
}

#[cfg(test)]
mod tests {
    use super::*;

    const DOCUMENT: &str = r#"{"openapi":"3.1.0","paths":{
        "/a":{"get":{},"post":{}},"/b/{id}":{"delete":{}, "parameters":[]}}}"#;

    #[test]
    fn operations_should_list_each_method_of_each_path() {
        let mut operations = operations(DOCUMENT).unwrap();
        operations.sort();
        assert_eq!(
            operations,
            [
                ("DELETE".to_owned(), "/b/{id}".to_owned()),
                ("GET".to_owned(), "/a".to_owned()),
                ("POST".to_owned(), "/a".to_owned()),
            ]
        );
    }

    #[test]
    fn path_drift_should_name_the_paths_on_one_side_only() {
        assert_eq!(path_drift(DOCUMENT, &["/a", "/b/{id}"]), Ok(()));
        let drift = path_drift(DOCUMENT, &["/a", "/c"]).unwrap_err();
        assert!(
            drift.contains("[\"/c\"]") && drift.contains("[\"/b/{id}\"]"),
            "{drift}"
        );
    }
}
