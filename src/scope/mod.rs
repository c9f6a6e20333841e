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

use std::collections::BTreeMap;
use std::path::Path;
use std::sync::{Arc, RwLock};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use crate::record::origin::ACTOR_REGISTRY_COLLECTION;
use crate::record::{Collection, NodeId};

/// The collection that holds signed grants and revocations, each under the SHA-256 of its
/// bytes (so two never overwrite each other), in a field `signed` (hex).
pub const GRANTS_COLLECTION: &str = "_grants";
/// Most grants and revocations a node reads from [`GRANTS_COLLECTION`].
pub const GRANT_RECORDS_MAX: usize = 10_000;
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
// And it comes in through the API in one request body.
const _: () = assert!(SIGNED_BYTES_MAX <= crate::node::api::REQUEST_BYTES_MAX);

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

/// A collection, optionally narrowed to the records whose `field` equals a value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scope {
    pub collection: String,
    pub filter: Option<Filter>,
}

/// A field and the value it must have, kept as its JSON text (one spelling per value, so that
/// the signed bytes of a grant are the same wherever it is made).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    pub field: String,
    pub value_json: String,
}

impl Scope {
    /// Reads `COLLECTION` or `COLLECTION:FIELD=VALUE`; VALUE is JSON when it is valid JSON
    /// (`7`, `true`, `"x"`), a string otherwise, as `concord put` takes values.
    pub fn parse(text: &str) -> Result<Self, ScopeError> {
        let bad_part = |reason: String| ScopeError::BadPart {
            scope: text.to_owned(),
            reason,
        };
        let (collection, filter) = match text.split_once(':') {
            None => (text, None),
            Some((collection, filter)) => {
                let Some((field, value)) = filter.split_once('=') else {
                    return Err(ScopeError::BadScope(text.to_owned()));
                };
                crate::record::document::check_field_name(field)
                    .map_err(|error| bad_part(error.to_string()))?;
                let value: Json =
                    serde_json::from_str(value).unwrap_or_else(|_| Json::String(value.to_owned()));
                if value.is_object() || value.is_array() || value.is_null() {
                    return Err(bad_part(
                        "a filter's value is a string, number or boolean".to_owned(),
                    ));
                }
                let value_json = value.to_string();
                if value_json.len() > FILTER_VALUE_BYTES_MAX {
                    return Err(bad_part(format!(
                        "a filter's value is at most {FILTER_VALUE_BYTES_MAX} bytes"
                    )));
                }
                (
                    collection,
                    Some(Filter {
                        field: field.to_owned(),
                        value_json,
                    }),
                )
            }
        };
        Collection::new_user(collection).map_err(|error| bad_part(error.to_string()))?;
        Ok(Self {
            collection: collection.to_owned(),
            filter,
        })
    }

    /// Whether this scope covers a record of `collection` whose fields are `fields`.
    pub fn covers(&self, collection: &str, fields: &Map<String, Json>) -> bool {
        self.collection == collection
            && self.filter.as_ref().is_none_or(|filter| {
                fields
                    .get(&filter.field)
                    .and_then(|value| serde_json::to_string(value).ok())
                    .is_some_and(|text| text == filter.value_json)
            })
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, out: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.filter {
            None => write!(out, "{}", self.collection),
            Some(filter) => {
                // A string value is written bare, as it is given.
                let value = match serde_json::from_str::<Json>(&filter.value_json) {
                    Ok(Json::String(text)) if serde_json::from_str::<Json>(&text).is_err() => text,
                    _ => filter.value_json.clone(),
                };
                write!(out, "{}:{}={value}", self.collection, filter.field)
            }
        }
    }
}

/// What the authority grants one node.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Grant {
    pub cluster: [u8; 16],
    pub node: [u8; 16],
    pub read: Vec<Scope>,
    pub write: Vec<Scope>,
    /// When it was issued (ms since the Unix epoch, the authority's clock): the latest counts.
    pub issued_ms: u64,
}

/// The authority's word that a node's changes stop counting past a cut-off.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Revocation {
    pub cluster: [u8; 16],
    pub node: [u8; 16],
    /// Per writer of the node (the origin of its log): the last place in that log that still
    /// counts.
    pub cut_off: Vec<([u8; 16], u64)>,
    pub issued_ms: u64,
}

/// The authority's word that a node left the cluster for good: its changes all count, but it
/// no longer holds back what every replica is said to hold (see [`crate::sync::stability`]),
/// and its connections are refused, so it can never bring back changes the others did not
/// wait for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Removal {
    pub cluster: [u8; 16],
    pub node: [u8; 16],
    pub issued_ms: u64,
}

/// What is signed: a version, then the body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
enum Body {
    Grant(Grant),
    Revocation(Revocation),
    Removal(Removal),
}

/// A body and the authority's signature over its bytes (ECDSA P-256 with SHA-256, ASN.1).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Signed {
    pub version: u16,
    pub body: Vec<u8>,
    pub signature: Vec<u8>,
}

impl Signed {
    pub fn to_bytes(&self) -> Vec<u8> {
        postcard::to_stdvec(self).expect("a signed body encodes")
    }

    pub fn from_bytes(bytes: &[u8]) -> Result<Self, ScopeError> {
        if bytes.len() > SIGNED_BYTES_MAX {
            return Err(ScopeError::Malformed(format!(
                "{} bytes, over {SIGNED_BYTES_MAX}",
                bytes.len()
            )));
        }
        postcard::from_bytes(bytes).map_err(|error| ScopeError::Malformed(error.to_string()))
    }
}

