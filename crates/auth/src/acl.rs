//! The ACL file: who may do what to which topics, services and the cluster, and
//! the bearer tokens that name principals. Deny by default: what no rule allows is
//! refused.
//!
//! ```toml
//! # `keel token create grading` prints a token and the entry to add here.
//! [[token]]
//! principal = "grading"
//! sha256 = "<the token's SHA-256, hex>"
//!
//! [[allow]]
//! principals = ["grading", "portal"]   # names or globs (`*`, `?`)
//! topics = ["logs", "grading-*"]
//! actions = ["produce", "consume"]      # and `admin`
//!
//! [[allow]]
//! principals = ["grading"]
//! services = ["grading"]
//! actions = ["register", "deregister", "read"]   # and `admin`
//! targets = ["loopback:8000-8999"]      # the addresses it may register
//!
//! [[allow]]
//! principals = ["ops"]
//! cluster = true
//! actions = ["admin"]
//! ```
//!
//! A caller with no credentials is the principal `anonymous`, which only a rule
//! naming `anonymous` itself matches (`*` matches every authenticated principal).

use std::collections::HashMap;
use std::fmt;

use serde::Deserialize;

use crate::glob;
use crate::targets::AllowTargets;

/// The principal of unauthenticated callers.
pub const ANONYMOUS: &str = "anonymous";

/// Who is calling.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Principal {
    /// No credentials.
    Anonymous,
    /// Named by a token or a client certificate.
    Named(String),
}

impl Principal {
    /// The principal's name (`anonymous` for [`Principal::Anonymous`]).
    pub fn name(&self) -> &str {
        match self {
            Self::Anonymous => ANONYMOUS,
            Self::Named(name) => name,
        }
    }
}

impl fmt::Display for Principal {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What a caller asks to do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Action {
    /// Append to a topic.
    Produce,
    /// Read a topic.
    Consume,
    /// Register an instance of a service.
    Register,
    /// Deregister (or heartbeat) an instance of a service.
    Deregister,
    /// Look a service up, or watch it.
    Read,
    /// Manage a topic, any instance of a service, or the cluster.
    Admin,
}

impl Action {
    /// The action's name in the ACL file.
    pub fn name(self) -> &'static str {
        match self {
            Self::Produce => "produce",
            Self::Consume => "consume",
            Self::Register => "register",
            Self::Deregister => "deregister",
            Self::Read => "read",
            Self::Admin => "admin",
        }
    }

    fn parse(text: &str) -> Option<Self> {
        [
            Self::Produce,
            Self::Consume,
            Self::Register,
            Self::Deregister,
            Self::Read,
            Self::Admin,
        ]
        .into_iter()
        .find(|action| action.name() == text)
    }
}

/// What an action is done to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Resource<'a> {
    /// A topic, by name.
    Topic(&'a str),
    /// A service, by name.
    Service(&'a str),
    /// The cluster: its membership and status.
    Cluster,
}

impl fmt::Display for Resource<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Self::Topic(name) => write!(f, "topic:{name}"),
            Self::Service(name) => write!(f, "service:{name}"),
            Self::Cluster => f.write_str("cluster"),
        }
    }
}

/// An ACL file that cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("ACL {source_name}: {message}")]
pub struct AclError {
    source_name: String,
    message: String,
}

