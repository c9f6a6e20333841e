//! The messages nodes exchange. Field order is the wire order (postcard encodes fields in
//! declaration order and enum variants by index): never reorder, only append new variants.

use serde::{Deserialize, Serialize};

use crate::frame::{FRAME_BYTES_MAX, VERSION_BYTES};
use crate::ProtoError;

/// A node id: 16 bytes, carried in the node's certificate too.
pub type NodeIdBytes = [u8; 16];
/// A cluster id: 16 bytes, the same on every node of one cluster.
pub type ClusterIdBytes = [u8; 16];
/// An Automerge change hash.
pub type HashBytes = [u8; 32];

/// Longest document key (`collection/key`): 64 + 1 + 256 bytes.
pub const DOC_KEY_BYTES_MAX: usize = 321;
/// Longest node name.
pub const NODE_NAME_BYTES_MAX: usize = 64;
/// Longest free-text detail in a goodbye.
pub const DETAIL_BYTES_MAX: usize = 1024;

/// Shortens `text` to at most `bytes_max` bytes, at a character boundary.
pub fn clip_text(text: &mut String, bytes_max: usize) {
    if text.len() > bytes_max {
        let mut end = bytes_max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
}
/// Most origins one summary lists.
pub const ORIGINS_PER_SUMMARY_MAX: usize = 4096;
/// Most changes one message carries.
pub const CHANGES_PER_MESSAGE_MAX: usize = 4096;
/// Largest encoded message: a frame less its version.
pub const MESSAGE_BYTES_MAX: usize = FRAME_BYTES_MAX - VERSION_BYTES;
/// Largest Automerge change, in bytes, that a node writes, accepts from any way in or sends:
/// 4 MiB less 4 KiB. One change of this size always fits one frame with its envelope, alone
/// in `Changes` or in `DocumentChanges` (the assertions below prove it), so every change a
/// node acknowledged can be sent.
pub const CHANGE_BYTES_MAX: usize = FRAME_BYTES_MAX - 4096;
/// Bytes a `Changes` message adds around its changes, at most: the variant index and the
/// count (a varint).
pub const CHANGES_MESSAGE_OVERHEAD_BYTES_MAX: usize =
    1 + varint_bytes(CHANGES_PER_MESSAGE_MAX as u64);
/// Bytes a [`ShippedChange`] adds around its change, at most: origin, sequence, the document
/// key with its length and the change's length.
pub const SHIPPED_CHANGE_OVERHEAD_BYTES_MAX: usize = 16
    + varint_bytes(u64::MAX)
    + varint_bytes(DOC_KEY_BYTES_MAX as u64)
    + DOC_KEY_BYTES_MAX
    + varint_bytes(CHANGE_BYTES_MAX as u64);

const _: () = assert!(
    CHANGES_MESSAGE_OVERHEAD_BYTES_MAX + SHIPPED_CHANGE_OVERHEAD_BYTES_MAX + CHANGE_BYTES_MAX
        <= MESSAGE_BYTES_MAX,
    "one change of the largest size fits one Changes message"
);
const _: () = assert!(
    1 + varint_bytes(DOC_KEY_BYTES_MAX as u64)
        + DOC_KEY_BYTES_MAX
        + varint_bytes(CHANGES_PER_MESSAGE_MAX as u64)
        + varint_bytes(CHANGE_BYTES_MAX as u64)
        + CHANGE_BYTES_MAX
        <= MESSAGE_BYTES_MAX,
    "one change of the largest size fits one DocumentChanges message"
);

/// Bytes of `value` as a postcard varint (LEB128).
pub const fn varint_bytes(value: u64) -> usize {
    let mut bytes = 1;
    let mut rest = value >> 7;
    while rest > 0 {
        bytes += 1;
        rest >>= 7;
    }
    bytes
}
/// Most heads listed for one document.
pub const HEADS_PER_DOCUMENT_MAX: usize = 1024;
/// Most ranges one digest message carries.
pub const RANGES_PER_DIGEST_MAX: usize = 256;
/// Most documents one heads listing carries.
pub const DOCUMENTS_PER_HEADS_MAX: usize = 4096;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    /// First message each way: who I am and which versions I speak.
    Hello(Hello),
    /// What I hold of each origin's replication log.
    Summary(Summary),
    /// Changes, each with its place in its origin's log.
    Changes(Changes),
    /// Send me every change of this document that is not an ancestor of `have`.
    NeedDocument(NeedDocument),
    /// The answer to [`Message::NeedDocument`].
    DocumentChanges(DocumentChanges),
    /// Fingerprints of (document, heads) over key ranges, for repair.
    RangeDigest(RangeDigest),
    /// The heads of each document in a range whose fingerprints differed.
    DocumentHeads(DocumentHeads),
    Ping {
        nonce: u64,
    },
    Pong {
        nonce: u64,
    },
    /// The sender is closing the connection, and why.
    Goodbye(Goodbye),
    /// Stop pushing changes of these origins to me: I receive them from the origins directly.
    /// Summaries still catch up anything missed.
    Prune {
        origins: Vec<NodeIdBytes>,
    },
    /// Push changes of these origins to me again (my direct link to them went down).
    Graft {
        origins: Vec<NodeIdBytes>,
    },
    /// (Version 2.) SHA-256 of the sender's conflict policies in canonical form: a receiver
    /// whose own differs resolves conflicts differently and warns.
    PolicyHash {
        hash: HashBytes,
    },
    /// (Version 3.) The origin the sender's own log is written under now: its store's writer.
    /// A node whose store was made again writes under a new one; the receiver takes its
    /// changes of that origin from the sender directly.
    Writer {
        writer: NodeIdBytes,
    },
    /// (Version 3.) How far the sender holds the receiver's own log (`origin`: the writer the
    /// receiver said it writes under) without a gap, and the hash of the change at that place.
    /// A receiver that holds less of its own log, or another change there, was brought back
    /// from an older copy of its store or shares its writer with another store: it takes a
    /// new writer, and takes back what its peers hold of the old one.
    LogMark {
        origin: NodeIdBytes,
        contiguous: u64,
        hash: HashBytes,
    },
    /// (Version 4.) Per origin: of its log after `after` up to `through`, the sender has sent
    /// every change the receiver may read (in messages before this one); the rest is outside
    /// the receiver's grant. A receiver whose mark stands at `after` or beyond moves it to
    /// `through`, so a partial replica's marks advance without a word per change it may not
    /// read.
    Covered {
        ranges: Vec<CoveredRange>,
    },
    /// (Version 4.) Documents the receiver holds that, as the sender holds them, its grant
    /// does not let it read (or whose copy holds a change the sender refused), when the
    /// sender holds every change of them the receiver holds: sent only by a node that reads
    /// every record (the receiver checks), found by repair or a `NeedDocument` it may not
    /// answer. The receiver drops its copy (keeping what it wrote itself for its log); the
    /// records stay wherever they may be read.
    Withdraw {
        docs: Vec<String>,
    },
    /// (Version 5.) How far one node (the sender, or a node the sender heard of) holds each
    /// origin's log, as that node reported it at `taken`: relayed, so that every node learns
    /// which log entries every node it knows holds, and which are therefore stable.
    Holdings(Holdings),
    /// (Version 6.) A document whose history the sender compacted, whole, for a peer that
    /// lacks the compacted part: the answer to a `NeedDocument` in its place.
    CompactedDocument(CompactedDocument),
}

