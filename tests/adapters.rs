//! Adapters against the machine's running PostgreSQL and real SQLite files, through two nodes
//! over QUIC with mutual TLS.
//!
//! Each test makes its own PostgreSQL database (`concord_test_*`) and drops it at the end.
//! Without a server at 127.0.0.1:5432 the PostgreSQL tests say loudly that they skipped;
//! with `CONCORD_REQUIRE_POSTGRES=1` (set by `.ci/run`) they fail instead.

mod common;

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::cluster::{eventually, TestNode};
use common::tables::{
    add_binding, binding, binding_status, sqlite, sqlite_file, sqlite_node, sqlite_row,
    SQLITE_TABLE,
};
use concord::config::{AdapterKind, BindingSection, Config, Direction, PolicyKind};
use serde_json::{json, Value};

const SERVER_URL: &str = "postgres://postgres@127.0.0.1:5432";
/// A change must reach the other database within this (the bar: a second).
const PROPAGATION_MAX: Duration = Duration::from_secs(1);
/// How long a test waits for what should take well under a second.
const WAIT: Duration = Duration::from_secs(20);

/// Runs a synchronous PostgreSQL call from inside the test's async runtime.
fn blocking<T>(call: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(call)
}

/// A client of the test database whose calls are safe inside the async runtime.
struct Pg(Option<postgres::Client>);

impl Pg {
    fn connect(url: &str) -> Result<Self, postgres::Error> {
        blocking(|| postgres::Client::connect(url, postgres::NoTls))
            .map(|client| Self(Some(client)))
    }

    fn inner(&mut self) -> &mut postgres::Client {
        self.0.as_mut().expect("open until dropped")
    }

    fn batch_execute(&mut self, sql: &str) -> Result<(), postgres::Error> {
        blocking(|| self.inner().batch_execute(sql))
    }

    fn count(&mut self, sql: &str) -> i64 {
        blocking(|| self.inner().query_one(sql, &[]).unwrap().get(0))
    }

    fn text(&mut self, sql: &str) -> Option<String> {
        blocking(|| self.inner().query_opt(sql, &[]))
            .unwrap()
            .and_then(|row| row.get::<_, Option<String>>(0))
    }
}

impl Drop for Pg {
    fn drop(&mut self) {
        // The synchronous client runs a runtime of its own, which may not be dropped from
        // inside the test's.
        let client = self.0.take();
        blocking(move || drop(client));
    }
}

/// A database of this test's own on the running server; dropped when this is dropped.
struct TestDatabase {
    name: String,
    url: String,
}

impl TestDatabase {
    fn create(test: &str) -> Option<Self> {
        let admin = format!("{SERVER_URL}/postgres");
        let mut client = match Pg::connect(&admin) {
            Ok(client) => client,
            Err(error) => {
                assert!(
                    std::env::var_os("CONCORD_REQUIRE_POSTGRES").is_none(),
                    "PostgreSQL is required here (CONCORD_REQUIRE_POSTGRES) but not reachable at {SERVER_URL}: {error}"
                );
                eprintln!("SKIPPED {test}: PostgreSQL is not reachable at {SERVER_URL} ({error})");
                return None;
            }
        };
        let name = format!("concord_test_{test}_{}", std::process::id());
        client
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name}"))
            .unwrap();
        client
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .unwrap();
        Some(Self {
            url: format!("{SERVER_URL}/{name}"),
            name,
        })
    }

    fn client(&self) -> Pg {
        Pg::connect(&self.url).unwrap()
    }
}

impl Drop for TestDatabase {
    fn drop(&mut self) {
        if let Ok(mut client) = Pg::connect(&format!("{SERVER_URL}/postgres")) {
            let _ = client.batch_execute(&format!(
                "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                self.name
            ));
        }
    }
}

const PG_TABLE: &str = "CREATE TABLE customers (
    id integer PRIMARY KEY,
    name text,
    email text,
    credit numeric(20,4),
    active boolean,
    joined timestamptz,
    born date,
    uid uuid,
    meta jsonb,
    photo bytea
)";

fn pg_text(database: &TestDatabase, sql: &str) -> Option<String> {
    database.client().text(sql)
}

