//! What can go wrong in a node's operations, as one error type the API and the CLI map.

use super::*;

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
    /// (A record error the store met reads as [`NodeError::Record`].)
    #[error(transparent)]
    Store(StoreError),
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

impl From<StoreError> for NodeError {
    fn from(error: StoreError) -> Self {
        match error {
            StoreError::Record(error) => Self::Record(error),
            other => Self::Store(other),
        }
    }
}
