//! Key layout of the document store, the one place that knows it.
//!
//! Every key starts with one tag byte:
//!
//! | tag | key after the tag | value |
//! |---|---|---|
//! | `M` | metadata name | metadata value (node id, sources) |
//! | `D` | document key | [`StoredDoc`]: heads, record state, snapshot, appended changes |
//! | `S` | document key | a snapshot too large to keep inside its `D` value, with its compaction epoch ([`snapshot_value`]) |
//! | `C` | document key, 0, change hash (32 bytes) | a change appended to a document whose snapshot is an `S` value |
//! | `L` | origin node id (16 bytes), sequence (u64 big endian) | [`LogEntry`] |
//! | `R` | change hash (32 bytes), document key | [`RefusedChange`]: a change refused here |
//! | `K` | document key, 0, change hash (32 bytes) | a change of this node's own to a document it withdrew |
//! | `W` | sequence (u64 big endian) | the key of a document this node withdrew, in the order it did |
//!
//! A document key is `collection/key` ([`crate::record::RecordId::to_doc_key`]). A small
//! record is one `D` value and one `L` entry per change: sled pays about 150 bytes of overhead
//! per key, so fewer keys is what keeps a record small on disk. A document whose history has
//! outgrown its `D` value (its snapshot is an `S` value) takes each change under a `C` key of
//! its own instead, and keeps its compaction epoch (which changes only with the snapshot) in
//! the `S` value, so a change to it writes the change once and a `D` value of its heads and
//! state, not the changes appended before it or the epoch again.

use automerge::ChangeHash;
use serde::{Deserialize, Serialize};

use super::{Batch, StoreError};
use crate::record::{NodeId, RecordState};

const TAG_META: u8 = b'M';
const TAG_DOC: u8 = b'D';
const TAG_SNAPSHOT: u8 = b'S';
const TAG_LOG: u8 = b'L';
const TAG_REFUSED: u8 = b'R';

/// The writer this store's incarnation writes under: the origin of its log and the first 16
/// bytes of its actors. Named `node_id` since stores made before incarnations wrote under
/// their node's id.
pub const META_NODE_ID: &[u8] = b"node_id";
/// The node (its certificate's id) this store belongs to. A store without it was made before
/// incarnations: its writer is its node's id.
pub const META_OWNER: &[u8] = b"owner";
/// The writers this store wrote under before its current one (16 bytes each, oldest first).
pub const META_FORMER_WRITERS: &[u8] = b"former_writers";
/// The store's format version (big-endian u32): what layout its keys and values follow.
pub const META_FORMAT: &[u8] = b"format";
/// The format this build writes and the newest it reads. A store without the key was made
/// before the format was recorded, with this same layout.
/// 3: an `S` value carries its snapshot's compaction epoch (a store of format 2 reads as one
/// of format 3 whose epochs are all in `D` values, each moving to its `S` value with the
/// document's next snapshot).
/// 2: appended changes under `C` keys (a store of format 1 reads as one of format 2 that has
/// none).
pub const STORE_FORMAT_VERSION: u32 = 3;
pub const META_SOURCE_PREFIX: &[u8] = b"source/";
/// Writes of this node's own that a collision took out of a document, to be written again
/// under its current writer: `reissue/` then the document key, valued [`Reissue`].
pub const META_REISSUE_PREFIX: &[u8] = b"reissue/";

/// Every document's `D` key starts with this.
pub const DOCS_PREFIX: &[u8] = &[TAG_DOC];
/// Every large snapshot's `S` key starts with this.
pub const SNAPSHOTS_PREFIX: &[u8] = &[TAG_SNAPSHOT];
/// Every log entry's key starts with this.
pub const LOG_PREFIX: &[u8] = &[TAG_LOG];
/// Every refused change's key starts with this.
pub const REFUSED_PREFIX: &[u8] = &[TAG_REFUSED];
/// Every withdrawal's key starts with this.
pub const WITHDRAWALS_PREFIX: &[u8] = &[TAG_WITHDRAWAL];
/// The key spaces of a store: each starts with one of these tags, and there are no others.
pub const KEY_SPACES: [u8; 8] = [
    TAG_META,
    TAG_DOC,
    TAG_SNAPSHOT,
    TAG_APPENDED,
    TAG_LOG,
    TAG_REFUSED,
    TAG_KEPT,
    TAG_WITHDRAWAL,
];

