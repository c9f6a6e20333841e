//! The bounded cache of loaded documents.
//!
//! A loaded Automerge document keeps every operation of its history in memory, so the cache
//! is bounded twice: by a count of documents and by memory, each document weighed by its
//! operations and the saved bytes kept beside it. Guarantees: the memory it is taken to hold
//! never exceeds its budget, except for the one document put last, which always stays so that
//! a document larger than the whole budget is still served from memory while in use.

use std::num::NonZeroUsize;

use automerge::{ChangeHash, ReadDoc};
use lru::LruCache;

use super::layout::{Snapshot, StoredDoc};
use crate::record::held::HeldDoc;

/// Documents kept loaded unless the config says otherwise (~20 KB each when loaded).
pub const CACHE_DOCUMENTS_DEFAULT: usize = 4096;
/// Most documents the cache may be configured to hold.
pub const CACHE_DOCUMENTS_MAX: usize = 1_000_000;
/// Memory the cache's documents may take unless the config says otherwise, in MiB: a
/// document's history grows with every change, so a count alone does not bound the cache.
/// 2,000 records patched on three nodes hold some 65 KB each by this cache's weighing
/// (history kept until it is stable everywhere, the snapshot and epoch beside it): with 64
/// MiB they no longer fit, every miss loads a record from disk, the nodes fall behind, the
/// histories grow and fewer fit still (the churn bench's patches fell from 2,500 to 625 a
/// second in 8 minutes); with 256 MiB the rate held at 2,300-2,500 a second and RSS was
/// lower. A million small records stay bounded by [`CACHE_DOCUMENTS_DEFAULT`] first.
pub const CACHE_MIB_DEFAULT: usize = 256;
/// Most memory the cache may be configured to take, in MiB.
pub const CACHE_MIB_MAX: usize = 64 * 1024;
/// Memory a loaded Automerge document takes whatever it holds, and per operation in its
/// history, as measured (`CONCORD_MEASURE_CHANGES=N cargo test --release -p concord --lib
/// loaded_document_memory -- --ignored --nocapture`): the loaded form keeps every operation
/// ever made, uncompressed, so it outgrows the saved form many times over.
pub const LOADED_DOCUMENT_BYTES: usize = 16 * 1024;
pub const LOADED_BYTES_PER_OP: usize = 100;

pub(super) struct Loaded {
    pub(super) doc: HeldDoc,
    pub(super) stored: StoredDoc,
    pub(super) appended: Appended,
}

/// What a document holds under `C` keys (see [`super::layout`]), and the size of the snapshot
/// they were appended to: what decides when they are folded into a new one.
#[derive(Debug, Clone, Default)]
pub(super) struct Appended {
    pub(super) hashes: Vec<ChangeHash>,
    pub(super) bytes: usize,
    pub(super) snapshot_bytes: usize,
}

impl Loaded {
    pub(super) fn empty() -> Self {
        Self {
            doc: HeldDoc::default(),
            stored: StoredDoc::default(),
            appended: Appended::default(),
        }
    }

    /// The memory this document is taken to hold: the loaded document, by the operations in
    /// its history, and the saved bytes kept beside it.
    pub(super) fn weight(&self) -> usize {
        let ops = usize::try_from(self.doc.local().stats().num_ops).unwrap_or(usize::MAX);
        let inline = match &self.stored.snapshot {
            Snapshot::Inline(snapshot) => snapshot.len(),
            Snapshot::None | Snapshot::External => 0,
        };
        ops.saturating_mul(LOADED_BYTES_PER_OP).saturating_add(
            LOADED_DOCUMENT_BYTES
                + inline
                + self.stored.appended_bytes()
                + self.appended.hashes.len() * std::mem::size_of::<ChangeHash>(),
        )
    }
}

/// The loaded documents, least recently used first out: at most so many, and at most so much
/// memory by their weight. The document put last always stays, whatever it weighs, so that
/// one document larger than the whole budget is still served from memory while it is in use.
pub(super) struct DocCache {
    entries: LruCache<Vec<u8>, (Loaded, usize)>,
    bytes: usize,
    bytes_max: usize,
}

impl DocCache {
    pub(super) fn new(documents: NonZeroUsize, bytes_max: usize) -> Self {
        Self {
            entries: LruCache::new(documents),
            bytes: 0,
            bytes_max,
        }
    }

    /// The cached document, without making it the most recently used.
    pub(super) fn peek(&self, doc_key: &[u8]) -> Option<&Loaded> {
        self.entries.peek(doc_key).map(|(loaded, _)| loaded)
    }

    pub(super) fn contains(&self, doc_key: &[u8]) -> bool {
        self.entries.contains(doc_key)
    }

    pub(super) fn get_mut(&mut self, doc_key: &[u8]) -> Option<&mut Loaded> {
        self.entries.get_mut(doc_key).map(|(loaded, _)| loaded)
    }

    pub(super) fn pop(&mut self, doc_key: &[u8]) -> Option<Loaded> {
        let (loaded, weight) = self.entries.pop(doc_key)?;
        self.bytes -= weight;
        Some(loaded)
    }

    pub(super) fn put(&mut self, doc_key: Vec<u8>, loaded: Loaded) {
        let weight = loaded.weight();
        if let Some((_, (_, out))) = self.entries.push(doc_key, (loaded, weight)) {
            self.bytes -= out;
        }
        self.bytes += weight;
        while self.bytes > self.bytes_max && self.entries.len() > 1 {
            let Some((_, (_, out))) = self.entries.pop_lru() else {
                break;
            };
            self.bytes -= out;
        }
    }

    /// Documents held, and the memory they are taken to hold.
    pub(super) fn usage(&self) -> (usize, usize) {
        (self.entries.len(), self.bytes)
    }
}
