//! The PostgreSQL table: capture by row triggers into `_concord_changes` with `LISTEN/NOTIFY`
//! (the module doc of [`crate::adapters`] says why not logical replication), apply by
//! upserts that write only changed columns, all values passed as text and cast by the server
//! (`$1::text::numeric(10,2)`), so no value goes through a float on the way.

use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::{Client, NoTls};

use super::convert::{ColumnKind, TextValue};
use super::{
    quote, AdapterError, Applied, Captured, Column, RowWrite, Table, CHANGES_TABLE, NOTIFY_CHANNEL,
};

pub struct PostgresTable {
    client: Client,
    /// `"schema"."table"`.
    qualified: String,
    /// `schema.table`, as the trigger names it in the change table.
    relation: String,
    schema: String,
    columns: Vec<Column>,
    key: Vec<usize>,
}

fn database(context: &str) -> impl Fn(postgres::Error) -> AdapterError + '_ {
    move |error| {
        let detail = error
            .as_db_error()
            .map(|db| db.message().to_owned())
            .unwrap_or_else(|| error.to_string());
        AdapterError::Database(format!("{context}: {detail}"))
    }
}

impl PostgresTable {
    /// Connects to `url` and finds `table` (`schema.table` or `table` in `public`).
    pub fn connect(url: &str, table: &str) -> Result<Self, AdapterError> {
        let mut config: postgres::Config = url
            .parse()
            .map_err(|error| AdapterError::Config(format!("url {url:?}: {error}")))?;
        config.connect_timeout(super::CONNECT_TIMEOUT);
        config.application_name("concord");
        let mut client = config
            .connect(NoTls)
            .map_err(database("cannot connect to PostgreSQL"))?;
        client
            .batch_execute("SET TimeZone = 'UTC'; SET DateStyle = 'ISO'; SET bytea_output = 'hex'")
            .map_err(database("session settings"))?;
        let (schema, name) = match table.split_once('.') {
            Some((schema, name)) => (schema.to_owned(), name.to_owned()),
            None => ("public".to_owned(), table.to_owned()),
        };
        let qualified = format!("{}.{}", quote(&schema), quote(&name));
        let found: Option<String> = client
            .query_one("SELECT to_regclass($1)::text", &[&qualified])
            .map_err(database("looking up the table"))?
            .get(0);
        if found.is_none() {
            return Err(AdapterError::Config(format!(
                "table {schema}.{name} does not exist"
            )));
        }
        Ok(Self {
            client,
            qualified,
            relation: format!("{schema}.{name}"),
            schema,
            columns: Vec::new(),
            key: Vec::new(),
        })
    }

    /// The expression that reads a column (of the table named `prefix`, if any) as its text
    /// form.
    fn read_expression(column: &Column, prefix: &str) -> String {
        let name = format!("{prefix}{}", quote(&column.name));
        match column.kind {
            ColumnKind::TimestampTz
            | ColumnKind::Timestamp
            | ColumnKind::Date
            | ColumnKind::Time => {
                format!("to_json({name}) #>> '{{}}'")
            }
            _ => format!("{name}::text"),
        }
    }

    fn select_list(&self) -> String {
        self.columns
            .iter()
            .map(|column| Self::read_expression(column, ""))
            .collect::<Vec<_>>()
            .join(", ")
    }

    /// `"k1" = $1::text::type AND ...`, numbering parameters from `first`.
    fn key_condition(&self, first: usize) -> String {
        self.key
            .iter()
            .enumerate()
            .map(|(offset, &index)| {
                let column = &self.columns[index];
                format!(
                    "{} = ${}::text::{}",
                    quote(&column.name),
                    first + offset,
                    column.sql_type
                )
            })
            .collect::<Vec<_>>()
            .join(" AND ")
    }