/// The document key a `D` or `S` key names.
pub fn doc_key_of(key: &[u8]) -> &[u8] {
    assert!(
        matches!(key.first(), Some(&TAG_DOC) | Some(&TAG_SNAPSHOT)),
        "not a document or snapshot key"
    );
    &key[1..]
}

/// The metadata name an `M` key holds.
pub fn meta_name_of(key: &[u8]) -> &[u8] {
    assert!(key.first() == Some(&TAG_META), "not a metadata key");
    &key[1..]
}

/// The collection a document key names.
pub fn collection_of(doc_key: &[u8]) -> &str {
    let end = doc_key
        .iter()
        .position(|&byte| byte == DOC_KEY_SEPARATOR)
        .unwrap_or(doc_key.len());
    std::str::from_utf8(&doc_key[..end]).unwrap_or_default()
}

/// What separates a document key's collection from its record key
/// ([`crate::record::RecordId::to_doc_key`]).
const DOC_KEY_SEPARATOR: u8 = b'/';

/// Every `D` key of a collection's documents starts with this.
pub fn collection_prefix(collection: &str) -> Vec<u8> {
    let mut prefix = tagged(TAG_DOC, collection.as_bytes());
    prefix.push(DOC_KEY_SEPARATOR);
    prefix
}

pub fn meta_key(name: &[u8]) -> Vec<u8> {
    tagged(TAG_META, name)
}

pub fn doc_key(doc: &[u8]) -> Vec<u8> {
    tagged(TAG_DOC, doc)
}

pub fn snapshot_key(doc: &[u8]) -> Vec<u8> {
    tagged(TAG_SNAPSHOT, doc)
}

pub fn log_prefix(origin: &NodeId) -> Vec<u8> {
    tagged(TAG_LOG, &origin.0)
}

pub fn log_key(origin: &NodeId, sequence: u64) -> Vec<u8> {
    let mut key = log_prefix(origin);
    key.extend_from_slice(&sequence.to_be_bytes());
    key
}

/// The origin node of a log key.
pub fn log_origin(key: &[u8]) -> Result<NodeId, StoreError> {
    let bytes: [u8; 16] = key
        .get(1..17)
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or_else(|| StoreError::Corrupt(format!("log key {key:?} is too short")))?;
    Ok(NodeId(bytes))
}

/// The sequence number at the end of a log key.
pub fn log_sequence(key: &[u8]) -> Result<u64, StoreError> {
    let tail: [u8; 8] = key
        .get(key.len().saturating_sub(8)..)
        .and_then(|bytes| bytes.try_into().ok())
        .ok_or_else(|| StoreError::Corrupt(format!("log key {key:?} is too short")))?;
    Ok(u64::from_be_bytes(tail))
}

pub fn refused_key(hash: &ChangeHash, doc: &[u8]) -> Vec<u8> {
    let mut key = tagged(TAG_REFUSED, &hash.0);
    key.extend_from_slice(doc);
    key
}

pub fn reissue_key(doc: &[u8]) -> Vec<u8> {
    let mut name = META_REISSUE_PREFIX.to_vec();
    name.extend_from_slice(doc);
    meta_key(&name)
}

fn tagged(tag: u8, rest: &[u8]) -> Vec<u8> {
    let mut key = Vec::with_capacity(1 + rest.len() + 33);
    key.push(tag);
    key.extend_from_slice(rest);
    key
}

/// Where a document's snapshot lives.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub enum Snapshot {
    /// No snapshot yet: the appended changes are the whole document.
    #[default]
    None,
    /// Inside the `D` value.
    Inline(Vec<u8>),
    /// Under the `S` key, being larger than [`SNAPSHOT_INLINE_BYTES_MAX`].
    External,
}

