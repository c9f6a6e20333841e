//! The door every change passes before it is stored: the rules of grants and revocations,
//! as the store sees them. The node implements it (see [`crate::scope`]); the store asks it
//! about this node's own writes and about changes from peers alike, so every way in is judged
//! by the same rule, once.

use super::layout::{RefusalReason, ScopeTag};
use crate::record::NodeId;

/// Judges every change before it is stored, by the scopes its author's grant allows (see
/// [`crate::scope`]): this node's own writes (API, CLI, imports, adapters: they all write
/// through [`WriteSession::write`] or merge), and changes from peers, relayed or fetched, by
/// the same rule, so every node decides alike about a change.
pub trait WriteDoor: Send + Sync {
    /// This node's id: the author of its own writes.
    fn node(&self) -> NodeId;
    /// Whether nothing is granted nor revoked: then every change is allowed, unread.
    fn is_open(&self) -> bool;
    /// The verdict on a change by `author` (`None`: it names none) at `place` (its origin's
    /// log place; `None` for a write of this node's own or a change fetched outside the log)
    /// to a record of `collection`, when it does not depend on the record; `None` when it does.
    fn verdict(
        &self,
        author: Option<&NodeId>,
        place: Option<(NodeId, u64)>,
        collection: &str,
    ) -> Option<Result<(), RefusalReason>>;
    /// The verdict on such a change that leaves a record of `collection` as `after`,
    /// from `before` (`None`: missing or deleted).
    fn judge(
        &self,
        author: Option<&NodeId>,
        place: Option<(NodeId, u64)>,
        collection: &str,
        before: Option<&serde_json::Map<String, serde_json::Value>>,
        after: Option<&serde_json::Map<String, serde_json::Value>>,
    ) -> Result<(), RefusalReason>;
    /// Why this node may not write that record of `collection`, in a sentence for its user.
    fn explain(&self, reason: RefusalReason, collection: &str) -> String;
    /// The fields that read filters name for records of `collection`, sorted: the log keeps
    /// their values beside each change of such a record ([`layout::LogEntry::tags`]).
    fn filter_fields(&self, collection: &str) -> Vec<String>;
    /// Whether `reader` may read a record of `collection` that had one of `tags`' values;
    /// `None` when the tags do not say (a field they lack).
    fn may_read_tagged(&self, reader: &NodeId, collection: &str, tags: &[ScopeTag])
        -> Option<bool>;
    /// Whether `reader` may read a live record of `collection` whose fields are `fields`.
    fn may_read(
        &self,
        reader: &NodeId,
        collection: &str,
        fields: &serde_json::Map<String, serde_json::Value>,
    ) -> bool;
    /// Whether `reader` reads every record.
    fn reads_all(&self, reader: &NodeId) -> bool;
    /// Whether `wider` may read every record that `narrower` may read.
    fn reads_at_least(&self, wider: &NodeId, narrower: &NodeId) -> bool;
    /// A text that changes whenever what `reader` may read changes (its read scopes, or
    /// its revocation).
    fn read_scopes_key(&self, reader: &NodeId) -> String;
    /// Whether `node` was revoked.
    fn is_revoked(&self, node: &NodeId) -> bool;
    /// Whether `node` was removed from the cluster: it holds nothing back.
    fn is_removed(&self, node: &NodeId) -> bool;
    /// A place of revoked `author`'s log that still counts (its cut-off), if any does.
    fn counted_place(&self, author: &NodeId) -> Option<(NodeId, u64)>;
}
