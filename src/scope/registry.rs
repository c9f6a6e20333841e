//! The registry of grants and revocations one node holds: the signed records of `_grants` in
//! its store, read, verified and published as the set its door judges by, and what a
//! revocation new to it takes out of the store. `concord run` and the simulator both keep
//! one per node, over the store they open, so the simulator drives this code as it ships.
//!
//! Guarantees: refreshes run one at a time from reading to publishing, so a set built earlier
//! is never published after a newer one; every record of `_grants` is read (page by page),
//! each judged once (its key is the SHA-256 of the bytes it holds, so its verdict never
//! changes); and when the published cut-offs change, the store holds afterwards what a store
//! that received the revocation first holds (what arrived past a cut-off is taken out).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, RwLock};

use serde_json::{Map, Value as Json};

use super::*;
use automerge::ActorId;

use crate::record::origin::ACTOR_REGISTRY_COLLECTION;
use crate::record::{document, Collection, Key, NodeId, RecordError, RecordId, RecordWrite};
use crate::store::{DocStore, Durability, Store, StoreError};

/// Records of `_grants` (and of the actor registry) read at a time by a refresh.
pub const GRANT_RECORDS_PAGE: usize = 1_000;

/// Checks a signed grant, revocation or removal: against the cluster CA certificate in
/// `concord run` ([`Verifier`]); the simulator signs and checks with a deterministic key of
/// its own, so that a seed replays exactly (ECDSA signatures are randomized).
pub trait Verify: Send + Sync {
    fn verify(&self, signed: &Signed) -> Result<Verified, ScopeError>;
}

impl Verify for Verifier {
    fn verify(&self, signed: &Signed) -> Result<Verified, ScopeError> {
        Verifier::verify(self, signed)
    }
}

/// A grant or revocation that verified, and its signature (the tie-break between grants).
type JudgedGrant = (Verified, Vec<u8>);

/// What a refresh changed that its caller acts on.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Refreshed {
    /// A read filter names a field no filter named before: log entries logged earlier lack
    /// its values (the node retags its log).
    pub new_read_filter: bool,
    /// Changes taken out past a revocation's cut-off.
    pub taken_out: u64,
    /// Some of those were this node's own (written on top of the revoked node's): its next
    /// change would reuse a place of one taken out, so it must write under a new writer.
    pub took_out_own: bool,
}

/// One node's grants and revocations (see the module doc).
pub struct Registry {
    node: NodeId,
    /// `None`: the node belongs to no cluster, and nothing is ever granted.
    verify: Option<Box<dyn Verify>>,
    /// Each record of `_grants` judged so far, by key: what verified, or `None`. Held for the
    /// whole of a refresh, so refreshes publish one after the other.
    judged: Mutex<HashMap<String, Option<JudgedGrant>>>,
    /// The set in force, shared with the store's door.
    scopes: Arc<RwLock<Scopes>>,
    /// Run by the next refresh between building its set and publishing it (tests only).
    #[cfg(test)]
    pub(crate) before_publish: Mutex<Option<Box<dyn FnOnce() + Send>>>,
    #[cfg(feature = "sabotage")]
    sabotage: crate::Sabotage,
}

impl Registry {
    pub fn new(node: NodeId, verify: Option<Box<dyn Verify>>) -> Self {
        Self {
            node,
            verify,
            judged: Mutex::new(HashMap::new()),
            scopes: Arc::new(RwLock::new(Scopes::default())),
            #[cfg(test)]
            before_publish: Mutex::new(None),
            #[cfg(feature = "sabotage")]
            sabotage: crate::Sabotage::default(),
        }
    }

    #[cfg(feature = "sabotage")]
    pub fn set_sabotage(&mut self, sabotage: crate::Sabotage) {
        self.sabotage = sabotage;
    }

    /// The door a store of this node judges every change through, by the set published last.
    pub fn door(&self) -> ScopeDoor {
        ScopeDoor::new(self.node, self.scopes.clone())
    }