    fn install_capture(&mut self) -> Result<(), AdapterError> {
        let schema = quote(&self.schema);
        let key_arguments = self
            .key
            .iter()
            .map(|&index| format!("'{}'", self.columns[index].name.replace('\'', "''")))
            .collect::<Vec<_>>()
            .join(", ");
        // The bound table is locked first, so a user's transaction that already wrote it (and
        // whose trigger will write the change table) finishes before anything here takes a
        // lock it needs: installing again on a reconnect never deadlocks with live writes.
        let sql = format!(
            r#"
LOCK TABLE {table} IN SHARE ROW EXCLUSIVE MODE;
CREATE TABLE IF NOT EXISTS {schema}.{changes} (
    id bigserial PRIMARY KEY,
    relation text NOT NULL,
    key text[] NOT NULL,
    columns text[]
);
ALTER TABLE {schema}.{changes} ADD COLUMN IF NOT EXISTS columns text[];
ALTER TABLE {schema}.{changes} ADD COLUMN IF NOT EXISTS changed_at timestamptz DEFAULT clock_timestamp();
CREATE INDEX IF NOT EXISTS {changes_index} ON {schema}.{changes} (relation, key);
CREATE OR REPLACE FUNCTION {schema}._concord_capture() RETURNS trigger LANGUAGE plpgsql AS $concord$
DECLARE
    new_key text[];
    old_key text[];
    changed text[];
    relation text := TG_TABLE_SCHEMA || '.' || TG_TABLE_NAME;
BEGIN
    IF current_setting('concord.applying', true) = 'on' THEN
        RETURN NULL;
    END IF;
    IF TG_OP <> 'DELETE' THEN
        new_key := '{{}}';
        FOR i IN 0 .. TG_NARGS - 1 LOOP
            new_key := new_key || (to_jsonb(NEW) ->> TG_ARGV[i]);
        END LOOP;
        IF TG_OP = 'UPDATE' THEN
            SELECT coalesce(array_agg(n.key), '{{}}') INTO changed FROM jsonb_each(to_jsonb(NEW)) n
                WHERE n.value IS DISTINCT FROM (to_jsonb(OLD) -> n.key);
        END IF;
        EXECUTE format('INSERT INTO %I.{changes_plain} (relation, key, columns) VALUES ($1, $2, $3)', TG_TABLE_SCHEMA)
            USING relation, new_key, changed;
    END IF;
    IF TG_OP <> 'INSERT' THEN
        old_key := '{{}}';
        FOR i IN 0 .. TG_NARGS - 1 LOOP
            old_key := old_key || (to_jsonb(OLD) ->> TG_ARGV[i]);
        END LOOP;
        IF new_key IS NULL OR new_key IS DISTINCT FROM old_key THEN
            EXECUTE format('INSERT INTO %I.{changes_plain} (relation, key) VALUES ($1, $2)', TG_TABLE_SCHEMA)
                USING relation, old_key;
        END IF;
    END IF;
    PERFORM pg_notify('{channel}', relation);
    RETURN NULL;
END
$concord$;
CREATE OR REPLACE TRIGGER _concord_capture
    AFTER INSERT OR UPDATE OR DELETE ON {table}
    FOR EACH ROW EXECUTE FUNCTION {schema}._concord_capture({key_arguments});
"#,
            changes = quote(CHANGES_TABLE),
            changes_plain = CHANGES_TABLE,
            changes_index = quote(&format!("{CHANGES_TABLE}_relation_key")),
            channel = NOTIFY_CHANNEL,
            table = self.qualified,
        );
        let relation = self.relation.clone();
        let failed = move |error: postgres::Error| {
            let detail = error
                .as_db_error()
                .map(|db| db.message().to_owned())
                .unwrap_or_else(|| error.to_string());
            AdapterError::Config(format!(
                "cannot install the capture trigger on {relation}: {detail}"
            ))
        };
        let mut transaction = self.client.transaction().map_err(&failed)?;
        transaction.batch_execute(&sql).map_err(&failed)?;
        transaction.commit().map_err(&failed)?;
        self.client
            .batch_execute(&format!("LISTEN {NOTIFY_CHANNEL}"))
            .map_err(database("LISTEN"))?;
        Ok(())
    }