/// Largest snapshot kept inside its document's `D` value.
pub const SNAPSHOT_INLINE_BYTES_MAX: usize = 8 * 1024;

/// First byte of an `S` value of format 3. One written before holds the snapshot alone, as
/// Automerge saves a document or its changes: it starts with Automerge's magic bytes.
const SNAPSHOT_VALUE_WITH_EPOCH: u8 = 0;

/// An `S` value: the tag byte, the epoch's length plus one as a big-endian u32 (0: none), the
/// epoch, then the snapshot.
pub fn snapshot_value(snapshot: &[u8], epoch: Option<&[u8]>) -> Vec<u8> {
    let (marker, epoch) = match epoch {
        None => (0, &[][..]),
        Some(epoch) => (epoch.len() + 1, epoch),
    };
    assert!(
        marker <= u32::MAX as usize,
        "an epoch is bounded by what one message carries"
    );
    let mut value = Vec::with_capacity(5 + epoch.len() + snapshot.len());
    value.push(SNAPSHOT_VALUE_WITH_EPOCH);
    value.extend_from_slice(&(marker as u32).to_be_bytes());
    value.extend_from_slice(epoch);
    value.extend_from_slice(snapshot);
    value
}

/// Where an `S` value says its snapshot's epoch is.
#[derive(Debug, PartialEq)]
pub enum EpochPlace<'a> {
    /// In the value (none, for a snapshot of an uncompacted history).
    Here(Option<&'a [u8]>),
    /// In the document's `D` value: an `S` value written before format 3.
    InDocValue,
}

/// The snapshot an `S` value holds, and where its epoch is.
pub fn read_snapshot_value(value: &[u8]) -> Result<(&[u8], EpochPlace<'_>), StoreError> {
    if value.starts_with(&AUTOMERGE_MAGIC) {
        return Ok((value, EpochPlace::InDocValue));
    }
    let corrupt = || StoreError::Corrupt("a snapshot value of an unknown form".to_owned());
    let (&tag, rest) = value.split_first().ok_or_else(corrupt)?;
    let (marker, rest) = rest.split_first_chunk::<4>().ok_or_else(corrupt)?;
    if tag != SNAPSHOT_VALUE_WITH_EPOCH {
        return Err(corrupt());
    }
    match u32::from_be_bytes(*marker) as usize {
        0 => Ok((rest, EpochPlace::Here(None))),
        marker => {
            let (epoch, snapshot) = rest.split_at_checked(marker - 1).ok_or_else(corrupt)?;
            Ok((snapshot, EpochPlace::Here(Some(epoch))))
        }
    }
}

/// Everything the store keeps about one document, in one value.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct StoredDoc {
    /// The document's heads, sorted.
    pub heads: Vec<[u8; 32]>,
    /// 0: missing, 1: deleted, 2: live.
    pub state: u8,
    pub snapshot: Snapshot,
    /// Changes appended since the snapshot, each as Automerge encodes a change: original
    /// changes, as the log serves them, also once the document was compacted.
    pub changes: Vec<Vec<u8>>,
    /// What the snapshot was compacted from ([`crate::record::compaction::Epoch`], encoded),
    /// once its history was compacted. Encoded after the fields above, only when present and
    /// not kept in the `S` value, so documents stored before compaction read as they were
    /// ([`StoredDoc::encode`]).
    #[serde(skip)]
    pub epoch: Option<Vec<u8>>,
    /// The epoch is kept beside the snapshot in the `S` value ([`snapshot_value`]), not in
    /// this value: a document of format 3 whose snapshot is an `S` value.
    #[serde(skip)]
    pub epoch_with_snapshot: bool,
}

impl StoredDoc {
    pub fn encode(&self) -> Vec<u8> {
        let mut bytes = encode(self);
        if let Some(epoch) = self.epoch.as_ref().filter(|_| !self.epoch_with_snapshot) {
            bytes.extend(encode(epoch));
        }
        bytes
    }

