//! Scopes: what each node may read and write, as the cluster authority grants it.
//!
//! The holder of the cluster CA key is the authority. It signs, with that key, a *grant* per
//! node (the collections it may read and write, each optionally narrowed to the records whose
//! field has a given value) and *revocations* (a node whose changes stop counting past a
//! cut-off). A node honours a grant or a revocation only if its signature verifies against the
//! cluster CA certificate it holds and it names this cluster, so no node can grant itself more.
//!
//! This module owns the signed formats, their signing and checking, and the rule that judges
//! a change. It guarantees that the rule is a pure function of its inputs (the change's author,
//! its place in its origin's log, its record as of the change's dependencies and as the change leaves
//! it, and the set of verified grants and revocations), so every node that judges the same
//! change against the same set decides alike, whenever the set reached it.
//!
//! The rule:
//! - With no grants in force at all, every node reads and writes everything (a cluster that
//!   never granted anything behaves as before scopes). A node without a grant of its own reads
//!   and writes everything too: the authority narrows a node by granting it.
//! - Of several grants for one node, the one issued last counts (ties: the larger signature
//!   bytes), so granting again replaces a grant.
//! - A node may read a record when a read scope of its grant names the record's collection and
//!   its filter, if any, holds for the record's fields (a field equal to the value, compared as
//!   JSON).
//! - A change by a node with a grant is allowed when a write scope names the collection and its
//!   filter holds both for the record as of the change's dependencies (unless the record did
//!   not exist or was deleted there) and for the record as the change leaves it (unless the
//!   change deletes it). So a site that may write `customers:region=paris` can create, edit and
//!   delete Paris customers, but can neither edit another region's nor move one of its own out.
//! - A change by a revoked node counts only at a place in its origin's replication log (a
//!   writer of that node, and a sequence number in that writer's log, from 1) at or before the
//!   cut-off the revocation names for that writer (a writer it does not name: nothing counts);
//!   one past it is refused, whatever grant the node had; one that comes with no place
//!   (fetched outside the log) waits until it comes with its place, except in an import,
//!   which is refused. One at or before it is judged by the grant as above. The cut-off is
//!   the highest place the revoking node held of each writer when it revoked; Automerge's
//!   own sequence numbers are per document, so they cannot name one cut-off for a whole node.
//!   A node that receives a revocation takes out what it already held past the cut-off, with
//!   what was written on top of it, so it holds what a node that received the revocation
//!   first holds.
//! - A change names its author in its stamp ([`crate::record::stamp`]); one that names none
//!   is judged, once anything is granted, as one by a node granted nothing.

mod door;
mod registry;
mod rule;
mod set;
mod signed;
#[cfg(test)]
mod tests;

pub use door::ScopeDoor;
pub use registry::{
    grant_key, is_grant_doc, store_signed, writers_of, Refreshed, Registry, Verify,
    GRANT_RECORDS_PAGE,
};
pub use rule::{Filter, Scope};
pub use set::{Refusal, Scopes};
pub use signed::{Authority, Grant, Removal, Revocation, Signed, Verified, Verifier};

/// The collection that holds signed grants and revocations, each under the SHA-256 of its
/// bytes (so two never overwrite each other), in a field `signed` (hex).
pub const GRANTS_COLLECTION: &str = "_grants";
/// Version of the signed bodies this build writes and reads.
pub const SCOPE_FORMAT_VERSION: u16 = 1;
/// Most read scopes, and most write scopes, one grant holds.
pub const SCOPES_PER_GRANT_MAX: usize = 64;
/// Longest field name a filter names (as a record's field names).
pub const FILTER_FIELD_BYTES_MAX: usize = crate::record::document::FIELD_NAME_BYTES_MAX;
/// Longest filter value, as JSON text.
pub const FILTER_VALUE_BYTES_MAX: usize = 256;
/// Most writers one revocation names a cut-off for.
pub const CUT_OFFS_MAX: usize = 1024;
/// Largest signed grant or revocation, encoded: every bound above fits in it.
pub const SIGNED_BYTES_MAX: usize = 128 * 1024;

const _: () = assert!(
    2 * SCOPES_PER_GRANT_MAX * (64 + FILTER_FIELD_BYTES_MAX + FILTER_VALUE_BYTES_MAX + 8) + 1024
        <= SIGNED_BYTES_MAX
);
const _: () = assert!(CUT_OFFS_MAX * (16 + 10) + 1024 <= SIGNED_BYTES_MAX);
// A signed item is stored as hex in one record of `_grants`, whose change must fit a frame.
const _: () = assert!(2 * SIGNED_BYTES_MAX + 4096 <= crate::record::document::CHANGE_BYTES_MAX);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ScopeError {
    #[error("{0:?} is not a scope: give COLLECTION or COLLECTION:FIELD=VALUE")]
    BadScope(String),
    #[error("scope {scope:?}: {reason}")]
    BadPart { scope: String, reason: String },
    #[error(
        "a grant holds at most {SCOPES_PER_GRANT_MAX} read and {SCOPES_PER_GRANT_MAX} write scopes"
    )]
    TooManyScopes,
    #[error("a revocation names at most {CUT_OFFS_MAX} writers")]
    TooManyCutOffs,
    #[error("the signature does not verify against the cluster CA")]
    BadSignature,
    #[error("signed for cluster {0}, not this one")]
    OtherCluster(String),
    #[error("format version {0} is not known to this build (it knows {SCOPE_FORMAT_VERSION})")]
    UnknownVersion(u16),
    #[error("not a signed grant or revocation: {0}")]
    Malformed(String),
    #[error("the cluster CA: {0}")]
    Authority(String),
}
