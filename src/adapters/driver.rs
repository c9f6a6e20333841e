//! The loop that runs one binding on its own thread: connect (with backoff), check the table
//! against the binding, load what is there, then capture and apply in rounds.
//!
//! Guarantees, in the terms of the module doc of [`crate::adapters`]: a captured change is
//! forgotten only after the record write it caused is durable; the apply cursor advances only
//! past records the table holds (written, unchanged, or set aside in the quarantine or the
//! deferred list, both kept in the store); a bad row never stops the others.

use std::collections::BTreeSet;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use automerge::ActorId;
use serde::{Deserialize, Serialize};
use serde_json::Value as Json;

use super::host::Host;
use super::{
    key_parts, record_key, AdapterError, Applied, Column, RowWrite, Table, TextValue,
    APPLY_BATCH_MAX, CAPTURE_BATCH_MAX, LOAD_PAGE_ROWS, POLL_INTERVAL,
};
use crate::config::{AdapterKind, BindingSection};
use crate::record::stamp::now_ms;
use crate::record::{document, Collection, Key, NodeId, RecordId, RecordWrite};
use crate::store::{Durability, StoreError};

mod quarantine;
mod state;

pub use state::Side;
use state::State;

pub use quarantine::{
    quarantined_rows, QuarantinedRow, QUARANTINE_ROWS_MAX, RETRIES_PER_ROUND, RETRY_BACKOFF_MAX_MS,
    RETRY_BACKOFF_MIN_MS,
};

/// Longest wait between reconnection attempts.
pub const RECONNECT_BACKOFF_MAX: Duration = Duration::from_secs(30);
/// First wait before a reconnection attempt.
pub const RECONNECT_BACKOFF_MIN: Duration = Duration::from_millis(100);
/// Log entries read per origin per round.
pub const LOG_ENTRIES_PER_ROUND: usize = 2_000;

/// What `/v1/status` shows of a binding.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BindingStatus {
    pub name: String,
    pub collection: String,
    pub adapter: String,
    pub table: String,
    pub direction: String,
    /// `connecting`, `loading`, `running`, `disconnected` or `failed`.
    pub state: String,
    pub last_error: Option<String>,
    /// Rows read from the table on the initial load.
    pub rows_loaded: u64,
    /// Captured row changes read from the table.
    pub rows_captured: u64,
    /// Record changes the binding wrote into the store (captured rows that changed a record).
    pub records_written: u64,
    /// Rows inserted, updated or deleted in the table.
    pub rows_applied: u64,
    /// Records compared with their row and found equal: nothing written.
    pub rows_unchanged: u64,
    pub quarantined: u64,
}

/// A binding checked against its table: the columns it maps and the fields they fill.
#[derive(Debug, Clone)]
pub struct Mapping {
    pub columns: Vec<Column>,
    pub fields: Vec<String>,
    /// Indexes of the key columns in `columns`.
    pub key: Vec<usize>,
}

/// A row to write into its record: key, the row as it is now (`None`: gone), the columns to
/// take from it (`None`: all), and when it changed (ms since the Unix epoch; `None`: now).
type CapturedRow = (
    Vec<String>,
    Option<Vec<TextValue>>,
    Option<BTreeSet<String>>,
    Option<i64>,
);

/// A running binding.
pub struct RunningBinding {
    pub status: Arc<Mutex<BindingStatus>>,
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    name: String,
}

impl RunningBinding {
    pub fn name(&self) -> &str {
        &self.name
    }

    /// Whether the binding's thread ended without being asked to (it panicked).
    pub fn failed(&self) -> bool {
        !self.stop.load(Ordering::SeqCst)
            && self
                .thread
                .as_ref()
                .is_some_and(std::thread::JoinHandle::is_finished)
    }

