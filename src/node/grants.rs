//! Grants and revocations as this node holds them: the signed records of `_grants`, read,
//! verified and published as the set every check judges by (one refresh at a time, so an
//! older set is never published after a newer one), the log retagged for new read filters,
//! and what a revocation takes out.

use super::*;

/// Records of `_grants` read at a time by [`Node::refresh_scopes`] (it reads them all).
pub(super) const GRANT_RECORDS_PAGE: usize = 1_000;

/// Most steps of [`crate::store::DocStore::retag_log_step`] one [`Node::retag_step`] takes.
pub const RETAG_STEPS_PER_CALL: usize = 64;

/// A grant or revocation that verified, and its signature (the tie-break between grants).
pub(super) type JudgedGrant = (crate::scope::Verified, Vec<u8>);

/// The key of a signed grant or revocation in `_grants`: the SHA-256 of its bytes, hex.
pub(super) fn grant_key(signed: &[u8]) -> String {
    hex::encode(ring::digest::digest(&ring::digest::SHA256, signed).as_ref())
}

/// The signed grant or revocation a `_grants` record under `key` holds (its `fields`).
pub(super) fn signed_in(
    fields: Option<Map<String, Json>>,
    key: &str,
) -> Result<crate::scope::Signed, crate::scope::ScopeError> {
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
            crate::scope::ScopeError::Malformed(
                "no signed bytes whose SHA-256 is the record's key".into(),
            )
        })
        .and_then(|bytes| crate::scope::Signed::from_bytes(&bytes))
}

impl Node {
    /// Reads the grants and revocations `_grants` holds again (all of them, page by page),
    /// keeping those that verify, and publishes the set. Refreshes run one at a time from
    /// reading to publishing, so a set built earlier is never published after a newer one.
    pub fn refresh_scopes(&self) -> Result<(), NodeError> {
        let Some(verifier) = &self.verifier else {
            return Ok(());
        };
        let mut judged = self
            .grants_judged
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        self.judge_new_grants(verifier, &mut judged)?;
        let mut scopes = crate::scope::Scopes::default();
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

    /// Reads and verifies each record of `_grants` not judged yet, [`GRANT_RECORDS_PAGE`]
    /// records at a time. Each record holds the bytes its key is the SHA-256 of: once judged,
    /// it is judged for good.
    pub(super) fn judge_new_grants(
        &self,
        verifier: &crate::scope::Verifier,
        judged: &mut HashMap<String, Option<JudgedGrant>>,
    ) -> Result<(), NodeError> {
        let collection = Collection::new(crate::scope::GRANTS_COLLECTION)?;
        let mut after: Option<Key> = None;
        loop {
            let page =
                self.docs
                    .scan_collection(&collection, after.as_ref(), GRANT_RECORDS_PAGE)?;
            let full = page.len() == GRANT_RECORDS_PAGE;
            after = page.last().map(|record| record.id.key.clone());
            for record in page {
                let key = record.id.key.to_string();
                if judged.contains_key(&key)
                    || record.stored.record_state() != document::RecordState::Live
                {
                    continue;
                }
                let verdict = signed_in(self.get(&record.id)?, &key)
                    .and_then(|signed| Ok((verifier.verify(&signed)?, signed.signature)));
                if let Err(error) = &verdict {
                    tracing::warn!(grant = %key, %error, "a grant or revocation that does not count");
                }
                judged.insert(key, verdict.ok());
            }
            if !full {
                return Ok(());
            }
        }
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
        self.store_signed(bytes, Durability::Durable)?;
        self.refresh_scopes()?;
        Ok(verified)
    }

    /// Writes signed grant or revocation bytes into `_grants`, under their SHA-256.
    pub(super) fn store_signed(
        &self,
        bytes: &[u8],
        durability: Durability,
    ) -> Result<(), NodeError> {
        let id = RecordId::new(
            Collection::new(crate::scope::GRANTS_COLLECTION)?,
            Key::new(&grant_key(bytes))?,
        );
        let write = RecordWrite {
            set: vec![("signed".to_owned(), Json::String(hex::encode(bytes)))],
            ..RecordWrite::default()
        };
        let mut session = self.docs.session();
        session.put_record(&id, &self.api_actor, now_ms(), &write)?;
        session.commit(durability)?;
        Ok(())
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
}
