//! Adapters: each binding maps one external table to one collection, in a direction (`in`,
//! `out` or `both`), with field mapping, type conversion, durable cursors and suppression of
//! its own echoes.
//!
//! What it owns: the [`Table`] seam that each database implements ([`postgres`], [`sqlite`]),
//! the one mapping between column text and field JSON ([`convert`]), and the loop that runs
//! each binding on its own thread ([`driver`]).
//!
//! How changes are captured. Both databases capture with row triggers into a change table
//! (`_concord_changes`) that holds only *which key* changed; the adapter then reads the row as
//! it is now. For PostgreSQL this was chosen over logical replication (pgoutput) because it
//! needs no `wal_level = logical`, no replication slot that holds WAL forever when a node is
//! down, and no superuser or REPLICATION role: owning the table is enough, and a
//! `LISTEN/NOTIFY` wakes the adapter within milliseconds of a commit. Because the queue
//! holds keys, not row images, re-reading it is idempotent, which is what makes the cursor
//! safe:
//!
//! - Capture cursor: a change row is deleted from `_concord_changes` only after the record
//!   write it caused is durable in the store. A crash in between reads the row again, finds
//!   the record already equal, and writes nothing: no change is missed or repeated.
//!   Transactions that commit out of key order are no problem, since nothing is skipped by id.
//! - Apply cursor: per origin node, the log sequence up to which this binding has applied
//!   records to the table, saved in the store after each applied batch. Applying a record
//!   compares it with the row and writes only the columns whose value differs, so a replay
//!   after a crash writes nothing. Changes the binding itself made from its table's rows are
//!   skipped (remembered by hash, bounded): the row holds them already.
//! - Echo suppression: the adapter's own writes to its table set a flag inside their
//!   transaction (`SET LOCAL concord.applying` in PostgreSQL, a row in `_concord_applying` in
//!   SQLite) that the triggers check, so they are never captured back; and a captured row
//!   equal to its record writes no change. A row with a change captured but not yet read is
//!   not overwritten (its capture goes first, then the merged record is applied).
//! - Bad rows (a constraint violation, a value that does not fit its column, a key that makes
//!   no record id) are quarantined with their error, retried with backoff, and never hold up
//!   the other rows. A database that goes away is reconnected with backoff and caught up.

pub mod convert;
pub mod driver;
pub mod host;
pub mod postgres;
pub mod sqlite;

use std::time::Duration;

pub use convert::{ColumnKind, TextValue};
pub use driver::{BindingStatus, QuarantinedRow};
pub use host::Host;

/// Captured changes read per round; the rest follow in the next.
pub const CAPTURE_BATCH_MAX: usize = 1000;
/// Records applied to a table per transaction.
pub const APPLY_BATCH_MAX: usize = 500;
/// Rows read per page of an initial load.
pub const LOAD_PAGE_ROWS: usize = 1000;
/// How long a binding waits for a change notice before looking again.
pub const POLL_INTERVAL: Duration = Duration::from_millis(20);
/// How long connecting to a database may take.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// The change table both adapters capture into.
pub const CHANGES_TABLE: &str = "_concord_changes";
/// The PostgreSQL notification channel that wakes the adapters.
pub const NOTIFY_CHANNEL: &str = "concord_capture";

/// One column the binding maps.
#[derive(Debug, Clone, PartialEq)]
pub struct Column {
    pub name: String,
    pub kind: ColumnKind,
    /// The database's own type name (PostgreSQL: `format_type`, SQLite: the declared type).
    pub sql_type: String,
}

/// A changed key taken from the change table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Captured {
    pub id: i64,
    /// The key columns' values in text form.
    pub key: Vec<String>,
    /// For an update, the columns whose value it changed; `None` for an insert or delete
    /// (every column). Only these are written into the record, so a column the table has not
    /// caught up on yet never overwrites a newer value merged from another site.
    pub columns: Option<Vec<String>>,
    /// When the row changed, ms since the Unix epoch, by the database's clock: the change
    /// made of it keeps that time (an edit made while the node was down keeps its place in
    /// time). `None` for a change row written before the time was kept.
    pub at_ms: Option<i64>,
}

/// A record to write to the table: `row` is `None` to delete, else one value per mapped
/// column in the binding's column order (key columns included).
#[derive(Debug, Clone, PartialEq)]
pub struct RowWrite {
    pub key: Vec<String>,
    pub row: Option<Vec<TextValue>>,
}

/// What became of one [`RowWrite`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Applied {
    /// The row already held these values: nothing written.
    Unchanged,
    Inserted,
    /// Updated, writing this many columns (only those whose value differed).
    Updated(usize),
    Deleted,
    /// The row has a captured change not read yet: left alone, tried again after capture.
    Deferred,
    /// Refused by the database or the mapping; the other rows went on.
    Failed(String),
}