    pub fn stop(mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for RunningBinding {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
    }
}

/// Opens the binding's table.
pub fn open_table(
    config: &BindingSection,
    data_dir: &std::path::Path,
) -> Result<Box<dyn Table>, AdapterError> {
    Ok(match config.adapter {
        AdapterKind::Postgres => Box::new(super::postgres::PostgresTable::connect(
            &config.url,
            &config.table,
        )?),
        AdapterKind::Sqlite => {
            let mut path = PathBuf::from(config.url.trim_start_matches("sqlite://"));
            if path.is_relative() {
                path = data_dir.join(path);
            }
            Box::new(super::sqlite::SqliteTable::open(&path, &config.table)?)
        }
    })
}

/// Checks the binding against the table's columns and prepares the table.
pub fn prepare(config: &BindingSection, table: &mut dyn Table) -> Result<Mapping, AdapterError> {
    let described = table.describe()?;
    let at = format!("binding {}: table {}", config.name(), config.table);
    let find = |name: &str| described.iter().find(|(column, _, _)| column == name);
    for key in &config.key {
        if find(key).is_none() {
            return Err(AdapterError::Config(format!(
                "{at} has no key column {key:?}"
            )));
        }
    }
    let mut wanted: Vec<(String, String)> = if config.fields.is_empty() {
        described
            .iter()
            .map(|(column, _, _)| (column.clone(), column.clone()))
            .collect()
    } else {
        config
            .fields
            .iter()
            .map(|(column, field)| (column.clone(), field.clone()))
            .collect()
    };
    for key in &config.key {
        if !wanted.iter().any(|(column, _)| column == key) {
            wanted.push((key.clone(), key.clone()));
        }
    }
    let mut mapping = Mapping {
        columns: Vec::new(),
        fields: Vec::new(),
        key: Vec::new(),
    };
    for (column, field) in wanted {
        let Some((_, kind, sql_type)) = find(&column) else {
            return Err(AdapterError::Config(format!(
                "{at} has no column {column:?}"
            )));
        };
        let kind = kind.clone().map_err(|type_name| {
            AdapterError::Config(format!(
                "{at}: column {column:?} has type {type_name}, which Concord cannot map; leave it out with `fields`"
            ))
        })?;
        document::check_field_name(&field).map_err(|error| {
            AdapterError::Config(format!("{at}: column {column:?} makes no field: {error}"))
        })?;
        mapping.columns.push(Column {
            name: column,
            kind,
            sql_type: sql_type.clone(),
        });
        mapping.fields.push(field);
    }
    for key in &config.key {
        let index = mapping
            .columns
            .iter()
            .position(|column| &column.name == key)
            .expect("key columns were added above");
        mapping.key.push(index);
    }
    table.prepare(
        &mapping.columns,
        &mapping.key,
        config.direction.reads_table(),
        config.direction.writes_table(),
    )?;
    Ok(mapping)
}

/// Starts a binding: checks it against its table at once when the database answers (a bad
/// binding fails here, naming what is wrong), then runs it on its own thread. A database that
/// does not answer yet is retried with backoff by the thread.
/// The store's state key of binding `binding`'s `what` (load progress, marks).
/// Has the binding named `name` load again, as when it first started: records into its
/// table (a binding that writes it) and rows into records (one that reads it). For a table
/// that was dropped and made again under the binding. What already matches is left as it
/// is. A running binding starts on it at its next round, a stopped one when it starts.
pub fn refill(node: &dyn Host, name: &str) -> Result<(), AdapterError> {
    let Some(config) = node
        .bindings()
        .iter()
        .find(|binding| binding.name() == name)
    else {
        let names: Vec<String> = node.bindings().iter().map(|b| b.name()).collect();
        return Err(AdapterError::Config(format!(
            "there is no binding {name:?} (this node has: {})",
            if names.is_empty() {
                "none".to_owned()
            } else {
                names.join(", ")
            }
        )));
    };
    let mut session = node.documents().session();
    if config.direction.reads_table() {
        session.remove_state(&State::LoadIn.name(name));
    }
    if config.direction.writes_table() {
        session.remove_state(&State::LoadOut.name(name));
    }
    session.commit(Durability::Durable)?;
    Ok(())
}

/// Stops the log being kept for bindings that no longer write a table on this node (taken
/// out of the config, or turned to read it only): the store follows only those configured.
/// Returns how many it let go.
pub fn forget_unbound_followers(node: &dyn Host) -> Result<usize, AdapterError> {
    let bound: BTreeSet<String> = node
        .bindings()
        .iter()
        .filter(|binding| binding.direction.writes_table())
        .map(BindingSection::name)
        .collect();
    let docs = node.documents();
    let stale: Vec<String> = docs
        .followers()?
        .into_iter()
        .map(|(name, _)| name)
        .filter(|name| !bound.contains(name))
        .collect();
    if !stale.is_empty() {
        let mut session = docs.session();
        for name in &stale {
            tracing::info!(binding = %name, "the binding is no longer configured: the log is no longer kept for it");
            session.remove_follower(name);
        }
        session.commit(Durability::Durable)?;
    }
    Ok(stale.len())
}

pub fn start(config: &BindingSection, node: Arc<dyn Host>) -> Result<RunningBinding, AdapterError> {
    let name = config.name();
    let collection = Collection::new_user(&config.collection)
        .map_err(|error| AdapterError::Config(format!("binding {name}: {error}")))?;
    let actor = node
        .source_actor(&name)
        .map_err(|error| AdapterError::Config(format!("binding {name}: {error}")))?;
    let status = Arc::new(Mutex::new(BindingStatus {
        name: name.clone(),
        collection: config.collection.clone(),
        adapter: config.adapter.as_str().to_owned(),
        table: config.table.clone(),
        direction: config.direction.as_str().to_owned(),
        state: "connecting".to_owned(),
        ..BindingStatus::default()
    }));
    let mut connected = None;
    match open_table(config, node.dir()).and_then(|mut table| {
        let mapping = prepare(config, table.as_mut())?;
        Ok((table, mapping))
    }) {
        Ok(ready) => connected = Some(ready),
        Err(AdapterError::Database(error)) => {
            tracing::warn!(binding = %name, %error, "database not reachable; retrying in the background");
            status.lock().unwrap_or_else(|p| p.into_inner()).last_error = Some(error);
        }
        Err(error) => return Err(error),
    }
    let stop = Arc::new(AtomicBool::new(false));
    let mut runner = Runner {
        config: config.clone(),
        name: name.clone(),
        collection,
        actor,
        node,
        status: status.clone(),
        stop: stop.clone(),
        mapping: None,
        own_changes: Default::default(),
    };
    // What the table changed while the node was down is captured before the node exchanges
    // anything with its peers: written on the record as the node last saw it, such a change
    // is concurrent with the edits made elsewhere meanwhile, as it was.
    if let Some((table, mapping)) = connected.as_mut() {
        runner.capture_pending(table.as_mut(), mapping);
    }
    let thread = std::thread::Builder::new()
        .name(format!("binding-{name}"))
        .spawn(move || runner.run(connected))
        .map_err(|error| AdapterError::Database(format!("cannot start a thread: {error}")))?;
    Ok(RunningBinding {
        status,
        stop,
        thread: Some(thread),
        name,
    })
}

struct Runner {
    config: BindingSection,
    name: String,
    collection: Collection,
    actor: ActorId,
    node: Arc<dyn Host>,
    status: Arc<Mutex<BindingStatus>>,
    stop: Arc<AtomicBool>,
    mapping: Option<Mapping>,
    own_changes: std::cell::RefCell<OwnChanges>,
}

/// Changes this binding wrote into the store from rows it read, not yet met again in the
/// log. Applying one back to the table would compare the row with itself; skipping it
/// saves a read per captured row. Forgetting one (past the bound, or at a restart) only
/// costs that read.
#[derive(Default)]
struct OwnChanges {
    hashes: std::collections::HashSet<[u8; 32]>,
    order: std::collections::VecDeque<[u8; 32]>,
}

/// Capture rounds made at start before the node talks to its peers, at most; what is left
/// is captured by the binding's thread.
const PENDING_CAPTURE_ROUNDS_MAX: usize = 1000;

/// Own changes remembered per binding (32 bytes each, twice).
const OWN_CHANGES_MAX: usize = 100_000;

impl OwnChanges {
    fn remember(&mut self, hash: [u8; 32]) {
        if self.order.len() >= OWN_CHANGES_MAX {
            if let Some(oldest) = self.order.pop_front() {
                self.hashes.remove(&oldest);
            }
        }
        if self.hashes.insert(hash) {
            self.order.push_back(hash);
        }
    }

