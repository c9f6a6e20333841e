//! One way for the CLI to reach a node's records: [`Records`], implemented by the node itself
//! (its data dir opened while it is stopped) and by the API client of the node that runs.
//!
//! Each record command is one function over `&dyn Records`, so a command behaves, prints and
//! fails alike on a stopped and a running node; the checks a write passes (field rules, size
//! limits, grants, the clock bound) are the node's own on both sides, since the API calls the
//! same `Node` methods the local side does.

use std::collections::BTreeMap;

use anyhow::{Context, Result};
use concord::node::{AuditFilter, Node, NodeError, Settlement};
use concord::record::{Collection, Key, NodeId, RecordId, RecordWrite};
use concord::scope::Signed;
use serde_json::Value as Json;

use super::remote::ApiClient;

/// Records `list` reads from a stopped node's store per page.
const LIST_PAGE_RECORDS: usize = 256;
/// Changes asked of a running node's API by `history`: first, then at a time (each page
/// replays the record up to its end, so long pages keep a long history linear).
const HISTORY_FIRST_PAGE: usize = 1000;
const HISTORY_PAGE: usize = concord::node::api::LIST_LIMIT_MAX;

/// A node's records and what the CLI does with them, wherever the node is.
pub(super) trait Records {
    /// The record's fields, now or at a version (a hash or 8+ of its hex digits).
    fn get(&self, id: &RecordId, at: Option<&str>) -> Result<Json>;
    fn put(&self, id: &RecordId, write: &RecordWrite) -> Result<()>;
    /// Writes every record of `writes`, durable together.
    fn put_batch(&self, writes: &[(RecordId, RecordWrite)]) -> Result<()>;
    fn delete(&self, id: &RecordId) -> Result<()>;
    /// Makes the record what it was at version `to`; whether that changed anything.
    fn revert(&self, id: &RecordId, to: &str) -> Result<bool>;
    /// Settles a conflicting field; the value written.
    fn resolve(&self, id: &RecordId, field: &str, settlement: &Settlement) -> Result<Json>;
    /// Every record of the collection, each as `{"key": ..., "fields": ...}`, in key order.
    fn list(&self, collection: &Collection, each: &mut dyn FnMut(Json) -> Result<()>)
        -> Result<()>;
    /// Up to `limit` changes of the record after version `after`, in causal order.
    fn history(
        &self,
        id: &RecordId,
        after: Option<&str>,
        limit: usize,
        each: &mut dyn FnMut(Json) -> Result<()>,
    ) -> Result<()>;
    /// The record's saved Automerge document.
    fn export(&self, id: &RecordId) -> Result<Vec<u8>>;
    /// Merges a saved Automerge document into the record; how many changes were new.
    fn import(&self, id: &RecordId, bytes: &[u8]) -> Result<u64>;
    /// The changes the filter matches, and whether more matched than were returned.
    fn audit(&self, filter: &AuditFilter) -> Result<(Vec<Json>, bool)>;
    /// A conflicts report: `{"records": [...], "truncated": bool}`.
    fn conflicts(&self, collection: Option<&Collection>, limit: usize) -> Result<Json>;
    fn grants(&self) -> Result<Vec<Json>>;
    /// The node with this name or id.
    fn node_named(&self, name: &str) -> Result<NodeId>;
    /// How far this node holds the log of each writer the node has had.
    fn writers_of(&self, node: NodeId) -> Result<BTreeMap<NodeId, u64>>;
    /// Stores a signed grant, revocation or removal once it verifies.
    fn add_signed(&self, signed: &Signed) -> Result<()>;
    /// Has a binding load again as when it first started.
    fn refill(&self, binding: &str) -> Result<()>;
    /// Up to `limit` changes this node refused.
    fn refused(&self, limit: usize) -> Result<Vec<Json>>;
}

impl Records for Node {
    fn get(&self, id: &RecordId, at: Option<&str>) -> Result<Json> {
        let fields = match at {
            None => self.get(id)?,
            Some(version) => self.get_at(id, &self.resolve_version(id, version)?)?,
        };
        Ok(Json::Object(
            fields.ok_or_else(|| NodeError::NotFound(id.clone()))?,
        ))
    }