    /// Takes `snapshot` and its `epoch` as the document's new snapshot, queueing its `S` value
    /// (or its removal, for a snapshot kept inline) into `batch`; the caller puts the `D`
    /// value.
    pub fn place_snapshot(
        &mut self,
        batch: &mut Batch,
        doc_key: &[u8],
        snapshot: Vec<u8>,
        epoch: Option<Vec<u8>>,
    ) {
        if snapshot.len() <= SNAPSHOT_INLINE_BYTES_MAX {
            if self.snapshot == Snapshot::External {
                batch.remove(snapshot_key(doc_key));
            }
            self.snapshot = Snapshot::Inline(snapshot);
            self.epoch_with_snapshot = false;
        } else {
            batch.put(
                snapshot_key(doc_key),
                snapshot_value(&snapshot, epoch.as_deref()),
            );
            self.snapshot = Snapshot::External;
            self.epoch_with_snapshot = true;
        }
        self.epoch = epoch;
    }

    pub fn decode(bytes: &[u8]) -> Result<Self, StoreError> {
        let corrupt = |error: postcard::Error| StoreError::Corrupt(format!("document: {error}"));
        let (mut stored, rest): (Self, &[u8]) =
            postcard::take_from_bytes(bytes).map_err(corrupt)?;
        if !rest.is_empty() {
            stored.epoch = Some(postcard::from_bytes(rest).map_err(corrupt)?);
        }
        Ok(stored)
    }

    pub fn record_state(&self) -> RecordState {
        match self.state {
            1 => RecordState::Deleted,
            2 => RecordState::Live,
            _ => RecordState::Missing,
        }
    }

    pub fn set_record_state(&mut self, state: RecordState) {
        self.state = match state {
            RecordState::Missing => 0,
            RecordState::Deleted => 1,
            RecordState::Live => 2,
        };
    }

    pub fn change_hashes(&self) -> Vec<ChangeHash> {
        self.heads.iter().map(|bytes| ChangeHash(*bytes)).collect()
    }

    pub fn set_heads(&mut self, heads: &[ChangeHash]) {
        self.heads = heads.iter().map(|hash| hash.0).collect();
        self.heads.sort_unstable();
    }

    pub fn appended_bytes(&self) -> usize {
        self.changes.iter().map(Vec::len).sum()
    }
}

/// One entry of the replication log: which change of which document.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct LogEntry {
    pub doc_key: Vec<u8>,
    pub hash: [u8; 32],
    /// The record's values, before and after the change, of the fields that read filters
    /// named when it was logged (see [`ScopeTag`]): what lets a sender tell whether a
    /// receiver may read the change without loading its document. Empty when no filter named
    /// a field of its collection. Encoded after the fields above, only when not empty, so
    /// entries logged before tags were kept read as they were ([`encode_log_entry`]).
    #[serde(skip)]
    pub tags: Vec<ScopeTag>,
}

/// A record's values (JSON text; `None` when the field is absent or the record missing or
/// deleted) of some fields, by field name, sorted: those its collection's read filters name.
pub type ScopeTag = Vec<(String, Option<String>)>;

pub fn encode_log_entry(entry: &LogEntry) -> Vec<u8> {
    let mut bytes = encode(entry);
    if !entry.tags.is_empty() {
        bytes.extend(encode(&entry.tags));
    }
    bytes
}

pub fn decode_log_entry(bytes: &[u8]) -> Result<LogEntry, StoreError> {
    let corrupt = |error: postcard::Error| StoreError::Corrupt(format!("log entry: {error}"));
    let (mut entry, rest): (LogEntry, &[u8]) = postcard::take_from_bytes(bytes).map_err(corrupt)?;
    if !rest.is_empty() {
        entry.tags = postcard::from_bytes(rest).map_err(corrupt)?;
    }
    Ok(entry)
}