/// Signs with the cluster CA key in `ca_dir`.
pub struct Authority {
    key: ring::signature::EcdsaKeyPair,
    cluster: [u8; 16],
}

impl Authority {
    pub fn open(ca_dir: &Path) -> Result<Self, ScopeError> {
        let cluster = crate::net::tls::read_cluster_id(ca_dir)
            .map_err(|error| ScopeError::Authority(error.to_string()))?;
        let path = ca_dir.join(crate::net::tls::CA_KEY_FILE);
        let pem = std::fs::read_to_string(&path)
            .map_err(|error| ScopeError::Authority(format!("{}: {error}", path.display())))?;
        let key = rcgen::KeyPair::from_pem(&pem)
            .map_err(|error| ScopeError::Authority(format!("{}: {error}", path.display())))?;
        let key = ring::signature::EcdsaKeyPair::from_pkcs8(
            &ring::signature::ECDSA_P256_SHA256_ASN1_SIGNING,
            &key.serialize_der(),
            &ring::rand::SystemRandom::new(),
        )
        .map_err(|error| ScopeError::Authority(format!("{}: {error}", path.display())))?;
        Ok(Self { key, cluster })
    }

    pub fn cluster(&self) -> [u8; 16] {
        self.cluster
    }

    /// The grant of `read` and `write` to `node`, signed.
    pub fn grant(
        &self,
        node: NodeId,
        read: Vec<Scope>,
        write: Vec<Scope>,
        issued_ms: u64,
    ) -> Result<Signed, ScopeError> {
        if read.len() > SCOPES_PER_GRANT_MAX || write.len() > SCOPES_PER_GRANT_MAX {
            return Err(ScopeError::TooManyScopes);
        }
        self.sign(&Body::Grant(Grant {
            cluster: self.cluster,
            node: node.0,
            read,
            write,
            issued_ms,
        }))
    }

    /// The revocation of `node`, its changes counting up to `cut_off` per writer, signed.
    pub fn revoke(
        &self,
        node: NodeId,
        cut_off: BTreeMap<NodeId, u64>,
        issued_ms: u64,
    ) -> Result<Signed, ScopeError> {
        if cut_off.len() > CUT_OFFS_MAX {
            return Err(ScopeError::TooManyCutOffs);
        }
        self.sign(&Body::Revocation(Revocation {
            cluster: self.cluster,
            node: node.0,
            cut_off: cut_off
                .into_iter()
                .map(|(writer, place)| (writer.0, place))
                .collect(),
            issued_ms,
        }))
    }

    /// The removal of `node` from the cluster, signed.
    pub fn remove(&self, node: NodeId, issued_ms: u64) -> Result<Signed, ScopeError> {
        self.sign(&Body::Removal(Removal {
            cluster: self.cluster,
            node: node.0,
            issued_ms,
        }))
    }

    fn sign(&self, body: &Body) -> Result<Signed, ScopeError> {
        let body = postcard::to_stdvec(body).expect("a body encodes");
        let signature = self
            .key
            .sign(&ring::rand::SystemRandom::new(), &body)
            .map_err(|error| ScopeError::Authority(error.to_string()))?;
        let signed = Signed {
            version: SCOPE_FORMAT_VERSION,
            body,
            signature: signature.as_ref().to_vec(),
        };
        assert!(signed.to_bytes().len() <= SIGNED_BYTES_MAX);
        Ok(signed)
    }
}

/// Checks signatures against the cluster CA certificate a node holds.
pub struct Verifier {
    public_key: Vec<u8>,
    cluster: [u8; 16],
}

/// A signed body that verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verified {
    Grant(Grant),
    Revocation(Revocation),
    Removal(Removal),
}

impl Verifier {
    /// From the cluster CA certificate (PEM) and the cluster id.
    pub fn new(ca_cert_pem: &str, cluster: [u8; 16]) -> Result<Self, ScopeError> {
        let (_, pem) = x509_parser::pem::parse_x509_pem(ca_cert_pem.as_bytes())
            .map_err(|error| ScopeError::Authority(error.to_string()))?;
        let certificate = pem
            .parse_x509()
            .map_err(|error| ScopeError::Authority(error.to_string()))?;
        Ok(Self {
            public_key: certificate.public_key().subject_public_key.data.to_vec(),
            cluster,
        })
    }

    pub fn verify(&self, signed: &Signed) -> Result<Verified, ScopeError> {
        if signed.version != SCOPE_FORMAT_VERSION {
            return Err(ScopeError::UnknownVersion(signed.version));
        }
        ring::signature::UnparsedPublicKey::new(
            &ring::signature::ECDSA_P256_SHA256_ASN1,
            &self.public_key,
        )
        .verify(&signed.body, &signed.signature)
        .map_err(|_| ScopeError::BadSignature)?;
        let body: Body = postcard::from_bytes(&signed.body)
            .map_err(|error| ScopeError::Malformed(error.to_string()))?;
        let (cluster, verified) = match body {
            Body::Grant(grant) => (grant.cluster, Verified::Grant(grant)),
            Body::Revocation(revocation) => (revocation.cluster, Verified::Revocation(revocation)),
            Body::Removal(removal) => (removal.cluster, Verified::Removal(removal)),
        };
        if cluster != self.cluster {
            return Err(ScopeError::OtherCluster(hex::encode(cluster)));
        }
        Ok(verified)
    }
}

