//! Node: a data dir, its identity and config, and the record operations on it.
//!
//! Owns the data dir layout (`concord.toml`, `node.id`, `store/`) and the record operations
//! that the CLI (and later the HTTP API) offer: put, get, delete, list, history, export,
//! import. Every write goes through the document store and is durable when the call returns.
//! The node's own API writes as the source `api`; the first time a source writes on a node,
//! its actor is entered in the actor registry (`_actors`), which replicates like any record.

pub mod api;
pub mod disk;
mod error;
mod grants;
mod history;
pub mod maintenance;
mod metrics;
pub mod runtime;
mod shared;
mod status;
#[cfg(test)]
mod tests;

pub use error::NodeError;
pub use grants::RETAG_STEPS_PER_CALL;
pub use history::{
    AuditEntry, AuditFilter, AuditReport, ConflictReport, HistoryEntry, HistoryReplay,
    RecordConflicts, Settlement, AUDIT_ENTRIES_MAX, AUDIT_RECORDS_MAX, HISTORY_CHANGES_MAX,
};

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::UNIX_EPOCH;

use automerge::{ActorId, ChangeHash};
use serde::Serialize;
use serde_json::{json, Map, Value as Json};

use crate::config::{Config, ConfigError, CONFIG_FILE};
use crate::net::tls;
use crate::record::held::HeldDoc;
use crate::record::history::Replay;
use crate::record::origin::{ACTOR_REGISTRY_COLLECTION, API_SOURCE};
use crate::record::stamp::ChangeStamp;
use crate::record::{document, Collection, Key, NodeId, RecordError, RecordId, RecordWrite};
use crate::store::{DiskStore, DocStore, DocStoreConfig, Durability, ImportOutcome, StoreError};

/// The node id file inside a data dir.
pub const NODE_ID_FILE: &str = "node.id";
/// The store's folder inside a data dir.
pub const STORE_DIR: &str = "store";
/// The node's certificate, key and cluster CA certificate, inside a data dir.
pub const TLS_DIR: &str = "tls";
/// Largest document `import` accepts, in bytes.
pub const IMPORT_BYTES_MAX: usize = 64 * 1024 * 1024;

impl From<crate::record::RecordIdError> for NodeError {
    fn from(error: crate::record::RecordIdError) -> Self {
        Self::Record(error.into())
    }
}

fn io_error(path: &Path) -> impl FnOnce(std::io::Error) -> NodeError + '_ {
    move |error| NodeError::Io {
        path: path.to_owned(),
        error,
    }
}

/// A version as `concord history` prints it: the hash of the change that made it.
pub fn parse_version(text: &str) -> Result<ChangeHash, NodeError> {
    let text = text.trim();
    if text.len() != 64 {
        return Err(NodeError::BadVersion(text.to_owned()));
    }
    text.parse()
        .map_err(|_| NodeError::BadVersion(text.to_owned()))
}

/// Shortest prefix of a version's hash that names it, as `history` shows it may be shortened.
pub const VERSION_PREFIX_HEX_MIN: usize = 8;

/// A page's limit as asked: at least 1 (a limit of 0 would list nothing, or one entry where a
/// floor is applied silently), at most `max` (more is cut to `max`).
pub fn page_limit(limit: usize, max: usize) -> Result<usize, NodeError> {
    if limit == 0 {
        return Err(NodeError::ZeroLimit);
    }
    Ok(limit.min(max))
}

/// A time as every `--since`, `--until` and query takes it: RFC 3339 (a `T`, or the space its
/// section 5.6 allows, between date and time; a `Z` or any offset), in Unix seconds. Nothing else is taken: a time without its
/// offset could mean any of them.
pub fn parse_time(text: &str) -> Result<i64, NodeError> {
    let time = time::OffsetDateTime::parse(text, &time::format_description::well_known::Rfc3339)
        .map_err(|_| NodeError::BadTime(text.to_owned()))?;
    Ok(time.unix_timestamp())
}

/// What `concord init` may be given besides the data dir.
#[derive(Debug, Clone, Default)]
pub struct InitOptions {
    pub name: Option<String>,
    /// A cluster CA dir: the node gets a certificate from it and joins its cluster.
    pub ca: Option<PathBuf>,
    pub listen: Option<String>,
    pub api: Option<String>,
    pub peers: Vec<String>,
    /// The store's engine; [`crate::store::Engine::DEFAULT`] when not given.
    pub engine: Option<crate::store::Engine>,
}

