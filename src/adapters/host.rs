//! What a binding needs of the node it runs in, and no more: the node implements [`Host`], so
//! the adapters never name the node's own types (the node starts bindings; bindings do not
//! reach back into it).
//!
//! Writes go through the store's one write entry
//! ([`crate::store::WriteSession::put_record`]): the same field rules, size limits and grant
//! as every other way in, and the engine woken once they are durable.

use std::path::Path;

use automerge::ActorId;
use serde_json::{Map, Value as Json};

use crate::config::BindingSection;
use crate::record::RecordId;
use crate::store::{DiskStore, DocStore};

/// The node a binding runs in.
pub trait Host: Send + Sync {
    /// The node's store: its records, and what each binding keeps of its own.
    fn documents(&self) -> &DocStore<DiskStore>;
    /// The data dir (a SQLite file named without a directory lives in it).
    fn dir(&self) -> &Path;
    /// The bindings the node's config names.
    fn bindings(&self) -> &[BindingSection];
    /// The actor a binding writes as: its source, numbered in the store.
    fn source_actor(&self, source: &str) -> Result<ActorId, String>;
    /// The record as its conflict policies resolve it (not Automerge's raw winner); `None`
    /// when it is deleted or was never written.
    fn resolved(&self, id: &RecordId) -> Result<Option<Map<String, Json>>, String>;
}