#[derive(Debug, thiserror::Error)]
pub enum AdapterError {
    /// Wrong for this table whatever happens (missing table or column, unmappable type, no
    /// privilege): the binding cannot run until the config or the table changes.
    #[error("{0}")]
    Config(String),
    /// The database is unreachable or failed: retried with backoff.
    #[error("{0}")]
    Database(String),
    #[error(transparent)]
    Store(#[from] crate::store::StoreError),
}

/// A table column as the database describes it: name, kind (or the unmappable type's name),
/// and the database's own type name.
pub type DescribedColumn = (String, Result<ColumnKind, String>, String);

/// What each database offers a binding. Blocking: each binding runs on its own thread.
pub trait Table: Send {
    /// Every column of the table: its name and kind, or `Err(type name)` when unmappable.
    fn describe(&mut self) -> Result<Vec<DescribedColumn>, AdapterError>;

    /// Fixes the columns the binding maps (`key` indexes into them) and, for a binding that
    /// reads the table, installs the capture triggers. Checks the privileges it needs.
    fn prepare(
        &mut self,
        columns: &[Column],
        key: &[usize],
        capture: bool,
        write: bool,
    ) -> Result<(), AdapterError>;

    /// Up to `limit` captured changes, oldest first.
    fn captured(&mut self, limit: usize) -> Result<Vec<Captured>, AdapterError>;

    /// Removes captured changes once what they caused is durable.
    fn forget(&mut self, ids: &[i64]) -> Result<(), AdapterError>;

    /// The row with this key as it is now, one value per mapped column; `None` if absent.
    fn read(&mut self, key: &[String]) -> Result<Option<Vec<TextValue>>, AdapterError>;

    /// The rows with these keys as they are now, in the order of `keys`. A database reached
    /// over a network answers in one round trip; the default reads them one by one.
    fn read_many(
        &mut self,
        keys: &[Vec<String>],
    ) -> Result<Vec<Option<Vec<TextValue>>>, AdapterError> {
        keys.iter().map(|key| self.read(key)).collect()
    }

    /// Up to `limit` rows in key order after the key `after`.
    fn scan(
        &mut self,
        after: Option<&[String]>,
        limit: usize,
    ) -> Result<Vec<Vec<TextValue>>, AdapterError>;

    /// Writes rows in one transaction, each alone (a failed row is rolled back to its own
    /// savepoint), only the columns whose value differs; never captured back.
    fn apply(&mut self, writes: &[RowWrite]) -> Result<Vec<Applied>, AdapterError>;

    /// Returns when a change may have been captured, or after `timeout`.
    fn wait(&mut self, timeout: Duration) -> Result<(), AdapterError>;
}

/// The record key of a row: the key columns' text, joined by `,` with `%`, `,` and a `/` at
/// either end escaped, so it is a valid key and splits back exactly.
pub fn record_key(parts: &[String]) -> String {
    let mut key = String::new();
    for (index, part) in parts.iter().enumerate() {
        if index > 0 {
            key.push(',');
        }
        for (position, character) in part.char_indices() {
            let at_edge = (index == 0 && position == 0)
                || (index + 1 == parts.len() && position + character.len_utf8() == part.len());
            match character {
                '%' => key.push_str("%25"),
                ',' => key.push_str("%2C"),
                '/' if at_edge => key.push_str("%2F"),
                other => key.push(other),
            }
        }
    }
    key
}

/// The key columns' text of a record key made by [`record_key`].
pub fn key_parts(key: &str, columns: usize) -> Result<Vec<String>, String> {
    let parts: Vec<String> = key
        .split(',')
        .map(|part| {
            part.replace("%2C", ",")
                .replace("%2F", "/")
                .replace("%25", "%")
        })
        .collect();
    if parts.len() == columns {
        Ok(parts)
    } else {
        Err(format!(
            "record key {key:?} has {} parts; the table's key has {columns} columns",
            parts.len()
        ))
    }
}

/// Quotes an SQL identifier (both databases use double quotes).
pub fn quote(identifier: &str) -> String {
    format!("\"{}\"", identifier.replace('"', "\"\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_keys_split_back_exactly() {
        let cases: [&[&str]; 5] = [
            &["42"],
            &["a,b", "c%d"],
            &["/lead", "trail/"],
            &["x", "", "y"],
            &["%2C"],
        ];
        for parts in cases {
            let parts: Vec<String> = parts.iter().map(|part| part.to_string()).collect();
            let key = record_key(&parts);
            assert!(!key.starts_with('/') && !key.ends_with('/'), "{key}");
            assert_eq!(key_parts(&key, parts.len()).unwrap(), parts, "{key}");
        }
        assert!(key_parts("1,2", 1).is_err());
    }
}