    fn has_privilege(&mut self, privilege: &str) -> Result<bool, AdapterError> {
        self.client
            .query_one(
                "SELECT has_table_privilege($1::text::regclass, $2)",
                &[&self.qualified, &privilege],
            )
            .map(|row| row.get(0))
            .map_err(database("checking privileges"))
    }

    fn row_values(&self, row: &postgres::Row) -> Vec<TextValue> {
        (0..self.columns.len())
            .map(|index| row.get::<_, Option<String>>(index))
            .collect()
    }

    fn apply_one(
        transaction: &mut postgres::Transaction<'_>,
        this: &TableSql,
        write: &RowWrite,
    ) -> Result<Applied, String> {
        let mut parameters: Vec<&(dyn postgres::types::ToSql + Sync)> = Vec::new();
        for part in &write.key {
            parameters.push(part);
        }
        // The row is locked first: a user's edit that committed before it has its capture
        // row visible now, and one that comes after waits for this transaction.
        let current = transaction
            .query_opt(&this.select_for_update, &parameters)
            .map_err(|error| db_message(&error))?;
        let relation_key: Vec<String> = write.key.clone();
        let pending = transaction
            .query_opt(&this.pending, &[&this.relation, &relation_key])
            .map_err(|error| db_message(&error))?
            .is_some();
        if pending {
            return Ok(Applied::Deferred);
        }
        match (&write.row, current) {
            (None, None) => Ok(Applied::Unchanged),
            (None, Some(_)) => {
                transaction
                    .execute(&this.delete, &parameters)
                    .map_err(|error| db_message(&error))?;
                Ok(Applied::Deleted)
            }
            (Some(values), None) => {
                // Only the columns the record fills: the others take their defaults.
                let mut names = Vec::new();
                let mut marks = Vec::new();
                let mut parameters: Vec<&(dyn postgres::types::ToSql + Sync)> = Vec::new();
                for (column, value) in this.columns.iter().zip(values) {
                    if value.is_none() {
                        continue;
                    }
                    names.push(quote(&column.name));
                    parameters.push(value);
                    marks.push(format!("${}::text::{}", parameters.len(), column.sql_type));
                }
                let sql = if names.is_empty() {
                    format!("INSERT INTO {} DEFAULT VALUES", this.qualified)
                } else {
                    format!(
                        "INSERT INTO {} ({}) VALUES ({})",
                        this.qualified,
                        names.join(", "),
                        marks.join(", ")
                    )
                };
                transaction
                    .execute(&sql, &parameters)
                    .map_err(|error| db_message(&error))?;
                Ok(Applied::Inserted)
            }
            (Some(values), Some(row)) => {
                let mut assignments = Vec::new();
                let mut changed: Vec<&TextValue> = Vec::new();
                for (index, column) in this.columns.iter().enumerate() {
                    let now: Option<String> = row.get(index);
                    let before = column.kind.to_json(now.as_deref());
                    let after = column.kind.to_json(values[index].as_deref());
                    if before.is_ok() && before == after {
                        continue;
                    }
                    changed.push(&values[index]);
                    assignments.push(format!(
                        "{} = ${}::text::{}",
                        quote(&column.name),
                        this.key_count + changed.len(),
                        column.sql_type
                    ));
                }
                if changed.is_empty() {
                    return Ok(Applied::Unchanged);
                }
                let sql = format!(
                    "UPDATE {} SET {} WHERE {}",
                    this.qualified,
                    assignments.join(", "),
                    this.key_condition
                );
                let mut all = parameters.clone();
                all.extend(
                    changed
                        .iter()
                        .map(|value| *value as &(dyn postgres::types::ToSql + Sync)),
                );
                transaction
                    .execute(&sql, &all)
                    .map_err(|error| db_message(&error))?;
                Ok(Applied::Updated(changed.len()))
            }
        }
    }
}