    fn put(&self, id: &RecordId, write: &RecordWrite) -> Result<()> {
        Node::put(self, id, write)?;
        Ok(())
    }

    fn put_batch(&self, writes: &[(RecordId, RecordWrite)]) -> Result<()> {
        self.put_many(writes.iter().map(|(id, write)| (id, write)))?;
        Ok(())
    }

    fn delete(&self, id: &RecordId) -> Result<()> {
        Ok(Node::delete(self, id)?)
    }

    fn revert(&self, id: &RecordId, to: &str) -> Result<bool> {
        let version = self.resolve_version(id, to)?;
        Ok(Node::revert(self, id, &version)?)
    }

    fn resolve(&self, id: &RecordId, field: &str, settlement: &Settlement) -> Result<Json> {
        Ok(Node::resolve(self, id, field, settlement)?)
    }

    fn list(
        &self,
        collection: &Collection,
        each: &mut dyn FnMut(Json) -> Result<()>,
    ) -> Result<()> {
        let mut after: Option<Key> = None;
        loop {
            let page = Node::list(self, collection, after.as_ref(), LIST_PAGE_RECORDS)?;
            for (key, fields) in page.records {
                each(serde_json::json!({"key": key.as_str(), "fields": fields}))?;
            }
            match page.last_seen {
                Some(last) => after = Some(last),
                None => return Ok(()),
            }
        }
    }

    fn history(
        &self,
        id: &RecordId,
        after: Option<&str>,
        limit: usize,
        each: &mut dyn FnMut(Json) -> Result<()>,
    ) -> Result<()> {
        let after = match after {
            Some(text) => Some(self.resolve_version(id, text)?),
            None => None,
        };
        for entry in self.history_replay(id, after.as_ref(), Some(limit))? {
            each(serde_json::to_value(entry?)?)?;
        }
        Ok(())
    }

    fn export(&self, id: &RecordId) -> Result<Vec<u8>> {
        Ok(Node::export(self, id)?)
    }

    fn import(&self, id: &RecordId, bytes: &[u8]) -> Result<u64> {
        Ok(Node::import(self, id, bytes)?.new_changes as u64)
    }

    fn audit(&self, filter: &AuditFilter) -> Result<(Vec<Json>, bool)> {
        let report = Node::audit(self, filter)?;
        let entries = report
            .entries
            .iter()
            .map(serde_json::to_value)
            .collect::<Result<Vec<_>, _>>()?;
        Ok((entries, report.truncated))
    }

    fn conflicts(&self, collection: Option<&Collection>, limit: usize) -> Result<Json> {
        Ok(serde_json::to_value(Node::conflicts(
            self, collection, limit,
        )?)?)
    }

    fn grants(&self) -> Result<Vec<Json>> {
        Ok(Node::grants(self))
    }

    fn node_named(&self, name: &str) -> Result<NodeId> {
        Ok(Node::node_named(self, name)?)
    }

    fn writers_of(&self, node: NodeId) -> Result<BTreeMap<NodeId, u64>> {
        Ok(Node::writers_of(self, node)?)
    }

    fn add_signed(&self, signed: &Signed) -> Result<()> {
        Node::add_signed(self, &signed.to_bytes())?;
        Ok(())
    }

    fn refill(&self, binding: &str) -> Result<()> {
        Ok(concord::adapters::driver::refill(self, binding)?)
    }

    fn refused(&self, limit: usize) -> Result<Vec<Json>> {
        Ok(self.refused_changes(limit)?)
    }
}

impl Records for ApiClient {
    fn get(&self, id: &RecordId, at: Option<&str>) -> Result<Json> {
        match at {
            None => ApiClient::get(self, id),
            Some(version) => self.get_at(id, version),
        }
    }

    fn put(&self, id: &RecordId, write: &RecordWrite) -> Result<()> {
        ApiClient::put(self, id, write)
    }

