//! keel's security policy, shared by every server: who the caller is (a bearer
//! token, or an anonymous caller), what the ACL lets each principal do to topics,
//! services and the cluster (deny by default once an ACL is given; reloaded on
//! `SIGHUP` and on file change), and where a registry may send requests
//! ([`AllowTargets`]).
//!
//! ```text
//!  request ──> Authorizer::authenticate ──> Principal ──> Authorizer::authorize(action, resource)
//!                 (Authorization: Bearer)                    │ allowed: on
//!                                                            └ denied: 401 / 403, counted, audit line
//! ```
//!
//! Servers own the mapping of their requests to an [`Action`] on a [`Resource`];
//! this crate owns the decision. It depends on no other keel crate but the serving
//! one (for its metrics text).

mod acl;
mod authorizer;
mod glob;
#[cfg(feature = "mint")]
pub mod mint;
pub mod signature;
pub mod targets;
pub mod token;

pub use acl::{ANONYMOUS, Acl, AclError, Action, Principal, Resource};
pub use authorizer::{Authorizer, Denied};
pub use targets::{AllowTargets, BadTargets, TargetRefused};