fn db_message(error: &postgres::Error) -> String {
    error
        .as_db_error()
        .map(|db| match db.detail() {
            Some(detail) => format!("{} ({detail})", db.message()),
            None => db.message().to_owned(),
        })
        .unwrap_or_else(|| error.to_string())
}

/// The statements of one table, built once in `prepare`.
struct TableSql {
    qualified: String,
    relation: String,
    columns: Vec<Column>,
    key_count: usize,
    key_condition: String,
    select_for_update: String,
    pending: String,
    delete: String,
}

impl PostgresTable {
    fn statements(&self) -> TableSql {
        let key_condition = self.key_condition(1);
        TableSql {
            qualified: self.qualified.clone(),
            relation: self.relation.clone(),
            columns: self.columns.clone(),
            key_count: self.key.len(),
            select_for_update: format!(
                "SELECT {} FROM {} WHERE {key_condition} FOR UPDATE",
                self.select_list(),
                self.qualified
            ),
            pending: format!(
                "SELECT 1 FROM {}.{} WHERE relation = $1 AND key = $2 LIMIT 1",
                quote(&self.schema),
                quote(CHANGES_TABLE)
            ),
            delete: format!("DELETE FROM {} WHERE {key_condition}", self.qualified),
            key_condition,
        }
    }
}

/// The kind of a PostgreSQL type, by `pg_type.typname`.
fn kind_of(type_name: &str) -> Option<ColumnKind> {
    Some(match type_name {
        "text" | "varchar" | "bpchar" | "name" | "citext" => ColumnKind::Text,
        "int2" | "int4" | "int8" => ColumnKind::Integer,
        "float4" | "float8" => ColumnKind::Float,
        "numeric" => ColumnKind::Numeric,
        "bool" => ColumnKind::Boolean,
        "timestamptz" => ColumnKind::TimestampTz,
        "timestamp" => ColumnKind::Timestamp,
        "date" => ColumnKind::Date,
        "time" | "timetz" => ColumnKind::Time,
        "uuid" => ColumnKind::Uuid,
        "json" | "jsonb" => ColumnKind::Json,
        "bytea" => ColumnKind::Bytes,
        _ => return None,
    })
}

impl Table for PostgresTable {
    fn describe(&mut self) -> Result<Vec<super::DescribedColumn>, AdapterError> {
        let rows = self
            .client
            .query(
                "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), t.typname::text \
                 FROM pg_attribute a JOIN pg_type t ON t.oid = a.atttypid \
                 WHERE a.attrelid = $1::text::regclass AND a.attnum > 0 AND NOT a.attisdropped \
                 ORDER BY a.attnum",
                &[&self.qualified],
            )
            .map_err(database("reading the table's columns"))?;
        Ok(rows
            .iter()
            .map(|row| {
                let name: String = row.get(0);
                let formatted: String = row.get(1);
                let type_name: String = row.get(2);
                let kind = kind_of(&type_name).ok_or_else(|| formatted.clone());
                (name, kind, formatted)
            })
            .collect())
    }

    fn prepare(
        &mut self,
        columns: &[Column],
        key: &[usize],
        capture: bool,
        write: bool,
    ) -> Result<(), AdapterError> {
        self.columns = columns.to_vec();
        self.key = key.to_vec();
        let mut needed = vec!["SELECT"];
        if write {
            needed.extend(["INSERT", "UPDATE", "DELETE"]);
        }
        for privilege in needed {
            if !self.has_privilege(privilege)? {
                return Err(AdapterError::Config(format!(
                    "no {privilege} privilege on {}",
                    self.relation
                )));
            }
        }
        if capture {
            self.install_capture()?;
        } else {
            // A table written only by Concord still needs the change table for the pending
            // check; without capture it stays empty.
            let sql = format!(
                "CREATE TABLE IF NOT EXISTS {}.{} (id bigserial PRIMARY KEY, relation text NOT NULL, key text[] NOT NULL)",
                quote(&self.schema),
                quote(CHANGES_TABLE)
            );
            self.client
                .batch_execute(&sql)
                .map_err(database("creating the change table"))?;
        }
        Ok(())
    }