/// Why a change is refused by the rule (see the module doc).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// The author's grant names no write scope for the record as it was or as it is left.
    OutsideGrant,
    /// The author was revoked, and the change is past the cut-off for its writer (or came
    /// with no place in a log).
    Revoked,
}

impl Refusal {
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::OutsideGrant => "outside_grant",
            Self::Revoked => "revoked",
        }
    }
}

/// The verified grants and revocations in force: per node, the grant issued last, and every
/// revocation (the earliest cut-off per writer counts, so a later revocation never lets in what
/// an earlier one kept out).
#[derive(Debug, Clone, Default)]
pub struct Scopes {
    grants: BTreeMap<NodeId, (Grant, Vec<u8>)>,
    cut_offs: BTreeMap<NodeId, BTreeMap<[u8; 16], u64>>,
    /// Nodes removed from the cluster. Removals judge no change: they leave the door open.
    removed: std::collections::BTreeSet<NodeId>,
}

impl Scopes {
    /// Takes in a verified grant or revocation with its signature (the tie-break).
    pub fn insert(&mut self, verified: Verified, signature: &[u8]) {
        match verified {
            Verified::Grant(grant) => {
                let node = NodeId(grant.node);
                let newer = self.grants.get(&node).is_none_or(|(held, held_signature)| {
                    (grant.issued_ms, signature) > (held.issued_ms, held_signature.as_slice())
                });
                if newer {
                    self.grants.insert(node, (grant, signature.to_vec()));
                }
            }
            Verified::Revocation(revocation) => {
                let cut_offs = self.cut_offs.entry(NodeId(revocation.node)).or_default();
                if cut_offs.is_empty() {
                    // First revocation: a writer it does not name counts nothing.
                    cut_offs.extend(revocation.cut_off);
                } else {
                    // Later ones only narrow: a writer keeps the smaller cut-off, and one the
                    // earlier revocation did not name stays at nothing (0).
                    for (writer, cut) in cut_offs.iter_mut() {
                        if let Some((_, other)) =
                            revocation.cut_off.iter().find(|(named, _)| named == writer)
                        {
                            *cut = (*cut).min(*other);
                        } else {
                            *cut = 0;
                        }
                    }
                }
            }
            Verified::Removal(removal) => {
                self.removed.insert(NodeId(removal.node));
            }
        }
    }

    /// The grant in force for `node`, if it has one.
    pub fn grant(&self, node: &NodeId) -> Option<&Grant> {
        self.grants.get(node).map(|(grant, _)| grant)
    }

