//! Tables for the adapter tests: a SQLite `customers` table, bindings to it, and a node
//! running with one.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use concord::config::{AdapterKind, BindingSection, Config, Direction};
use serde_json::{json, Value};

use super::cluster::TestNode;

pub const SQLITE_TABLE: &str = "CREATE TABLE customers (
    id INTEGER PRIMARY KEY,
    name TEXT,
    email TEXT,
    credit TEXT CHECK (credit IS NULL OR CAST(credit AS REAL) >= 0),
    active BOOLEAN,
    joined TIMESTAMP,
    born DATE,
    uid UUID,
    meta JSON,
    photo BLOB
)";

pub fn binding(adapter: AdapterKind, url: &str, direction: Direction) -> BindingSection {
    BindingSection {
        name: None,
        collection: "customers".to_owned(),
        adapter,
        url: url.to_owned(),
        table: "customers".to_owned(),
        key: vec!["id".to_owned()],
        direction,
        fields: Default::default(),
    }
}

pub fn add_binding(node: &TestNode, binding: BindingSection) {
    let path = node.dir.join("concord.toml");
    let mut config = Config::load(&path).unwrap();
    config.bindings.push(binding);
    std::fs::write(&path, config.to_toml()).unwrap();
}

pub fn sqlite_file(dir: &Path) -> PathBuf {
    let path = dir.join("site.db");
    let connection = rusqlite::Connection::open(&path).unwrap();
    connection.execute_batch(SQLITE_TABLE).unwrap();
    path
}

pub fn sqlite(path: &Path) -> rusqlite::Connection {
    let connection = rusqlite::Connection::open(path).unwrap();
    connection.busy_timeout(Duration::from_secs(5)).unwrap();
    connection
}

/// A row of the SQLite table as JSON (column name to value, blobs as hex).
pub fn sqlite_row(path: &Path, id: i64) -> Option<Value> {
    let connection = sqlite(path);
    let mut statement = connection
        .prepare("SELECT * FROM customers WHERE id = ?1")
        .unwrap();
    let names: Vec<String> = statement
        .column_names()
        .iter()
        .map(|n| n.to_string())
        .collect();
    let mut rows = statement.query([id]).unwrap();
    let row = rows.next().unwrap()?;
    let mut object = serde_json::Map::new();
    for (index, name) in names.iter().enumerate() {
        use rusqlite::types::ValueRef;
        let value = match row.get_ref(index).unwrap() {
            ValueRef::Null => Value::Null,
            ValueRef::Integer(i) => json!(i),
            ValueRef::Real(r) => json!(r),
            ValueRef::Text(t) => json!(String::from_utf8_lossy(t)),
            ValueRef::Blob(b) => json!(format!("\\x{}", hex::encode(b))),
        };
        object.insert(name.clone(), value);
    }
    Some(Value::Object(object))
}

/// One node, running, bound `direction` to a SQLite file in its data dir.
pub async fn sqlite_node(parent: &Path, direction: Direction) -> (TestNode, PathBuf) {
    let ca = parent.join("ca");
    concord::net::tls::create_ca(&ca).unwrap();
    let mut node = TestNode::create(parent, "n", &ca, &[]);
    let file = sqlite_file(&node.dir);
    add_binding(
        &node,
        binding(AdapterKind::Sqlite, file.to_str().unwrap(), direction),
    );
    node.start().await;
    (node, file)
}

pub fn binding_status(node: &TestNode) -> Value {
    node.status().unwrap()["bindings"][0].clone()
}
