//! Every way in refuses the same bad write with the same message: a bound table's row, the
//! API, the CLI against a running and a stopped node, and an import through both.

mod common;

use std::time::Duration;

use common::cluster::eventually;
use common::tables::{binding_status, sqlite, sqlite_node};
use concord::config::Direction;
use serde_json::{json, Value};

/// How long a test waits for what should take well under a second.
const WAIT: Duration = Duration::from_secs(20);

/// Runs a synchronous call (the CLI) from inside the test's async runtime.
fn blocking<T>(call: impl FnOnce() -> T) -> T {
    tokio::task::block_in_place(call)
}

/// An Automerge record document whose field `field` holds `value`, saved.
fn document_with(field: &str, value: &Value) -> Vec<u8> {
    use automerge::transaction::Transactable;
    let mut doc = automerge::AutoCommit::new();
    let mut object = automerge::ROOT;
    let mut name = field.to_owned();
    let mut inner = value;
    while let Some(map) = inner.as_object() {
        object = doc
            .put_object(&object, name.as_str(), automerge::ObjType::Map)
            .unwrap();
        let (key, next) = map.iter().next().unwrap();
        name = key.clone();
        inner = next;
    }
    doc.put(&object, name.as_str(), inner.as_i64().unwrap())
        .unwrap();
    doc.save()
}

/// One bad write (a value nested deeper than the limit) through every way in: a bound
/// table's row, the API, the CLI against a running and a stopped node, and an import through
/// both. Each refuses it with the same message, and none of it is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn every_way_in_refuses_the_same_bad_write_with_the_same_message() {
    let depth = concord::record::value::VALUE_DEPTH_MAX + 1;
    let deep = (0..depth).fold(json!(1), |inner, _| json!({ "a": inner }));
    let expected = concord::record::RecordError::ValueTooDeep {
        field: "meta".to_owned(),
        depth_max: concord::record::value::VALUE_DEPTH_MAX,
    }
    .to_string();
    let parent = tempfile::tempdir().unwrap();
    let (mut node, file) = sqlite_node(parent.path(), Direction::Both).await;
    let document = parent.path().join("deep.automerge");
    std::fs::write(&document, document_with("meta", &deep)).unwrap();
    let document = document.to_str().unwrap();
    let assignment = format!("meta={deep}");

    // A row of the bound table: quarantined, with the message.
    sqlite(&file)
        .execute(
            "INSERT INTO customers (id, name, meta) VALUES (1, 'deep', ?1)",
            [deep.to_string()],
        )
        .unwrap();
    eventually("the row is quarantined", WAIT, || {
        binding_status(&node)["quarantined"] == json!(1)
    })
    .await;
    let errors = common::stdout(&common::concord(&node.dir, &["errors"]));
    let row: Value = serde_json::from_str(errors.lines().next().unwrap()).unwrap();
    assert!(
        row["error"].as_str().unwrap().contains(&expected),
        "{errors}"
    );
    // The API.
    let body = json!({ "meta": deep }).to_string().into_bytes();
    let (status, answer) = node.put_body("customers/2", body);
    assert_eq!(status, 400, "{answer}");
    assert!(
        answer["error"].as_str().unwrap().contains(&expected),
        "{answer}"
    );
    // The CLI and an import, through the running node.
    let put = blocking(|| common::concord(&node.dir, &["put", "customers/3", &assignment]));
    common::refused(put, 1, &expected);
    let import = blocking(|| common::concord(&node.dir, &["import", "customers/4", document]));
    common::refused(import, 1, &expected);
    node.stop().await;
    // The CLI and an import on the stopped node.
    common::refused(
        common::concord(&node.dir, &["put", "customers/5", &assignment]),
        1,
        &expected,
    );
    common::refused(
        common::concord(&node.dir, &["import", "customers/6", document]),
        1,
        &expected,
    );
    for key in 1..=6 {
        let get = common::concord(&node.dir, &["get", &format!("customers/{key}")]);
        assert_eq!(get.status.code(), Some(2), "customers/{key} was stored");
    }
}