    /// The grants in force and the revoked nodes, one JSON object each: `node`, then `read`,
    /// `write` and `issued` (RFC 3339) for a grant, or `revoked: true` and `cut_off` (per
    /// writer, the last log place that counts).
    pub fn describe(&self) -> Vec<Json> {
        let issued = |ms: u64| {
            humantime::format_rfc3339_millis(
                std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms),
            )
            .to_string()
        };
        let mut described: Vec<Json> = self
            .grants
            .iter()
            .map(|(node, (grant, _))| {
                serde_json::json!({
                    "node": node.to_string(),
                    "read": grant.read.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "write": grant.write.iter().map(ToString::to_string).collect::<Vec<_>>(),
                    "issued": issued(grant.issued_ms),
                    "signer": "cluster CA",
                })
            })
            .collect();
        for (node, cut_offs) in &self.cut_offs {
            let cut_off: Map<String, Json> = cut_offs
                .iter()
                .map(|(writer, place)| (NodeId(*writer).to_string(), Json::from(*place)))
                .collect();
            described.push(serde_json::json!({
                "node": node.to_string(),
                "revoked": true,
                "cut_off": cut_off,
                "signer": "cluster CA",
            }));
        }
        for node in &self.removed {
            described.push(serde_json::json!({
                "node": node.to_string(),
                "removed": true,
                "signer": "cluster CA",
            }));
        }
        described
    }

    /// Every revoked node's writers, each with its cut-off: the last place of its log that
    /// counts.
    pub fn cut_offs(&self) -> BTreeMap<NodeId, u64> {
        self.cut_offs
            .values()
            .flat_map(|cut_offs| cut_offs.iter())
            .map(|(writer, cut)| (NodeId(*writer), *cut))
            .collect()
    }

    /// These scopes without anything granted to or revoked of `node`: how a node modified to
    /// ignore its own grant sees them (the simulator's).
    pub fn without_node(&self, node: &NodeId) -> Self {
        let mut without = self.clone();
        without.grants.remove(node);
        without.cut_offs.remove(node);
        without
    }

    /// The nodes revoked.
    pub fn revoked(&self) -> std::collections::BTreeSet<NodeId> {
        self.cut_offs.keys().copied().collect()
    }

    /// The nodes whose connections are refused: revoked or removed.
    pub fn shut_out(&self) -> std::collections::BTreeSet<NodeId> {
        self.revoked().union(&self.removed).copied().collect()
    }

    /// Whether `node` was removed from the cluster.
    pub fn is_removed(&self, node: &NodeId) -> bool {
        self.removed.contains(node)
    }

    /// A place of revoked `author`'s log that still counts: one of its writers at its
    /// cut-off, when that is past 0.
    pub fn counted_place(&self, author: &NodeId) -> Option<(NodeId, u64)> {
        self.cut_offs
            .get(author)?
            .iter()
            .find(|(_, cut)| **cut > 0)
            .map(|(writer, cut)| (NodeId(*writer), *cut))
    }

    pub fn is_revoked(&self, node: &NodeId) -> bool {
        self.cut_offs.contains_key(node)
    }

    /// Whether `node` may read a record of `collection` with `fields`.
    pub fn may_read(&self, node: &NodeId, collection: &str, fields: &Map<String, Json>) -> bool {
        if self.is_revoked(node) {
            return false;
        }
        if collection == GRANTS_COLLECTION || collection == ACTOR_REGISTRY_COLLECTION {
            return true;
        }
        self.grant(node).is_none_or(|grant| {
            grant
                .read
                .iter()
                .any(|scope| scope.covers(collection, fields))
        })
    }

    /// Whether no grant and no revocation is in force: then every change is allowed.
    /// Whether `reader` reads every record: nothing narrows it (no grant of its own) and it
    /// is not revoked.
    pub fn reads_all(&self, reader: &NodeId) -> bool {
        !self.is_revoked(reader) && self.grant(reader).is_none()
    }

    /// Whether `wider` may read every record `narrower` may read, by their grants' scopes
    /// (a filtered scope is covered by the same one or by its whole collection).
    pub fn reads_at_least(&self, wider: &NodeId, narrower: &NodeId) -> bool {
        if self.reads_all(wider) || self.is_revoked(narrower) {
            return true;
        }
        if self.is_revoked(wider) {
            return false;
        }
        let (Some(wide), Some(narrow)) = (self.grant(wider), self.grant(narrower)) else {
            // `narrower` reads all, `wider` does not.
            return false;
        };
        narrow.read.iter().all(|scope| {
            wide.read.iter().any(|held| {
                held == scope || held.collection == scope.collection && held.filter.is_none()
            })
        })
    }

    /// Every (collection, field) a read filter of the grants in force names.
    pub fn read_filters(&self) -> std::collections::BTreeSet<(String, String)> {
        self.grants
            .values()
            .flat_map(|(grant, _)| grant.read.iter())
            .filter_map(|scope| {
                let filter = scope.filter.as_ref()?;
                Some((scope.collection.clone(), filter.field.clone()))
            })
            .collect()
    }

    /// The fields that read filters of the grants in force name for records of
    /// `collection`, sorted: what the log keeps beside each change of such a record.
    pub fn filter_fields(&self, collection: &str) -> Vec<String> {
        let mut fields: Vec<String> = self
            .grants
            .values()
            .flat_map(|(grant, _)| grant.read.iter())
            .filter(|scope| scope.collection == collection)
            .filter_map(|scope| scope.filter.as_ref().map(|filter| filter.field.clone()))
            .collect();
        fields.sort_unstable();
        fields.dedup();
        fields
    }

    /// Whether `reader` may read a record of `collection` that had, at some point, the
    /// values of one of `tags` (see [`crate::store::ScopeTag`]); `None` when a tag lacks a
    /// field the reader's grant filters on (it was logged before a grant named it), so only
    /// the record itself can tell.
    pub fn may_read_tagged(
        &self,
        reader: &NodeId,
        collection: &str,
        tags: &[crate::store::ScopeTag],
    ) -> Option<bool> {
        if self.is_revoked(reader) {
            return Some(false);
        }
        if collection == GRANTS_COLLECTION || collection == ACTOR_REGISTRY_COLLECTION {
            return Some(true);
        }
        let Some(grant) = self.grant(reader) else {
            return Some(true);
        };
        let mut unknown = false;
        for scope in grant
            .read
            .iter()
            .filter(|scope| scope.collection == collection)
        {
            let Some(filter) = &scope.filter else {
                return Some(true);
            };
            for tag in tags {
                match tag.iter().find(|(field, _)| *field == filter.field) {
                    None => unknown = true,
                    Some((_, Some(value))) if *value == filter.value_json => return Some(true),
                    Some(_) => {}
                }
            }
        }
        if unknown || tags.is_empty() && grant.read.iter().any(|s| s.collection == collection) {
            None
        } else {
            Some(false)
        }
    }

    pub fn is_empty(&self) -> bool {
        self.grants.is_empty() && self.cut_offs.is_empty()
    }

    /// The verdict on a change by `author` (`None`: its stamp names no node) at `place` to a
    /// record of `collection`, when it does not depend on the record; `None` when it does (see
    /// [`Scopes::judge_change`]).
    pub fn verdict(
        &self,
        author: Option<&NodeId>,
        place: Option<(NodeId, u64)>,
        collection: &str,
    ) -> Option<Result<(), Refusal>> {
        if self.is_empty() {
            return Some(Ok(()));
        }
        if let Some(cut_offs) = author.and_then(|author| self.cut_offs.get(author)) {
            let counts = place.is_some_and(|(writer, sequence)| {
                cut_offs.get(&writer.0).is_some_and(|cut| sequence <= *cut)
            });
            if !counts {
                return Some(Err(Refusal::Revoked));
            }
        }
        if collection == GRANTS_COLLECTION || collection == ACTOR_REGISTRY_COLLECTION {
            return None;
        }
        match author {
            // A change that names no author is taken as one by a node granted nothing, once
            // anything is granted: otherwise leaving the name out would lift every grant.
            None if self.grants.is_empty() => Some(Ok(())),
            None => Some(Err(Refusal::OutsideGrant)),
            Some(author) if self.grant(author).is_none() => Some(Ok(())),
            Some(_) => None,
        }
    }

    /// Judges a change by `author` at `place` to a record of `collection`, `before`
    /// as of its dependencies and `after` once applied to them (`None`: missing or deleted).
    /// Beside [`Scopes::judge_write`], Concord's own collections have rules of their own,
    /// whoever writes: a signed grant in [`GRANTS_COLLECTION`] is never deleted nor changed
    /// (its signature is what counts, so anyone may add one), and an entry of the actor
    /// registry is written only by the node it names, which never changes.
    pub fn judge_change(
        &self,
        author: Option<&NodeId>,
        place: Option<(NodeId, u64)>,
        collection: &str,
        before: Option<&Map<String, Json>>,
        after: Option<&Map<String, Json>>,
    ) -> Result<(), Refusal> {
        if let Some(verdict) = self.verdict(author, place, collection) {
            return verdict;
        }
        let field = |fields: Option<&Map<String, Json>>, name: &str| {
            fields.and_then(|fields| fields.get(name)).cloned()
        };
        let allowed = match collection {
            GRANTS_COLLECTION => {
                after.is_some()
                    && (before.is_none() || field(before, "signed") == field(after, "signed"))
            }
            ACTOR_REGISTRY_COLLECTION => {
                let named = author.map(|author| Json::from(author.to_string()));
                after.is_some()
                    && named.is_some()
                    && field(after, "node") == named
                    && (before.is_none() || field(before, "node") == named)
            }
            _ => {
                let Some(author) = author else {
                    return Err(Refusal::OutsideGrant);
                };
                return self.judge_write(author, place, collection, before, after);
            }
        };
        if allowed {
            Ok(())
        } else {
            Err(Refusal::OutsideGrant)
        }
    }

    /// Judges a change by `author` at `place` (its origin, a writer of the author, and its
    /// sequence in that writer's log; `None` when it came without one) to a record of
    /// `collection` that was `before` as of the change's dependencies and is `after` once it
    /// is applied to them (`None`: missing or deleted).
    pub fn judge_write(
        &self,
        author: &NodeId,
        place: Option<(NodeId, u64)>,
        collection: &str,
        before: Option<&Map<String, Json>>,
        after: Option<&Map<String, Json>>,
    ) -> Result<(), Refusal> {
        if let Some(cut_offs) = self.cut_offs.get(author) {
            let counts = place.is_some_and(|(writer, sequence)| {
                cut_offs.get(&writer.0).is_some_and(|cut| sequence <= *cut)
            });
            if !counts {
                return Err(Refusal::Revoked);
            }
        }
        let Some(grant) = self.grant(author) else {
            return Ok(());
        };
        let allowed = |fields: Option<&Map<String, Json>>| match fields {
            None => grant
                .write
                .iter()
                .any(|scope| scope.collection == collection),
            Some(fields) => grant
                .write
                .iter()
                .any(|scope| scope.covers(collection, fields)),
        };
        if allowed(before) && allowed(after) {
            Ok(())
        } else {
            Err(Refusal::OutsideGrant)
        }
    }
}

