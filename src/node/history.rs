//! What a node tells of the past: a record's history change by change with who wrote it, the
//! audit across records, and conflicts with their settlement.

use super::*;

/// Most changes `history` lists for one record.
pub const HISTORY_CHANGES_MAX: usize = 100_000;

/// Actors whose origin one history replay keeps at hand.
pub(super) const HISTORY_ORIGINS_CACHED_MAX: usize = 4096;

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
                // The base stands for every change before the cut: listed once, as the
                // record it left.
                Some(epoch) if epoch.base() == Some(change.hash()) => {
                    let cut = epoch.cut().to_vec();
                    return Some(self.compacted_entry(&change, &cut));
                }
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

impl HistoryReplay<'_> {
    /// The entry that stands for a compacted history: the record as it was at the cut, under
    /// the cut's version (its first head), written when the base's last change says.
    fn compacted_entry(
        &mut self,
        base: &automerge::Change,
        cut: &[ChangeHash],
    ) -> Result<HistoryEntry, NodeError> {
        let effect = document::ChangeEffect {
            action: "compacted",
            set: document::read_at(self.held.local(), Some(&[base.hash()])).unwrap_or_default(),
            removed: Vec::new(),
            reverts: None,
        };
        let mut entry = self.node.history_entry(&mut self.origins, base, effect)?;
        if let Some(head) = cut.first() {
            entry.hash = head.to_string();
        }
        Ok(entry)
    }
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
pub(super) const AUDIT_SCAN_PAGE: usize = 10_000;

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

impl Node {
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
    pub(super) fn history_entry(
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
    pub(super) fn audited_records(
        &self,
        filter: &AuditFilter,
    ) -> Result<(Vec<RecordId>, bool), NodeError> {
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

    pub(super) fn actor_origin(
        &self,
        actor: &ActorId,
    ) -> Result<Option<Map<String, Json>>, NodeError> {
        let Ok(key) = Key::new(&actor.to_hex_string()) else {
            return Ok(None);
        };
        let entry = RecordId::new(Collection::new(ACTOR_REGISTRY_COLLECTION)?, key);
        self.get(&entry)
    }
}
