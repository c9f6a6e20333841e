//! The store's door: every change, a node's own or a peer's, judged by [`Scopes`].

use std::sync::{Arc, RwLock};

use serde_json::{Map, Value as Json};

use super::*;
use crate::record::NodeId;

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
