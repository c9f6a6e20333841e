//! Node: a data dir, its identity and config, and the record operations on it.
//!
//! Owns the data dir layout (`concord.toml`, `node.id`, `store/`) and the record operations
//! that the CLI (and later the HTTP API) offer: put, get, delete, list, history, export,
//! import. Every write goes through the document store and is durable when the call returns.
//! The node's own API writes as the source `api`; the first time a source writes on a node,
//! its actor is entered in the actor registry (`_actors`), which replicates like any record.

pub mod api;
pub mod disk;
pub mod maintenance;
pub mod runtime;

use std::collections::{BTreeMap, HashMap};
use std::num::NonZeroUsize;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{SystemTime, UNIX_EPOCH};

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
/// Most changes `history` lists for one record.
pub const HISTORY_CHANGES_MAX: usize = 100_000;
/// Actors whose origin one history replay keeps at hand.
const HISTORY_ORIGINS_CACHED_MAX: usize = 4096;

/// A record's changes with who wrote them, described one at a time: see [`Node::history`].
pub struct HistoryReplay<'a> {
    node: &'a Node,
    replay: Replay,
    /// The document replayed: a compacted one's history starts at its cut (the changes of
    /// its base are replayed, not listed), and lists the original changes.
    held: HeldDoc,
    origins: HashMap<ActorId, Option<Map<String, Json>>>,
}

impl Iterator for HistoryReplay<'_> {
    type Item = Result<HistoryEntry, NodeError>;

    fn next(&mut self) -> Option<Self::Item> {
        loop {
            let (change, effect) = self.replay.next()?;
            let change = match self.held.epoch() {
                None => change,
                Some(epoch) if epoch.is_base(&change.hash()) => continue,
                Some(epoch) => match epoch.back(&change) {
                    Ok(original) => original,
                    Err(error) => return Some(Err(NodeError::Store(error.into()))),
                },
            };
            return Some(self.node.history_entry(&mut self.origins, &change, effect));
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("cannot listen for {what} on {address}: {error}")]
    Listen {
        what: &'static str,
        address: String,
        error: std::io::Error,
    },
    #[error(transparent)]
    Scope(#[from] crate::scope::ScopeError),
    #[error("no node named {0:?} is known here (give its id, as `concord status` shows it)")]
    UnknownNode(String),
    #[error("node {0} is revoked: it takes no grant (a site that returns needs a new node)")]
    Revoked(NodeId),
    #[error("node {0} is already revoked")]
    AlreadyRevoked(NodeId),
    #[error(
        "node {0} was removed from the cluster: it takes no grant (a site that returns needs a \
         new node)"
    )]
    Removed(NodeId),
    #[error("node {0} is already removed")]
    AlreadyRemoved(NodeId),
    #[error("a limit of 0 lists nothing: give at least 1")]
    ZeroLimit,
    /// Write `index` of a batch (numbered from 0) failed, so the batch stored nothing.
    #[error("write {index}: {error}")]
    InBatch { index: usize, error: Box<NodeError> },
    #[error("{0} is already a Concord data dir")]
    AlreadyInitialized(PathBuf),
    #[error("{0} is not a Concord data dir (run `concord init {0}` first)")]
    NotInitialized(PathBuf),
    #[error("{path}: {message}")]
    BadIdentity { path: PathBuf, message: String },
    #[error(
        "{path} can be written by users other than its owner (mode {mode:o}): whoever can \
         write it can replace this node's keys and records; run `chmod 700 {path}`"
    )]
    UnsafePermissions { path: PathBuf, mode: u32 },
    #[error("cannot create a node id: {0}")]
    Random(getrandom::Error),
    #[error("the store in {path} is in use by another process (is `concord run` serving it?)")]
    Locked { path: PathBuf },
    #[error(
        "the store in {path} is damaged ({detail}): `concord recover {dir}` salvages what it \
         still holds, and its peers send the rest"
    )]
    StoreDamaged {
        path: PathBuf,
        dir: String,
        detail: String,
    },
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Tls(#[from] tls::TlsError),
    #[error(transparent)]
    Policy(#[from] crate::policy::PolicyError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Record(#[from] RecordError),
    #[error("{0} not found")]
    NotFound(RecordId),
    #[error("address {0:?} does not resolve")]
    Address(String),
    #[error(
        "this node has no cluster certificate: give it one with `concord init DIR --ca CA_DIR` \
         (it keeps the node's id and records)"
    )]
    NoCluster,
    #[error("transport: {0}")]
    Transport(String),
    #[error("{0}")]
    Binding(String),
    #[error("{0}; the node stopped so as not to accept writes it cannot replicate")]
    Failed(String),
    #[error("version {0:?} is not a change hash: 64 hex digits, as `concord history` prints them")]
    BadVersion(String),
    #[error("field {field:?} of {id} is not in conflict (see `concord conflicts`)")]
    NoConflict { id: RecordId, field: String },
    #[error("there is no candidate {index}: the conflict has {count}, numbered from 0")]
    NoCandidate { index: usize, count: usize },
    #[error("time {0:?} is not understood: give it as RFC 3339, such as 2026-11-26T10:00:00Z or 2026-11-26T11:00:00+01:00")]
    BadTime(String),
    #[error("{id} has no version {version} (see `concord history {id}`)")]
    UnknownVersion { id: RecordId, version: String },
    #[error("{what} is {size} bytes; the most is {size_max}")]
    TooLarge {
        what: &'static str,
        size: usize,
        size_max: usize,
    },
}

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

