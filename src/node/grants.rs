//! Grants and revocations as this node holds them: its [`crate::scope::Registry`] refreshed
//! from `_grants` (what a revocation takes out included), the log retagged for new read
//! filters, a new writer when a revocation took out this node's own changes, and signed
//! items added.

use super::*;

/// Most steps of [`crate::store::DocStore::retag_log_step`] one [`Node::retag_step`] takes.
pub const RETAG_STEPS_PER_CALL: usize = 64;

impl Node {
    /// Reads the grants and revocations `_grants` holds again (see
    /// [`crate::scope::Registry::refresh`]) and acts on what changed: the log is retagged
    /// for a read filter new here, and a revocation that took out changes of this node's own
    /// makes it write under a new writer.
    pub fn refresh_scopes(&self) -> Result<(), NodeError> {
        let refreshed = self.registry.refresh(&self.docs)?;
        if refreshed.new_read_filter {
            *self
                .retag
                .lock()
                .unwrap_or_else(|poisoned| poisoned.into_inner()) = Some(None);
        }
        if refreshed.took_out_own {
            // Its next change would reuse a sequence number of one taken out.
            self.new_incarnation(
                "a revocation took out changes of this node's own written on top of the \
                 revoked node's",
            )?;
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
        let verifier = self.registry.verifier().ok_or(NodeError::NoCluster)?;
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
        crate::scope::store_signed(&self.docs, &self.api_actor, now_ms(), bytes, durability)?;
        Ok(())
    }

    /// The writers of node `id`, each with how far this node holds its log: the cut-off a
    /// revocation made here names (see [`crate::scope::writers_of`]).
    pub fn writers_of(&self, id: NodeId) -> Result<BTreeMap<NodeId, u64>, NodeError> {
        Ok(crate::scope::writers_of(&self.docs, id)?)
    }

    /// The grants in force and the revoked nodes, one JSON object each.
    pub fn grants(&self) -> Vec<Json> {
        self.registry.scopes().describe()
    }

    /// The grants and revocations in force.
    pub fn scopes(&self) -> crate::scope::Scopes {
        self.registry.scopes()
    }
}
