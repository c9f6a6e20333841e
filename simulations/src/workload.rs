//! What clients do: writes of small fields and large values (some over the limit, which
//! must be refused and leave nothing), deletes and bursts to one record.

use super::*;

impl Sim {
    pub(super) fn workload(&mut self) -> Result<(), Violation> {
        let index = self.rng.index(self.nodes.len());
        if !self.nodes[index].up {
            return Ok(());
        }
        if self.faults_on && self.rng.below(1000) < self.params.backup_permille {
            let backup = self.nodes[index].store.durable_copy();
            self.nodes[index].backup = Some(backup);
            self.record_trace(format!("{} node {index} backed up", self.now_ms));
        }
        let record = self.rng.index(self.ids.len());
        if self.rng.below(1000) < self.params.burst_permille {
            return self.burst(index, record);
        }
        let delete = self.rng.chance(15);
        let actor = self.nodes[index].writer.actor(self.rng.below(2) as u16);
        let mut write = RecordWrite::default();
        let mut size = 0;
        if !delete {
            let field = format!("f{}", self.rng.below(4));
            if self.rng.below(1000) < self.params.large_value_permille {
                size = self.large_value_size();
                write.set.push((field, json!("L".repeat(size))));
            } else if self.rng.chance(15) {
                write.remove.push(field);
            } else {
                write.set.push((field, json!(self.rng.below(1000))));
            }
            write.replace = self.rng.chance(5);
            // In a scoped run, writes set a record's region too, some moving it.
            if self.scoped.is_some() && (write.replace || self.rng.chance(30)) {
                let region = REGIONS[self.rng.index(REGIONS.len())];
                write.set.push(("region".to_owned(), json!(region)));
            }
        }
        let outcome = match self.write(index, record, &actor, delete.then_some(()), &write) {
            Ok(outcome) => outcome,
            Err(StoreError::OutsideGrant(_)) => {
                self.summary.scope_refused_writes += 1;
                return Ok(());
            }
            Err(error) if size > 0 => {
                return self.refused(index, record, size, &error);
            }
            Err(error) => {
                return Err(self.violation(format!("node {index}: a write failed: {error}")))
            }
        };
        if size > 0 {
            self.summary.large_writes += 1;
        }
        if outcome.is_some() {
            self.step(index, vec![Input::LocalWrites])?;
        }
        Ok(())
    }

    /// A value's size for a large write: up to the largest change, halved a random number
    /// of times; one in ten is over the limit, and must be refused.
    pub(super) fn large_value_size(&mut self) -> usize {
        let largest = concord_proto::CHANGE_BYTES_MAX - 1024;
        if self.rng.chance(10) {
            largest + 1024 + self.rng.index(4096) + 1
        } else {
            largest >> self.rng.below(10)
        }
    }

    /// A write over the change limit: refused, and the record is as it was.
    pub(super) fn refused(
        &mut self,
        index: usize,
        record: usize,
        size: usize,
        error: &StoreError,
    ) -> Result<(), Violation> {
        let over = size + 1024 > concord_proto::CHANGE_BYTES_MAX;
        let refusal = matches!(
            error,
            StoreError::ChangeTooLarge { .. } | StoreError::Record(_)
        );
        if !over || !refusal {
            return Err(self.violation(format!(
                "node {index}: a write of a {size}-byte value failed: {error}"
            )));
        }
        self.summary.refused_writes += 1;
        self.record_trace(format!(
            "{} node {index} refused a {size}-byte write of {}",
            self.now_ms, self.ids[record]
        ));
        // Nothing of it may be left in the store, nor in the log.
        let mark = self.nodes[index]
            .docs
            .origin_mark(&self.nodes[index].writer);
        let logged = self.nodes[index]
            .docs
            .log_after(&self.nodes[index].writer, mark, 1, usize::MAX)
            .map_err(|error| self.violation(format!("node {index}: {error}")))?;
        if !logged.is_empty() {
            return Err(self.violation(format!("node {index}: a refused write left a log entry")));
        }
        Ok(())
    }