/// Where a sender's coverage of an origin's log for this node stands (see
/// [`crate::sync`]): `cover/` then the origin's 16 bytes, valued the sequence (big endian)
/// up to which this node holds every entry of that log it may read.
pub const META_COVER_PREFIX: &[u8] = b"cover/";
/// This node's own changes to documents it withdrew (they left its read scope), kept so its
/// log still serves them: `K`, the document key, 0, the change hash; and, without a hash,
/// the mark that the document was withdrawn once.
const TAG_KEPT: u8 = b'K';

/// Every kept change's key, and every withdrawal mark, starts with this.
pub const KEPT_PREFIX: &[u8] = &[TAG_KEPT];
/// Changes appended to a document whose snapshot is an `S` value, each under a key of its own
/// (see [`super::session`]): `C`, the document key, 0, the change hash; valued the change as
/// Automerge encodes it.
const TAG_APPENDED: u8 = b'C';

/// Every appended change's key starts with this.
pub const APPENDED_PREFIX: &[u8] = &[TAG_APPENDED];

pub fn appended_key(doc: &[u8], hash: &ChangeHash) -> Vec<u8> {
    let mut key = appended_prefix(doc);
    key.extend_from_slice(&hash.0);
    key
}

/// Every key of [`appended_key`] for one document.
pub fn appended_prefix(doc: &[u8]) -> Vec<u8> {
    let mut key = tagged(TAG_APPENDED, doc);
    key.push(0);
    key
}

/// The document key and the change hash a `C` key names.
pub fn appended_parts(key: &[u8]) -> Result<(&[u8], ChangeHash), StoreError> {
    let bad = || StoreError::Corrupt("an appended change's key".to_owned());
    if key.first() != Some(&TAG_APPENDED) || key.len() < 1 + 1 + 32 {
        return Err(bad());
    }
    let (doc_and_zero, hash) = key[1..].split_at(key.len() - 1 - 32);
    let doc = doc_and_zero.strip_suffix(&[0]).ok_or_else(bad)?;
    Ok((doc, ChangeHash(hash.try_into().map_err(|_| bad())?)))
}

pub fn kept_key(doc: &[u8], hash: &ChangeHash) -> Vec<u8> {
    let mut key = kept_prefix(doc);
    key.extend_from_slice(&hash.0);
    key
}

/// Every key of [`kept_key`] for one document.
pub fn kept_prefix(doc: &[u8]) -> Vec<u8> {
    let mut key = tagged(TAG_KEPT, doc);
    key.push(0);
    key
}

/// The documents this node withdrew, in the order it withdrew them (see
/// [`super::DocStore::withdrawals_after`]): `W`, a sequence from 1 (big endian), valued the
/// document key.
const TAG_WITHDRAWAL: u8 = b'W';

pub fn withdrawal_key(sequence: u64) -> Vec<u8> {
    let mut key = vec![TAG_WITHDRAWAL];
    key.extend_from_slice(&sequence.to_be_bytes());
    key
}

pub fn withdrawal_sequence(key: &[u8]) -> Result<u64, StoreError> {
    key.get(1..9)
        .and_then(|bytes| <[u8; 8]>::try_from(bytes).ok())
        .filter(|_| key.len() == 9 && key[0] == TAG_WITHDRAWAL)
        .map(u64::from_be_bytes)
        .ok_or_else(|| StoreError::Corrupt("a withdrawal key is not 9 bytes".into()))
}

/// The nodes replication knows (see [`crate::sync::stability`]): `known/` then the node's 16
/// bytes, valued its name.
pub const META_KNOWN_PREFIX: &[u8] = b"known/";

/// The metadata name of a known node ([`META_KNOWN_PREFIX`]).
pub fn known_node_name(node: &NodeId) -> Vec<u8> {
    let mut name = META_KNOWN_PREFIX.to_vec();
    name.extend_from_slice(&node.0);
    name
}

/// Every key of a known node starts with this.
pub fn known_prefix() -> Vec<u8> {
    meta_key(META_KNOWN_PREFIX)
}