impl AclError {
    pub(crate) fn unreadable(source_name: &str, err: &std::io::Error) -> Self {
        Self {
            source_name: source_name.to_owned(),
            message: format!("cannot be read: {err}"),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    token: Vec<TokenEntry>,
    #[serde(default)]
    allow: Vec<RuleEntry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct TokenEntry {
    principal: String,
    sha256: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RuleEntry {
    principals: Vec<String>,
    topics: Option<Vec<String>>,
    services: Option<Vec<String>>,
    #[serde(default)]
    cluster: bool,
    actions: Vec<String>,
    targets: Option<Vec<String>>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Scope {
    Topics(Vec<String>),
    Services(Vec<String>),
    Cluster,
}

#[derive(Debug, Clone, PartialEq, Eq)]
struct Rule {
    principals: Vec<String>,
    scope: Scope,
    actions: Vec<Action>,
    targets: Option<AllowTargets>,
}

impl Rule {
    fn names(&self, principal: &Principal) -> bool {
        self.principals.iter().any(|pattern| match principal {
            Principal::Anonymous => pattern == ANONYMOUS,
            Principal::Named(name) => pattern != ANONYMOUS && glob::matches(pattern, name),
        })
    }

    fn covers(&self, resource: Resource<'_>) -> bool {
        match (&self.scope, resource) {
            (Scope::Topics(patterns), Resource::Topic(name))
            | (Scope::Services(patterns), Resource::Service(name)) => {
                patterns.iter().any(|pattern| glob::matches(pattern, name))
            }
            (Scope::Cluster, Resource::Cluster) => true,
            _ => false,
        }
    }

    fn allows(&self, principal: &Principal, action: Action, resource: Resource<'_>) -> bool {
        self.actions.contains(&action) && self.names(principal) && self.covers(resource)
    }
}

/// A parsed ACL: its tokens and rules.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Acl {
    /// Principal by the SHA-256 (hex) of its token.
    tokens: HashMap<String, String>,
    rules: Vec<Rule>,
}

impl Acl {
    /// Parses the ACL file `text`; `source_name` (its path) goes into errors.
    ///
    /// # Errors
    ///
    /// [`AclError`] naming what is wrong: TOML syntax (with its line), an unknown
    /// field or action, a rule with no or several scopes, a bad token hash or target.
    pub fn parse(text: &str, source_name: &str) -> Result<Self, AclError> {
        let error = |message: String| AclError {
            source_name: source_name.to_owned(),
            message,
        };
        let file: File = toml::from_str(text).map_err(|err| error(err.to_string()))?;
        let mut tokens = HashMap::new();
        for (at, entry) in file.token.iter().enumerate() {
            let which = format!("token #{}", at + 1);
            valid_principal(&entry.principal).map_err(|why| error(format!("{which}: {why}")))?;
            let hash = entry.sha256.to_ascii_lowercase();
            if hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(error(format!(
                    "{which}: sha256 must be 64 hex digits (the hash `keel token create` prints)"
                )));
            }
            if tokens.insert(hash, entry.principal.clone()).is_some() {
                return Err(error(format!("{which}: the same token is listed twice")));
            }
        }
        let rules = file
            .allow
            .into_iter()
            .enumerate()
            .map(|(at, entry)| {
                rule(entry).map_err(|why| error(format!("allow #{}: {why}", at + 1)))
            })
            .collect::<Result<_, _>>()?;
        Ok(Self { tokens, rules })
    }

    /// The principal a bearer token names, if the ACL lists it.
    pub fn principal_of_token(&self, token: &str) -> Option<&str> {
        self.tokens
            .get(&crate::token::hash(token))
            .map(String::as_str)
    }

    /// Whether a rule allows `principal` to do `action` to `resource`.
    pub fn allows(&self, principal: &Principal, action: Action, resource: Resource<'_>) -> bool {
        self.rules
            .iter()
            .any(|rule| rule.allows(principal, action, resource))
    }

    /// The addresses `principal` may register instances of `service` at: the union
    /// of the `targets` of the rules that let it register them; `None` when one of
    /// them names no targets (any address, within the registry's own list).
    pub fn register_targets(&self, principal: &Principal, service: &str) -> Option<AllowTargets> {
        let mut union: Option<AllowTargets> = None;
        for rule in &self.rules {
            if !rule.allows(principal, Action::Register, Resource::Service(service)) {
                continue;
            }
            let targets = rule.targets.as_ref()?;
            union = Some(match union {
                Some(so_far) => so_far.union(targets),
                None => targets.clone(),
            });
        }
        union
    }
}

fn valid_principal(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 256 || name.chars().any(char::is_control) {
        return Err(format!(
            "principal {name:?} must be 1 to 256 characters, none a control character"
        ));
    }
    if name == ANONYMOUS {
        return Err(format!(
            "{ANONYMOUS:?} names callers without credentials; a token cannot"
        ));
    }
    Ok(())
}

fn rule(entry: RuleEntry) -> Result<Rule, String> {
    if entry.principals.is_empty() {
        return Err(
            "principals is empty: name who the rule is for (\"*\" for anyone authenticated)".into(),
        );
    }
    let (scope, allowed): (Scope, &[&str]) = match (entry.topics, entry.services, entry.cluster) {
        (Some(topics), None, false) => (Scope::Topics(topics), &["produce", "consume", "admin"]),
        (None, Some(services), false) => (
            Scope::Services(services),
            &["register", "deregister", "read", "admin"],
        ),
        (None, None, true) => (Scope::Cluster, &["admin"]),
        _ => return Err("give exactly one of topics, services or cluster = true".into()),
    };
    if entry.targets.is_some() && !matches!(scope, Scope::Services(_)) {
        return Err("targets belong to a rule on services".into());
    }
    if entry.actions.is_empty() {
        return Err("actions is empty".into());
    }
    let actions = entry
        .actions
        .iter()
        .map(|name| {
            Action::parse(name)
                .filter(|_| allowed.contains(&name.as_str()))
                .ok_or_else(|| format!("action {name:?} is not one of {}", allowed.join(", ")))
        })
        .collect::<Result<Vec<_>, _>>()?;
    let targets = entry
        .targets
        .map(|entries| {
            entries
                .join(",")
                .parse::<AllowTargets>()
                .map_err(|err| err.to_string())
        })
        .transpose()?;
    Ok(Rule {
        principals: entry.principals,
        scope,
        actions,
        targets,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const ACL: &str = r#"
        [[token]]
        principal = "grading"
        sha256 = "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"

        [[allow]]
        principals = ["grading", "portal"]
        topics = ["logs", "grading-*"]
        actions = ["produce", "consume"]

        [[allow]]
        principals = ["grading"]
        services = ["grading"]
        actions = ["register", "deregister", "read"]
        targets = ["loopback:8000-8999"]

        [[allow]]
        principals = ["*"]
        services = ["*"]
        actions = ["read"]

        [[allow]]
        principals = ["anonymous"]
        topics = ["public"]
        actions = ["consume"]

        [[allow]]
        principals = ["ops"]
        cluster = true
        actions = ["admin"]
    "#;

    fn named(name: &str) -> Principal {
        Principal::Named(name.to_owned())
    }

    #[test]
    fn rules_should_allow_what_they_name_and_nothing_else() {
        let acl = Acl::parse(ACL, "test").expect("an ACL");
        let grading = named("grading");
        assert!(acl.allows(&grading, Action::Produce, Resource::Topic("logs")));
        assert!(acl.allows(&grading, Action::Consume, Resource::Topic("grading-2026")));
        assert!(!acl.allows(&grading, Action::Admin, Resource::Topic("logs")));
        assert!(!acl.allows(&grading, Action::Produce, Resource::Topic("visits")));
        assert!(acl.allows(&grading, Action::Register, Resource::Service("grading")));
        assert!(!acl.allows(&grading, Action::Register, Resource::Service("portal")));
        assert!(acl.allows(&named("portal"), Action::Read, Resource::Service("grading")));
        assert!(!acl.allows(&grading, Action::Admin, Resource::Cluster));
        assert!(acl.allows(&named("ops"), Action::Admin, Resource::Cluster));
        assert!(!acl.allows(&named("ops"), Action::Admin, Resource::Topic("logs")));
    }

    #[test]
    fn an_anonymous_caller_should_match_only_rules_naming_it() {
        let acl = Acl::parse(ACL, "test").expect("an ACL");
        let anonymous = Principal::Anonymous;
        assert!(!acl.allows(&anonymous, Action::Read, Resource::Service("grading")));
        assert!(acl.allows(&anonymous, Action::Consume, Resource::Topic("public")));
        assert!(!acl.allows(
            &named("anonymous-ish"),
            Action::Consume,
            Resource::Topic("public")
        ));
    }

    #[test]
    fn tokens_should_name_their_principal_by_hash() {
        let acl = Acl::parse(ACL, "test").expect("an ACL");
        assert_eq!(acl.principal_of_token("abc"), Some("grading"));
        assert_eq!(acl.principal_of_token("abd"), None);
    }

    #[test]
    fn register_targets_should_be_the_union_of_the_rules_that_allow_it() {
        let acl = Acl::parse(ACL, "test").expect("an ACL");
        let targets = acl
            .register_targets(&named("grading"), "grading")
            .expect("targets");
        assert!(targets.allows("127.0.0.1:8080".parse().expect("an address")));
        assert!(!targets.allows("127.0.0.1:20002".parse().expect("an address")));
        let open = Acl::parse(
            r#"
            [[allow]]
            principals = ["a"]
            services = ["s"]
            actions = ["register"]
            targets = ["10.0.0.0/8"]
            [[allow]]
            principals = ["*"]
            services = ["s"]
            actions = ["register"]
            "#,
            "test",
        )
        .expect("an ACL");
        assert_eq!(open.register_targets(&named("a"), "s"), None);
    }

    #[test]
    fn mistakes_should_be_refused_with_where_they_are() {
        for (text, expected) in [
            (
                "[[allow]]\nprincipals = [\"a\"]\nactions = [\"read\"]",
                "exactly one of",
            ),
            (
                "[[allow]]\nprincipals = [\"a\"]\ntopics = [\"t\"]\nactions = [\"register\"]",
                "action \"register\"",
            ),
            (
                "[[allow]]\nprincipals = []\ntopics = [\"t\"]\nactions = [\"produce\"]",
                "principals is empty",
            ),
            (
                "[[allow]]\nprincipals = [\"a\"]\ntopics = [\"t\"]\nactions = [\"produce\"]\ntargets = [\"any\"]",
                "targets belong",
            ),
            (
                "[[allow]]\nprincipals = [\"a\"]\nservices = [\"s\"]\nactions = [\"register\"]\ntargets = [\"10.0.0.0/33\"]",
                "10.0.0.0/33",
            ),
            (
                "[[token]]\nprincipal = \"a\"\nsha256 = \"xyz\"",
                "64 hex digits",
            ),
            (
                "[[token]]\nprincipal = \"anonymous\"\nsha256 = \"ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad\"",
                "without credentials",
            ),
            ("[[allow]]\nprincipal = [\"a\"]", "unknown field"),
            ("[[allow", "TOML"),
        ] {
            let err = Acl::parse(text, "acl.toml").expect_err(text).to_string();
            assert!(err.contains("acl.toml"), "{err}");
            assert!(
                err.to_lowercase().contains(&expected.to_lowercase()),
                "{text}: {err}"
            );
        }
    }
}