/// One page of a collection listing.
#[derive(Debug, Clone)]
pub struct ListPage {
    /// Live records, in key order.
    pub records: Vec<(Key, Map<String, Json>)>,
    /// The last key looked at (live or not): where the next page starts. `None` at the end.
    pub last_seen: Option<Key>,
}

/// A node opened on its data dir.
pub struct Node {
    dir: PathBuf,
    config: Config,
    id: NodeId,
    docs: DocStore<DiskStore>,
    api_actor: ActorId,
    /// The disk under the data dir.
    disk: disk::Disk,

    /// The conflict policies of `config`, ready to resolve reads with.
    policies: crate::policy::Policies,
    /// The grants and revocations `_grants` holds, checked against the cluster CA (none
    /// without a cluster), and the set the store's door judges by.
    registry: crate::scope::Registry,
    /// Where retagging the log for read filters new since it was logged stands, while it
    /// runs: the log key to go on after (`Some(None)`: from the start).
    retag: Mutex<Option<Option<Vec<u8>>>>,
}

impl Node {
    /// Creates a data dir with its config and identity. Fails if `dir` already holds one.
    pub fn init(dir: &Path, name: Option<&str>) -> Result<NodeId, NodeError> {
        Self::init_with(
            dir,
            &InitOptions {
                name: name.map(str::to_owned),
                ..InitOptions::default()
            },
        )
    }

    /// Like [`Node::init`], with a certificate from a cluster CA and network settings.
    pub fn init_with(dir: &Path, options: &InitOptions) -> Result<NodeId, NodeError> {
        Ok(Self::create(dir, options)?.id())
    }

    /// Creates a data dir as [`Node::init_with`] does and returns the node, open.
    pub fn create(dir: &Path, options: &InitOptions) -> Result<Self, NodeError> {
        let name = options.name.as_deref();
        let config_path = dir.join(CONFIG_FILE);
        if config_path.exists() {
            return match &options.ca {
                Some(ca_dir) if Config::load(&config_path)?.cluster.is_none() => {
                    Self::join_cluster(dir, ca_dir)
                }
                _ => Err(NodeError::AlreadyInitialized(dir.to_owned())),
            };
        }
        crate::files::create_private_dir(dir).map_err(io_error(dir))?;
        let id = NodeId::random().map_err(NodeError::Random)?;
        let default_name = format!("node-{}", &id.to_string()[..8]);
        let mut config = Config::new(name.unwrap_or(&default_name));
        if let Some(listen) = &options.listen {
            config.network.listen = listen.clone();
        }
        if let Some(api) = &options.api {
            config.network.api = api.clone();
        }
        config.network.peers = options.peers.clone();
        config.store.engine = Some(options.engine.unwrap_or(crate::store::Engine::DEFAULT));
        config.check().map_err(|message| ConfigError::Invalid {
            path: config_path.clone(),
            message,
        })?;
        if let Some(ca_dir) = &options.ca {
            let cluster = tls::read_cluster_id(ca_dir)?;
            tls::issue_node_certificate(ca_dir, &id, &dir.join(TLS_DIR))?;
            config.cluster = Some(crate::config::ClusterSection {
                id: hex::encode(cluster),
            });
        }
        let id_path = dir.join(NODE_ID_FILE);
        crate::files::write_private(&id_path, format!("{id}\n").as_bytes())
            .map_err(io_error(&id_path))?;
        // The config is written last: its presence marks a complete data dir.
        crate::files::write_private(&config_path, config.to_toml().as_bytes())
            .map_err(io_error(&config_path))?;
        let node = Self::open(dir)?;
        node.docs.sync()?;
        Ok(node)
    }