/// The node a known node's key names.
pub fn known_node(key: &[u8]) -> Result<NodeId, StoreError> {
    node_after(&known_prefix(), key)
}

/// How far each origin's log was truncated: `floor/` then the origin's 16 bytes, valued the
/// sequence (big endian) at and below which its entries are gone (see [`super::truncation`]).
pub const META_FLOOR_PREFIX: &[u8] = b"floor/";

/// The metadata name of an origin's floor.
pub fn floor_name(origin: &NodeId) -> Vec<u8> {
    let mut name = META_FLOOR_PREFIX.to_vec();
    name.extend_from_slice(&origin.0);
    name
}

/// Every key of a floor starts with this.
pub fn floor_prefix() -> Vec<u8> {
    meta_key(META_FLOOR_PREFIX)
}

/// Local readers of the log (bindings that write records out): `follower/` then the
/// follower's name, valued [`FollowerMarks`]: how far it read each origin's log.
pub const META_FOLLOWER_PREFIX: &[u8] = b"follower/";

/// How far a follower read each origin's log (an origin it does not list: not at all).
pub type FollowerMarks = Vec<([u8; 16], u64)>;

/// The metadata name of a follower's marks.
pub fn follower_name(follower: &str) -> Vec<u8> {
    let mut name = META_FOLLOWER_PREFIX.to_vec();
    name.extend_from_slice(follower.as_bytes());
    name
}

/// Every key of a follower starts with this.
pub fn follower_prefix() -> Vec<u8> {
    meta_key(META_FOLLOWER_PREFIX)
}

/// The 16 bytes after `prefix` in a metadata key that names an origin or node.
pub fn node_after(prefix: &[u8], key: &[u8]) -> Result<NodeId, StoreError> {
    key.strip_prefix(prefix)
        .and_then(|bytes| <[u8; 16]>::try_from(bytes).ok())
        .map(NodeId)
        .ok_or_else(|| StoreError::Corrupt(format!("a key under {prefix:?}")))
}

/// A big-endian u64 value.
pub fn decode_u64(what: &str, value: &[u8]) -> Result<u64, StoreError> {
    <[u8; 8]>::try_from(value)
        .map(u64::from_be_bytes)
        .map_err(|_| StoreError::Corrupt(format!("{what}: not 8 bytes")))
}

pub fn cover_prefix() -> Vec<u8> {
    meta_key(META_COVER_PREFIX)
}

pub fn cover_key(origin: &NodeId) -> Vec<u8> {
    let mut name = META_COVER_PREFIX.to_vec();
    name.extend_from_slice(&origin.0);
    meta_key(&name)
}

/// Why a change was refused (see [`super::collision`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RefusalReason {
    /// Another change with the same actor and sequence number stands: the rule picked it.
    DuplicateSequence,
    /// It depends on a refused change.
    DependsOnRefused,
    /// Its author's grant does not let it write that record (see [`crate::scope`]).
    OutsideGrant,
    /// Its author was revoked, and it is past the cut-off (or came without a log place).
    Revoked,
}

impl RefusalReason {
    /// The label of `concord_changes_refused_total` and of `concord refused`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::DuplicateSequence => "duplicate_sequence",
            Self::DependsOnRefused => "depends_on_refused",
            Self::OutsideGrant => "outside_grant",
            Self::Revoked => "revoked",
        }
    }
}

/// A change refused here: kept so that the log can still serve its place (other nodes decide
/// about it alike, and their marks must move past it), and listed by `concord refused`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RefusedChange {
    pub reason: RefusalReason,
    /// The change that stands instead (for a duplicate sequence), or the refused dependency.
    pub instead: [u8; 32],
    /// The refused change's own clock (its stamp's, ms since the Unix epoch).
    pub hlc: u64,
    /// The change itself; empty once refused changes kept their bytes past their budget.
    pub change: Vec<u8>,
}