/// A compacted document: its local form saved, and what it was compacted from.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CompactedDocument {
    pub doc: String,
    /// The compacted Automerge document, saved.
    pub snapshot: Vec<u8>,
    /// The compaction epoch: the cut it stands for and how its changes translate.
    pub epoch: Vec<u8>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Holdings {
    /// The node whose report this is (its certificate's id).
    pub node: NodeIdBytes,
    /// Its name, as it gives it in its hello.
    pub name: String,
    /// When that node took the report, by its own clock (ms since the Unix epoch, or later
    /// than its previous report): of two reports of one node, the later counts.
    pub taken: u64,
    pub origins: Vec<OriginMark>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct CoveredRange {
    pub origin: NodeIdBytes,
    pub after: u64,
    pub through: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub cluster: ClusterIdBytes,
    pub node: NodeIdBytes,
    pub node_name: String,
    pub version_min: u16,
    pub version_max: u16,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OriginMark {
    pub origin: NodeIdBytes,
    /// Every entry of this origin's log up to and including this sequence number is held.
    pub contiguous: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Summary {
    pub origins: Vec<OriginMark>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShippedChange {
    /// The node that first wrote this change into the cluster, and its place in that node's log.
    pub origin: NodeIdBytes,
    pub sequence: u64,
    pub doc: String,
    /// The change as Automerge encodes it.
    pub change: Vec<u8>,
}

impl ShippedChange {
    /// Bytes of this change's encoding inside a `Changes` message.
    pub fn encoded_len(&self) -> usize {
        16 + varint_bytes(self.sequence)
            + varint_bytes(self.doc.len() as u64)
            + self.doc.len()
            + varint_bytes(self.change.len() as u64)
            + self.change.len()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Changes {
    pub changes: Vec<ShippedChange>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NeedDocument {
    pub doc: String,
    pub have: Vec<HashBytes>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocumentChanges {
    pub doc: String,
    pub changes: Vec<Vec<u8>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DigestRange {
    /// The bucket: a prefix of 1 to 3 hex digits of SHA-256 of the document key.
    pub start: String,
    /// Reserved for key ranges; empty in version 1.
    pub end: String,
    /// Documents in the bucket.
    pub count: u64,
    /// XOR over the bucket's documents of SHA-256(document key, 0x00, sorted heads).
    pub fingerprint: HashBytes,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RangeDigest {
    pub ranges: Vec<DigestRange>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DocumentHeads {
    /// The leaf bucket (hex prefix) these documents are all of the sender's documents in.
    pub leaf: String,
    pub documents: Vec<(String, Vec<HashBytes>)>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum GoodbyeReason {
    Shutdown,
    WrongCluster,
    UnsupportedVersion,
    Malformed,
    Overloaded,
    /// No hello arrived in time.
    HandshakeTimeout,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Goodbye {
    pub reason: GoodbyeReason,
    pub detail: String,
}

fn check_len(what: &str, len: usize, max: usize) -> Result<(), ProtoError> {
    if len > max {
        return Err(ProtoError::Malformed(format!(
            "{what}: {len} is over the limit of {max}"
        )));
    }
    Ok(())
}

fn check_change(change: &[u8]) -> Result<(), ProtoError> {
    check_len("change bytes", change.len(), CHANGE_BYTES_MAX)
}

fn check_doc(doc: &str) -> Result<(), ProtoError> {
    if doc.is_empty() {
        return Err(ProtoError::Malformed("empty document key".to_owned()));
    }
    check_len("document key bytes", doc.len(), DOC_KEY_BYTES_MAX)
}

impl Message {
    /// The message's name, for logs and measurements.
    pub fn kind(&self) -> &'static str {
        match self {
            Message::Hello(_) => "hello",
            Message::Summary(_) => "summary",
            Message::Changes(_) => "changes",
            Message::NeedDocument(_) => "need_document",
            Message::DocumentChanges(_) => "document_changes",
            Message::RangeDigest(_) => "range_digest",
            Message::DocumentHeads(_) => "document_heads",
            Message::Ping { .. } => "ping",
            Message::Pong { .. } => "pong",
            Message::Goodbye(_) => "goodbye",
            Message::Prune { .. } => "prune",
            Message::Graft { .. } => "graft",
            Message::PolicyHash { .. } => "policy_hash",
            Message::Writer { .. } => "writer",
            Message::LogMark { .. } => "log_mark",
            Message::Covered { .. } => "covered",
            Message::Withdraw { .. } => "withdraw",
            Message::Holdings(_) => "holdings",
            Message::CompactedDocument(_) => "compacted_document",
        }
    }

    /// The protocol version that introduced this message: the version its frame carries.
    pub fn introduced_in(&self) -> u16 {
        match self {
            Message::PolicyHash { .. } => 2,
            Message::Writer { .. } | Message::LogMark { .. } => 3,
            Message::Covered { .. } | Message::Withdraw { .. } => 4,
            Message::Holdings(_) => 5,
            Message::CompactedDocument(_) => 6,
            _ => 1,
        }
    }

    /// Bytes of this message's encoding (without the frame's length and version). Exact, and
    /// cheap for the messages that carry changes: their bytes are counted, not walked.
    pub fn encoded_len(&self) -> usize {
        const VARIANT_BYTES: usize = 1;
        match self {
            Message::Changes(changes) => {
                VARIANT_BYTES
                    + varint_bytes(changes.changes.len() as u64)
                    + changes
                        .changes
                        .iter()
                        .map(ShippedChange::encoded_len)
                        .sum::<usize>()
            }
            Message::DocumentChanges(answer) => {
                VARIANT_BYTES
                    + varint_bytes(answer.doc.len() as u64)
                    + answer.doc.len()
                    + varint_bytes(answer.changes.len() as u64)
                    + answer
                        .changes
                        .iter()
                        .map(|change| varint_bytes(change.len() as u64) + change.len())
                        .sum::<usize>()
            }
            other => postcard::experimental::serialized_size(other)
                .expect("sizing a message into a counter cannot fail"),
        }
    }

    /// Bytes of this message's whole frame: length prefix, version and message.
    pub fn frame_len(&self) -> usize {
        crate::FRAME_HEADER_BYTES + VERSION_BYTES + self.encoded_len()
    }

    /// Checks the limits that the types alone do not say. Decoding calls it.
    pub fn check(&self) -> Result<(), ProtoError> {
        match self {
            Message::Hello(hello) => {
                check_len(
                    "node name bytes",
                    hello.node_name.len(),
                    NODE_NAME_BYTES_MAX,
                )?;
                if hello.version_min > hello.version_max {
                    return Err(ProtoError::Malformed(
                        "version_min above version_max".to_owned(),
                    ));
                }
            }
            Message::Summary(summary) => {
                check_len("origins", summary.origins.len(), ORIGINS_PER_SUMMARY_MAX)?;
            }
            Message::Changes(changes) => {
                check_len("changes", changes.changes.len(), CHANGES_PER_MESSAGE_MAX)?;
                for change in &changes.changes {
                    check_doc(&change.doc)?;
                    check_change(&change.change)?;
                }
            }
            Message::NeedDocument(need) => {
                check_doc(&need.doc)?;
                check_len("heads", need.have.len(), HEADS_PER_DOCUMENT_MAX)?;
            }
            Message::CompactedDocument(compacted) => check_doc(&compacted.doc)?,
            Message::DocumentChanges(answer) => {
                check_doc(&answer.doc)?;
                check_len("changes", answer.changes.len(), CHANGES_PER_MESSAGE_MAX)?;
                for change in &answer.changes {
                    check_change(change)?;
                }
            }
            Message::RangeDigest(digest) => {
                check_len("ranges", digest.ranges.len(), RANGES_PER_DIGEST_MAX)?;
                for range in &digest.ranges {
                    check_len("range key bytes", range.start.len(), DOC_KEY_BYTES_MAX)?;
                    check_len("range key bytes", range.end.len(), DOC_KEY_BYTES_MAX)?;
                }
            }
            Message::DocumentHeads(heads) => {
                check_len("leaf bytes", heads.leaf.len(), DOC_KEY_BYTES_MAX)?;
                check_len("documents", heads.documents.len(), DOCUMENTS_PER_HEADS_MAX)?;
                for (doc, hashes) in &heads.documents {
                    check_doc(doc)?;
                    check_len("heads", hashes.len(), HEADS_PER_DOCUMENT_MAX)?;
                }
            }
            Message::Goodbye(goodbye) => {
                check_len("detail bytes", goodbye.detail.len(), DETAIL_BYTES_MAX)?;
            }
            Message::Ping { .. }
            | Message::Pong { .. }
            | Message::PolicyHash { .. }
            | Message::Writer { .. }
            | Message::LogMark { .. } => {}
            Message::Prune { origins } | Message::Graft { origins } => {
                check_len("origins", origins.len(), ORIGINS_PER_SUMMARY_MAX)?;
            }
            Message::Covered { ranges } => {
                check_len("ranges", ranges.len(), ORIGINS_PER_SUMMARY_MAX)?;
                if ranges.iter().any(|range| range.after >= range.through) {
                    return Err(ProtoError::Malformed(
                        "a covered range ends where it starts or before".to_owned(),
                    ));
                }
            }
            Message::Withdraw { docs } => {
                check_len("documents", docs.len(), DOCUMENTS_PER_HEADS_MAX)?;
                for doc in docs {
                    check_doc(doc)?;
                }
            }
            Message::Holdings(holdings) => {
                check_len("node name bytes", holdings.name.len(), NODE_NAME_BYTES_MAX)?;
                check_len("origins", holdings.origins.len(), ORIGINS_PER_SUMMARY_MAX)?;
            }
        }
        Ok(())
    }
}