    fn captured(&mut self, limit: usize) -> Result<Vec<Captured>, AdapterError> {
        let sql = format!(
            "SELECT id, key, columns, (extract(epoch FROM changed_at) * 1000)::bigint \
             FROM {}.{} WHERE relation = $1 ORDER BY id LIMIT $2",
            quote(&self.schema),
            quote(CHANGES_TABLE)
        );
        let rows = self
            .client
            .query(&sql, &[&self.relation, &(limit as i64)])
            .map_err(database("reading captured changes"))?;
        Ok(rows
            .iter()
            .map(|row| Captured {
                id: row.get(0),
                key: row
                    .get::<_, Vec<Option<String>>>(1)
                    .into_iter()
                    .map(Option::unwrap_or_default)
                    .collect(),
                columns: row
                    .get::<_, Option<Vec<Option<String>>>>(2)
                    .map(|columns| columns.into_iter().flatten().collect()),
                at_ms: row.get::<_, Option<i64>>(3),
            })
            .collect())
    }

    fn forget(&mut self, ids: &[i64]) -> Result<(), AdapterError> {
        if ids.is_empty() {
            return Ok(());
        }
        let sql = format!(
            "DELETE FROM {}.{} WHERE id = ANY($1)",
            quote(&self.schema),
            quote(CHANGES_TABLE)
        );
        // This commit need not wait for the WAL flush: a delete lost in a crash brings its
        // change rows back, and reading them again writes nothing (the records already hold
        // those rows), while waiting would put a flush on every capture round.
        let mut transaction = self
            .client
            .transaction()
            .map_err(database("forgetting captured changes"))?;
        transaction
            .batch_execute("SET LOCAL synchronous_commit = off")
            .map_err(database("forgetting captured changes"))?;
        transaction
            .execute(&sql, &[&ids])
            .map_err(database("forgetting captured changes"))?;
        transaction
            .commit()
            .map_err(database("forgetting captured changes"))?;
        Ok(())
    }

    fn read(&mut self, key: &[String]) -> Result<Option<Vec<TextValue>>, AdapterError> {
        let sql = format!(
            "SELECT {} FROM {} WHERE {}",
            self.select_list(),
            self.qualified,
            self.key_condition(1)
        );
        let parameters: Vec<&(dyn postgres::types::ToSql + Sync)> = key
            .iter()
            .map(|part| part as &(dyn postgres::types::ToSql + Sync))
            .collect();
        let statement = self
            .client
            .prepare(&sql)
            .map_err(database("reading a row"))?;
        let row = self
            .client
            .query_opt(&statement, &parameters)
            .map_err(|error| {
                AdapterError::Database(format!("reading a row: {}", db_message(&error)))
            })?;
        Ok(row.map(|row| self.row_values(&row)))
    }

    fn read_many(
        &mut self,
        keys: &[Vec<String>],
    ) -> Result<Vec<Option<Vec<TextValue>>>, AdapterError> {
        if keys.is_empty() {
            return Ok(Vec::new());
        }
        // The keys go in as one text array per key column, joined to the table through its
        // key columns' own types, so the primary key's index does the lookups.
        let key_names: Vec<String> = (0..self.key.len())
            .map(|offset| format!("_concord_k{offset}"))
            .collect();
        let join = self
            .key
            .iter()
            .zip(&key_names)
            .map(|(&index, name)| {
                let column = &self.columns[index];
                format!("t.{} = k.{name}::{}", quote(&column.name), column.sql_type)
            })
            .collect::<Vec<_>>()
            .join(" AND ");
        let arrays = (1..=self.key.len())
            .map(|number| format!("${number}::text[]"))
            .collect::<Vec<_>>()
            .join(", ");
        let select_list = self
            .columns
            .iter()
            .map(|column| Self::read_expression(column, "t."))
            .collect::<Vec<_>>()
            .join(", ");
        let sql = format!(
            "SELECT k._concord_place, {select_list} FROM unnest({arrays}) WITH ORDINALITY \
             AS k({}, _concord_place) JOIN {} AS t ON {join}",
            key_names.join(", "),
            self.qualified
        );
        let columns: Vec<Vec<String>> = (0..self.key.len())
            .map(|offset| keys.iter().map(|key| key[offset].clone()).collect())
            .collect();
        let parameters: Vec<&(dyn postgres::types::ToSql + Sync)> = columns
            .iter()
            .map(|column| column as &(dyn postgres::types::ToSql + Sync))
            .collect();
        let rows = self.client.query(&sql, &parameters).map_err(|error| {
            AdapterError::Database(format!("reading rows: {}", db_message(&error)))
        })?;
        let mut found: Vec<Option<Vec<TextValue>>> = vec![None; keys.len()];
        for row in rows {
            let place: i64 = row.get(0);
            let values = (1..=self.columns.len())
                .map(|index| row.get::<_, Option<String>>(index))
                .collect();
            if let Some(slot) = usize::try_from(place - 1)
                .ok()
                .and_then(|index| found.get_mut(index))
            {
                *slot = Some(values);
            }
        }
        Ok(found)
    }