    /// Whether `hash` was remembered; it is forgotten either way (the log holds it once).
    fn take(&mut self, hash: &[u8; 32]) -> bool {
        self.hashes.remove(hash)
    }
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct LoadProgress {
    done: bool,
    /// In: the last key loaded. Out: the last record key applied.
    after: Option<Vec<String>>,
    /// Out: the log marks when the load began; the apply cursor starts there.
    marks: Vec<([u8; 16], u64)>,
    /// Out: the last withdrawal when the load began; the withdrawal cursor starts there.
    #[serde(default)]
    withdrawn: u64,
}

impl Runner {
    fn status(&self) -> std::sync::MutexGuard<'_, BindingStatus> {
        self.status
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn state_name(&self, state: State<'_>) -> Vec<u8> {
        state.name(&self.name)
    }

    fn run(&mut self, mut connected: Option<(Box<dyn Table>, Mapping)>) {
        let mut backoff = RECONNECT_BACKOFF_MIN;
        while !self.stop.load(Ordering::SeqCst) {
            let Some((table, mapping)) = connected.as_mut() else {
                match open_table(&self.config, self.node.dir()).and_then(|mut table| {
                    let mapping = prepare(&self.config, table.as_mut())?;
                    Ok((table, mapping))
                }) {
                    Ok(ready) => {
                        tracing::info!(binding = %self.name, "connected");
                        connected = Some(ready);
                        backoff = RECONNECT_BACKOFF_MIN;
                    }
                    Err(error) => {
                        let state = if matches!(error, AdapterError::Config(_)) {
                            "failed"
                        } else {
                            "disconnected"
                        };
                        tracing::warn!(binding = %self.name, %error, "cannot reach the table; retrying in {backoff:?}");
                        {
                            let mut status = self.status();
                            status.state = state.to_owned();
                            status.last_error = Some(error.to_string());
                        }
                        self.sleep(backoff);
                        backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
                    }
                }
                continue;
            };
            if self
                .mapping
                .as_ref()
                .is_none_or(|held| held.columns != mapping.columns)
            {
                self.mapping = Some(mapping.clone());
            }
            match self.round(table.as_mut()) {
                Ok(busy) => {
                    if !busy {
                        if let Err(error) = table.wait(POLL_INTERVAL) {
                            tracing::warn!(binding = %self.name, %error, "lost the table; reconnecting");
                            self.disconnected(&error);
                            connected = None;
                        }
                    }
                }
                Err(error) => {
                    tracing::warn!(binding = %self.name, %error, "lost the table; reconnecting");
                    self.disconnected(&error);
                    connected = None;
                    self.sleep(backoff);
                    backoff = (backoff * 2).min(RECONNECT_BACKOFF_MAX);
                }
            }
        }
    }

