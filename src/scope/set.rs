//! The verified grants and revocations in force, and the rule that judges a change or a
//! read by them (see the module doc of [`crate::scope`]).

use std::collections::BTreeMap;

use serde_json::{Map, Value as Json};

use super::*;
use crate::record::origin::ACTOR_REGISTRY_COLLECTION;
use crate::record::NodeId;

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