/// The store's door (see [`crate::store::WriteDoor`]): judges every change by its author's grant,
/// a node's own writes and what comes from peers, by the rule of [`Scopes`]. The node and the
/// simulator both use it.
pub struct ScopeDoor {
    node: NodeId,
    scopes: Arc<RwLock<Scopes>>,
}

impl ScopeDoor {
    pub fn new(node: NodeId, scopes: Arc<RwLock<Scopes>>) -> Self {
        Self { node, scopes }
    }

    fn scopes(&self) -> std::sync::RwLockReadGuard<'_, Scopes> {
        self.scopes
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

fn refusal_reason(refusal: Refusal) -> crate::store::RefusalReason {
    match refusal {
        Refusal::OutsideGrant => crate::store::RefusalReason::OutsideGrant,
        Refusal::Revoked => crate::store::RefusalReason::Revoked,
    }
}

impl crate::store::WriteDoor for ScopeDoor {
    fn node(&self) -> NodeId {
        self.node
    }

    fn is_open(&self) -> bool {
        self.scopes().is_empty()
    }

    fn verdict(
        &self,
        author: Option<&NodeId>,
        place: Option<(NodeId, u64)>,
        collection: &str,
    ) -> Option<Result<(), crate::store::RefusalReason>> {
        self.scopes()
            .verdict(author, place, collection)
            .map(|verdict| verdict.map_err(refusal_reason))
    }

    fn judge(
        &self,
        author: Option<&NodeId>,
        place: Option<(NodeId, u64)>,
        collection: &str,
        before: Option<&Map<String, Json>>,
        after: Option<&Map<String, Json>>,
    ) -> Result<(), crate::store::RefusalReason> {
        self.scopes()
            .judge_change(author, place, collection, before, after)
            .map_err(refusal_reason)
    }

    fn filter_fields(&self, collection: &str) -> Vec<String> {
        self.scopes().filter_fields(collection)
    }

    fn may_read_tagged(
        &self,
        reader: &NodeId,
        collection: &str,
        tags: &[crate::store::ScopeTag],
    ) -> Option<bool> {
        self.scopes().may_read_tagged(reader, collection, tags)
    }

    fn may_read(&self, reader: &NodeId, collection: &str, fields: &Map<String, Json>) -> bool {
        self.scopes().may_read(reader, collection, fields)
    }

    fn reads_all(&self, reader: &NodeId) -> bool {
        self.scopes().reads_all(reader)
    }

    fn reads_at_least(&self, wider: &NodeId, narrower: &NodeId) -> bool {
        self.scopes().reads_at_least(wider, narrower)
    }

    fn is_revoked(&self, node: &NodeId) -> bool {
        self.scopes().is_revoked(node)
    }

    fn is_removed(&self, node: &NodeId) -> bool {
        self.scopes().is_removed(node)
    }