    /// Many updates of one record in a row, each acknowledged, then shipped together: a long
    /// history that must reach every node.
    pub(super) fn burst(&mut self, index: usize, record: usize) -> Result<(), Violation> {
        let writes = 1 + self.rng.below(self.params.burst_writes_max.max(1));
        let actor = self.nodes[index].writer.actor(0);
        for count in 0..writes {
            let write = RecordWrite {
                set: vec![("stock".to_owned(), json!(count))],
                ..RecordWrite::default()
            };
            match self.write(index, record, &actor, None, &write) {
                Ok(_) => {}
                Err(StoreError::OutsideGrant(_)) => {
                    self.summary.scope_refused_writes += 1;
                    break;
                }
                Err(error) => {
                    return Err(self.violation(format!("node {index}: a write failed: {error}")))
                }
            }
            self.summary.burst_writes += 1;
        }
        self.step(index, vec![Input::LocalWrites])
    }

    /// One durable write (or delete) on `index`, recorded as acknowledged if it changed
    /// anything; the change it made, if any.
    pub(super) fn write(
        &mut self,
        index: usize,
        record: usize,
        actor: &automerge::ActorId,
        delete: Option<()>,
        write: &RecordWrite,
    ) -> Result<Option<ChangeHash>, StoreError> {
        let id = self.ids[record].clone();
        let time = self.node_now(index).as_millis() as i64;
        let result = if delete.is_some() {
            self.nodes[index]
                .docs
                .write(&id, actor, time, Durability::Durable, |tx| {
                    document::apply_delete(tx)
                })
        } else {
            write.check()?;
            self.nodes[index]
                .docs
                .write(&id, actor, time, Durability::Durable, |tx| {
                    document::apply_write(tx, write).map(|()| true)
                })
        };
        let (_, outcome) = result?;
        let Some(hash) = outcome.change else {
            return Ok(None);
        };
        // No change a node accepted may have pushed its clock further ahead than the bound.
        let bound = concord::sync::CLOCK_AHEAD_MAX_DEFAULT.as_millis() as u64;
        let written = self.nodes[index]
            .docs
            .read(&id, |held| held.change(&hash))?;
        let Some(written) = written else {
            return Err(StoreError::Corrupt(format!(
                "the change {hash} a write just made is not in its document"
            )));
        };
        self.written
            .insert(hash, (written.actor_id().clone(), written.seq()));
        let stamp =
            concord::record::stamp::ChangeStamp::of_change(written.message(), written.timestamp());
        if stamp.hlc > time as u64 + bound + 1 {
            return Err(StoreError::Corrupt(format!(
                "a write at {time} ms was stamped {}: a change it accepted moved its clock \
                 more than {bound} ms ahead",
                stamp.hlc
            )));
        }
        let delete = delete.is_some();
        if delete {
            self.summary.deletes += 1;
        } else {
            self.summary.writes += 1;
        }
        if let Some(scoped) = self
            .scoped
            .as_mut()
            .filter(|scoped| scoped.modified == Some(index))
        {
            // What the modified node writes is judged by the others, not acknowledged to
            // anyone: the end checks which of it every other node holds.
            let writer = self.nodes[index].writer;
            let place = (writer, self.nodes[index].docs.origin_mark(&writer));
            scoped.forged.push((record, hash, place));
            self.summary.forged_writes += 1;
        } else {
            self.summary.acknowledged += 1;
            self.acknowledged.push((record, hash, delete, index));
        }
        let deps = if self.params.print_trace {
            format!(" after {}", short_hashes(written.deps()))
        } else {
            String::new()
        };
        self.record_trace(format!(
            "{} node {index} {} {id} -> {hash}{deps}",
            self.now_ms,
            if delete { "delete" } else { "write" }
        ));
        Ok(Some(hash))
    }
}
