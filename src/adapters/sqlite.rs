//! The SQLite table: capture by row triggers into `_concord_changes` (SQLite has no
//! notifications across processes, so the binding looks every [`super::POLL_INTERVAL`]),
//! apply in `BEGIN IMMEDIATE` transactions that first mark themselves in `_concord_applying`,
//! which the triggers check; other connections never see that row, since SQLite lets one
//! writer in at a time and readers see only committed data.

use std::path::Path;
use std::time::Duration;

use rusqlite::types::{Value, ValueRef};
use rusqlite::{params_from_iter, Connection, OptionalExtension};

use super::convert::{bytes_to_text, text_to_bytes, ColumnKind, TextValue};
use super::{quote, AdapterError, Applied, Captured, Column, RowWrite, Table, CHANGES_TABLE};

/// How long a statement waits for another writer's lock before failing.
pub const BUSY_TIMEOUT: Duration = Duration::from_secs(5);
/// The table whose row marks a transaction as Concord's own.
pub const APPLYING_TABLE: &str = "_concord_applying";

pub struct SqliteTable {
    connection: Connection,
    table: String,
    columns: Vec<Column>,
    key: Vec<usize>,
}

fn database(context: &str) -> impl Fn(rusqlite::Error) -> AdapterError + '_ {
    move |error| AdapterError::Database(format!("{context}: {error}"))
}

impl SqliteTable {
    /// Opens the database file (created if missing) and finds `table`.
    pub fn open(path: &Path, table: &str) -> Result<Self, AdapterError> {
        let connection = Connection::open(path)
            .map_err(|error| AdapterError::Config(format!("{}: {error}", path.display())))?;
        connection
            .busy_timeout(BUSY_TIMEOUT)
            .map_err(database("busy timeout"))?;
        connection
            .pragma_update(None, "journal_mode", "WAL")
            .map_err(database("journal mode"))?;
        let exists: Option<String> = connection
            .query_row(
                "SELECT name FROM sqlite_master WHERE type = 'table' AND name = ?1",
                [table],
                |row| row.get(0),
            )
            .optional()
            .map_err(database("looking up the table"))?;
        if exists.is_none() {
            return Err(AdapterError::Config(format!(
                "table {table} does not exist in {}",
                path.display()
            )));
        }
        Ok(Self {
            connection,
            table: table.to_owned(),
            columns: Vec::new(),
            key: Vec::new(),
        })
    }

    fn select_list(&self) -> String {
        self.columns
            .iter()
            .map(|column| quote(&column.name))
            .collect::<Vec<_>>()
            .join(", ")
    }