    /// Captures every change the table holds pending, now, on this thread (see [`start`]).
    fn capture_pending(&mut self, table: &mut dyn Table, mapping: &Mapping) {
        if !self.config.direction.reads_table() {
            return;
        }
        match self.load_progress(State::LoadIn) {
            Ok(progress) if progress.done => {}
            // A table not loaded yet is loaded by the binding's thread.
            _ => return,
        }
        self.mapping = Some(mapping.clone());
        for _ in 0..PENDING_CAPTURE_ROUNDS_MAX {
            match self.capture(table) {
                Ok(true) => {}
                Ok(false) => return,
                Err(error) => {
                    tracing::warn!(binding = %self.name, %error, "capturing the table's pending changes");
                    return;
                }
            }
        }
    }

    fn disconnected(&self, error: &AdapterError) {
        let mut status = self.status();
        status.state = "disconnected".to_owned();
        status.last_error = Some(error.to_string());
    }

    fn sleep(&self, duration: Duration) {
        let until = std::time::Instant::now() + duration;
        while std::time::Instant::now() < until && !self.stop.load(Ordering::SeqCst) {
            std::thread::sleep(POLL_INTERVAL.min(until - std::time::Instant::now()));
        }
    }

    fn mapping(&self) -> &Mapping {
        self.mapping.as_ref().expect("set once connected")
    }