    fn counted_place(&self, author: &NodeId) -> Option<(NodeId, u64)> {
        self.scopes().counted_place(author)
    }

    fn read_scopes_key(&self, reader: &NodeId) -> String {
        let scopes = self.scopes();
        let reads: Vec<String> = scopes
            .grant(reader)
            .map(|grant| grant.read.iter().map(Scope::to_string).collect())
            .unwrap_or_default();
        format!("{}:{}", scopes.is_revoked(reader), reads.join(","))
    }

    fn explain(&self, reason: crate::store::RefusalReason, collection: &str) -> String {
        let scopes = self.scopes();
        if reason == crate::store::RefusalReason::Revoked || scopes.is_revoked(&self.node) {
            return "this node was revoked by the cluster authority: it writes nothing".into();
        }
        if collection.starts_with('_') {
            return format!(
                "{collection} is Concord's own: a signed grant there is never changed nor \
                 deleted, and an actor's entry is written only by its node"
            );
        }
        let write: Vec<String> = scopes
            .grant(&self.node)
            .map(|grant| grant.write.iter().map(ToString::to_string).collect())
            .unwrap_or_default();
        format!(
            "this node's grant does not let it write that record of {collection} \
             (it may write: {})",
            if write.is_empty() {
                "nothing".to_owned()
            } else {
                write.join(", ")
            }
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn fields(value: Json) -> Map<String, Json> {
        value.as_object().unwrap().clone()
    }

    fn new_authority(dir: &Path) -> (Authority, Verifier) {
        let cluster = crate::net::tls::create_ca(dir).unwrap();
        let authority = Authority::open(dir).unwrap();
        let pem = std::fs::read_to_string(dir.join(crate::net::tls::CA_CERT_FILE)).unwrap();
        (authority, Verifier::new(&pem, cluster).unwrap())
    }

    fn scopes(list: &[&str]) -> Vec<Scope> {
        list.iter()
            .map(|text| Scope::parse(text).unwrap())
            .collect()
    }

    #[test]
    fn a_removal_verifies_shuts_the_node_out_and_leaves_the_door_open() {
        let temp = tempfile::tempdir().unwrap();
        let (authority, verifier) = new_authority(&temp.path().join("ca"));
        let node = NodeId([7; 16]);
        let signed = authority.remove(node, 1_000).unwrap();
        let bytes = signed.to_bytes();
        let verified = verifier
            .verify(&Signed::from_bytes(&bytes).unwrap())
            .unwrap();
        assert!(matches!(&verified, Verified::Removal(removal) if removal.node == node.0));
        let mut scopes = Scopes::default();
        scopes.insert(verified, &signed.signature);
        assert!(scopes.is_removed(&node));
        assert!(!scopes.is_revoked(&node));
        // It judges no change: with nothing granted or revoked, everything is allowed.
        assert!(scopes.is_empty());
        assert!(scopes.shut_out().contains(&node));
        assert_eq!(scopes.describe()[0]["removed"], json!(true));
        // Another cluster's authority cannot remove anyone here.
        let (other, _) = new_authority(&temp.path().join("other"));
        let foreign = other.remove(node, 1_000).unwrap();
        assert!(verifier.verify(&foreign).is_err());
    }

    #[test]
    fn scopes_parse_and_print_as_given() {
        for text in [
            "customers",
            "customers:region=paris",
            "orders:open=true",
            "t:n=7",
        ] {
            assert_eq!(Scope::parse(text).unwrap().to_string(), text);
        }
        let quoted = Scope::parse("t:code=\"7\"").unwrap();
        assert_eq!(quoted.filter.as_ref().unwrap().value_json, "\"7\"");
        assert_eq!(quoted.to_string(), "t:code=\"7\"");
        for bad in [
            "",
            "Bad Name",
            "c:region",
            "c:@x=1",
            "c:f={\"a\":1}",
            "c:f=null",
        ] {
            assert!(Scope::parse(bad).is_err(), "{bad:?}");
        }
        let long = format!("c:f={}", "v".repeat(FILTER_VALUE_BYTES_MAX));
        assert!(Scope::parse(&long).is_err());
    }

    #[test]
    fn a_comma_in_a_value_is_part_of_the_value() {
        let scope = Scope::parse("customers:city=Washington,dc").unwrap();
        assert_eq!(scope.collection, "customers");
        assert_eq!(
            scope.filter.as_ref().unwrap().value_json,
            "\"Washington,dc\""
        );
        assert_eq!(scope.to_string(), "customers:city=Washington,dc");
        // The quoted form names the same value.
        assert_eq!(
            Scope::parse("customers:city=\"Washington,dc\"").unwrap(),
            scope
        );
        assert!(scope.covers("customers", &fields(json!({"city": "Washington,dc"}))));
        assert!(!scope.covers("customers", &fields(json!({"city": "Washington"}))));
        assert!(!scope.covers("dc", &fields(json!({"city": "Washington,dc"}))));
        // A list given the old way is not a collection.
        assert!(Scope::parse("gw,c").is_err());
    }

    /// What `concord put` stores for `FIELD=text`: JSON when the text is JSON, else a string.
    fn put_value(text: &str) -> Json {
        serde_json::from_str(text).unwrap_or_else(|_| Json::String(text.to_owned()))
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(256))]

        /// Any value (commas, colons, equals signs, quotes, spaces, any script) is one scope's
        /// value: it prints as it parses, survives signing, `grants` and reading back, and the
        /// judge covers exactly the records that hold it.
        #[test]
        fn any_value_round_trips_through_grant_grants_and_the_judge(
            value in "[^\\p{Cc}]{0,40}",
            field in "[a-z][a-z_,:]{0,10}",
        ) {
            let text = format!("customers:{field}={value}");
            let stored = put_value(&value);
            let scope = match Scope::parse(&text) {
                Ok(scope) => scope,
                Err(_) => {
                    // Only values that are not a scalar are refused.
                    proptest::prop_assert!(stored.is_object() || stored.is_array() || stored.is_null());
                    return Ok(());
                }
            };
            proptest::prop_assert_eq!(&scope.collection, "customers");
            proptest::prop_assert_eq!(Scope::parse(&scope.to_string()).unwrap(), scope.clone());
            let record = fields(json!({ field.clone(): stored.clone() }));
            proptest::prop_assert!(scope.covers("customers", &record));
            let other = fields(json!({ field.clone(): format!("{value}x") }));
            proptest::prop_assert!(!scope.covers("customers", &other));

            // Through a signed grant and the grants listing, as `concord grants` prints it.
            let node = NodeId([9; 16]);
            let mut held = Scopes::default();
            held.insert(
                Verified::Grant(Grant {
                    cluster: [1; 16],
                    node: node.0,
                    read: vec![scope.clone()],
                    write: Vec::new(),
                    issued_ms: 1,
                }),
                b"signature",
            );
            let listed = held.describe();
            let read = listed[0]["read"].as_array().unwrap();
            proptest::prop_assert_eq!(read.len(), 1);
            proptest::prop_assert_eq!(Scope::parse(read[0].as_str().unwrap()).unwrap(), scope);
            proptest::prop_assert!(held.may_read(&node, "customers", &record));
            proptest::prop_assert!(!held.may_read(&node, "customers", &other));
        }
    }