    fn key_condition(&self) -> String {
        self.key
            .iter()
            .map(|&index| format!("{} = ?", quote(&self.columns[index].name)))
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    fn text_of(kind: ColumnKind, value: ValueRef<'_>) -> TextValue {
        match value {
            ValueRef::Null => None,
            ValueRef::Integer(integer) => Some(match kind {
                ColumnKind::Boolean => (integer != 0).to_string(),
                _ => integer.to_string(),
            }),
            ValueRef::Real(real) => Some(real.to_string()),
            ValueRef::Text(text) => Some(String::from_utf8_lossy(text).into_owned()),
            ValueRef::Blob(bytes) => Some(bytes_to_text(bytes)),
        }
    }

    /// The SQLite value to bind for a column value in text form.
    fn value_of(kind: ColumnKind, text: &TextValue) -> Result<Value, String> {
        let Some(text) = text else {
            return Ok(Value::Null);
        };
        Ok(match kind {
            ColumnKind::Integer => Value::Integer(
                text.parse()
                    .map_err(|_| format!("{text:?} is not an integer"))?,
            ),
            ColumnKind::Float => Value::Real(
                text.parse()
                    .map_err(|_| format!("{text:?} is not a number"))?,
            ),
            ColumnKind::Boolean => Value::Integer(i64::from(text == "true")),
            ColumnKind::Bytes => Value::Blob(text_to_bytes(text)?),
            _ => Value::Text(text.clone()),
        })
    }

    fn row_values(&self, row: &rusqlite::Row<'_>) -> rusqlite::Result<Vec<TextValue>> {
        self.columns
            .iter()
            .enumerate()
            .map(|(index, column)| Ok(Self::text_of(column.kind, row.get_ref(index)?)))
            .collect()
    }

    fn key_values(&self, key: &[String]) -> Result<Vec<Value>, String> {
        self.key
            .iter()
            .zip(key)
            .map(|(&index, part)| Self::value_of(self.columns[index].kind, &Some(part.clone())))
            .collect()
    }

    fn apply_one(&self, write: &RowWrite) -> Result<Applied, String> {
        let error = |error: rusqlite::Error| error.to_string();
        let key = self.key_values(&write.key)?;
        let pending: bool = self
            .connection
            .query_row(
                &format!(
                    "SELECT EXISTS (SELECT 1 FROM {} WHERE relation = ?1 AND key = ?2)",
                    quote(CHANGES_TABLE)
                ),
                rusqlite::params![self.table, key_json(&write.key)],
                |row| row.get(0),
            )
            .map_err(error)?;
        if pending {
            return Ok(Applied::Deferred);
        }
        let current = self
            .connection
            .query_row(
                &format!(
                    "SELECT {} FROM {} WHERE {}",
                    self.select_list(),
                    quote(&self.table),
                    self.key_condition()
                ),
                params_from_iter(key.iter()),
                |row| self.row_values(row),
            )
            .optional()
            .map_err(error)?;
        match (&write.row, current) {
            (None, None) => Ok(Applied::Unchanged),
            (None, Some(_)) => {
                self.connection
                    .execute(
                        &format!(
                            "DELETE FROM {} WHERE {}",
                            quote(&self.table),
                            self.key_condition()
                        ),
                        params_from_iter(key.iter()),
                    )
                    .map_err(error)?;
                Ok(Applied::Deleted)
            }
            (Some(values), None) => self.insert(values),
            (Some(values), Some(row)) => self.update(values, &row, key),
        }
    }

    /// Inserts a row for a record the table lacks: only the columns the record fills, the
    /// others take their defaults.
    fn insert(&self, values: &[TextValue]) -> Result<Applied, String> {
        let mut names = Vec::new();
        let mut bound = Vec::new();
        for (column, value) in self.columns.iter().zip(values) {
            if value.is_some() {
                names.push(quote(&column.name));
                bound.push(Self::value_of(column.kind, value)?);
            }
        }
        let sql = if names.is_empty() {
            format!("INSERT INTO {} DEFAULT VALUES", quote(&self.table))
        } else {
            format!(
                "INSERT INTO {} ({}) VALUES ({})",
                quote(&self.table),
                names.join(", "),
                vec!["?"; bound.len()].join(", ")
            )
        };
        self.connection
            .execute(&sql, params_from_iter(bound.iter()))
            .map_err(|error| error.to_string())?;
        Ok(Applied::Inserted)
    }

    /// Updates the columns of the row at `key` whose values differ from the record's.
    fn update(
        &self,
        values: &[TextValue],
        row: &[TextValue],
        key: Vec<Value>,
    ) -> Result<Applied, String> {
        let mut assignments = Vec::new();
        let mut bound = Vec::new();
        for (index, column) in self.columns.iter().enumerate() {
            let before = column.kind.to_json(row[index].as_deref());
            let after = column.kind.to_json(values[index].as_deref());
            if before.is_ok() && before == after {
                continue;
            }
            assignments.push(format!("{} = ?", quote(&column.name)));
            bound.push(Self::value_of(column.kind, &values[index])?);
        }
        if assignments.is_empty() {
            return Ok(Applied::Unchanged);
        }
        let count = assignments.len();
        bound.extend(key);
        self.connection
            .execute(
                &format!(
                    "UPDATE {} SET {} WHERE {}",
                    quote(&self.table),
                    assignments.join(", "),
                    self.key_condition()
                ),
                params_from_iter(bound.iter()),
            )
            .map_err(|error| error.to_string())?;
        Ok(Applied::Updated(count))
    }
}

/// The change table's form of a key: a JSON array of the key columns' text.
fn key_json(key: &[String]) -> String {
    serde_json::Value::from(key.to_vec()).to_string()
}

/// The kind of an SQLite column, by its declared type (SQLite's affinity rules, with the
/// common names for booleans, JSON, times and exact decimals first).
fn kind_of(declared: &str) -> ColumnKind {
    let upper = declared.to_ascii_uppercase();
    let has = |part: &str| upper.contains(part);
    if has("JSON") {
        ColumnKind::Json
    } else if has("BOOL") {
        ColumnKind::Boolean
    } else if has("UUID") {
        ColumnKind::Uuid
    } else if has("TIMESTAMP") || has("DATETIME") {
        ColumnKind::Timestamp
    } else if has("DATE") {
        ColumnKind::Date
    } else if has("TIME") {
        ColumnKind::Time
    } else if has("INT") {
        ColumnKind::Integer
    } else if has("CHAR") || has("CLOB") || has("TEXT") {
        ColumnKind::Text
    } else if has("BLOB") || has("BYTEA") {
        ColumnKind::Bytes
    } else if has("REAL") || has("FLOA") || has("DOUB") {
        ColumnKind::Float
    } else if has("NUMERIC") || has("DECIMAL") {
        ColumnKind::Numeric
    } else {
        ColumnKind::Text
    }
}

impl Table for SqliteTable {
    fn describe(&mut self) -> Result<Vec<super::DescribedColumn>, AdapterError> {
        let mut statement = self
            .connection
            .prepare(&format!("PRAGMA table_info({})", quote(&self.table)))
            .map_err(database("reading the table's columns"))?;
        let columns = statement
            .query_map([], |row| {
                let name: String = row.get(1)?;
                let declared: String = row.get(2)?;
                Ok((name, Ok(kind_of(&declared)), declared))
            })
            .map_err(database("reading the table's columns"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(database("reading the table's columns"))?;
        Ok(columns)
    }

    fn prepare(
        &mut self,
        columns: &[Column],
        key: &[usize],
        capture: bool,
        _write: bool,
    ) -> Result<(), AdapterError> {
        self.columns = columns.to_vec();
        self.key = key.to_vec();
        let changes = quote(CHANGES_TABLE);
        let applying = quote(APPLYING_TABLE);
        let mut sql = format!(
            "CREATE TABLE IF NOT EXISTS {changes} (id INTEGER PRIMARY KEY AUTOINCREMENT, relation TEXT NOT NULL, key TEXT NOT NULL, columns TEXT, changed_at INTEGER);\n\
             CREATE INDEX IF NOT EXISTS {} ON {changes} (relation, key);\n\
             CREATE TABLE IF NOT EXISTS {applying} (marker INTEGER);\n",
            quote(&format!("{CHANGES_TABLE}_relation_key"))
        );
        if capture {
            let key_of = |row: &str| {
                let parts = key
                    .iter()
                    .map(|&index| format!("CAST({row}.{} AS TEXT)", quote(&columns[index].name)))
                    .collect::<Vec<_>>()
                    .join(", ");
                format!("json_array({parts})")
            };
            let table = quote(&self.table);
            let relation = self.table.replace('\'', "''");
            let guard = format!("WHEN NOT EXISTS (SELECT 1 FROM {applying})");
            // The row's time of change, in ms, by the database's clock.
            let now_ms = "CAST((julianday('now') - 2440587.5) * 86400000 AS INTEGER)";
            let insert = |row: &str| {
                format!(
                    "INSERT INTO {changes} (relation, key, changed_at) VALUES ('{relation}', {}, {now_ms});",
                    key_of(row)
                )
            };
            let changed = columns
                .iter()
                .map(|column| {
                    let name = quote(&column.name);
                    format!(
                        "CASE WHEN OLD.{name} IS NOT NEW.{name} THEN '{}' END",
                        column.name.replace('\'', "''")
                    )
                })
                .collect::<Vec<_>>()
                .join(", ");
            for (event, body) in [
                ("INSERT", insert("NEW")),
                (
                    "UPDATE",
                    format!(
                        "INSERT INTO {changes} (relation, key, columns, changed_at) VALUES ('{relation}', {}, json_array({changed}), {now_ms}); \
                         INSERT INTO {changes} (relation, key, changed_at) SELECT '{relation}', {}, {now_ms} WHERE {} IS NOT {};",
                        key_of("NEW"),
                        key_of("OLD"),
                        key_of("OLD"),
                        key_of("NEW")
                    ),
                ),
                ("DELETE", insert("OLD")),
            ] {
                let name = quote(&format!("_concord_{}_{}", self.table, event.to_lowercase()));
                sql.push_str(&format!(
                    "DROP TRIGGER IF EXISTS {name};\n\
                     CREATE TRIGGER {name} AFTER {event} ON {table} {guard} BEGIN {body} END;\n"
                ));
            }
        }
        // A change table made before the time of change was kept gets the column.
        let columns_now: Vec<String> = self
            .connection
            .prepare(&format!(
                "SELECT name FROM pragma_table_info('{CHANGES_TABLE}')"
            ))
            .and_then(|mut statement| {
                statement
                    .query_map([], |row| row.get::<_, String>(0))?
                    .collect::<Result<Vec<_>, _>>()
            })
            .unwrap_or_default();
        if !columns_now.is_empty() && !columns_now.iter().any(|name| name == "changed_at") {
            sql = format!("ALTER TABLE {changes} ADD COLUMN changed_at INTEGER;\n{sql}");
        }
        self.connection.execute_batch(&sql).map_err(|error| {
            AdapterError::Config(format!(
                "cannot install the capture triggers on {}: {error}",
                self.table
            ))
        })
    }

    fn captured(&mut self, limit: usize) -> Result<Vec<Captured>, AdapterError> {
        let mut statement = self
            .connection
            .prepare_cached(&format!(
                "SELECT id, key, columns, changed_at FROM {} WHERE relation = ?1 ORDER BY id LIMIT ?2",
                quote(CHANGES_TABLE)
            ))
            .map_err(database("reading captured changes"))?;
        let rows = statement
            .query_map(rusqlite::params![self.table, limit as i64], |row| {
                Ok((
                    row.get::<_, i64>(0)?,
                    row.get::<_, String>(1)?,
                    row.get::<_, Option<String>>(2)?,
                    row.get::<_, Option<i64>>(3)?,
                ))
            })
            .map_err(database("reading captured changes"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(database("reading captured changes"))?;
        rows.into_iter()
            .map(|(id, key, columns, at_ms)| {
                let parts: Vec<Option<String>> = serde_json::from_str(&key).map_err(|error| {
                    AdapterError::Database(format!("captured key {key:?}: {error}"))
                })?;
                let columns = match columns {
                    Some(columns) => Some(
                        serde_json::from_str::<Vec<Option<String>>>(&columns)
                            .map_err(|error| {
                                AdapterError::Database(format!("captured columns: {error}"))
                            })?
                            .into_iter()
                            .flatten()
                            .collect(),
                    ),
                    None => None,
                };
                Ok(Captured {
                    id,
                    key: parts.into_iter().map(Option::unwrap_or_default).collect(),
                    columns,
                    at_ms,
                })
            })
            .collect()
    }

    fn forget(&mut self, ids: &[i64]) -> Result<(), AdapterError> {
        let transaction = self
            .connection
            .transaction()
            .map_err(database("forgetting captured changes"))?;
        {
            let mut statement = transaction
                .prepare_cached(&format!(
                    "DELETE FROM {} WHERE id = ?1",
                    quote(CHANGES_TABLE)
                ))
                .map_err(database("forgetting captured changes"))?;
            for id in ids {
                statement
                    .execute([id])
                    .map_err(database("forgetting captured changes"))?;
            }
        }
        transaction
            .commit()
            .map_err(database("forgetting captured changes"))
    }

    fn read(&mut self, key: &[String]) -> Result<Option<Vec<TextValue>>, AdapterError> {
        let key = self.key_values(key).map_err(AdapterError::Database)?;
        let sql = format!(
            "SELECT {} FROM {} WHERE {}",
            self.select_list(),
            quote(&self.table),
            self.key_condition()
        );
        let mut statement = self
            .connection
            .prepare_cached(&sql)
            .map_err(database("reading a row"))?;
        statement
            .query_row(params_from_iter(key.iter()), |row| self.row_values(row))
            .optional()
            .map_err(database("reading a row"))
    }

    fn scan(
        &mut self,
        after: Option<&[String]>,
        limit: usize,
    ) -> Result<Vec<Vec<TextValue>>, AdapterError> {
        let order = self
            .key
            .iter()
            .map(|&index| quote(&self.columns[index].name))
            .collect::<Vec<_>>()
            .join(", ");
        let mut bound = match after {
            Some(after) => self.key_values(after).map_err(AdapterError::Database)?,
            None => Vec::new(),
        };
        let filter = if after.is_some() {
            format!(
                "WHERE ({order}) > ({})",
                vec!["?"; self.key.len()].join(", ")
            )
        } else {
            String::new()
        };
        bound.push(Value::Integer(limit as i64));
        let sql = format!(
            "SELECT {} FROM {} {filter} ORDER BY {order} LIMIT ?",
            self.select_list(),
            quote(&self.table)
        );
        let mut statement = self
            .connection
            .prepare(&sql)
            .map_err(database("reading the table"))?;
        let rows = statement
            .query_map(params_from_iter(bound.iter()), |row| self.row_values(row))
            .map_err(database("reading the table"))?
            .collect::<Result<Vec<_>, _>>()
            .map_err(database("reading the table"));
        rows
    }

    fn apply(&mut self, writes: &[RowWrite]) -> Result<Vec<Applied>, AdapterError> {
        self.connection
            .execute_batch(&format!(
                "BEGIN IMMEDIATE; INSERT INTO {} VALUES (1);",
                quote(APPLYING_TABLE)
            ))
            .map_err(database("starting a transaction"))?;
        let mut results = Vec::with_capacity(writes.len());
        // Per-row savepoints through cached statements: `execute_batch` would parse the SQL
        // again for every row, a measurable share of a large apply.
        let savepoint = |connection: &Connection, sql: &str| {
            connection
                .prepare_cached(sql)
                .and_then(|mut statement| statement.execute([]))
                .map(|_| ())
                .map_err(database("savepoint"))
        };
        for write in writes {
            savepoint(&self.connection, "SAVEPOINT concord_row")?;
            match self.apply_one(write) {
                Ok(applied) => {
                    savepoint(&self.connection, "RELEASE concord_row")?;
                    results.push(applied);
                }
                Err(error) => {
                    savepoint(&self.connection, "ROLLBACK TO concord_row")?;
                    savepoint(&self.connection, "RELEASE concord_row")?;
                    results.push(Applied::Failed(error));
                }
            }
        }
        let finish = format!("DELETE FROM {}; COMMIT;", quote(APPLYING_TABLE));
        if let Err(error) = self.connection.execute_batch(&finish) {
            let _ = self.connection.execute_batch("ROLLBACK");
            return Err(AdapterError::Database(format!(
                "committing applied rows: {error}"
            )));
        }
        Ok(results)
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), AdapterError> {
        std::thread::sleep(timeout.min(super::POLL_INTERVAL));
        Ok(())
    }
}