/// Two nodes over QUIC: `a` bound to PostgreSQL, `b` to a SQLite file, both `both` ways.
async fn two_sites(
    parent: &Path,
    database: &TestDatabase,
    a_direction: Direction,
) -> (TestNode, TestNode, PathBuf) {
    let ca = parent.join("ca");
    concord::net::tls::create_ca(&ca).unwrap();
    let mut a = TestNode::create(parent, "a", &ca, &[]);
    let mut b = TestNode::create(parent, "b", &ca, &[a.listen]);
    database.client().batch_execute(PG_TABLE).unwrap();
    add_binding(
        &a,
        binding(AdapterKind::Postgres, &database.url, a_direction),
    );
    let file = sqlite_file(&b.dir);
    add_binding(
        &b,
        binding(AdapterKind::Sqlite, file.to_str().unwrap(), Direction::Both),
    );
    a.start().await;
    b.start().await;
    eventually("the nodes connect", WAIT, || {
        a.status()
            .is_some_and(|s| s["peers"].as_array().is_some_and(|p| !p.is_empty()))
    })
    .await;
    (a, b, file)
}

async fn time_until(what: &str, mut check: impl FnMut() -> bool) -> Duration {
    let start = Instant::now();
    eventually(what, WAIT, &mut check).await;
    start.elapsed()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn postgres_and_sqlite_sync_every_create_update_and_delete_both_ways() {
    let Some(database) = TestDatabase::create("both_ways") else {
        return;
    };
    let parent = tempfile::tempdir().unwrap();
    let (mut a, mut b, file) = two_sites(parent.path(), &database, Direction::Both).await;
    let mut pg = database.client();

    // Insert in PostgreSQL: every type arrives in SQLite.
    pg.batch_execute(
        "INSERT INTO customers VALUES (1, 'Ada', 'ada@example.com', 12345678901.0123, true, \
         '2026-11-26 10:00:00.5+00', '1815-12-10', '6f1c8c1e-7a8b-4b8e-9a57-0b3f0e3c2a11', \
         '{\"tier\": \"gold\", \"tags\": [1, 2]}', '\\x00ff10')",
    )
    .unwrap();
    let took = time_until("the PostgreSQL insert reaches SQLite", || {
        sqlite_row(&file, 1).is_some()
    })
    .await;
    assert!(took < PROPAGATION_MAX, "insert took {took:?}");
    let row = sqlite_row(&file, 1).unwrap();
    assert_eq!(row["name"], json!("Ada"));
    assert_eq!(
        row["credit"],
        json!("12345678901.0123"),
        "numeric stays exact"
    );
    assert_eq!(row["active"], json!(1));
    assert_eq!(row["joined"], json!("2026-11-26T10:00:00.5+00:00"));
    assert_eq!(row["born"], json!("1815-12-10"));
    assert_eq!(row["uid"], json!("6f1c8c1e-7a8b-4b8e-9a57-0b3f0e3c2a11"));
    let meta: Value = serde_json::from_str(row["meta"].as_str().unwrap()).unwrap();
    assert_eq!(meta, json!({"tier": "gold", "tags": [1, 2]}));
    assert_eq!(row["photo"], json!("\\x00ff10"));
    assert_eq!(
        b.get("customers/1").unwrap()["credit"],
        json!("12345678901.0123")
    );

    // Update and insert in SQLite: they arrive in PostgreSQL.
    sqlite(&file)
        .execute_batch(
            "UPDATE customers SET email = 'ada@lovelace.org' WHERE id = 1; \
             INSERT INTO customers (id, name, credit, active) VALUES (2, 'Grace', '10.5', 0);",
        )
        .unwrap();
    let took = time_until("the SQLite update reaches PostgreSQL", || {
        pg_text(&database, "SELECT email FROM customers WHERE id = 1").as_deref()
            == Some("ada@lovelace.org")
            && pg_text(&database, "SELECT name FROM customers WHERE id = 2").is_some()
    })
    .await;
    assert!(took < PROPAGATION_MAX, "update took {took:?}");
    assert_eq!(
        pg_text(&database, "SELECT credit::text FROM customers WHERE id = 2").as_deref(),
        Some("10.5000")
    );
    assert_eq!(
        pg_text(&database, "SELECT active::text FROM customers WHERE id = 2").as_deref(),
        Some("false")
    );

    // Delete in PostgreSQL: gone from SQLite and from both nodes.
    pg.batch_execute("DELETE FROM customers WHERE id = 2")
        .unwrap();
    let took = time_until("the PostgreSQL delete reaches SQLite", || {
        sqlite_row(&file, 2).is_none()
    })
    .await;
    assert!(took < PROPAGATION_MAX, "delete took {took:?}");
    assert_eq!(a.get("customers/2"), None);
    assert_eq!(b.get("customers/2"), None);

    // Concurrent edits of different columns of one row at two sites both survive; of the
    // same column, they converge to one value in both databases.
    pg.batch_execute("UPDATE customers SET name = 'Ada L.', active = false WHERE id = 1")
        .unwrap();
    sqlite(&file)
        .execute_batch(
            "UPDATE customers SET email = 'countess@example.com', active = 1 WHERE id = 1",
        )
        .unwrap();
    eventually("both columns survive in both databases", WAIT, || {
        let row = sqlite_row(&file, 1).unwrap();
        let pg_name = pg_text(&database, "SELECT name FROM customers WHERE id = 1");
        let pg_email = pg_text(&database, "SELECT email FROM customers WHERE id = 1");
        let pg_active = pg_text(&database, "SELECT active::text FROM customers WHERE id = 1");
        let sqlite_active = if row["active"] == json!(1) {
            "true"
        } else {
            "false"
        };
        row["name"] == json!("Ada L.")
            && row["email"] == json!("countess@example.com")
            && pg_name.as_deref() == Some("Ada L.")
            && pg_email.as_deref() == Some("countess@example.com")
            && pg_active.as_deref() == Some(sqlite_active)
    })
    .await;

    // Nothing echoed: SQLite's change table is empty once things settle, and the status
    // counts are those of the edits made, not of a ping-pong.
    let status_a = binding_status(&a);
    let status_b = binding_status(&b);
    assert_eq!(status_a["quarantined"], json!(0), "{status_a}");
    assert_eq!(status_b["quarantined"], json!(0), "{status_b}");
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn echo_suppression_holds_under_a_burst_of_ten_thousand_updates() {
    let Some(database) = TestDatabase::create("echo") else {
        return;
    };
    let parent = tempfile::tempdir().unwrap();
    let (mut a, mut b, file) = two_sites(parent.path(), &database, Direction::Both).await;
    let mut pg = database.client();
    pg.batch_execute("INSERT INTO customers (id, name, credit) SELECT i, 'c' || i, 0 FROM generate_series(1, 100) i")
        .unwrap();
    eventually("the rows reach SQLite", WAIT, || {
        sqlite_row(&file, 100).is_some()
    })
    .await;
    let before_a = binding_status(&a);
    let before_b = binding_status(&b);
    // 10,000 updates, 100 per transaction, each changing one row's credit.
    for round in 1..=100 {
        let sql = (1..=100)
            .map(|id| format!("UPDATE customers SET credit = {round} WHERE id = {id};"))
            .collect::<String>();
        pg.batch_execute(&format!("BEGIN; {sql} COMMIT;")).unwrap();
    }
    eventually(
        "the last update reaches SQLite",
        Duration::from_secs(60),
        || {
            (1..=100).all(|id| {
                sqlite_row(&file, id).is_some_and(|row| row["credit"] == json!("100.0000"))
            })
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    let after_a = binding_status(&a);
    let after_b = binding_status(&b);
    let delta = |after: &Value, before: &Value, key: &str| {
        after[key].as_u64().unwrap() - before[key].as_u64().unwrap()
    };
    // Site A captured the updates (coalesced per key within a round) and wrote at most one
    // record change per captured row; site B applied rows and captured none back.
    let captured_a = delta(&after_a, &before_a, "rows_captured");
    let written_a = delta(&after_a, &before_a, "records_written");
    assert!(captured_a <= 10_100 && captured_a > 0, "{after_a}");
    assert!(written_a <= captured_a, "{after_a}");
    assert_eq!(
        delta(&after_b, &before_b, "rows_captured"),
        0,
        "SQLite echoed: {after_b}"
    );
    assert_eq!(
        delta(&after_b, &before_b, "records_written"),
        0,
        "{after_b}"
    );
    assert_eq!(
        delta(&after_a, &before_a, "rows_applied"),
        0,
        "PostgreSQL got writes back: {after_a}"
    );
    let pending: i64 = sqlite(&file)
        .query_row("SELECT count(*) FROM _concord_changes", [], |row| {
            row.get(0)
        })
        .unwrap();
    assert_eq!(pending, 0);
    let pending_pg = pg.count("SELECT count(*) FROM _concord_changes");
    assert_eq!(pending_pg, 0);
    eprintln!(
        "burst: A captured {captured_a} row changes and wrote {written_a} record changes; B applied {} rows, captured 0",
        delta(&after_b, &before_b, "rows_applied")
    );
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_in_binding_never_writes_its_table_and_a_restart_loses_and_repeats_nothing() {
    let Some(database) = TestDatabase::create("in_restart") else {
        return;
    };
    let parent = tempfile::tempdir().unwrap();
    let (mut a, mut b, file) = two_sites(parent.path(), &database, Direction::In).await;
    let mut pg = database.client();
    // Records written at B (and through A's API) never reach A's `in` table.
    sqlite(&file)
        .execute_batch("INSERT INTO customers (id, name) VALUES (7, 'from sqlite')")
        .unwrap();
    a.put("customers/8", json!({"id": 8, "name": "from the API"}));
    eventually("A holds both records", WAIT, || {
        a.get("customers/7").is_some() && a.get("customers/8").is_some()
    })
    .await;
    tokio::time::sleep(Duration::from_millis(300)).await;
    let count = pg.count("SELECT count(*) FROM customers");
    assert_eq!(count, 0, "an `in` binding wrote to its table");
    assert_eq!(binding_status(&a)["rows_applied"], json!(0));

    // Rows written while node A is down arrive after its restart, once each.
    pg.batch_execute("INSERT INTO customers (id, name) VALUES (1, 'first')")
        .unwrap();
    eventually("the row reaches SQLite", WAIT, || {
        sqlite_row(&file, 1).is_some()
    })
    .await;
    a.stop().await;
    pg.batch_execute(
        "UPDATE customers SET name = 'while down' WHERE id = 1; \
         INSERT INTO customers (id, name) VALUES (2, 'second'), (3, 'third'); \
         DELETE FROM customers WHERE id = 3;",
    )
    .unwrap();
    let history_before = a_history_len(&a, "customers/1");
    a.start().await;
    eventually(
        "the changes made while A was down reach SQLite",
        WAIT,
        || {
            sqlite_row(&file, 1).is_some_and(|row| row["name"] == json!("while down"))
                && sqlite_row(&file, 2).is_some()
        },
    )
    .await;
    assert!(sqlite_row(&file, 3).is_none());
    // Restart the database connection too: terminate A's backend; the binding reconnects.
    pg.batch_execute(
        "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
         WHERE application_name = 'concord' AND datname = current_database() \
         AND pid <> pg_backend_pid()",
    )
    .unwrap();
    pg.batch_execute("UPDATE customers SET name = 'after reconnect' WHERE id = 2")
        .unwrap();
    eventually(
        "a change after the database connection dropped arrives",
        WAIT,
        || sqlite_row(&file, 2).is_some_and(|row| row["name"] == json!("after reconnect")),
    )
    .await;
    // One change for the update made while down: nothing repeated.
    assert_eq!(a_history_len(&a, "customers/1"), history_before + 1);
    a.stop().await;
    b.stop().await;
}

fn a_history_len(node: &TestNode, id: &str) -> usize {
    let output = common::concord(&node.dir, &["history", id]);
    common::stdout(&output).lines().count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_bad_row_is_quarantined_while_the_others_flow() {
    let Some(database) = TestDatabase::create("quarantine") else {
        return;
    };
    let parent = tempfile::tempdir().unwrap();
    let (mut a, mut b, file) = two_sites(parent.path(), &database, Direction::Both).await;
    let mut pg = database.client();
    // SQLite refuses a negative credit (CHECK); PostgreSQL does not.
    pg.batch_execute(
        "INSERT INTO customers (id, name, credit) VALUES (1, 'bad', -5), (2, 'good', 5)",
    )
    .unwrap();
    eventually("the good row flows", WAIT, || {
        sqlite_row(&file, 2).is_some()
    })
    .await;
    eventually("the bad row is quarantined", WAIT, || {
        binding_status(&b)["quarantined"] == json!(1)
    })
    .await;
    assert!(sqlite_row(&file, 1).is_none());
    let errors = common::concord(&b.dir, &["errors"]);
    let text = common::stdout(&errors);
    assert!(
        text.contains("\"key\":\"1\"") && text.contains("CHECK"),
        "{text}"
    );
    // Its times are RFC 3339 too, for people.
    let row: Value = serde_json::from_str(text.lines().next().unwrap()).unwrap();
    for time in ["first_seen", "next_retry"] {
        let said = row[time].as_str().unwrap_or_default();
        assert!(
            humantime::parse_rfc3339(said).is_ok(),
            "{time}: {said:?} in {text}"
        );
    }
    // Fixed at the source, the row goes through on a retry.
    pg.batch_execute("UPDATE customers SET credit = 1 WHERE id = 1")
        .unwrap();
    eventually("the fixed row arrives", WAIT, || {
        sqlite_row(&file, 1).is_some()
    })
    .await;
    eventually("the quarantine empties", WAIT, || {
        binding_status(&b)["quarantined"] == json!(0)
    })
    .await;
    a.stop().await;
    b.stop().await;
}

#[test]
fn a_binding_that_does_not_fit_its_table_stops_the_node_with_one_clear_line() {
    let parent = tempfile::tempdir().unwrap();
    let dir = common::init_node(parent.path(), "site");
    let ca = parent.path().join("ca");
    concord::net::tls::create_ca(&ca).unwrap();
    let node_dir = parent.path().join("member");
    concord::node::Node::init_with(
        &node_dir,
        &concord::node::InitOptions {
            ca: Some(ca.clone()),
            listen: Some(format!("127.0.0.1:{}", common::cluster::free_port())),
            api: Some(format!("127.0.0.1:{}", common::cluster::free_port())),
            ..Default::default()
        },
    )
    .unwrap();
    let _ = dir;
    let file = node_dir.join("site.db");
    rusqlite::Connection::open(&file)
        .unwrap()
        .execute_batch("CREATE TABLE people (id INTEGER PRIMARY KEY, name TEXT)")
        .unwrap();
    for (table, key, expected) in [
        ("missing", "id", "table missing does not exist"),
        ("people", "code", "no key column \"code\""),
    ] {
        let path = node_dir.join("concord.toml");
        let mut config = Config::load(&path).unwrap();
        let mut bad = binding(AdapterKind::Sqlite, file.to_str().unwrap(), Direction::Both);
        bad.table = table.to_owned();
        bad.key = vec![key.to_owned()];
        config.bindings = vec![bad];
        std::fs::write(&path, config.to_toml()).unwrap();
        let output = common::concord(&node_dir, &["run"]);
        assert_eq!(output.status.code(), Some(1));
        let error = common::stderr(&output);
        assert!(error.contains(expected), "{error}");
        assert_eq!(error.trim().lines().count(), 1, "{error}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_composite_key_captures_whole_batches_and_keys_with_commas() {
    let Some(database) = TestDatabase::create("composite_key") else {
        return;
    };
    let parent = tempfile::tempdir().unwrap();
    let ca = parent.path().join("ca");
    concord::net::tls::create_ca(&ca).unwrap();
    let mut a = TestNode::create(parent.path(), "a", &ca, &[]);
    let mut pg = database.client();
    pg.batch_execute(
        "CREATE TABLE stock (site text, sku integer, qty integer, PRIMARY KEY (site, sku))",
    )
    .unwrap();
    add_binding(
        &a,
        BindingSection {
            name: None,
            collection: "stock".to_owned(),
            adapter: AdapterKind::Postgres,
            url: database.url.clone(),
            table: "stock".to_owned(),
            key: vec!["site".to_owned(), "sku".to_owned()],
            direction: Direction::In,
            fields: Default::default(),
        },
    );
    a.start().await;
    // More rows than one capture round reads, in one transaction: every one arrives.
    let rows = concord::adapters::CAPTURE_BATCH_MAX + 200;
    pg.batch_execute(&format!(
        "INSERT INTO stock SELECT 'north', g, g FROM generate_series(1, {rows}) AS g; \
         INSERT INTO stock VALUES ('a,b', 1, 5), ('/south', 2, 6)"
    ))
    .unwrap();
    eventually("every captured row is a record", WAIT, || {
        binding_status(&a)["records_written"].as_u64() == Some(rows as u64 + 2)
    })
    .await;
    assert_eq!(
        a.get(&format!("stock/north,{rows}")).unwrap()["qty"],
        json!(rows)
    );
    // Record keys `a%2Cb,1` and `%2Fsouth,2`, their `%` escaped again in the URL path.
    assert_eq!(a.get("stock/a%252Cb,1").unwrap()["qty"], json!(5));
    assert_eq!(a.get("stock/%252Fsouth,2").unwrap()["qty"], json!(6));
    pg.batch_execute(
        "UPDATE stock SET qty = 50 WHERE site = 'a,b'; DELETE FROM stock WHERE sku = 7",
    )
    .unwrap();
    eventually("the update and the delete arrive", WAIT, || {
        a.get("stock/a%252Cb,1")
            .is_some_and(|record| record["qty"] == json!(50))
            && a.get("stock/north,7").is_none()
    })
    .await;
    a.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_over_the_change_limit_is_quarantined_and_holds_up_nothing() {
    let parent = tempfile::tempdir().unwrap();
    let (mut node, file) = sqlite_node(parent.path(), Direction::In).await;
    let connection = sqlite(&file);
    connection
        .execute(
            "INSERT INTO customers (id, name) VALUES (1, ?1), (2, 'small'), (3, ?2)",
            rusqlite::params!["h".repeat(5_000_000), "m".repeat(3_000_000)],
        )
        .unwrap();
    eventually("the other rows become records", WAIT, || {
        node.get("customers/2").is_some() && node.get("customers/3").is_some()
    })
    .await;
    eventually("the oversized row is quarantined", WAIT, || {
        binding_status(&node)["quarantined"] == json!(1)
    })
    .await;
    assert_eq!(node.get("customers/1"), None);
    let errors = common::stdout(&common::concord(&node.dir, &["errors"]));
    let limit = concord::record::document::CHANGE_BYTES_MAX.to_string();
    assert!(
        errors.contains("\"key\":\"1\"") && errors.contains(&limit),
        "{errors}"
    );
    // Later rows keep flowing.
    connection
        .execute("INSERT INTO customers (id, name) VALUES (4, 'later')", [])
        .unwrap();
    eventually("a later row", WAIT, || node.get("customers/4").is_some()).await;
    node.stop().await;
}

/// The offline-edit scenario: `b` is down while its SQLite row is edited; then the same row is
/// edited in PostgreSQL at `a`, later; then `b` starts. Run under `policy` on both nodes.
/// Returns the two nodes (running) and the SQLite file.
async fn offline_edit(
    parent: &Path,
    database: &TestDatabase,
    policy: PolicyKind,
) -> (TestNode, TestNode, PathBuf) {
    let (mut a, mut b, file) = two_sites(parent, database, Direction::Both).await;
    database
        .client()
        .batch_execute("INSERT INTO customers (id, name, email) VALUES (1, 'Ada', 'old@x')")
        .unwrap();
    eventually("the row reaches b's table", WAIT, || {
        sqlite_row(&file, 1).is_some_and(|row| row["email"] == json!("old@x"))
    })
    .await;
    a.stop().await;
    b.stop().await;
    let rule = concord::config::PolicySection {
        collection: "customers".to_owned(),
        field: None,
        policy,
        order: Vec::new(),
        script: None,
    };
    a.set_policies(vec![rule.clone()]);
    b.set_policies(vec![rule]);
    a.start().await;
    // While b is down: its table first, then PostgreSQL at a, 300 ms later.
    sqlite(&file)
        .execute(
            "UPDATE customers SET email = 'sqlite@offline' WHERE id = 1",
            [],
        )
        .unwrap();
    tokio::time::sleep(Duration::from_millis(300)).await;
    database
        .client()
        .batch_execute("UPDATE customers SET email = 'postgres@later' WHERE id = 1")
        .unwrap();
    eventually("a takes PostgreSQL's edit", WAIT, || {
        a.get("customers/1")
            .is_some_and(|record| record["email"] == json!("postgres@later"))
    })
    .await;
    b.start().await;
    (a, b, file)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_edit_made_offline_keeps_its_place_in_time() {
    let Some(database) = TestDatabase::create("offline_edit") else {
        return;
    };
    let temp = tempfile::tempdir().unwrap();
    // Under lww the later edit wins on both tables, whichever site made it.
    let (mut a, mut b, file) = offline_edit(temp.path(), &database, PolicyKind::Lww).await;
    eventually("both tables show the later edit", WAIT, || {
        sqlite_row(&file, 1).is_some_and(|row| row["email"] == json!("postgres@later"))
            && pg_text(&database, "SELECT email FROM customers WHERE id = 1").as_deref()
                == Some("postgres@later")
    })
    .await;
    // The two edits were concurrent: a conflict lww settled, on both nodes alike.
    for node in [&a, &b] {
        let conflicts = node.conflicts("customers");
        let email = conflicts
            .iter()
            .find(|conflict| conflict["field"] == json!("email"))
            .unwrap_or_else(|| panic!("{}: no conflict on email: {conflicts:?}", node.name));
        assert_eq!(email["rule"], json!("lww"), "{email}");
    }
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_edit_made_offline_is_a_conflict_listed_on_both_nodes_under_manual() {
    let Some(database) = TestDatabase::create("offline_manual") else {
        return;
    };
    let temp = tempfile::tempdir().unwrap();
    let (mut a, mut b, _file) = offline_edit(temp.path(), &database, PolicyKind::Manual).await;
    eventually("the conflict is listed on both nodes", WAIT, || {
        [&a, &b].iter().all(|node| {
            node.conflicts("customers").iter().any(|conflict| {
                conflict["field"] == json!("email") && conflict["pending"] == json!(true)
            })
        })
    })
    .await;
    let listed: Vec<Value> = [&a, &b]
        .iter()
        .map(|node| node.conflicts("customers")[0]["candidates"].clone())
        .collect();
    assert_eq!(listed[0], listed[1], "both nodes list the same candidates");
    a.stop().await;
    b.stop().await;
}

/// A saved Automerge document whose root holds `fields`, stamped now (as Concord stamps).
fn automerge_document(fields: &[(&str, automerge::ScalarValue)]) -> Vec<u8> {
    use automerge::transaction::{CommitOptions, Transactable};
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let mut doc = automerge::Automerge::new();
    let mut tx = doc.transaction();
    for (field, value) in fields {
        tx.put(automerge::ROOT, *field, value.clone()).unwrap();
    }
    tx.commit_with(
        CommitOptions::default()
            .with_message(format!("{{\"hlc\":{now}}}"))
            .with_time((now / 1000) as i64),
    );
    doc.save()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn dates_and_bytes_round_trip_exactly_through_postgres_and_sqlite() {
    let Some(database) = TestDatabase::create("dates_bytes") else {
        return;
    };
    let temp = tempfile::tempdir().unwrap();
    let (mut a, mut b, file) = two_sites(temp.path(), &database, Direction::Both).await;
    // An out write leaves a field the record lacks to the column's default.
    database
        .client()
        .batch_execute("ALTER TABLE customers ALTER COLUMN email SET DEFAULT 'unknown@example.com'")
        .unwrap();

    // 2026-11-26T10:00:00.123Z and three bytes, as Automerge Date and Bytes, imported at a.
    const JOINED_MS: i64 = 1_795_687_200_123;
    let bytes = vec![0x00, 0xff, 0x10];
    let document = automerge_document(&[
        ("name", automerge::ScalarValue::Str("Ada".into())),
        ("joined", automerge::ScalarValue::Timestamp(JOINED_MS)),
        ("photo", automerge::ScalarValue::Bytes(bytes.clone())),
    ]);
    let path = temp.path().join("typed.automerge");
    std::fs::write(&path, document).unwrap();
    common::ok(common::concord(
        &a.dir,
        &["import", "customers/7", path.to_str().unwrap()],
    ));
    // The record reads them as PostgreSQL writes them.
    let record = a.get("customers/7").unwrap();
    assert_eq!(record["joined"], json!("2026-11-26T10:00:00.123+00:00"));
    assert_eq!(record["photo"], json!("\\x00ff10"));

    // PostgreSQL holds the same instant and bytes, and the column default.
    eventually("the row reaches PostgreSQL", WAIT, || {
        pg_text(&database, "SELECT name FROM customers WHERE id = 7").is_some()
    })
    .await;
    let pg = |sql: &str| pg_text(&database, sql).unwrap_or_default();
    assert_eq!(
        pg("SELECT (extract(epoch FROM joined) * 1000)::bigint::text FROM customers WHERE id = 7"),
        JOINED_MS.to_string()
    );
    assert_eq!(
        pg("SELECT encode(photo, 'hex') FROM customers WHERE id = 7"),
        "00ff10"
    );
    assert_eq!(
        pg("SELECT email FROM customers WHERE id = 7"),
        "unknown@example.com"
    );

    // SQLite holds the instant as text and the bytes as a blob.
    eventually("the row reaches SQLite", WAIT, || {
        sqlite_row(&file, 7).is_some_and(|row| row["name"] == json!("Ada"))
    })
    .await;
    // The default filled PostgreSQL's row only: the record still has no email.
    assert_eq!(sqlite_row(&file, 7).unwrap()["email"], Value::Null);
    assert!(a.get("customers/7").unwrap().get("email").is_none());
    let (joined, photo_type, photo): (String, String, Vec<u8>) = sqlite(&file)
        .query_row(
            "SELECT joined, typeof(photo), photo FROM customers WHERE id = 7",
            [],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
        )
        .unwrap();
    assert_eq!(joined, "2026-11-26T10:00:00.123+00:00");
    assert_eq!(photo_type, "blob");
    assert_eq!(photo, bytes);

    // Back: an edit of another column in SQLite leaves both exactly as they were in
    // PostgreSQL.
    sqlite(&file)
        .execute("UPDATE customers SET name = 'Ada L.' WHERE id = 7", [])
        .unwrap();
    eventually("the SQLite edit reaches PostgreSQL", WAIT, || {
        pg_text(&database, "SELECT name FROM customers WHERE id = 7").as_deref() == Some("Ada L.")
    })
    .await;
    assert_eq!(
        pg("SELECT (extract(epoch FROM joined) * 1000)::bigint::text FROM customers WHERE id = 7"),
        JOINED_MS.to_string()
    );
    assert_eq!(
        pg("SELECT encode(photo, 'hex') FROM customers WHERE id = 7"),
        "00ff10"
    );
    assert_eq!(b.get("customers/7").unwrap()["photo"], json!("\\x00ff10"));
    a.stop().await;
    b.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_table_made_again_under_its_binding_is_refilled_on_request() {
    let parent = tempfile::tempdir().unwrap();
    let (mut node, file) = sqlite_node(parent.path(), Direction::Both).await;
    for id in 1..=3 {
        node.put(
            &format!("customers/{id}"),
            json!({"name": format!("c{id}")}),
        );
    }
    eventually("the records fill the table", WAIT, || {
        (1..=3).all(|id| sqlite_row(&file, id).is_some())
    })
    .await;
    // The table is dropped and made again, empty, with a default for email.
    sqlite(&file)
        .execute_batch(&format!(
            "DROP TABLE customers; {}",
            SQLITE_TABLE.replace("email TEXT,", "email TEXT DEFAULT 'none',")
        ))
        .unwrap();
    let name = binding_status(&node)["name"].as_str().unwrap().to_owned();
    let said = common::ok(common::concord(&node.dir, &["refill", &name]));
    assert!(said.contains("loads again"), "{said}");
    eventually("the table is filled again", WAIT, || {
        (1..=3).all(|id| {
            sqlite_row(&file, id).is_some_and(|row| {
                row["name"] == json!(format!("c{id}")) && row["email"] == json!("none")
            })
        })
    })
    .await;
    // Its triggers are back: an edit of the new table reaches the record.
    sqlite(&file)
        .execute("UPDATE customers SET name = 'edited' WHERE id = 2", [])
        .unwrap();
    eventually("the edit reaches the record", WAIT, || {
        node.get("customers/2")
            .is_some_and(|record| record["name"] == json!("edited"))
    })
    .await;
    // An unknown binding is refused with the names there are.
    let output = common::concord(&node.dir, &["refill", "nope"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(
        common::stderr(&output).contains(&name),
        "{}",
        common::stderr(&output)
    );
    node.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_row_outside_the_node_s_grant_is_quarantined_and_the_others_flow() {
    let parent = tempfile::tempdir().unwrap();
    let (mut node, file) = sqlite_node(parent.path(), Direction::In).await;
    let id = std::fs::read_to_string(node.dir.join("node.id")).unwrap();
    let ca = parent.path().join("ca");
    common::ok(common::concord(
        &node.dir,
        &[
            "grant",
            id.trim(),
            "--ca",
            ca.to_str().unwrap(),
            "--read",
            "customers",
            "--write",
            "customers:email=ok@example.com",
        ],
    ));
    sqlite(&file)
        .execute_batch(
            "INSERT INTO customers (id, name, email) VALUES (1, 'in', 'ok@example.com'), \
             (2, 'out', 'other@example.com')",
        )
        .unwrap();
    eventually("the row the grant allows flows", WAIT, || {
        node.get("customers/1").is_some()
    })
    .await;
    eventually("the other is quarantined", WAIT, || {
        binding_status(&node)["quarantined"] == json!(1)
    })
    .await;
    assert_eq!(node.get("customers/2"), None);
    let errors = common::stdout(&common::concord(&node.dir, &["errors"]));
    assert!(
        errors.contains("\"key\":\"2\"") && errors.contains("grant"),
        "{errors}"
    );
    node.stop().await;
}