    #[test]
    fn a_grant_verifies_only_as_signed_by_this_cluster_s_authority() {
        let temp = tempfile::tempdir().unwrap();
        let (authority, verifier) = new_authority(&temp.path().join("ca"));
        let node = NodeId([7; 16]);
        let signed = authority
            .grant(
                node,
                scopes(&["customers:region=paris"]),
                scopes(&["customers"]),
                1,
            )
            .unwrap();
        let decoded = Signed::from_bytes(&signed.to_bytes()).unwrap();
        let Verified::Grant(grant) = verifier.verify(&decoded).unwrap() else {
            panic!("a grant");
        };
        assert_eq!(grant.node, node.0);
        assert_eq!(grant.read, scopes(&["customers:region=paris"]));
        // A body changed after signing does not verify.
        let mut tampered = signed.clone();
        let last = tampered.body.len() - 1;
        tampered.body[last] ^= 1;
        assert_eq!(verifier.verify(&tampered), Err(ScopeError::BadSignature));
        // Nor one signed by another cluster's CA.
        let (other, other_verifier) = new_authority(&temp.path().join("other"));
        let foreign = other.grant(node, Vec::new(), Vec::new(), 1).unwrap();
        assert_eq!(verifier.verify(&foreign), Err(ScopeError::BadSignature));
        assert!(other_verifier.verify(&foreign).is_ok());
        // An unknown version is refused before anything else.
        let mut future = signed;
        future.version = SCOPE_FORMAT_VERSION + 1;
        assert!(matches!(
            verifier.verify(&future),
            Err(ScopeError::UnknownVersion(_))
        ));
        assert!(Signed::from_bytes(&[0xff; 8]).is_err());
    }

    #[test]
    fn the_rule_reads_and_writes_by_grant_and_filter() {
        let temp = tempfile::tempdir().unwrap();
        let (authority, verifier) = new_authority(&temp.path().join("ca"));
        let (hq, paris) = (NodeId([1; 16]), NodeId([2; 16]));
        let mut in_force = Scopes::default();
        let paris_customer = fields(json!({"name": "Ada", "region": "paris"}));
        let tokyo_customer = fields(json!({"name": "Kei", "region": "tokyo"}));
        let place = Some((NodeId([20; 16]), 1));
        // No grants: everyone reads and writes everything.
        assert!(in_force.may_read(&paris, "customers", &tokyo_customer));
        assert_eq!(
            in_force.judge_write(&paris, place, "customers", None, Some(&tokyo_customer)),
            Ok(())
        );
        let granted = authority
            .grant(
                paris,
                scopes(&["customers:region=paris", "products"]),
                scopes(&["customers:region=paris"]),
                10,
            )
            .unwrap();
        in_force.insert(verifier.verify(&granted).unwrap(), &granted.signature);
        assert!(in_force.may_read(&paris, "customers", &paris_customer));
        assert!(!in_force.may_read(&paris, "customers", &tokyo_customer));
        assert!(in_force.may_read(&paris, "products", &fields(json!({}))));
        assert!(!in_force.may_read(&paris, "orders", &fields(json!({}))));
        // hq has no grant of its own: it reads and writes everything.
        assert!(in_force.may_read(&hq, "customers", &tokyo_customer));
        let judge = |scopes: &Scopes,
                     before: Option<&Map<String, Json>>,
                     after: Option<&Map<String, Json>>| {
            scopes.judge_write(&paris, place, "customers", before, after)
        };
        assert_eq!(
            judge(&in_force, None, Some(&paris_customer)),
            Ok(()),
            "create"
        );
        assert_eq!(
            judge(&in_force, Some(&paris_customer), Some(&paris_customer)),
            Ok(()),
            "edit"
        );
        assert_eq!(
            judge(&in_force, Some(&paris_customer), None),
            Ok(()),
            "delete"
        );
        assert_eq!(
            judge(&in_force, None, Some(&tokyo_customer)),
            Err(Refusal::OutsideGrant),
            "another region's"
        );
        assert_eq!(
            judge(&in_force, Some(&paris_customer), Some(&tokyo_customer)),
            Err(Refusal::OutsideGrant),
            "moving one out"
        );
        assert_eq!(
            judge(&in_force, Some(&tokyo_customer), None),
            Err(Refusal::OutsideGrant),
            "deleting another region's"
        );
        assert_eq!(
            in_force.judge_write(&paris, place, "products", None, None),
            Err(Refusal::OutsideGrant),
            "read-only collection"
        );
        // Granting again replaces the grant; an older grant arriving late changes nothing.
        let wider = authority
            .grant(paris, scopes(&["customers"]), scopes(&["customers"]), 20)
            .unwrap();
        in_force.insert(verifier.verify(&wider).unwrap(), &wider.signature);
        in_force.insert(verifier.verify(&granted).unwrap(), &granted.signature);
        assert_eq!(judge(&in_force, None, Some(&tokyo_customer)), Ok(()));
        assert!(in_force.may_read(&paris, "customers", &tokyo_customer));
    }