    fn scan(
        &mut self,
        after: Option<&[String]>,
        limit: usize,
    ) -> Result<Vec<Vec<TextValue>>, AdapterError> {
        let key_columns: Vec<&Column> =
            self.key.iter().map(|&index| &self.columns[index]).collect();
        let order = key_columns
            .iter()
            .map(|column| quote(&column.name))
            .collect::<Vec<_>>()
            .join(", ");
        let mut parameters: Vec<&(dyn postgres::types::ToSql + Sync)> = Vec::new();
        let limit = limit as i64;
        let filter = match after {
            Some(after) => {
                let values = key_columns
                    .iter()
                    .enumerate()
                    .map(|(index, column)| format!("${}::text::{}", index + 1, column.sql_type))
                    .collect::<Vec<_>>()
                    .join(", ");
                for part in after {
                    parameters.push(part);
                }
                format!("WHERE ({order}) > ({values})")
            }
            None => String::new(),
        };
        parameters.push(&limit);
        let sql = format!(
            "SELECT {} FROM {} {filter} ORDER BY {order} LIMIT ${}",
            self.select_list(),
            self.qualified,
            parameters.len()
        );
        let rows = self
            .client
            .query(&sql, &parameters)
            .map_err(database("reading the table"))?;
        Ok(rows.iter().map(|row| self.row_values(row)).collect())
    }

    fn apply(&mut self, writes: &[RowWrite]) -> Result<Vec<Applied>, AdapterError> {
        let statements = self.statements();
        let mut transaction = self
            .client
            .transaction()
            .map_err(database("starting a transaction"))?;
        transaction
            .batch_execute("SELECT set_config('concord.applying', 'on', true)")
            .map_err(database("marking the transaction as Concord's"))?;
        let mut results = Vec::with_capacity(writes.len());
        for write in writes {
            let mut savepoint = transaction
                .savepoint("concord_row")
                .map_err(database("savepoint"))?;
            match Self::apply_one(&mut savepoint, &statements, write) {
                Ok(applied) => {
                    savepoint.commit().map_err(database("savepoint"))?;
                    results.push(applied);
                }
                Err(error) => {
                    savepoint.rollback().map_err(database("savepoint"))?;
                    results.push(Applied::Failed(error));
                }
            }
        }
        transaction
            .commit()
            .map_err(database("committing applied rows"))?;
        Ok(results)
    }

    fn wait(&mut self, timeout: Duration) -> Result<(), AdapterError> {
        let mut notifications = self.client.notifications();
        // One notice is enough to look; the rest are drained so they do not pile up.
        let noticed = notifications
            .timeout_iter(timeout)
            .next()
            .map_err(database("waiting for notifications"))?
            .is_some();
        if noticed {
            let mut ready = notifications.iter();
            while ready
                .next()
                .map_err(database("reading notifications"))?
                .is_some()
            {}
        }
        Ok(())
    }
}