    /// Gives a node made without a cluster (`init` without `--ca`) its certificate from the
    /// cluster CA in `ca_dir`, keeping its id, store and settings.
    fn join_cluster(dir: &Path, ca_dir: &Path) -> Result<Self, NodeError> {
        let config_path = dir.join(CONFIG_FILE);
        let node = Self::open(dir)?;
        let cluster = tls::read_cluster_id(ca_dir)?;
        tls::issue_node_certificate(ca_dir, &node.id(), &dir.join(TLS_DIR))?;
        // The section is added to the file as it is, so that what the user wrote in it stays.
        let mut text = std::fs::read_to_string(&config_path).map_err(io_error(&config_path))?;
        if !text.ends_with('\n') {
            text.push('\n');
        }
        text.push_str(&format!("\n[cluster]\nid = \"{}\"\n", hex::encode(cluster)));
        crate::files::write_private(&config_path, text.as_bytes())
            .map_err(io_error(&config_path))?;
        drop(node);
        Self::open(dir)
    }

    /// Opens the node in `dir`.
    pub fn open(dir: &Path) -> Result<Self, NodeError> {
        #[cfg(feature = "sabotage")]
        return Self::open_sabotaged(
            dir,
            crate::Sabotage {
                skip_scope_checks: crate::sabotage_from_env("CONCORD_SABOTAGE_SKIP_SCOPE_CHECKS"),
                ..crate::Sabotage::default()
            },
        );
        #[cfg(not(feature = "sabotage"))]
        Self::open_inner(dir)
    }

    /// [`Node::open`] with deliberate bugs switched on, for tests that show the other nodes
    /// hold against a modified one (a `sabotage` build only).
    #[cfg(feature = "sabotage")]
    pub fn open_sabotaged(dir: &Path, sabotage: crate::Sabotage) -> Result<Self, NodeError> {
        Self::open_inner(dir, sabotage)
    }

    fn open_inner(
        dir: &Path,
        #[cfg(feature = "sabotage")] sabotage: crate::Sabotage,
    ) -> Result<Self, NodeError> {
        let config_path = dir.join(CONFIG_FILE);
        if !config_path.exists() {
            return Err(NodeError::NotInitialized(dir.to_owned()));
        }
        if let Some(mode) = crate::files::writable_by_others(dir).map_err(io_error(dir))? {
            return Err(NodeError::UnsafePermissions {
                path: dir.to_owned(),
                mode,
            });
        }
        let config = Config::load(&config_path)?;
        let id = read_node_id(dir)?;
        let disk = disk::Disk::new(dir);
        let backend = open_backend(dir, &config, &disk)?;
        let store_path = dir.join(STORE_DIR);
        let damaged = |detail: String| NodeError::StoreDamaged {
            path: store_path.clone(),
            dir: dir.display().to_string(),
            detail,
        };
        let store_config = DocStoreConfig {
            cache_documents: NonZeroUsize::new(config.store.cache_documents)
                .expect("Config::check refuses a zero cache"),
            cache_bytes: config.store.cache_mib * 1024 * 1024,
            compact_after_changes: config.store.compact_after_changes,
            compact_histories: config.store.compact_histories,
            ..DocStoreConfig::default()
        };
        let fresh = NodeId::random().map_err(NodeError::Random)?;
        let (writer, incarnation) = crate::store::claim_writer(&backend, id, fresh)?;
        if incarnation == crate::store::Incarnation::Created {
            tracing::info!(node = %id, %writer, "a new store: its changes are written under a new writer");
        }
        #[cfg_attr(not(feature = "sabotage"), allow(unused_mut))]
        let mut docs =
            DocStore::open(backend, writer, store_config).map_err(|error| match error {
                StoreError::Corrupt(_) | StoreError::EngineCorrupt(_) => damaged(error.to_string()),
                other => other.into(),
            })?;
        #[cfg(feature = "sabotage")]
        docs.set_sabotage(sabotage);
        let api_actor = Self::register_source(&docs, &config, id, API_SOURCE)?;
        let policies = crate::policy::Policies::from_config(&config.policies)?;
        // Writes wait while the disk is nearly full; reads go on.
        if let Ok(state) = disk.check() {
            docs.refuse_writes(state.refusal());
            docs.set_room(state.room());
        }
        let verifier = match config.cluster_id() {
            Some(cluster) => {
                let path = dir.join(TLS_DIR).join(tls::CA_CERT_FILE);
                let pem = std::fs::read_to_string(&path).map_err(io_error(&path))?;
                Some(Box::new(crate::scope::Verifier::new(&pem, cluster)?)
                    as Box<dyn crate::scope::Verify>)
            }
            None => None,
        };
        let registry = crate::scope::Registry::new(id, verifier);
        docs.set_door(Arc::new(registry.door()));
        let node = Self {
            dir: dir.to_owned(),
            config,
            id,
            docs,
            api_actor,
            disk,
            policies,
            registry,
            retag: Mutex::new(None),
        };
        node.refresh_scopes()?;
        Ok(node)
    }