    /// One round: load, capture, apply, retry. Returns whether there may be more to do now.
    fn round(&mut self, table: &mut dyn Table) -> Result<bool, AdapterError> {
        if self.config.direction.reads_table() {
            let progress = self.load_progress(State::LoadIn)?;
            if !progress.done {
                self.status().state = "loading".to_owned();
                self.prepare_for_load(table, &progress)?;
                return self.load_in_page(table, progress).map(|()| true);
            }
        }
        if self.config.direction.writes_table() {
            let progress = self.load_progress(State::LoadOut)?;
            if !progress.done {
                self.status().state = "loading".to_owned();
                self.prepare_for_load(table, &progress)?;
                return self.load_out_page(table, progress).map(|()| true);
            }
        }
        self.status().state = "running".to_owned();
        let mut busy = false;
        if self.config.direction.reads_table() {
            busy |= self.capture(table)?;
        }
        if self.config.direction.writes_table() {
            busy |= self.apply_log(table)?;
        }
        self.retry(table)?;
        Ok(busy)
    }

    /// A load that begins (first start, or `refill` for a table made again) checks the table
    /// and installs its triggers again: a table dropped and made again lost them.
    fn prepare_for_load(
        &mut self,
        table: &mut dyn Table,
        progress: &LoadProgress,
    ) -> Result<(), AdapterError> {
        if progress.after.is_none() {
            self.mapping = Some(prepare(&self.config, table)?);
        }
        Ok(())
    }

    fn load_progress(&self, load: State<'_>) -> Result<LoadProgress, AdapterError> {
        Ok(match self.node.documents().state(&self.state_name(load))? {
            Some(bytes) => serde_json::from_slice(&bytes)
                .map_err(|error| StoreError::Corrupt(format!("binding load progress: {error}")))?,
            None => LoadProgress::default(),
        })
    }

    /// The record id of a row's key, or why it makes none.
    fn record_id(&self, key: &[String]) -> Result<RecordId, String> {
        let key = Key::new(&record_key(key)).map_err(|error| error.to_string())?;
        Ok(RecordId::new(self.collection.clone(), key))
    }

    fn key_of_row(&self, row: &[TextValue]) -> Vec<String> {
        self.mapping()
            .key
            .iter()
            .map(|&index| row[index].clone().unwrap_or_default())
            .collect()
    }

    /// The record write a row makes.
    fn write_of_row(
        &self,
        row: &[TextValue],
        only: Option<&BTreeSet<String>>,
    ) -> Result<RecordWrite, String> {
        let mapping = self.mapping();
        let mut write = RecordWrite::default();
        for ((column, field), value) in mapping.columns.iter().zip(&mapping.fields).zip(row) {
            if only.is_some_and(|only| !only.contains(&column.name)) {
                continue;
            }
            let json = column
                .kind
                .to_json(value.as_deref())
                .map_err(|error| format!("column {}: {error}", column.name))?;
            write.set.push((field.clone(), json));
        }
        // Its field rules and limits are checked where every write is: `put_record`.
        Ok(write)
    }