    /// How this node checks signed items (`None` outside a cluster).
    pub fn verifier(&self) -> Option<&dyn Verify> {
        self.verify.as_deref()
    }

    /// The grants and revocations in force.
    pub fn scopes(&self) -> Scopes {
        self.scopes
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }

    /// Reads the records of `_grants` not judged yet, keeps those that verify, publishes the
    /// set, and takes out of `docs` what a revocation new here cut off.
    pub fn refresh<S: Store>(&self, docs: &DocStore<S>) -> Result<Refreshed, StoreError> {
        let Some(verify) = &self.verify else {
            return Ok(Refreshed::default());
        };
        let mut judged = self
            .judged
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        judge_new(docs, verify.as_ref(), &mut judged)?;
        let mut scopes = Scopes::default();
        for (verified, signature) in judged.values().flatten() {
            scopes.insert(verified.clone(), signature);
        }
        #[cfg(test)]
        if let Some(hook) = self
            .before_publish
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .take()
        {
            hook();
        }
        let before = std::mem::replace(
            &mut *self
                .scopes
                .write()
                .unwrap_or_else(|poisoned| poisoned.into_inner()),
            scopes.clone(),
        );
        let mut refreshed = Refreshed {
            new_read_filter: !scopes.read_filters().is_subset(&before.read_filters()),
            ..Refreshed::default()
        };
        // A node revoked itself is cut off: it keeps what it holds as it was.
        let cut_offs = scopes.without_node(&self.node).cut_offs();
        if cut_offs != before.without_node(&self.node).cut_offs() {
            #[cfg(feature = "sabotage")]
            if self.sabotage.revocation_by_arrival {
                return Ok(refreshed);
            }
            self.take_out(docs, &scopes, cut_offs, &mut refreshed)?;
        }
        Ok(refreshed)
    }

    /// A revocation new here (or narrower) counts for what arrived before it too: the revoked
    /// node's changes past the cut-off come out, as every node leaves them out.
    fn take_out<S: Store>(
        &self,
        docs: &DocStore<S>,
        scopes: &Scopes,
        mut cut_offs: BTreeMap<NodeId, u64>,
        refreshed: &mut Refreshed,
    ) -> Result<(), StoreError> {
        // A writer of a revoked node that its revocation does not name counts nothing.
        for node in scopes.revoked() {
            if node == self.node {
                continue;
            }
            for writer in writers_of(docs, node)?.into_keys() {
                cut_offs.entry(writer).or_insert(0);
            }
        }
        for (writer, cut_off) in cut_offs {
            let (taken_out, own) = docs.take_out_past(&writer, cut_off)?;
            refreshed.took_out_own |= own;
            refreshed.taken_out += taken_out as u64;
            if taken_out > 0 {
                tracing::warn!(
                    %writer,
                    cut_off,
                    taken_out,
                    "took out changes of a revoked node past its cut-off"
                );
            }
        }
        Ok(())
    }
}

/// Reads and verifies each record of `_grants` not judged yet, [`GRANT_RECORDS_PAGE`] at a
/// time. Each record holds the bytes its key is the SHA-256 of: once judged, for good.
fn judge_new<S: Store>(
    docs: &DocStore<S>,
    verify: &dyn Verify,
    judged: &mut HashMap<String, Option<JudgedGrant>>,
) -> Result<(), StoreError> {
    for_each_live_record(docs, GRANTS_COLLECTION, |id| {
        let key = id.key.to_string();
        if judged.contains_key(&key) {
            return Ok(());
        }
        let verdict = signed_in(fields_of(docs, id)?, &key)
            .and_then(|signed| Ok((verify.verify(&signed)?, signed.signature)));
        if let Err(error) = &verdict {
            tracing::warn!(grant = %key, %error, "a grant or revocation that does not count");
        }
        judged.insert(key, verdict.ok());
        Ok(())
    })
}