    /// The node named `name` (its `node.name`, as the actor registry holds it), or the node
    /// whose id `name` is.
    pub fn node_named(&self, name: &str) -> Result<NodeId, NodeError> {
        if name.is_empty() {
            return Err(NodeError::UnknownNode(String::new()));
        }
        if let Ok(id) = name.parse::<NodeId>() {
            return Ok(id);
        }
        let registry = Collection::new(ACTOR_REGISTRY_COLLECTION)?;
        let mut after: Option<Key> = None;
        loop {
            let page = self.list(&registry, after.as_ref(), crate::store::SCAN_PAGE_ENTRIES)?;
            for (_, fields) in &page.records {
                if fields.get("node_name").and_then(Json::as_str) == Some(name) {
                    if let Some(id) = fields
                        .get("node")
                        .and_then(Json::as_str)
                        .and_then(|text| text.parse::<NodeId>().ok())
                    {
                        return Ok(id);
                    }
                }
            }
            match page.last_seen {
                Some(last) => after = Some(last),
                None => return Err(NodeError::UnknownNode(name.to_owned())),
            }
        }
    }

    /// The actor of `source` on this node, entered in the actor registry the first time.
    fn register_source(
        docs: &DocStore<DiskStore>,
        config: &Config,
        node: NodeId,
        source: &str,
    ) -> Result<ActorId, NodeError> {
        let writer = docs.writer();
        let (index, new) = docs.source_index(source)?;
        let actor = writer.actor(index);
        docs.name_writer(&actor, source, &config.node.name, node);
        let entry = RecordId::new(
            Collection::new(ACTOR_REGISTRY_COLLECTION)?,
            Key::new(&actor.to_hex_string())?,
        );
        // A source already numbered is entered again under a new writer (a new incarnation).
        if new || docs.stored(&entry)?.is_none() {
            let mut fields = Map::new();
            fields.insert("node".into(), json!(node.to_string()));
            fields.insert("writer".into(), json!(writer.to_string()));
            fields.insert("node_name".into(), json!(config.node.name));
            fields.insert("source".into(), json!(source));
            let mut session = docs.session();
            session.put_record(&entry, &actor, now_ms(), &RecordWrite::replace_with(fields))?;
            session.commit(Durability::Durable)?;
        }
        Ok(actor)
    }

    /// Refused changes as `concord refused` lists them, one JSON object each: record, change,
    /// actor, sequence, reason, the change that stands instead, and the change's clock.
    pub fn refused_changes(&self, limit: usize) -> Result<Vec<Json>, NodeError> {
        let entries = self.docs.refused_changes(limit)?;
        Ok(entries
            .into_iter()
            .map(|entry| {
                let change = automerge::Change::from_bytes(entry.refused.change.clone()).ok();
                json!({
                    "record": String::from_utf8_lossy(&entry.doc_key),
                    "change": entry.hash.to_string(),
                    "actor": change.as_ref().map(|change| change.actor_id().to_hex_string()),
                    "seq": change.as_ref().map(automerge::Change::seq),
                    "author": change.as_ref().and_then(|change| {
                        ChangeStamp::of_change(change.message(), change.timestamp())
                            .author()
                            .map(|author| author.to_string())
                    }),
                    "reason": entry.refused.reason.as_str(),
                    "instead": (entry.refused.instead != [0; 32])
                        .then(|| ChangeHash(entry.refused.instead).to_string()),
                    "hlc": entry.refused.hlc,
                })
            })
            .collect())
    }

    /// The node's identity: its certificate's id, kept in `node.id`.
    pub fn id(&self) -> NodeId {
        self.id
    }

    /// The writer this node's store writes under: the origin of its log and the prefix of its
    /// actors. It differs from [`Node::id`] for every store made since incarnations, and a
    /// store made again (lost, or restored from a backup) gets a new one.
    pub fn writer(&self) -> NodeId {
        self.docs.writer()
    }