    /// Writes rows (or their absence) into records as this binding's source, in one durable
    /// session. Rows that make no record are quarantined.
    fn write_rows(
        &self,
        rows: Vec<CapturedRow>,
        progress: Option<(State<'_>, &LoadProgress)>,
    ) -> Result<u64, AdapterError> {
        let docs = self.node.documents();
        let mut session = docs.session();
        let now = now_ms();
        let mut written = 0u64;
        let mut bad = Vec::new();
        for (key, row, only, at) in rows {
            // When the row changed, by the database's clock, never later than now: a change
            // made while the node was down keeps its place in time.
            let time = at.map_or(now, |at| at.min(now));
            let id = match self.record_id(&key) {
                Ok(id) => id,
                Err(error) => {
                    bad.push((record_key(&key), error));
                    continue;
                }
            };
            let outcome = match row {
                Some(row) => match self.write_of_row(&row, only.as_ref()) {
                    Ok(write) => session.put_record(&id, &self.actor, time, &write),
                    Err(error) => {
                        bad.push((id.key.to_string(), error));
                        continue;
                    }
                },
                None => session
                    .delete_record(&id, &self.actor, time, None)
                    .map(|(_, outcome)| outcome),
            };
            match outcome {
                Ok(outcome) => {
                    if let Some(change) = outcome.change {
                        written += 1;
                        self.own_changes.borrow_mut().remember(change.0);
                    }
                }
                // A row whose record could never be sent (over the change limit) is set aside
                // like any row that makes no record; nothing of it was stored.
                Err(StoreError::Record(error)) => bad.push((id.key.to_string(), error.to_string())),
                Err(error @ (StoreError::ChangeTooLarge { .. } | StoreError::OutsideGrant(_))) => {
                    bad.push((id.key.to_string(), error.to_string()))
                }
                Err(error) => return Err(error.into()),
            }
        }
        if let Some((what, progress)) = progress {
            let bytes = serde_json::to_vec(progress).expect("progress serializes");
            session.put_state(&self.state_name(what), bytes);
        }
        session.commit(Durability::Durable)?;
        for (key, error) in bad {
            self.quarantine(Side::In, &key, &error)?;
        }
        // Durable: the store wakes the engine to ship them.
        if written > 0 {
            self.status().records_written += written;
        }
        Ok(written)
    }

    fn load_in_page(
        &self,
        table: &mut dyn Table,
        mut progress: LoadProgress,
    ) -> Result<(), AdapterError> {
        let rows = table.scan(progress.after.as_deref(), LOAD_PAGE_ROWS)?;
        let count = rows.len();
        if count < LOAD_PAGE_ROWS {
            progress.done = true;
        }
        if let Some(last) = rows.last() {
            progress.after = Some(self.key_of_row(last));
        }
        let keyed: Vec<CapturedRow> = rows
            .into_iter()
            .map(|row| (self.key_of_row(&row), Some(row), None, None))
            .collect();
        self.write_rows(keyed, Some((State::LoadIn, &progress)))?;
        let loaded = {
            let mut status = self.status();
            status.rows_loaded += count as u64;
            status.rows_loaded
        };
        if progress.done || loaded % (LOAD_PAGE_ROWS as u64 * 10) == 0 {
            tracing::info!(binding = %self.name, rows = loaded, done = progress.done, "initial load from the table");
        }
        Ok(())
    }

    fn load_out_page(
        &self,
        table: &mut dyn Table,
        mut progress: LoadProgress,
    ) -> Result<(), AdapterError> {
        let docs = self.node.documents();
        if progress.after.is_none() && progress.marks.is_empty() {
            progress.marks = docs
                .origin_marks()
                .into_iter()
                .map(|(origin, mark)| (origin.0, mark))
                .collect();
            progress.withdrawn = docs.last_withdrawal();
        }
        let after = match progress.after.as_ref().and_then(|after| after.first()) {
            Some(key) => {
                Some(Key::new(key).map_err(|error| StoreError::Corrupt(error.to_string()))?)
            }
            None => None,
        };
        let stored = docs.scan_collection(&self.collection, after.as_ref(), APPLY_BATCH_MAX)?;
        if stored.len() < APPLY_BATCH_MAX {
            progress.done = true;
        }
        let ids: Vec<RecordId> = stored.into_iter().map(|record| record.id).collect();
        if let Some(last) = ids.last() {
            progress.after = Some(vec![last.key.to_string()]);
        }
        self.apply_records(table, &ids)?;
        let mut session = docs.session();
        // From the first page on, the log from where the load began is kept for this binding
        // (it follows the log from there once the load is done).
        session.put_follower_marks(&self.name, &progress.marks);
        if progress.done {
            session.put_state(
                &self.state_name(State::Withdrawn),
                progress.withdrawn.to_be_bytes().to_vec(),
            );
        }
        let bytes = serde_json::to_vec(&progress).expect("progress serializes");
        session.put_state(&self.state_name(State::LoadOut), bytes);
        session.commit(Durability::Deferred)?;
        if progress.done {
            tracing::info!(binding = %self.name, "initial load into the table done");
        }
        Ok(())
    }

    /// Reads captured changes, writes the rows as they are now into records, then forgets
    /// the changes. Returns whether a full batch was read.
    fn capture(&self, table: &mut dyn Table) -> Result<bool, AdapterError> {
        let captured = table.captured(CAPTURE_BATCH_MAX)?;
        if captured.is_empty() {
            return Ok(false);
        }
        // Per key, the union of the columns its updates changed; an insert or delete (no
        // list) means every column.
        let mut changed: std::collections::BTreeMap<Vec<String>, Option<BTreeSet<String>>> =
            std::collections::BTreeMap::new();
        // The latest time of change of each key: the record's change keeps it.
        let mut changed_at: std::collections::BTreeMap<Vec<String>, i64> =
            std::collections::BTreeMap::new();
        let mut order = Vec::new();
        for change in &captured {
            if let Some(at) = change.at_ms {
                let latest = changed_at.entry(change.key.clone()).or_insert(at);
                *latest = (*latest).max(at);
            }
            let columns = change.columns.as_ref().map(|c| c.iter().cloned().collect());
            match changed.get_mut(&change.key) {
                None => {
                    order.push(change.key.clone());
                    changed.insert(change.key.clone(), columns);
                }
                Some(held) => match (held.as_mut(), columns) {
                    (Some(held), Some(columns)) => held.extend(columns),
                    _ => *held = None,
                },
            }
        }
        let now = table.read_many(&order)?;
        let mut rows = Vec::with_capacity(order.len());
        for (key, row) in order.into_iter().zip(now) {
            let only = changed.remove(&key).flatten();
            let at = changed_at.get(&key).copied();
            rows.push((key, row, only, at));
        }
        self.write_rows(rows, None)?;
        let ids: Vec<i64> = captured.iter().map(|change| change.id).collect();
        table.forget(&ids)?;
        self.status().rows_captured += captured.len() as u64;
        Ok(captured.len() == CAPTURE_BATCH_MAX)
    }

    /// Applies the records the log shows changed since the apply cursor. Returns whether
    /// there may be more.
    fn apply_log(&self, table: &mut dyn Table) -> Result<bool, AdapterError> {
        let docs = self.node.documents();
        // Marks kept before the store named followers are read once, and move over.
        let legacy = self.state_name(State::LegacyMarks);
        let mut marks = match docs.follower_marks(&self.name)? {
            Some(marks) => marks,
            None => decode_marks(docs.state(&legacy)?.as_deref()),
        };
        let prefix = format!("{}/", self.collection);
        let mut ids: BTreeSet<RecordId> = BTreeSet::new();
        let mut advanced = false;
        let mut more = false;
        for (origin, held) in docs.origin_marks() {
            let mine = marks
                .iter()
                .find(|(o, _)| *o == origin.0)
                .map_or(0, |(_, m)| *m);
            if held <= mine {
                continue;
            }
            let entries = docs.log_entries(&origin, mine, LOG_ENTRIES_PER_ROUND)?;
            let mut last = mine;
            for (sequence, entry) in entries {
                if sequence > held {
                    break;
                }
                last = sequence;
                // A change this binding made from its own table's row is in the row already.
                if self.own_changes.borrow_mut().take(&entry.hash) {
                    continue;
                }
                if entry.doc_key.starts_with(prefix.as_bytes()) {
                    if let Ok(id) = RecordId::from_doc_key(&entry.doc_key) {
                        ids.insert(id);
                    }
                }
                if ids.len() >= APPLY_BATCH_MAX {
                    more = true;
                    break;
                }
            }
            if last > mine {
                set_mark(&mut marks, origin, last);
                advanced = true;
            }
            if ids.len() >= APPLY_BATCH_MAX {
                more = true;
                break;
            }
        }
        // Records that left this node's read scope are gone from the store with no log entry
        // of their own: the withdrawal feed names them, and their rows go too.
        let withdrawn_name = self.state_name(State::Withdrawn);
        let seen = docs
            .state(&withdrawn_name)?
            .and_then(|bytes| <[u8; 8]>::try_from(bytes.as_slice()).ok())
            .map_or(0, u64::from_be_bytes);
        let mut withdrawn_to = seen;
        if ids.len() < APPLY_BATCH_MAX {
            let withdrawals = docs.withdrawals_after(seen, APPLY_BATCH_MAX - ids.len())?;
            if withdrawals
                .first()
                .is_some_and(|(number, _)| *number > seen + 1)
            {
                tracing::warn!(binding = %self.name, missed_from = seen + 1, "the binding fell behind the store's withdrawal feed: rows of some records that left this node's read scope may stay in the table");
            }
            more |= withdrawals.len() == APPLY_BATCH_MAX - ids.len();
            for (number, doc_key) in withdrawals {
                withdrawn_to = number;
                if doc_key.starts_with(prefix.as_bytes()) {
                    if let Ok(id) = RecordId::from_doc_key(&doc_key) {
                        ids.insert(id);
                    }
                }
            }
        }
        if !ids.is_empty() {
            let ids: Vec<RecordId> = ids.into_iter().collect();
            self.apply_records(table, &ids)?;
        }
        if advanced || withdrawn_to > seen {
            let mut session = docs.session();
            session.put_follower_marks(&self.name, &marks);
            session.remove_state(&legacy);
            session.put_state(&withdrawn_name, withdrawn_to.to_be_bytes().to_vec());
            session.commit(Durability::Deferred)?;
        }
        Ok(more)
    }

    /// The row write a record makes, or why it makes none.
    fn row_of_record(&self, id: &RecordId) -> Result<RowWrite, String> {
        let mapping = self.mapping();
        let key = key_parts(id.key.as_str(), mapping.key.len())?;
        // The record as its conflict policies resolve it, not Automerge's raw winner.
        let fields = self.node.resolved(id)?;
        let Some(fields) = fields else {
            return Ok(RowWrite { key, row: None });
        };
        let mut row = Vec::with_capacity(mapping.columns.len());
        for (index, (column, field)) in mapping.columns.iter().zip(&mapping.fields).enumerate() {
            if let Some(place) = mapping.key.iter().position(|&key_index| key_index == index) {
                row.push(Some(key[place].clone()));
                continue;
            }
            let value = fields.get(field).unwrap_or(&Json::Null);
            row.push(
                column.kind.to_text(value).map_err(|error| {
                    format!("field {field:?} to column {}: {error}", column.name)
                })?,
            );
        }
        Ok(RowWrite {
            key,
            row: Some(row),
        })
    }

    /// Applies records to the table; failures go to the quarantine, rows with a pending
    /// capture to the deferred list.
    fn apply_records(&self, table: &mut dyn Table, ids: &[RecordId]) -> Result<(), AdapterError> {
        let mut writes = Vec::new();
        let mut keys = Vec::new();
        for id in ids {
            match self.row_of_record(id) {
                Ok(write) => {
                    writes.push(write);
                    keys.push(id.key.to_string());
                }
                Err(error) => self.quarantine(Side::Out, id.key.as_str(), &error)?,
            }
        }
        if writes.is_empty() {
            return Ok(());
        }
        let results = table.apply(&writes)?;
        let (mut applied, mut unchanged) = (0u64, 0u64);
        for (key, result) in keys.iter().zip(results) {
            match result {
                Applied::Unchanged => {
                    unchanged += 1;
                    self.clear(Side::Out, key)?;
                }
                Applied::Inserted | Applied::Updated(_) | Applied::Deleted => {
                    applied += 1;
                    self.clear(Side::Out, key)?;
                }
                Applied::Deferred => self.defer(key)?,
                Applied::Failed(error) => self.quarantine(Side::Out, key, &error)?,
            }
        }
        let mut status = self.status();
        status.rows_applied += applied;
        status.rows_unchanged += unchanged;
        Ok(())
    }
}

fn decode_marks(bytes: Option<&[u8]>) -> Vec<([u8; 16], u64)> {
    let Some(bytes) = bytes else {
        return Vec::new();
    };
    let entries: Vec<(String, u64)> = serde_json::from_slice(bytes).unwrap_or_default();
    entries
        .into_iter()
        .filter_map(|(origin, mark)| {
            let origin: NodeId = origin.parse().ok()?;
            Some((origin.0, mark))
        })
        .collect()
}

fn set_mark(marks: &mut Vec<([u8; 16], u64)>, origin: NodeId, mark: u64) {
    match marks.iter_mut().find(|(o, _)| *o == origin.0) {
        Some(entry) => entry.1 = mark,
        None => marks.push((origin.0, mark)),
    }
}