/// Calls `each` with every live record of `collection`, read [`GRANT_RECORDS_PAGE`] at a time.
fn for_each_live_record<S: Store>(
    docs: &DocStore<S>,
    collection: &str,
    mut each: impl FnMut(&RecordId) -> Result<(), StoreError>,
) -> Result<(), StoreError> {
    let collection = Collection::new(collection).map_err(RecordError::from)?;
    let mut after: Option<Key> = None;
    loop {
        let page = docs.scan_collection(&collection, after.as_ref(), GRANT_RECORDS_PAGE)?;
        let full = page.len() == GRANT_RECORDS_PAGE;
        after = page.last().map(|record| record.id.key.clone());
        for record in page {
            if record.stored.record_state() == document::RecordState::Live {
                each(&record.id)?;
            }
        }
        if !full {
            return Ok(());
        }
    }
}

/// A record of Concord's own collections as it reads (they hold no conflicting values that
/// a policy would pick among: a grant's bytes are its key's, an actor entry has one writer).
fn fields_of<S: Store>(
    docs: &DocStore<S>,
    id: &RecordId,
) -> Result<Option<Map<String, Json>>, StoreError> {
    docs.read(id, |held| document::read(held.local()))
}

/// Whether a document is a record of `_grants`: a change to one may change what counts.
pub fn is_grant_doc(doc_key: &[u8]) -> bool {
    crate::store::collection_of(doc_key) == GRANTS_COLLECTION
}

/// The key of a signed grant or revocation in `_grants`: the SHA-256 of its bytes, hex.
pub fn grant_key(signed: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, signed).as_ref())
}

/// The signed grant or revocation a `_grants` record under `key` holds (its `fields`).
fn signed_in(fields: Option<Map<String, Json>>, key: &str) -> Result<Signed, ScopeError> {
    fields
        .and_then(|fields| {
            fields
                .get("signed")
                .and_then(Json::as_str)
                .map(str::to_owned)
        })
        .and_then(|text| hex::decode(text).ok())
        .filter(|bytes| grant_key(bytes) == key)
        .ok_or_else(|| {
            ScopeError::Malformed("no signed bytes whose SHA-256 is the record's key".into())
        })
        .and_then(|bytes| Signed::from_bytes(&bytes))
}

/// Writes signed grant or revocation bytes into `_grants`, under their SHA-256, as `actor`.
/// Anyone may add one: only its signature makes it count.
pub fn store_signed<S: Store>(
    docs: &DocStore<S>,
    actor: &ActorId,
    time_ms: i64,
    bytes: &[u8],
    durability: Durability,
) -> Result<(), StoreError> {
    let id = RecordId::new(
        Collection::new(GRANTS_COLLECTION).map_err(RecordError::from)?,
        Key::new(&grant_key(bytes)).map_err(RecordError::from)?,
    );
    let write = RecordWrite {
        set: vec![("signed".to_owned(), Json::String(hex::encode(bytes)))],
        ..RecordWrite::default()
    };
    let mut session = docs.session();
    session.put_record(&id, actor, time_ms, &write)?;
    session.commit(durability)
}

/// The writers of node `id` (the origins of its log, from the actor registry, and its own id
/// for a store made before incarnations), each with how far `docs` holds its log: the
/// cut-off a revocation made at this node names.
pub fn writers_of<S: Store>(
    docs: &DocStore<S>,
    id: NodeId,
) -> Result<BTreeMap<NodeId, u64>, StoreError> {
    let named = Json::from(id.to_string());
    let mut writers = BTreeMap::new();
    for_each_live_record(docs, ACTOR_REGISTRY_COLLECTION, |record| {
        let Some(fields) = fields_of(docs, record)? else {
            return Ok(());
        };
        let writer = fields
            .get("writer")
            .and_then(Json::as_str)
            .and_then(|text| text.parse::<NodeId>().ok())
            .filter(|_| fields.get("node") == Some(&named));
        if let Some(writer) = writer {
            if writers.len() < CUT_OFFS_MAX {
                writers.insert(writer, docs.origin_mark(&writer));
            }
        }
        Ok(())
    })?;
    let legacy = docs.origin_mark(&id);
    if legacy > 0 {
        writers.insert(id, legacy);
    }
    Ok(writers)
}