    /// Makes the store write under a new writer from now on, and enters every source's actor
    /// under it in the actor registry: for a store found behind or beside what its peers hold
    /// of its own log (`reason` says which). What it wrote before stays its own, under the
    /// former writer, and what peers hold of that comes back like any other origin's log.
    pub fn new_incarnation(&self, reason: &str) -> Result<NodeId, NodeError> {
        let fresh = NodeId::random().map_err(NodeError::Random)?;
        let former = self.docs.switch_writer(self.id, fresh)?;
        tracing::warn!(
            node = %self.id,
            %former,
            writer = %fresh,
            "{reason}: this node now writes under a new writer"
        );
        for (source, _) in self.docs.sources()? {
            Self::register_source(&self.docs, &self.config, self.id, &source)?;
        }
        Ok(fresh)
    }

    /// The latest clock a change from elsewhere may carry now: this node's clock and the
    /// bound its config allows.
    pub fn accept_until_ms(&self) -> u64 {
        u64::try_from(now_ms())
            .unwrap_or(0)
            .saturating_add(self.config.node.clock_ahead_max_ms)
    }

    /// The disk under the data dir.
    pub fn disk(&self) -> &disk::Disk {
        &self.disk
    }

    /// The conflict policies reads are resolved by.
    pub fn policies(&self) -> &crate::policy::Policies {
        &self.policies
    }

    /// The actor that source `name` (an adapter binding) writes with, registered on first use.
    pub fn source_actor(&self, name: &str) -> Result<ActorId, NodeError> {
        Self::register_source(&self.docs, &self.config, self.id, name)
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn documents(&self) -> &DocStore<DiskStore> {
        &self.docs
    }

    /// Sets and removes fields (or replaces the record); creates or re-creates it as needed.
    /// Returns whether anything changed. Durable when it returns.
    pub fn put(&self, id: &RecordId, write: &RecordWrite) -> Result<bool, NodeError> {
        let mut session = self.docs.session();
        let outcome = session.put_record(id, &self.api_actor, now_ms(), write)?;
        session.commit(Durability::Durable)?;
        Ok(outcome.change.is_some())
    }

    /// Like [`Node::put`] for many records, acknowledged together by one flush.
    pub fn put_many<'a>(
        &self,
        writes: impl IntoIterator<Item = (&'a RecordId, &'a RecordWrite)>,
    ) -> Result<usize, NodeError> {
        let now = now_ms();
        let mut session = self.docs.session();
        let mut changed = 0;
        for (index, (id, write)) in writes.into_iter().enumerate() {
            let in_batch = |error: NodeError| NodeError::InBatch {
                index,
                error: Box::new(error),
            };
            let outcome = session
                .put_record(id, &self.api_actor, now, write)
                .map_err(|error| in_batch(error.into()))?;
            changed += usize::from(outcome.change.is_some());
        }
        session.commit(Durability::Durable)?;
        Ok(changed)
    }

    /// The record's fields, or `None` when it is deleted or was never written.
    pub fn get(&self, id: &RecordId) -> Result<Option<Map<String, Json>>, NodeError> {
        let collection = id.collection.as_str();
        Ok(self.docs.read(id, |doc| {
            crate::policy::read(doc.local(), None, collection, &self.policies)
        })?)
    }

    /// The record as it was at `version` (a change in its history), or `None` when it was
    /// deleted then.
    pub fn get_at(
        &self,
        id: &RecordId,
        version: &ChangeHash,
    ) -> Result<Option<Map<String, Json>>, NodeError> {
        let collection = id.collection.as_str();
        let then = self.docs.read(id, |doc| {
            let local = doc
                .local_heads(std::slice::from_ref(version))
                .filter(|_| doc.holds(version))?;
            Some(crate::policy::read(
                doc.local(),
                Some(&local),
                collection,
                &self.policies,
            ))
        })?;
        then.ok_or_else(|| NodeError::UnknownVersion {
            id: id.clone(),
            version: version.to_string(),
        })
    }