/// One change in a record's history.
#[derive(Debug, Clone, Serialize)]
pub struct HistoryEntry {
    /// The change hash: the version this change produced.
    pub hash: String,
    pub actor: String,
    /// The node the actor belongs to, when it is a Concord actor.
    pub node: Option<String>,
    pub node_name: Option<String>,
    pub source: Option<String>,
    /// When it was written (RFC 3339), by the writer's clock.
    pub time: String,
    /// The same, in seconds since the Unix epoch.
    #[serde(skip)]
    pub seconds: i64,
    #[serde(flatten)]
    pub effect: document::ChangeEffect,
}

/// Most records one audit looks at; past that it says it stopped early.
pub const AUDIT_RECORDS_MAX: usize = 100_000;
/// Most entries one audit returns.
pub const AUDIT_ENTRIES_MAX: usize = 100_000;
/// Records read per page while an audit finds the records to look at.
const AUDIT_SCAN_PAGE: usize = 10_000;

/// Which changes an audit lists; every condition given must hold.
#[derive(Debug, Clone, Default)]
pub struct AuditFilter {
    pub collection: Option<Collection>,
    pub record: Option<RecordId>,
    /// A source name: `api`, or a binding's name.
    pub source: Option<String>,
    /// A node's name or id.
    pub node: Option<String>,
    /// Seconds since the Unix epoch, inclusive, by the writer's clock.
    pub since: Option<i64>,
    pub until: Option<i64>,
    /// Most entries returned, the earliest first (at most [`AUDIT_ENTRIES_MAX`]).
    pub limit: usize,
}

impl AuditFilter {
    fn admits(&self, change: &HistoryEntry) -> bool {
        self.source
            .as_ref()
            .is_none_or(|source| change.source.as_ref() == Some(source))
            && self.node.as_ref().is_none_or(|node| {
                change.node.as_ref() == Some(node) || change.node_name.as_ref() == Some(node)
            })
            && self.since.is_none_or(|since| change.seconds >= since)
            && self.until.is_none_or(|until| change.seconds <= until)
    }
}

/// The conflicting fields of one record.
#[derive(Debug, Clone, Serialize)]
pub struct RecordConflicts {
    /// `COLLECTION/KEY`.
    pub record: String,
    pub fields: Vec<crate::policy::FieldConflict>,
}

/// What `concord conflicts` found.
#[derive(Debug, Clone, Serialize)]
pub struct ConflictReport {
    pub records: Vec<RecordConflicts>,
    /// More records conflict than were listed, or more records exist than one listing looks
    /// at: narrow it to a collection.
    pub truncated: bool,
}

/// How a person settles a conflict.
#[derive(Debug, Clone, PartialEq)]
pub enum Settlement {
    /// The candidate at this index, as `concord conflicts` lists them.
    Pick(usize),
    /// A value of one's own.
    Value(Json),
}

/// One change an audit found.
#[derive(Debug, Clone, Serialize)]
pub struct AuditEntry {
    /// `COLLECTION/KEY`.
    pub record: String,
    #[serde(flatten)]
    pub change: HistoryEntry,
}