/// Writes of this node's own to one document that lost a collision: each effect (as history
/// shows it) with the source that made it, oldest first, written again as one new change.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Reissue {
    /// (source index, effect as JSON: `{"action", "set", "removed"}`).
    pub effects: Vec<(u16, String)>,
    /// The hashes of the changes taken out that this write stands for.
    pub replaces: Vec<[u8; 32]>,
}

pub fn encode<T: Serialize>(value: &T) -> Vec<u8> {
    postcard::to_stdvec(value).expect("encoding plain structs into a Vec cannot fail")
}

pub fn decode<'a, T: Deserialize<'a>>(what: &str, bytes: &'a [u8]) -> Result<T, StoreError> {
    postcard::from_bytes(bytes).map_err(|error| StoreError::Corrupt(format!("{what}: {error}")))
}

/// The magic bytes that start every Automerge chunk.
const AUTOMERGE_MAGIC: [u8; 4] = [0x85, 0x6f, 0x4a, 0x83];
/// The chunk type of an uncompressed change.
const CHANGE_CHUNK_TYPE: u8 = 1;

/// The checksum in a change chunk's header (the first four bytes of its hash), if the bytes
/// are a chunk: equal for the same change, without hashing it.
pub fn change_checksum(bytes: &[u8]) -> Option<[u8; 4]> {
    if bytes.len() <= 9 || bytes[..4] != AUTOMERGE_MAGIC {
        return None;
    }
    bytes[4..8].try_into().ok()
}

/// The hash of a change in Automerge's binary format, without parsing it: SHA-256 of the
/// chunk after the magic bytes and checksum (Automerge's own definition). `None` if the bytes
/// are not an uncompressed change chunk.
pub fn change_hash(bytes: &[u8]) -> Option<ChangeHash> {
    if bytes.len() <= 9 || bytes[..4] != AUTOMERGE_MAGIC || bytes[8] != CHANGE_CHUNK_TYPE {
        return None;
    }
    let digest = ring::digest::digest(&ring::digest::SHA256, &bytes[8..]);
    let mut hash = [0u8; 32];
    hash.copy_from_slice(digest.as_ref());
    // The checksum is the hash's first four bytes: a cheap check that this is a real chunk.
    (bytes[4..8] == hash[..4]).then_some(ChangeHash(hash))
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::transaction::Transactable;

    #[test]
    fn change_hash_matches_automerge() {
        let mut doc = automerge::Automerge::new();
        let mut tx = doc.transaction();
        tx.put(automerge::ROOT, "field", "value").unwrap();
        let (hash, _) = tx.commit();
        let hash = hash.unwrap();
        let change = automerge::ReadDoc::get_change_by_hash(&doc, &hash).unwrap();
        assert_eq!(change_hash(change.raw_bytes()), Some(hash));
        let mut corrupt = change.raw_bytes().to_vec();
        let last = corrupt.len() - 1;
        corrupt[last] ^= 1;
        assert_eq!(change_hash(&corrupt), None);
        assert_eq!(change_hash(b"short"), None);
    }

    #[test]
    fn a_snapshot_value_carries_its_epoch_and_one_written_before_says_it_does_not() {
        let mut doc = automerge::AutoCommit::new();
        automerge::transaction::Transactable::put(&mut doc, automerge::ROOT, "a", 1).unwrap();
        let snapshot = doc.save();
        for epoch in [None, Some(&b""[..]), Some(&b"an epoch"[..])] {
            let value = snapshot_value(&snapshot, epoch);
            assert_eq!(
                read_snapshot_value(&value).unwrap(),
                (&snapshot[..], EpochPlace::Here(epoch))
            );
        }
        assert_eq!(
            read_snapshot_value(&snapshot).unwrap(),
            (&snapshot[..], EpochPlace::InDocValue)
        );
        for garbage in [
            &b""[..],
            b"\x00\x00",
            b"\x01\x00\x00\x00\x00",
            b"\x00\x00\x00\x00\x09ab",
        ] {
            assert!(read_snapshot_value(garbage).is_err(), "{garbage:?}");
        }
    }
}