    /// The version of `id` that `text` names: a whole hash, or a prefix of at least
    /// [`VERSION_PREFIX_HEX_MIN`] hex digits that one change of the record's history alone
    /// starts with.
    pub fn resolve_version(&self, id: &RecordId, text: &str) -> Result<ChangeHash, NodeError> {
        let text = text.trim().to_ascii_lowercase();
        if text.len() == 64 {
            return parse_version(&text);
        }
        if text.len() < VERSION_PREFIX_HEX_MIN
            || text.len() > 64
            || !text.bytes().all(|byte| byte.is_ascii_hexdigit())
        {
            return Err(NodeError::BadVersion(text));
        }
        let matching: Vec<ChangeHash> = self.docs.read(id, |doc| {
            let cut = doc
                .epoch()
                .map(|epoch| epoch.cut().to_vec())
                .unwrap_or_default();
            doc.changes(&[])
                .iter()
                .map(automerge::Change::hash)
                .chain(cut)
                .filter(|hash| hash.to_string().starts_with(&text))
                .collect()
        })?;
        match matching.as_slice() {
            [one] => Ok(*one),
            [] => Err(NodeError::UnknownVersion {
                id: id.clone(),
                version: text,
            }),
            _ => Err(NodeError::BadVersion(format!(
                "{text} (it starts {} versions of {id}: give more of it)",
                matching.len()
            ))),
        }
    }

    /// Writes a new change that makes the record what it was at `version`: exactly its
    /// fields then, or deleted if it was deleted then. It replicates like any write and is
    /// itself a version that can be reverted to. Returns whether anything changed.
    pub fn revert(&self, id: &RecordId, version: &ChangeHash) -> Result<bool, NodeError> {
        let then = self.get_at(id, version)?;
        let mut session = self.docs.session();
        let outcome = match then {
            Some(fields) => session.put_record_reverting(
                id,
                &self.api_actor,
                now_ms(),
                Some(*version),
                &RecordWrite::replace_with(fields),
            )?,
            None => {
                session
                    .delete_record(id, &self.api_actor, now_ms(), Some(*version))?
                    .1
            }
        };
        session.commit(Durability::Durable)?;
        Ok(outcome.change.is_some())
    }

    /// Deletes a live record; `NotFound` otherwise.
    pub fn delete(&self, id: &RecordId) -> Result<(), NodeError> {
        let mut session = self.docs.session();
        let (was_live, _) = session.delete_record(id, &self.api_actor, now_ms(), None)?;
        session.commit(Durability::Durable)?;
        if was_live {
            Ok(())
        } else {
            Err(NodeError::NotFound(id.clone()))
        }
    }

    /// Live records of a collection after key `after`, looking at `limit` records at most,
    /// in key order.
    pub fn list(
        &self,
        collection: &Collection,
        after: Option<&Key>,
        limit: usize,
    ) -> Result<ListPage, NodeError> {
        let limit = page_limit(limit, usize::MAX)?;
        let stored = self.docs.scan_collection(collection, after, limit)?;
        let last = stored.last().map(|record| record.id.key.clone());
        let mut records = Vec::with_capacity(stored.len());
        for record in stored {
            if record.stored.record_state() != document::RecordState::Live {
                continue;
            }
            if let Some(fields) = self.get(&record.id)? {
                records.push((record.id.key, fields));
            }
        }
        Ok(ListPage {
            records,
            last_seen: last,
        })
    }

    /// Live records over all user collections (kept up to date by the store; no scan).
    pub fn count_live_records(&self) -> Result<u64, NodeError> {
        Ok(self.docs.count_live()?)
    }

    /// The record's Automerge document, saved whole; `NotFound` if it was never written.
    pub fn export(&self, id: &RecordId) -> Result<Vec<u8>, NodeError> {
        let bytes = self.docs.export(id)?;
        bytes.ok_or_else(|| NodeError::NotFound(id.clone()))
    }

    /// Merges a saved Automerge document into the record.
    pub fn import(&self, id: &RecordId, bytes: &[u8]) -> Result<ImportOutcome, NodeError> {
        if bytes.len() > IMPORT_BYTES_MAX {
            return Err(NodeError::TooLarge {
                what: "the document",
                size: bytes.len(),
                size_max: IMPORT_BYTES_MAX,
            });
        }
        Ok(self.docs.import(id, bytes, self.accept_until_ms())?)
    }
}

/// How long opening a store waits for a lock that this process is still releasing (an engine may let
/// go of its file lock shortly after the last handle is dropped).
const STORE_LOCK_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