/// What an audit found, in time order (by the writers' clocks), then by record.
#[derive(Debug, Clone, Serialize)]
pub struct AuditReport {
    pub entries: Vec<AuditEntry>,
    /// More changes matched than were returned (or more records exist than one audit looks
    /// at): narrow the filter, or continue with `since`.
    pub truncated: bool,
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
    /// Checks grants and revocations against the cluster CA (none without a cluster).
    verifier: Option<crate::scope::Verifier>,
    /// The grants and revocations in force, as `_grants` held them when last read.
    scopes: Arc<RwLock<crate::scope::Scopes>>,
    /// Each record of `_grants` judged so far, by key: what verified, or `None`.
    grants_judged: Mutex<HashMap<String, Option<JudgedGrant>>>,
    /// Where retagging the log for read filters new since it was logged stands, while it
    /// runs: the log key to go on after (`Some(None)`: from the start).
    retag: Mutex<Option<Option<Vec<u8>>>>,
}

/// Most steps of [`crate::store::DocStore::retag_log_step`] one [`Node::retag_step`] takes.
pub const RETAG_STEPS_PER_CALL: usize = 64;

/// A grant or revocation that verified, and its signature (the tie-break between grants).
type JudgedGrant = (crate::scope::Verified, Vec<u8>);

/// The key of a signed grant or revocation in `_grants`: the SHA-256 of its bytes, hex.
fn grant_key(signed: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, signed).as_ref())
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
        let id_path = dir.join(NODE_ID_FILE);
        let id_text = std::fs::read_to_string(&id_path).map_err(io_error(&id_path))?;
        let id = id_text
            .parse::<NodeId>()
            .map_err(|error| NodeError::BadIdentity {
                path: id_path.clone(),
                message: error.to_string(),
            })?;
        let store_path = dir.join(STORE_DIR);
        let damaged = |detail: String| NodeError::StoreDamaged {
            path: store_path.clone(),
            dir: dir.display().to_string(),
            detail,
        };
        // An engine may panic on some damaged files instead of failing.
        let cache_bytes = config.store.page_cache_mib * 1024 * 1024;
        let engine = config.store.engine;
        let disk = disk::Disk::new(dir);
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
                Some(crate::scope::Verifier::new(&pem, cluster)?)
            }
            None => None,
        };
        let scopes = Arc::new(RwLock::new(crate::scope::Scopes::default()));
        docs.set_door(Arc::new(crate::scope::ScopeDoor::new(id, scopes.clone())));
        let node = Self {
            dir: dir.to_owned(),
            config,
            id,
            docs,
            api_actor,
            disk,
            policies,
            verifier,
            scopes,
            grants_judged: Mutex::new(HashMap::new()),
            retag: Mutex::new(None),
        };
        node.refresh_scopes()?;
        Ok(node)
    }

    /// Reads the grants and revocations `_grants` holds again, keeping those that verify.
    pub fn refresh_scopes(&self) -> Result<(), NodeError> {
        let Some(verifier) = &self.verifier else {
            return Ok(());
        };
        let collection = Collection::new(crate::scope::GRANTS_COLLECTION)?;
        let stored =
            self.docs
                .scan_collection(&collection, None, crate::scope::GRANT_RECORDS_MAX)?;
        let mut judged = self
            .grants_judged
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        // Each record holds the bytes its key is the SHA-256 of: once judged, it is judged for
        // good, and only records new since the last time are read and verified.
        for record in stored {
            let key = record.id.key.to_string();
            if judged.contains_key(&key)
                || record.stored.record_state() != document::RecordState::Live
            {
                continue;
            }
            let signed = self
                .get(&record.id)?
                .and_then(|fields| {
                    fields
                        .get("signed")
                        .and_then(Json::as_str)
                        .map(str::to_owned)
                })
                .and_then(|text| hex::decode(text).ok())
                .filter(|bytes| grant_key(bytes) == key)
                .ok_or_else(|| {
                    crate::scope::ScopeError::Malformed(
                        "no signed bytes whose SHA-256 is the record's key".into(),
                    )
                })
                .and_then(|bytes| crate::scope::Signed::from_bytes(&bytes));
            let verdict =
                signed.and_then(|signed| Ok((verifier.verify(&signed)?, signed.signature)));
            if let Err(error) = &verdict {
                tracing::warn!(grant = %key, %error, "a grant or revocation that does not count");
            }
            judged.insert(key, verdict.ok());
        }
        let mut scopes = crate::scope::Scopes::default();
        for (verified, signature) in judged.values().flatten() {
            scopes.insert(verified.clone(), signature);
        }
        drop(judged);
        // A read filter naming a field new here: the log's entries logged before it lack that
        // field's values, so they are given them (by `retag_step`, in the background).
        let filters_before = self.scopes().read_filters();
        if !scopes.read_filters().is_subset(&filters_before) {
            *self
                .retag
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(None);
        }
        // A node revoked itself is cut off: it keeps what it holds as it was.
        let cut_offs = scopes.without_node(&self.id).cut_offs();
        let cut_offs_before = std::mem::replace(
            &mut *self
                .scopes
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
            scopes,
        )
        .without_node(&self.id)
        .cut_offs();
        // A revocation new here (or narrower) counts for what arrived before it too: the
        // revoked node's changes past the cut-off come out, as every node leaves them out.
        if cut_offs != cut_offs_before {
            // A writer of a revoked node that its revocation does not name counts nothing.
            let mut cut_offs = cut_offs;
            for node in self.scopes().revoked() {
                if node == self.id {
                    continue;
                }
                for writer in self.writers_of(node)?.into_keys() {
                    cut_offs.entry(writer).or_insert(0);
                }
            }
            let mut own = false;
            for (writer, cut_off) in cut_offs {
                let (taken_out, own_here) = self.docs.take_out_past(&writer, cut_off)?;
                own |= own_here;
                if taken_out > 0 {
                    tracing::warn!(
                        %writer,
                        cut_off,
                        taken_out,
                        "took out changes of a revoked node past its cut-off"
                    );
                }
            }
            if own {
                // Its next change would reuse a sequence number of one taken out.
                self.new_incarnation(
                    "a revocation took out changes of this node's own written on top of the \
                     revoked node's",
                )?;
            }
        }
        Ok(())
    }

    /// Goes on giving log entries the values of the fields read filters name (after a filter
    /// named a new field), for at most [`RETAG_STEPS_PER_CALL`] steps; returns whether more
    /// is left. Until it is done, a sender loads a record to judge an entry that lacks them.
    pub fn retag_step(&self) -> Result<bool, NodeError> {
        let cursor = || {
            self.retag
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner())
        };
        // Taken out while the steps run, so a refresh that asks to start over never waits.
        let Some(mut after) = cursor().take() else {
            return Ok(false);
        };
        for _ in 0..RETAG_STEPS_PER_CALL {
            let (next, rewritten) = self.docs.retag_log_step(after.as_deref())?;
            if rewritten > 0 {
                tracing::debug!(rewritten, "log entries given the values read filters name");
            }
            match next {
                Some(next) => after = Some(next),
                None => return Ok(cursor().is_some()),
            }
        }
        // A refresh that asked to start over meanwhile wins.
        cursor().get_or_insert(after);
        Ok(true)
    }

    /// Runs [`Node::retag_step`] until the log is done.
    pub fn retag_all(&self) -> Result<(), NodeError> {
        while self.retag_step()? {}
        Ok(())
    }

    /// Stores a signed grant or revocation (it replicates like any record) once it verifies.
    pub fn add_signed(&self, bytes: &[u8]) -> Result<crate::scope::Verified, NodeError> {
        let verifier = self.verifier.as_ref().ok_or(NodeError::NoCluster)?;
        let signed = crate::scope::Signed::from_bytes(bytes)?;
        let verified = verifier.verify(&signed)?;
        let scopes = self.scopes();
        match &verified {
            crate::scope::Verified::Grant(grant) if scopes.is_revoked(&NodeId(grant.node)) => {
                return Err(NodeError::Revoked(NodeId(grant.node)));
            }
            crate::scope::Verified::Grant(grant) if scopes.is_removed(&NodeId(grant.node)) => {
                return Err(NodeError::Removed(NodeId(grant.node)));
            }
            crate::scope::Verified::Revocation(revocation)
                if scopes.is_revoked(&NodeId(revocation.node)) =>
            {
                return Err(NodeError::AlreadyRevoked(NodeId(revocation.node)));
            }
            crate::scope::Verified::Removal(removal)
                if scopes.is_removed(&NodeId(removal.node)) =>
            {
                return Err(NodeError::AlreadyRemoved(NodeId(removal.node)));
            }
            _ => {}
        }
        let id = RecordId::new(
            Collection::new(crate::scope::GRANTS_COLLECTION)?,
            Key::new(&grant_key(bytes))?,
        );
        let write = RecordWrite {
            set: vec![("signed".to_owned(), Json::String(hex::encode(bytes)))],
            ..RecordWrite::default()
        };
        self.docs
            .write(&id, &self.api_actor, now_ms(), Durability::Durable, |tx| {
                document::apply_write(tx, &write)
            })?;
        self.refresh_scopes()?;
        Ok(verified)
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

    /// The writers of node `id` (the origins of its log, from the actor registry, and its
    /// own id for a store made before incarnations), each with how far this node holds its
    /// log: the cut-off a revocation made here names.
    pub fn writers_of(&self, id: NodeId) -> Result<BTreeMap<NodeId, u64>, NodeError> {
        let registry = Collection::new(ACTOR_REGISTRY_COLLECTION)?;
        let mut writers = BTreeMap::new();
        let mut after: Option<Key> = None;
        loop {
            let page = self.list(&registry, after.as_ref(), crate::store::SCAN_PAGE_ENTRIES)?;
            for (_, fields) in &page.records {
                let text = |name: &str| fields.get(name).and_then(Json::as_str);
                if text("node") != Some(id.to_string().as_str()) {
                    continue;
                }
                if let Some(writer) = text("writer").and_then(|text| text.parse::<NodeId>().ok()) {
                    if writers.len() < crate::scope::CUT_OFFS_MAX {
                        writers.insert(writer, self.docs.origin_mark(&writer));
                    }
                }
            }
            match page.last_seen {
                Some(last) => after = Some(last),
                None => break,
            }
        }
        let legacy = self.docs.origin_mark(&id);
        if legacy > 0 {
            writers.insert(id, legacy);
        }
        Ok(writers)
    }

    /// The grants in force and the revoked nodes, one JSON object each.
    pub fn grants(&self) -> Vec<Json> {
        let scopes = self
            .scopes
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        scopes.describe()
    }

    /// The grants and revocations in force.
    pub fn scopes(&self) -> crate::scope::Scopes {
        self.scopes
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
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
            let write = RecordWrite::replace_with(fields);
            docs.write(&entry, &actor, now_ms(), Durability::Durable, |tx| {
                document::apply_write(tx, &write)
            })?;
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
        write.check()?;
        let (_, outcome) =
            self.docs
                .write(id, &self.api_actor, now_ms(), Durability::Durable, |tx| {
                    document::apply_write(tx, write)
                })?;
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
            write.check().map_err(|error| in_batch(error.into()))?;
            let (_, outcome) = session
                .write(id, &self.api_actor, now, |tx| {
                    document::apply_write(tx, write)
                })
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
        let (_, outcome) = match then {
            Some(fields) => {
                let write = RecordWrite::replace_with(fields);
                write.check()?;
                session.write_reverting(id, &self.api_actor, now_ms(), Some(*version), |tx| {
                    document::apply_write(tx, &write)
                })?
            }
            None => {
                session.write_reverting(id, &self.api_actor, now_ms(), Some(*version), |tx| {
                    document::apply_delete(tx).map(|_| ())
                })?
            }
        };
        session.commit(Durability::Durable)?;
        Ok(outcome.change.is_some())
    }

    /// Deletes a live record; `NotFound` otherwise.
    pub fn delete(&self, id: &RecordId) -> Result<(), NodeError> {
        let (was_live, _) =
            self.docs
                .write(id, &self.api_actor, now_ms(), Durability::Durable, |tx| {
                    document::apply_delete(tx)
                })?;
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

    /// Up to `limit` changes of the record after the change `after` (from the first when
    /// `None`), in causal order, with who wrote them and what they did. One page costs what
    /// replaying the record up to its end costs, and holds no lock meanwhile.
    pub fn history(
        &self,
        id: &RecordId,
        after: Option<&ChangeHash>,
        limit: usize,
    ) -> Result<Vec<HistoryEntry>, NodeError> {
        let limit = page_limit(limit, HISTORY_CHANGES_MAX)?;
        self.history_replay(id, after, Some(limit))?.collect()
    }

    /// The changes of the record after `after` (every one, or up to `limit`), described one
    /// at a time as they are taken. The record is copied at once, so the replay holds no lock
    /// that other reads wait on.
    pub fn history_replay(
        &self,
        id: &RecordId,
        after: Option<&ChangeHash>,
        limit: Option<usize>,
    ) -> Result<HistoryReplay<'_>, NodeError> {
        let held = self.docs.read(id, HeldDoc::clone)?;
        if held.heads().is_empty() {
            return Err(NodeError::NotFound(id.clone()));
        }
        let unknown = |version: &ChangeHash| NodeError::UnknownVersion {
            id: id.clone(),
            version: version.to_string(),
        };
        let after = match after {
            Some(after) => match held.local_heads(std::slice::from_ref(after)).as_deref() {
                Some([local]) => Some(*local),
                _ => return Err(unknown(after)),
            },
            None => None,
        };
        let replay = Replay::new(held.local().clone(), after.as_ref(), limit)
            .map_err(|error| unknown(&error.0))?;
        Ok(HistoryReplay {
            node: self,
            replay,
            held,
            origins: HashMap::new(),
        })
    }

    /// Who wrote with `actor`, as the actor registry says (looked up once per actor).
    fn history_entry(
        &self,
        origins: &mut HashMap<ActorId, Option<Map<String, Json>>>,
        change: &automerge::Change,
        mut effect: document::ChangeEffect,
    ) -> Result<HistoryEntry, NodeError> {
        let stamp = ChangeStamp::of_change(change.message(), change.timestamp());
        if let Some(version) = stamp.reverts {
            effect.action = "revert";
            effect.reverts = Some(version);
        }
        let actor = change.actor_id();
        if !origins.contains_key(actor) {
            if origins.len() >= HISTORY_ORIGINS_CACHED_MAX {
                origins.clear();
            }
            let origin = self.actor_origin(actor)?;
            origins.insert(actor.clone(), origin);
        }
        let origin = origins.get(actor).cloned().flatten();
        let text = |field: &str| {
            origin
                .as_ref()
                .and_then(|fields| fields.get(field))
                .and_then(Json::as_str)
                .map(str::to_owned)
        };
        let node =
            text("node").or_else(|| NodeId::split_actor(actor).map(|(node, _)| node.to_string()));
        let seconds = change.timestamp();
        let time = u64::try_from(seconds)
            .map(|seconds| {
                humantime::format_rfc3339_seconds(
                    UNIX_EPOCH + std::time::Duration::from_secs(seconds),
                )
                .to_string()
            })
            .unwrap_or_default();
        Ok(HistoryEntry {
            hash: change.hash().to_string(),
            actor: actor.to_hex_string(),
            node,
            node_name: text("node_name"),
            source: text("source"),
            time,
            seconds,
            effect,
        })
    }

    /// Changes to user records (or to `filter.collection`, which may be one of Concord's
    /// own), with node, source and time, filtered.
    pub fn audit(&self, filter: &AuditFilter) -> Result<AuditReport, NodeError> {
        let limit = page_limit(filter.limit, AUDIT_ENTRIES_MAX)?;
        let (ids, mut truncated) = self.audited_records(filter)?;
        let mut entries: Vec<AuditEntry> = Vec::new();
        let keep_earliest = |entries: &mut Vec<AuditEntry>, truncated: &mut bool| {
            // Stable: one record's changes stay in causal order within a second.
            entries
                .sort_by(|a, b| (a.change.seconds, &a.record).cmp(&(b.change.seconds, &b.record)));
            if entries.len() > limit {
                entries.truncate(limit);
                *truncated = true;
            }
        };
        for id in ids {
            let history = match self.history_replay(&id, None, None) {
                Ok(history) => history,
                Err(NodeError::NotFound(_)) => continue,
                Err(error) => return Err(error),
            };
            let record = id.to_string();
            for change in history.take(HISTORY_CHANGES_MAX) {
                let change = change?;
                if filter.admits(&change) {
                    entries.push(AuditEntry {
                        record: record.clone(),
                        change,
                    });
                }
            }
            if entries.len() > 2 * limit {
                keep_earliest(&mut entries, &mut truncated);
            }
        }
        keep_earliest(&mut entries, &mut truncated);
        Ok(AuditReport { entries, truncated })
    }

    /// Records with conflicting fields (in `collection`, or in every user collection), with
    /// each field's candidates, their origins and times, the winner and the rule; at most
    /// `limit` records.
    pub fn conflicts(
        &self,
        collection: Option<&Collection>,
        limit: usize,
    ) -> Result<ConflictReport, NodeError> {
        let filter = AuditFilter {
            collection: collection.cloned(),
            ..AuditFilter::default()
        };
        let limit = page_limit(limit, AUDIT_ENTRIES_MAX)?;
        let (ids, mut truncated) = self.audited_records(&filter)?;
        let mut records = Vec::new();
        for id in ids {
            let collection = id.collection.as_str();
            let fields = self.docs.read(&id, |doc| {
                crate::policy::conflicts(doc.local(), collection, &self.policies)
            })?;
            if fields.is_empty() {
                continue;
            }
            if records.len() >= limit {
                truncated = true;
                break;
            }
            records.push(RecordConflicts {
                record: id.to_string(),
                fields,
            });
        }
        Ok(ConflictReport { records, truncated })
    }

    /// Settles a conflicting field with a new write of the picked candidate's value (or of
    /// `settlement`'s own value), which follows every candidate and so ends the conflict on
    /// every node it reaches.
    pub fn resolve(
        &self,
        id: &RecordId,
        field: &str,
        settlement: &Settlement,
    ) -> Result<Json, NodeError> {
        let value = match settlement {
            Settlement::Value(value) => value.clone(),
            Settlement::Pick(index) => {
                let collection = id.collection.as_str();
                let conflicts = self.docs.read(id, |doc| {
                    crate::policy::conflicts(doc.local(), collection, &self.policies)
                })?;
                let conflict = conflicts
                    .into_iter()
                    .find(|conflict| conflict.field == field)
                    .ok_or_else(|| NodeError::NoConflict {
                        id: id.clone(),
                        field: field.to_owned(),
                    })?;
                let count = conflict.candidates.len();
                conflict
                    .candidates
                    .into_iter()
                    .nth(*index)
                    .ok_or(NodeError::NoCandidate {
                        index: *index,
                        count,
                    })?
                    .value
            }
        };
        if self.get(id)?.is_none() {
            return Err(NodeError::NotFound(id.clone()));
        }
        let write = RecordWrite {
            set: vec![(field.to_owned(), value.clone())],
            ..RecordWrite::default()
        };
        self.put(id, &write)?;
        Ok(value)
    }

    /// The records an audit looks at: every record held (live or deleted) of the collection
    /// asked for, or of every user collection, in key order; whether there were more than it
    /// may look at. Read from the documents, not the log, which is truncated once every
    /// replica holds it.
    fn audited_records(&self, filter: &AuditFilter) -> Result<(Vec<RecordId>, bool), NodeError> {
        if let Some(id) = &filter.record {
            return Ok((vec![id.clone()], false));
        }
        let mut ids = Vec::new();
        let mut after: Option<RecordId> = None;
        loop {
            let page = match &filter.collection {
                Some(collection) => {
                    let key = after.as_ref().map(|id| id.key.clone());
                    self.docs
                        .scan_collection(collection, key.as_ref(), AUDIT_SCAN_PAGE)?
                }
                None => self
                    .docs
                    .scan_all_records(after.as_ref(), AUDIT_SCAN_PAGE)?,
            };
            let full = page.len() == AUDIT_SCAN_PAGE;
            for record in page {
                after = Some(record.id.clone());
                if record.id.collection.as_str().starts_with('_') && filter.collection.is_none() {
                    continue;
                }
                if ids.len() >= AUDIT_RECORDS_MAX {
                    return Ok((ids, true));
                }
                ids.push(record.id);
            }
            if !full {
                return Ok((ids, false));
            }
        }
    }

    fn actor_origin(&self, actor: &ActorId) -> Result<Option<Map<String, Json>>, NodeError> {
        let Ok(key) = Key::new(&actor.to_hex_string()) else {
            return Ok(None);
        };
        let entry = RecordId::new(Collection::new(ACTOR_REGISTRY_COLLECTION)?, key);
        self.get(&entry)
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

/// The wall clock in milliseconds since the Unix epoch, as writes take it.
pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|elapsed| i64::try_from(elapsed.as_millis()).unwrap_or(i64::MAX))
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scope::{Authority, Scope};
    use serde_json::json;

    #[test]
    fn times_are_rfc_3339_with_any_offset_and_nothing_else() {
        let utc = parse_time("2026-12-06T00:00:00Z").unwrap();
        assert_eq!(utc, 1_796_515_200);
        assert_eq!(parse_time("2026-12-06T01:00:00+01:00").unwrap(), utc);
        assert_eq!(parse_time("2026-12-05T19:00:00-05:00").unwrap(), utc);
        assert_eq!(parse_time("2026-12-06T00:00:00.750z").unwrap(), utc);
        assert_eq!(parse_time("2026-12-06T00:00:00+01:00").unwrap(), utc - 3600);
        // RFC 3339 lets a space stand for the `T` (the note in its section 5.6).
        assert_eq!(parse_time("2026-12-06 00:00:00Z").unwrap(), utc);
        for bad in [
            "2026-12-06T00:00:00",
            "2026-12-06 09:00:00",
            "2026-12-06",
            "yesterday",
            "",
            " 2026-12-06T00:00:00Z",
        ] {
            assert!(
                matches!(parse_time(bad), Err(NodeError::BadTime(_))),
                "{bad:?}"
            );
        }
    }

    #[test]
    fn entries_logged_before_a_filter_named_their_field_are_tagged_for_it() {
        let temp = tempfile::tempdir().unwrap();
        let ca = temp.path().join("ca");
        crate::net::tls::create_ca(&ca).unwrap();
        let make = |name: &str| {
            Node::create(
                &temp.path().join(name),
                &InitOptions {
                    name: Some(name.into()),
                    ca: Some(ca.clone()),
                    ..InitOptions::default()
                },
            )
            .unwrap()
        };
        let (hq, edge) = (make("hq"), make("edge"));
        for (key, region) in [("1", "paris"), ("2", "tokyo"), ("3", "paris")] {
            let write = RecordWrite {
                set: vec![("region".to_owned(), json!(region))],
                ..RecordWrite::default()
            };
            hq.put(
                &RecordId::parse(&format!("customers/{key}")).unwrap(),
                &write,
            )
            .unwrap();
        }
        let writer = hq.writer();
        let customers = |docs: &DocStore<DiskStore>| {
            docs.log_entries(&writer, 0, 100)
                .unwrap()
                .into_iter()
                .filter(|(_, entry)| entry.doc_key.starts_with(b"customers/"))
                .map(|(_, entry)| entry)
                .collect::<Vec<_>>()
        };
        assert!(customers(hq.documents())
            .iter()
            .all(|entry| entry.tags.is_empty()));

        let scope = Scope::parse("customers:region=paris").unwrap();
        let signed = Authority::open(&ca)
            .unwrap()
            .grant(edge.id(), vec![scope.clone()], vec![scope], 1)
            .unwrap();
        hq.add_signed(&signed.to_bytes()).unwrap();
        hq.retag_all().unwrap();
        let tagged = customers(hq.documents());
        assert_eq!(tagged.len(), 3);
        for entry in &tagged {
            let region = if entry.doc_key == b"customers/2" {
                "\"tokyo\""
            } else {
                "\"paris\""
            };
            assert_eq!(
                entry.tags,
                vec![vec![("region".to_owned(), Some(region.to_owned()))]]
            );
        }
        // The edge is sent the Paris customers, judged by their tags.
        let sent = hq
            .documents()
            .log_readable_after(Some(&edge.id()), &writer, 0, 100, usize::MAX)
            .unwrap()
            .changes;
        let keys: Vec<&[u8]> = sent
            .iter()
            .map(|change| change.doc_key.as_slice())
            .filter(|key| key.starts_with(b"customers/"))
            .collect();
        assert_eq!(keys, [&b"customers/1"[..], b"customers/3"]);
        // Done: a second pass rewrites nothing.
        assert!(!hq.retag_step().unwrap());
    }
}
