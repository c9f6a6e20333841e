//! Rows that failed: deferred, quarantined with their error and retried with backoff, each
//! direction on its own, and cleared once they pass; listed by `concord quarantine`.

use super::*;

/// First wait before a quarantined row is tried again; doubled each time up to the max.
pub const RETRY_BACKOFF_MIN_MS: u64 = 1_000;
/// Longest wait before a quarantined row is tried again.
pub const RETRY_BACKOFF_MAX_MS: u64 = 300_000;

/// Most rows one binding keeps in quarantine; past that the apply cursor waits.
pub const QUARANTINE_ROWS_MAX: usize = 100_000;

/// Quarantined or deferred rows tried again per round.
pub const RETRIES_PER_ROUND: usize = 100;

/// One row set aside with its error.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct QuarantinedRow {
    pub binding: String,
    /// `in` (table to record) or `out` (record to table).
    pub direction: String,
    pub key: String,
    pub error: String,
    pub attempts: u32,
    pub first_seen_ms: u64,
    pub next_retry_ms: u64,
}

/// Every quarantined row of every binding on the node, up to `limit`.
pub fn quarantined_rows(
    node: &dyn Host,
    limit: usize,
) -> Result<Vec<QuarantinedRow>, AdapterError> {
    let mut rows = Vec::new();
    for binding in node.bindings() {
        let prefix = state::quarantined_prefix(&binding.name());
        for (_, value) in
            node.documents()
                .states(&prefix, None, limit.saturating_sub(rows.len()))?
        {
            if let Ok(row) = serde_json::from_slice::<QuarantinedRow>(&value) {
                rows.push(row);
            }
        }
        if rows.len() >= limit {
            break;
        }
    }
    Ok(rows)
}

impl Runner {
    pub(super) fn defer(&self, key: &str) -> Result<(), AdapterError> {
        let mut session = self.node.documents().session();
        session.put_state(
            &self.state_name(State::Deferred(Side::Out, key)),
            Vec::new(),
        );
        session.commit(Durability::Deferred)?;
        Ok(())
    }

    pub(super) fn quarantine(
        &self,
        side: Side,
        key: &str,
        error: &str,
    ) -> Result<(), AdapterError> {
        let docs = self.node.documents();
        let name = self.state_name(State::Quarantined(side, key));
        let now = u64::try_from(now_ms()).unwrap_or(0);
        let mut entry = match docs.state(&name)? {
            Some(bytes) => serde_json::from_slice::<QuarantinedRow>(&bytes).ok(),
            None => None,
        }
        .unwrap_or(QuarantinedRow {
            binding: self.name.clone(),
            direction: side.as_str().to_owned(),
            key: key.to_owned(),
            error: String::new(),
            attempts: 0,
            first_seen_ms: now,
            next_retry_ms: now,
        });
        let new = entry.attempts == 0;
        entry.attempts = entry.attempts.saturating_add(1);
        entry.error = error.to_owned();
        let backoff = RETRY_BACKOFF_MIN_MS
            .saturating_mul(1 << entry.attempts.min(16).saturating_sub(1))
            .min(RETRY_BACKOFF_MAX_MS);
        entry.next_retry_ms = now + backoff;
        if new {
            tracing::warn!(binding = %self.name, direction = side.as_str(), key, error, "row quarantined");
            self.status().quarantined += 1;
        }
        let mut session = docs.session();
        session.put_state(&name, serde_json::to_vec(&entry).expect("entry serializes"));
        session.commit(Durability::Durable)?;
        Ok(())
    }

    pub(super) fn clear(&self, side: Side, key: &str) -> Result<(), AdapterError> {
        let docs = self.node.documents();
        let names = [
            (true, self.state_name(State::Quarantined(side, key))),
            (false, self.state_name(State::Deferred(side, key))),
        ];
        let mut session = docs.session();
        let mut any = false;
        for (quarantined, name) in names {
            if docs.state(&name)?.is_some() {
                if quarantined {
                    let mut status = self.status();
                    status.quarantined = status.quarantined.saturating_sub(1);
                }
                session.remove_state(&name);
                any = true;
            }
        }
        if any {
            session.commit(Durability::Deferred)?;
        }
        Ok(())
    }

    /// Tries deferred rows, and quarantined rows whose backoff has passed.
    pub(super) fn retry(&self, table: &mut dyn Table) -> Result<(), AdapterError> {
        let docs = self.node.documents();
        let now = u64::try_from(now_ms()).unwrap_or(0);
        let deferred_prefix = state::deferred_prefix(&self.name, Side::Out);
        let mut out_keys: Vec<String> = docs
            .states(&deferred_prefix, None, RETRIES_PER_ROUND)?
            .into_iter()
            .filter_map(|(name, _)| String::from_utf8(name[deferred_prefix.len()..].to_vec()).ok())
            .collect();
        let quarantine_prefix = state::quarantined_prefix(&self.name);
        let mut in_keys = Vec::new();
        for (_, value) in docs.states(&quarantine_prefix, None, QUARANTINE_ROWS_MAX)? {
            let Ok(entry) = serde_json::from_slice::<QuarantinedRow>(&value) else {
                continue;
            };
            if entry.next_retry_ms > now {
                continue;
            }
            if entry.direction == Side::Out.as_str() {
                out_keys.push(entry.key);
            } else {
                in_keys.push(entry.key);
            }
            if out_keys.len() + in_keys.len() >= RETRIES_PER_ROUND {
                break;
            }
        }
        if !out_keys.is_empty() {
            let ids: Vec<RecordId> = out_keys
                .iter()
                .filter_map(|key| Key::new(key).ok())
                .map(|key| RecordId::new(self.collection.clone(), key))
                .collect();
            self.apply_records(table, &ids)?;
        }
        for key in in_keys {
            let parts = match key_parts(&key, self.mapping().key.len()) {
                Ok(parts) => parts,
                Err(error) => {
                    self.quarantine(Side::In, &key, &error)?;
                    continue;
                }
            };
            let row = table.read(&parts)?;
            self.write_rows(vec![(parts, row, None, None)], None)?;
            // A row that wrote cleanly leaves the quarantine; one that failed again was
            // put back above with a longer backoff.
            let name = self.state_name(State::Quarantined(Side::In, &key));
            if let Some(bytes) = docs.state(&name)? {
                if let Ok(entry) = serde_json::from_slice::<QuarantinedRow>(&bytes) {
                    if entry.next_retry_ms <= now {
                        self.clear(Side::In, &key)?;
                    }
                }
            }
        }
        Ok(())
    }
}