/// The node's id, from its data dir's `node.id`.
fn read_node_id(dir: &Path) -> Result<NodeId, NodeError> {
    let id_path = dir.join(NODE_ID_FILE);
    let id_text = std::fs::read_to_string(&id_path).map_err(io_error(&id_path))?;
    let id = id_text
        .parse::<NodeId>()
        .map_err(|error| NodeError::BadIdentity {
            path: id_path.clone(),
            message: error.to_string(),
        })?;
    Ok(id)
}

/// Opens the data dir's store on the engine its config names; a store its engine cannot
/// open (or panics on) is reported damaged, with what to do. On a nearly full disk the
/// reserve makes room first: an engine writes as it opens.
fn open_backend(dir: &Path, config: &Config, disk: &disk::Disk) -> Result<DiskStore, NodeError> {
    let store_path = dir.join(STORE_DIR);
    let damaged = |detail: String| NodeError::StoreDamaged {
        path: store_path.clone(),
        dir: dir.display().to_string(),
        detail,
    };
    // An engine may panic on some damaged files instead of failing.
    let cache_bytes = config.store.page_cache_mib * 1024 * 1024;
    let engine = config.store.engine;
    // An engine writes as it opens (a snapshot of its page table, or its journal), and a write cut
    // short by a full disk leaves that snapshot unreadable: on a nearly full disk the
    // reserve makes room first, so that the node opens and serves reads.
    let short_of_room = disk.check().is_ok_and(|state| state.refusal().is_some());
    if short_of_room && disk.release() {
        tracing::warn!("the disk is nearly full: its reserve was given up to open the store");
    }
    let open_on_disk = || match open_store(&store_path, engine, cache_bytes) {
        // The engine writes as it opens: on a full disk the reserve makes room for it, so
        // that the node serves reads.
        Err(NodeError::Store(StoreError::Io(error)))
            if disk::is_disk_full(&error) && disk.release() =>
        {
            tracing::warn!("the disk is full: its reserve was given up to open the store");
            open_store(&store_path, engine, cache_bytes)
        }
        other => other,
    };
    let backend = std::panic::catch_unwind(open_on_disk)
        .map_err(|panic| {
            let detail = panic
                .downcast_ref::<&str>()
                .map(|text| (*text).to_owned())
                .or_else(|| panic.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "the store's engine panicked opening it".to_owned());
            damaged(detail)
        })?
        .map_err(|error| match error {
            NodeError::Store(StoreError::EngineCorrupt(_)) => damaged(error.to_string()),
            other => other,
        })?;
    crate::files::restrict_tree(&store_path).map_err(io_error(&store_path))?;
    Ok(backend)
}

/// Whether the store in `dir` is locked by a running node, by its lock alone: no waiting, and
/// without opening it (which a damaged store can hang).
pub fn store_in_use(dir: &Path) -> Result<bool, NodeError> {
    let path = dir.join(STORE_DIR);
    crate::store::engine::in_use(&path).map_err(io_error(&path))
}

fn open_store(
    path: &Path,
    engine: Option<crate::store::Engine>,
    cache_bytes: u64,
) -> Result<DiskStore, NodeError> {
    let start = std::time::Instant::now();
    loop {
        match DiskStore::open(path, engine, cache_bytes) {
            Ok(store) => return Ok(store),
            Err(StoreError::Locked) => {
                if start.elapsed() >= STORE_LOCK_WAIT {
                    return Err(NodeError::Locked {
                        path: path.to_owned(),
                    });
                }
                std::thread::sleep(std::time::Duration::from_millis(20));
            }
            Err(other) => return Err(other.into()),
        }
    }
}

pub use crate::record::stamp::now_ms;

/// A binding's view of the node it runs in.
impl crate::adapters::Host for Node {
    fn documents(&self) -> &DocStore<DiskStore> {
        &self.docs
    }

    fn dir(&self) -> &Path {
        &self.dir
    }

    fn bindings(&self) -> &[crate::config::BindingSection] {
        &self.config.bindings
    }

    fn source_actor(&self, source: &str) -> Result<ActorId, String> {
        Node::source_actor(self, source).map_err(|error| error.to_string())
    }

    fn resolved(&self, id: &RecordId) -> Result<Option<Map<String, Json>>, String> {
        self.get(id).map_err(|error| error.to_string())
    }
}