    #[test]
    fn a_revocation_keeps_what_came_before_its_cut_off_and_only_narrows() {
        let temp = tempfile::tempdir().unwrap();
        let (authority, verifier) = new_authority(&temp.path().join("ca"));
        let node = NodeId([3; 16]);
        // Two writers of the node (two incarnations of its store).
        let (first, second) = (NodeId([30; 16]), NodeId([31; 16]));
        let mut in_force = Scopes::default();
        let revoked = authority
            .revoke(node, BTreeMap::from([(first, 5), (second, 9)]), 1)
            .unwrap();
        in_force.insert(verifier.verify(&revoked).unwrap(), &revoked.signature);
        let judge = |scopes: &Scopes, place: Option<(NodeId, u64)>| {
            scopes.judge_write(&node, place, "t", None, Some(&fields(json!({}))))
        };
        assert_eq!(judge(&in_force, Some((first, 5))), Ok(()));
        assert_eq!(judge(&in_force, Some((first, 6))), Err(Refusal::Revoked));
        assert_eq!(judge(&in_force, Some((second, 9))), Ok(()));
        assert_eq!(
            judge(&in_force, Some((NodeId([32; 16]), 1))),
            Err(Refusal::Revoked),
            "a writer the revocation does not name"
        );
        assert_eq!(judge(&in_force, None), Err(Refusal::Revoked), "no place");
        assert!(!in_force.may_read(&node, "t", &fields(json!({}))));
        // Another node is not touched.
        assert_eq!(
            in_force.judge_write(&NodeId([8; 16]), None, "t", None, None),
            Ok(())
        );
        // A later revocation with larger cut-offs lets nothing more in.
        let later = authority
            .revoke(node, BTreeMap::from([(first, 50), (second, 4)]), 2)
            .unwrap();
        in_force.insert(verifier.verify(&later).unwrap(), &later.signature);
        assert_eq!(judge(&in_force, Some((first, 6))), Err(Refusal::Revoked));
        assert_eq!(judge(&in_force, Some((second, 5))), Err(Refusal::Revoked));
        assert_eq!(judge(&in_force, Some((second, 4))), Ok(()));
    }

    #[test]
    fn decisions_do_not_depend_on_the_order_grants_and_revocations_arrive_in() {
        let temp = tempfile::tempdir().unwrap();
        let (authority, verifier) = new_authority(&temp.path().join("ca"));
        let node = NodeId([4; 16]);
        let writer = NodeId([40; 16]);
        let signed = [
            authority
                .grant(node, scopes(&["c:r=a"]), scopes(&["c:r=a"]), 5)
                .unwrap(),
            authority
                .grant(node, scopes(&["c"]), scopes(&["c:r=b"]), 9)
                .unwrap(),
            authority
                .grant(node, scopes(&["c"]), scopes(&["c"]), 9)
                .unwrap(),
            authority
                .revoke(node, BTreeMap::from([(writer, 7)]), 11)
                .unwrap(),
            authority
                .revoke(node, BTreeMap::from([(writer, 3)]), 12)
                .unwrap(),
        ];
        let records = [
            fields(json!({"r": "a"})),
            fields(json!({"r": "b"})),
            fields(json!({"r": "c"})),
        ];
        let decide = |order: &[usize]| {
            let mut in_force = Scopes::default();
            for &index in order {
                let item = &signed[index];
                in_force.insert(verifier.verify(item).unwrap(), &item.signature);
            }
            let mut decisions = Vec::new();
            for sequence in 1..10 {
                for before in &records {
                    for after in &records {
                        decisions.push(in_force.judge_write(
                            &node,
                            Some((writer, sequence)),
                            "c",
                            Some(before),
                            Some(after),
                        ));
                    }
                }
            }
            decisions
        };
        let first = decide(&[0, 1, 2, 3, 4]);
        for order in [
            [4, 3, 2, 1, 0],
            [2, 0, 4, 1, 3],
            [3, 1, 0, 4, 2],
            [1, 4, 3, 0, 2],
        ] {
            assert_eq!(decide(&order), first, "{order:?}");
        }
        // Without the revocations, the two grants issued at once resolve alike too.
        assert_eq!(decide(&[1, 2]), decide(&[2, 1]));
    }
}