    fn put_batch(&self, writes: &[(RecordId, RecordWrite)]) -> Result<()> {
        ApiClient::put_batch(self, writes)
    }

    fn delete(&self, id: &RecordId) -> Result<()> {
        ApiClient::delete(self, id)
    }

    fn revert(&self, id: &RecordId, to: &str) -> Result<bool> {
        ApiClient::revert(self, id, to)
    }

    fn resolve(&self, id: &RecordId, field: &str, settlement: &Settlement) -> Result<Json> {
        ApiClient::resolve(self, id, field, settlement)
    }

    fn list(
        &self,
        collection: &Collection,
        each: &mut dyn FnMut(Json) -> Result<()>,
    ) -> Result<()> {
        let mut after: Option<String> = None;
        loop {
            let (records, next) = ApiClient::list(self, collection.as_str(), after.as_deref())?;
            for record in records {
                each(record)?;
            }
            match next {
                Some(next) => after = Some(next),
                None => return Ok(()),
            }
        }
    }

    fn history(
        &self,
        id: &RecordId,
        after: Option<&str>,
        limit: usize,
        each: &mut dyn FnMut(Json) -> Result<()>,
    ) -> Result<()> {
        // Page by page, each printed as it comes: a short first page, so the first changes
        // show at once, then long ones.
        let mut after = after.map(str::to_owned);
        let mut left = limit;
        let mut page_size = HISTORY_FIRST_PAGE;
        while left > 0 {
            let asked = left.min(page_size);
            page_size = HISTORY_PAGE;
            let page = ApiClient::history(self, id, after.as_deref(), asked)?;
            let taken = page.len();
            after = page
                .last()
                .and_then(|entry| entry["hash"].as_str())
                .map(str::to_owned);
            for entry in page {
                each(entry)?;
            }
            left = left.saturating_sub(taken);
            if taken < asked {
                break;
            }
        }
        Ok(())
    }

    fn export(&self, id: &RecordId) -> Result<Vec<u8>> {
        ApiClient::export(self, id)
    }

    fn import(&self, id: &RecordId, bytes: &[u8]) -> Result<u64> {
        ApiClient::import(self, id, bytes)
    }

    fn audit(&self, filter: &AuditFilter) -> Result<(Vec<Json>, bool)> {
        let report = ApiClient::audit(self, filter)?;
        Ok((
            report["entries"].as_array().cloned().unwrap_or_default(),
            report["truncated"].as_bool().unwrap_or(false),
        ))
    }

    fn conflicts(&self, collection: Option<&Collection>, limit: usize) -> Result<Json> {
        ApiClient::conflicts(self, collection, limit)
    }

    fn grants(&self) -> Result<Vec<Json>> {
        Ok(ApiClient::grants(self)?["grants"]
            .as_array()
            .cloned()
            .unwrap_or_default())
    }

    fn node_named(&self, name: &str) -> Result<NodeId> {
        ApiClient::node_named(self, name)?["node"]
            .as_str()
            .unwrap_or_default()
            .parse()
            .context("the node answered with no node id")
    }

    fn writers_of(&self, node: NodeId) -> Result<BTreeMap<NodeId, u64>> {
        let answer = ApiClient::node_named(self, &node.to_string())?;
        let mut writers = BTreeMap::new();
        for (writer, mark) in answer["writers"].as_object().into_iter().flatten() {
            let writer: NodeId = writer
                .parse()
                .context("the node answered with a bad writer id")?;
            writers.insert(writer, mark.as_u64().unwrap_or(0));
        }
        Ok(writers)
    }

    fn add_signed(&self, signed: &Signed) -> Result<()> {
        ApiClient::add_signed(self, &signed.to_bytes())?;
        Ok(())
    }

    fn refill(&self, binding: &str) -> Result<()> {
        ApiClient::refill(self, binding)?;
        Ok(())
    }

    fn refused(&self, limit: usize) -> Result<Vec<Json>> {
        let answer = ApiClient::refused(self)?;
        let rows = answer["refused"].as_array().cloned().unwrap_or_default();
        Ok(rows.into_iter().take(limit).collect())
    }
}
