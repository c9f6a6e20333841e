//! The CLI contract, driven through the real binary on real sled data dirs. Every command is
//! a new process, so every read also checks that the data survived a restart.

mod common;

use common::{concord, concord_bare, init_node, ok, refused, stderr, stdout};
use serde_json::{json, Value};

/// Adds `text` (TOML) at the end of a node's concord.toml.
fn append_config(data: &std::path::Path, text: &str) {
    let config = data.join("concord.toml");
    let original = std::fs::read_to_string(&config).unwrap();
    std::fs::write(&config, format!("{original}{text}")).unwrap();
}

fn get_json(data: &std::path::Path, id: &str) -> Value {
    serde_json::from_str(&ok(concord(data, &["get", id]))).unwrap()
}

#[test]
fn put_get_list_delete_round_trip() {
    let temp = tempfile::tempdir().unwrap();
    let node = init_node(temp.path(), "a");
    ok(concord(
        &node,
        &[
            "put",
            "customers/1",
            "name=Ada",
            "age=36",
            "vip=true",
            r#"tags=["x","y"]"#,
            "note=null",
        ],
    ));
    ok(concord(
        &node,
        &[
            "put",
            "customers/2",
            "name=Grace",
            r#"address={"city":"Arlington"}"#,
        ],
    ));
    assert_eq!(
        get_json(&node, "customers/1"),
        json!({"name": "Ada", "age": 36, "vip": true, "tags": ["x", "y"], "note": null})
    );
    // A value that is not valid JSON is a string; FIELD= removes the field.
    ok(concord(
        &node,
        &["put", "customers/1", "age=", "name={not json"],
    ));
    assert_eq!(
        get_json(&node, "customers/1"),
        json!({"name": "{not json", "vip": true, "tags": ["x", "y"], "note": null})
    );
    ok(concord(
        &node,
        &["put", "customers/1", "--replace", "name=Ada"],
    ));
    assert_eq!(get_json(&node, "customers/1"), json!({"name": "Ada"}));

    let listed: Vec<Value> = ok(concord(&node, &["list", "customers"]))
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(
        listed,
        vec![
            json!({"key": "1", "fields": {"name": "Ada"}}),
            json!({"key": "2", "fields": {"name": "Grace", "address": {"city": "Arlington"}}}),
        ]
    );

    ok(concord(&node, &["delete", "customers/2"]));
    let missing = concord(&node, &["get", "customers/2"]);
    assert_eq!(missing.status.code(), Some(2), "{}", stderr(&missing));
    assert!(stderr(&missing).contains("customers/2 not found"));
    assert_eq!(
        ok(concord(&node, &["list", "customers"])).lines().count(),
        1
    );
    assert_eq!(
        concord(&node, &["delete", "customers/2"]).status.code(),
        Some(2)
    );
    assert_eq!(
        concord(&node, &["get", "customers/nope"]).status.code(),
        Some(2)
    );
}

#[test]
fn record_is_created_again_after_delete() {
    let temp = tempfile::tempdir().unwrap();
    let node = init_node(temp.path(), "a");
    ok(concord(&node, &["put", "items/x", "a=1", "b=2"]));
    ok(concord(&node, &["delete", "items/x"]));
    ok(concord(&node, &["put", "items/x", "c=3"]));
    // The re-created record starts fresh: nothing of the old one leaks back.
    assert_eq!(get_json(&node, "items/x"), json!({"c": 3}));
    let actions: Vec<String> = ok(concord(&node, &["history", "items/x"]))
        .lines()
        .map(|line| {
            serde_json::from_str::<Value>(line).unwrap()["action"]
                .as_str()
                .unwrap()
                .to_owned()
        })
        .collect();
    assert_eq!(actions, vec!["create", "delete", "recreate"]);
}

#[test]
fn history_names_origin_time_and_effect() {
    let temp = tempfile::tempdir().unwrap();
    let node = init_node(temp.path(), "site-a");
    ok(concord(&node, &["put", "c/1", "name=Ada"]));
    ok(concord(&node, &["put", "c/1", "name=Grace", "city=Paris"]));
    let history: Vec<Value> = ok(concord(&node, &["history", "c/1"]))
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(history.len(), 2);
    let node_id = std::fs::read_to_string(node.join("node.id")).unwrap();
    for entry in &history {
        assert_eq!(entry["node"], json!(node_id.trim()));
        assert_eq!(entry["node_name"], json!("site-a"));
        assert_eq!(entry["source"], json!("api"));
        // Written under the store's writer (its incarnation), not the node's id.
        let actor = entry["actor"].as_str().unwrap();
        assert!(actor.starts_with(&history[0]["actor"].as_str().unwrap()[..32]));
        assert!(!actor.starts_with(node_id.trim()));
        assert!(entry["time"].as_str().unwrap().starts_with("20"));
        assert_eq!(entry["hash"].as_str().unwrap().len(), 64);
    }
    assert_eq!(history[0]["action"], json!("create"));
    assert_eq!(history[1]["set"], json!({"name": "Grace", "city": "Paris"}));
}

#[test]
fn get_at_a_version_and_revert_to_it_and_back() {
    let temp = tempfile::tempdir().unwrap();
    let node = init_node(temp.path(), "a");
    ok(concord(&node, &["put", "c/1", "name=Ada", "city=London"]));
    ok(concord(
        &node,
        &["put", "c/1", "name=Grace", "email=g@example.com"],
    ));
    ok(concord(&node, &["delete", "c/1"]));
    let versions: Vec<String> = ok(concord(&node, &["history", "c/1"]))
        .lines()
        .map(|line| {
            let entry: Value = serde_json::from_str(line).unwrap();
            entry["hash"].as_str().unwrap().to_owned()
        })
        .collect();
    assert_eq!(versions.len(), 3);
    let at = |version: &str| -> Value {
        serde_json::from_str(&ok(concord(&node, &["get", "c/1", "--at", version]))).unwrap()
    };
    assert_eq!(at(&versions[0]), json!({"name": "Ada", "city": "London"}));
    assert_eq!(
        at(&versions[1]),
        json!({"name": "Grace", "city": "London", "email": "g@example.com"})
    );
    // Deleted at the last version: not found there, as now.
    let output = concord(&node, &["get", "c/1", "--at", &versions[2]]);
    assert_eq!(output.status.code(), Some(2), "{}", stderr(&output));

    // Revert to the first version: a new change, and the record is exactly that again.
    ok(concord(&node, &["revert", "c/1", "--to", &versions[0]]));
    assert_eq!(
        get_json(&node, "c/1"),
        json!({"name": "Ada", "city": "London"})
    );
    let history = ok(concord(&node, &["history", "c/1"]));
    assert_eq!(history.lines().count(), 4);
    let revert_version: Value = serde_json::from_str(history.lines().last().unwrap()).unwrap();
    assert_eq!(
        revert_version["action"],
        json!("revert"),
        "{revert_version}"
    );
    assert_eq!(
        revert_version["reverts"],
        json!(versions[0]),
        "{revert_version}"
    );
    // The revert is a version too; reverting to the delete deletes again, and reverting to
    // the revert brings it back.
    ok(concord(&node, &["revert", "c/1", "--to", &versions[2]]));
    assert_eq!(concord(&node, &["get", "c/1"]).status.code(), Some(2));
    ok(concord(
        &node,
        &[
            "revert",
            "c/1",
            "--to",
            revert_version["hash"].as_str().unwrap(),
        ],
    ));
    assert_eq!(
        get_json(&node, "c/1"),
        json!({"name": "Ada", "city": "London"})
    );

    // Bad and unknown versions are refused with the rule.
    refused(
        concord(&node, &["revert", "c/1", "--to", "abc"]),
        1,
        "64 hex digits",
    );
    let unknown = "ab".repeat(32);
    refused(
        concord(&node, &["get", "c/1", "--at", &unknown]),
        1,
        "has no version",
    );
}

#[test]
fn a_priority_policy_shows_the_ranked_site_value_on_both_nodes() {
    let temp = tempfile::tempdir().unwrap();
    // The collection ranks the ERP site first, the phone field the CRM site: Automerge's
    // own choice takes one site's value for both fields, so at least one of them shows
    // that the policy, not Automerge, picked it.
    let policy = r#"
[[policies]]
collection = "customers"
policy = "priority"
order = ["erp-site"]

[[policies]]
collection = "customers"
field = "phone"
policy = "priority"
order = ["crm-site"]
"#;
    // The CRM writes second.
    let (erp, crm) = sites_in_conflict(
        temp.path(),
        policy,
        &["address=1 ERP Street", "phone=111"],
        &["address=2 CRM Road", "phone=222"],
    );
    for node in [&erp, &crm] {
        assert_eq!(
            get_json(node, "customers/1"),
            json!({"address": "1 ERP Street", "phone": 222})
        );
    }
}

#[test]
fn a_custom_policy_picks_by_script_and_a_looping_script_leaves_the_conflict_queued() {
    let temp = tempfile::tempdir().unwrap();
    // The address field: the longest value wins. The phone field: a script that never ends.
    let policy = r#"
[[policies]]
collection = "customers"
field = "address"
policy = "custom"
script = '''
let best = 0;
for i in 1..candidates.len() {
    if candidates[i].value.len() > candidates[best].value.len() { best = i; }
}
best
'''

[[policies]]
collection = "customers"
field = "phone"
policy = "custom"
script = "loop { }"
"#;
    let (erp, crm) = sites_in_conflict(
        temp.path(),
        policy,
        &["address=1 Long ERP Street", "phone=111"],
        &["address=2 CRM Rd", "phone=222"],
    );
    let mut listings = Vec::new();
    for node in [&erp, &crm] {
        assert_eq!(
            get_json(node, "customers/1")["address"],
            json!("1 Long ERP Street")
        );
        let listed: Vec<Value> = ok(concord(node, &["conflicts", "customers"]))
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect();
        assert_eq!(listed.len(), 2, "{listed:?}");
        let address = &listed[0];
        assert_eq!(address["field"], json!("address"));
        assert_eq!(address["rule"], json!("custom"));
        assert_eq!(address["pending"], json!(false));
        let phone = &listed[1];
        assert_eq!(phone["field"], json!("phone"));
        assert_eq!(phone["pending"], json!(true));
        assert!(
            phone["error"].as_str().unwrap().contains("operations"),
            "{phone}"
        );
        listings.push(listed);
    }
    assert_eq!(listings[0], listings[1]);
    // The queued one is settled by a person like a manual one.
    ok(concord(
        &crm,
        &["resolve", "customers/1", "phone", "--value", "333"],
    ));
    assert_eq!(get_json(&crm, "customers/1")["phone"], json!(333));
}

#[test]
fn a_manual_conflict_is_listed_and_a_resolution_on_one_node_shows_on_both() {
    let temp = tempfile::tempdir().unwrap();
    let policy = "\n[[policies]]\ncollection = \"customers\"\npolicy = \"manual\"\n";
    let (erp, crm) = sites_in_conflict(
        temp.path(),
        policy,
        &["address=1 ERP Street"],
        &["address=2 CRM Road"],
    );
    let listed: Vec<Value> = ok(concord(&erp, &["conflicts", "customers"]))
        .lines()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(listed.len(), 1, "{listed:?}");
    let conflict = &listed[0];
    assert_eq!(conflict["record"], json!("customers/1"));
    assert_eq!(conflict["field"], json!("address"));
    assert_eq!(conflict["rule"], json!("manual"));
    assert_eq!(conflict["pending"], json!(true));
    let candidates = conflict["candidates"].as_array().unwrap();
    assert_eq!(candidates.len(), 2);
    for candidate in candidates {
        assert_eq!(candidate["source"], json!("api"));
        assert!(candidate["time"].as_str().unwrap().starts_with("20"));
        assert_eq!(candidate["node"].as_str().unwrap().len(), 32);
    }
    // Both nodes list the same conflict with the same default winner.
    let on_crm = ok(concord(&crm, &["conflicts"]));
    let on_crm: Value = serde_json::from_str(on_crm.lines().next().unwrap()).unwrap();
    assert_eq!(&on_crm, conflict);
    // The CRM's candidate is picked on the ERP node; the settlement reaches the CRM node.
    let pick = candidates
        .iter()
        .position(|candidate| candidate["site"] == json!("crm-site"))
        .unwrap();
    ok(concord(
        &erp,
        &[
            "resolve",
            "customers/1",
            "address",
            "--pick",
            &pick.to_string(),
        ],
    ));
    exchange(&erp, &crm, "customers/1", temp.path());
    for node in [&erp, &crm] {
        assert_eq!(ok(concord(node, &["conflicts"])), "");
        assert_eq!(
            get_json(node, "customers/1"),
            json!({"address": "2 CRM Road"})
        );
    }
    // Nothing left to settle; a bad candidate number is refused.
    refused(
        concord(&erp, &["resolve", "customers/1", "address", "--pick", "0"]),
        1,
        "not in conflict",
    );
    ok(concord(&erp, &["put", "customers/1", "city=Paris"]));
    ok(concord(&crm, &["put", "customers/1", "city=Lyon"]));
    exchange(&erp, &crm, "customers/1", temp.path());
    refused(
        concord(&crm, &["resolve", "customers/1", "city", "--pick", "7"]),
        1,
        "no candidate 7",
    );
    ok(concord(
        &crm,
        &["resolve", "customers/1", "city", "--value", "Marseille"],
    ));
    assert_eq!(get_json(&crm, "customers/1")["city"], json!("Marseille"));
}

#[test]
fn audit_filters_by_collection_record_source_node_and_time() {
    let temp = tempfile::tempdir().unwrap();
    let node = init_node(temp.path(), "site-a");
    ok(concord(&node, &["put", "customers/1", "name=Ada"]));
    ok(concord(&node, &["put", "customers/1", "city=Paris"]));
    ok(concord(&node, &["put", "customers/2", "name=Grace"]));
    ok(concord(&node, &["put", "orders/9", "total=12"]));
    ok(concord(&node, &["delete", "orders/9"]));
    let audit = |args: &[&str]| -> Vec<Value> {
        let mut all = vec!["audit"];
        all.extend_from_slice(args);
        ok(concord(&node, &all))
            .lines()
            .map(|line| serde_json::from_str(line).unwrap())
            .collect()
    };
    let everything = audit(&[]);
    assert_eq!(everything.len(), 5, "{everything:?}");
    for entry in &everything {
        assert_eq!(entry["source"], json!("api"));
        assert_eq!(entry["node_name"], json!("site-a"));
        assert!(entry["time"].as_str().unwrap().starts_with("20"));
    }
    let records: Vec<&str> = everything
        .iter()
        .map(|entry| entry["record"].as_str().unwrap())
        .collect();
    assert_eq!(records.iter().filter(|r| **r == "customers/1").count(), 2);
    assert_eq!(audit(&["--collection", "orders"]).len(), 2);
    let one = audit(&["--record", "customers/1"]);
    assert_eq!(one.len(), 2);
    assert_eq!(one[0]["action"], json!("create"));
    assert_eq!(one[1]["set"], json!({"city": "Paris"}));
    assert_eq!(audit(&["--source", "api", "--node", "site-a"]).len(), 5);
    assert_eq!(audit(&["--source", "erp"]).len(), 0);
    assert_eq!(audit(&["--node", "elsewhere"]).len(), 0);
    assert_eq!(audit(&["--since", "2999-01-01T00:00:00Z"]).len(), 0);
    assert_eq!(audit(&["--until", "2000-01-01T00:00:00Z"]).len(), 0);
    assert_eq!(
        audit(&[
            "--since",
            "2000-01-01T00:00:00Z",
            "--until",
            "2999-01-01T00:00:00Z"
        ])
        .len(),
        5
    );
    let output = concord(&node, &["audit", "--limit", "2"]);
    assert_eq!(stdout(&output).lines().count(), 2);
    assert!(
        stderr(&output).contains("more changes matched"),
        "{}",
        stderr(&output)
    );
    refused(
        concord(&node, &["audit", "--since", "yesterday"]),
        1,
        "RFC 3339",
    );
}

#[test]
fn export_loads_in_automerge_and_import_merges() {
    let temp = tempfile::tempdir().unwrap();
    let node = init_node(temp.path(), "a");
    ok(concord(
        &node,
        &[
            "put",
            "c/1",
            "name=Ada",
            r#"address={"city":"London","lines":["1 Main St"]}"#,
            "n=1.5",
        ],
    ));
    let file = temp.path().join("c1.automerge");
    ok(concord(
        &node,
        &["export", "c/1", "-o", file.to_str().unwrap()],
    ));

    // Another Automerge program (the automerge crate itself) reads the same JSON.
    let bytes = std::fs::read(&file).unwrap();
    let doc = automerge::Automerge::load(&bytes).unwrap();
    let mut loaded = serde_json::to_value(automerge::AutoSerde::from(&doc)).unwrap();
    loaded.as_object_mut().unwrap().remove("@deleted");
    assert_eq!(loaded, get_json(&node, "c/1"));

    // Import into a record elsewhere, then merge edits both ways.
    let other = init_node(temp.path(), "b");
    assert!(
        ok(concord(&other, &["import", "c/1", file.to_str().unwrap()]))
            .contains("merged 1 new changes")
    );
    assert_eq!(get_json(&other, "c/1"), get_json(&node, "c/1"));
    ok(concord(&other, &["put", "c/1", "email=ada@example.com"]));
    ok(concord(&node, &["put", "c/1", "name=Ada Lovelace"]));
    exchange(&node, &other, "c/1", temp.path());
    assert_eq!(
        get_json(&node, "c/1"),
        json!({"name": "Ada Lovelace", "email": "ada@example.com", "address": {"city": "London", "lines": ["1 Main St"]}, "n": 1.5})
    );
    assert_eq!(get_json(&node, "c/1"), get_json(&other, "c/1"));

    // Importing the same bytes again changes nothing.
    assert!(
        ok(concord(&node, &["import", "c/1", file.to_str().unwrap()]))
            .contains("merged 0 new changes")
    );
}

/// Exports `id` from each node and imports it into the other.
/// Two nodes, `erp-site` and `crm-site`, configured with the same `policies`: each writes
/// `customers/1` (with `erp_fields`, then `crm_fields`) without seeing the other's write, then
/// they exchange documents.
fn sites_in_conflict(
    scratch: &std::path::Path,
    policies: &str,
    erp_fields: &[&str],
    crm_fields: &[&str],
) -> (std::path::PathBuf, std::path::PathBuf) {
    let erp = init_node(scratch, "erp-site");
    let crm = init_node(scratch, "crm-site");
    for node in [&erp, &crm] {
        append_config(node, policies);
    }
    for (node, fields) in [(&erp, erp_fields), (&crm, crm_fields)] {
        let mut args = vec!["put", "customers/1"];
        args.extend_from_slice(fields);
        ok(concord(node, &args));
    }
    exchange(&erp, &crm, "customers/1", scratch);
    (erp, crm)
}

fn exchange(a: &std::path::Path, b: &std::path::Path, id: &str, scratch: &std::path::Path) {
    let from_a = scratch.join("from-a.automerge");
    let from_b = scratch.join("from-b.automerge");
    ok(concord(a, &["export", id, "-o", from_a.to_str().unwrap()]));
    ok(concord(b, &["export", id, "-o", from_b.to_str().unwrap()]));
    ok(concord(a, &["import", id, from_b.to_str().unwrap()]));
    ok(concord(b, &["import", id, from_a.to_str().unwrap()]));
}

fn saved_state(
    node: &std::path::Path,
    id: &str,
    scratch: &std::path::Path,
) -> (Vec<automerge::ChangeHash>, Value) {
    let file = scratch.join("state.automerge");
    ok(concord(node, &["export", id, "-o", file.to_str().unwrap()]));
    let doc = automerge::Automerge::load(&std::fs::read(file).unwrap()).unwrap();
    let mut heads = doc.get_heads();
    heads.sort();
    (
        heads,
        serde_json::to_value(automerge::AutoSerde::from(&doc)).unwrap(),
    )
}

#[test]
fn concurrent_edit_and_delete_merge_the_same_in_both_orders() {
    let temp = tempfile::tempdir().unwrap();
    let a = init_node(temp.path(), "a");
    let b = init_node(temp.path(), "b");
    ok(concord(&a, &["put", "c/1", "name=Ada", "city=London"]));
    let base = temp.path().join("base.automerge");
    ok(concord(
        &a,
        &["export", "c/1", "-o", base.to_str().unwrap()],
    ));
    ok(concord(&b, &["import", "c/1", base.to_str().unwrap()]));

    // Concurrently: a edits, b deletes.
    ok(concord(&a, &["put", "c/1", "city=Paris", "phone=123"]));
    ok(concord(&b, &["delete", "c/1"]));

    // a merges b's delete; b merges a's edit: opposite orders.
    exchange(&a, &b, "c/1", temp.path());
    let state_a = saved_state(&a, "c/1", temp.path());
    let state_b = saved_state(&b, "c/1", temp.path());
    assert_eq!(state_a, state_b);
    // The delete wins over the concurrent edit, on both nodes.
    assert_eq!(concord(&a, &["get", "c/1"]).status.code(), Some(2));
    assert_eq!(concord(&b, &["get", "c/1"]).status.code(), Some(2));

    // A later write re-creates the record, and that too converges.
    ok(concord(&b, &["put", "c/1", "name=Grace"]));
    exchange(&a, &b, "c/1", temp.path());
    assert_eq!(get_json(&a, "c/1"), json!({"name": "Grace"}));
    assert_eq!(get_json(&b, "c/1"), json!({"name": "Grace"}));
}

#[test]
fn malformed_ids_are_refused_with_the_rule() {
    let temp = tempfile::tempdir().unwrap();
    let node = init_node(temp.path(), "a");
    let long_collection = format!("{}/1", "c".repeat(65));
    let long_key = format!("c/{}", "k".repeat(257));
    let cases: Vec<(&str, &str)> = vec![
        ("nokey", "must have the form COLLECTION/KEY"),
        ("Customers/1", "a-z, 0-9"),
        ("/1", "a-z, 0-9"),
        (long_collection.as_str(), "1-64 characters"),
        ("c/", "1-256 bytes"),
        (long_key.as_str(), "1-256 bytes"),
        ("c/a\tb", "printable"),
        ("c//a", "must not start or end with '/'"),
        ("c/a/", "must not start or end with '/'"),
        ("_actors/x", "reserved"),
    ];
    for (id, rule) in cases {
        for args in [vec!["put", id, "a=1"], vec!["get", id], vec!["delete", id]] {
            if args[0] == "get" && rule == "reserved" {
                // Concord's own collections read as `list` and `history` read them.
                let output = concord(&node, &args);
                assert_eq!(
                    output.status.code(),
                    Some(2),
                    "{args:?}: {}",
                    stderr(&output)
                );
                continue;
            }
            let output = concord(&node, &args);
            assert_eq!(output.status.code(), Some(1), "{args:?}");
            let message = stderr(&output);
            assert!(message.contains(rule), "{args:?}: {message}");
            assert_eq!(message.lines().count(), 1, "one line: {message}");
        }
    }
}

#[test]
fn malformed_values_are_refused_with_the_rule() {
    let temp = tempfile::tempdir().unwrap();
    let node = init_node(temp.path(), "a");
    let deep = format!("x={}1{}", "[".repeat(40), "]".repeat(40));
    let long_field = format!("{}=1", "f".repeat(257));
    let cases: Vec<(&str, &str)> = vec![
        ("noequals", "is not FIELD=VALUE"),
        ("=1", "must not be empty"),
        ("@deleted=true", "reserved"),
        (deep.as_str(), "nested deeper"),
        (long_field.as_str(), "at most 256 bytes"),
    ];
    for (assignment, rule) in cases {
        let output = concord(&node, &["put", "c/1", assignment]);
        assert_eq!(output.status.code(), Some(1), "{assignment}");
        assert!(
            stderr(&output).contains(rule),
            "{assignment}: {}",
            stderr(&output)
        );
    }
    // Nothing was written by any refused command.
    assert_eq!(concord(&node, &["get", "c/1"]).status.code(), Some(2));
    // A broken import file is refused too.
    let junk = temp.path().join("junk");
    std::fs::write(&junk, b"not an automerge document").unwrap();
    refused(
        concord(&node, &["import", "c/1", junk.to_str().unwrap()]),
        1,
        "not an Automerge document",
    );
}

#[test]
fn usage_errors_and_conventions() {
    let temp = tempfile::tempdir().unwrap();
    // No data dir anywhere.
    let output = concord_bare(&["get", "c/1"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("CONCORD_DATA"));
    // A data dir that was never initialized.
    let output = concord(&temp.path().join("nothing"), &["get", "c/1"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("concord init"));
    // Unknown subcommand or flag: usage error, exit 1, message on stderr.
    let output = concord_bare(&["frobnicate"]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stdout(&output).is_empty());
    // --help succeeds on stdout.
    let output = concord_bare(&["--help"]);
    assert_eq!(output.status.code(), Some(0));
    assert!(stdout(&output).contains("Usage"));
    // init refuses to overwrite a data dir.
    let node = init_node(temp.path(), "a");
    let output = concord_bare(&["init", node.to_str().unwrap()]);
    assert_eq!(output.status.code(), Some(1));
    assert!(stderr(&output).contains("already a Concord data dir"));
    // CONCORD_DATA stands for --data.
    let output = std::process::Command::new(common::concord_binary())
        .args(["put", "c/1", "a=1"])
        .env("CONCORD_DATA", &node)
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(get_json(&node, "c/1"), json!({"a": 1}));
}

#[test]
fn bad_config_fails_with_one_clear_line() {
    let temp = tempfile::tempdir().unwrap();
    let node = init_node(temp.path(), "a");
    let config = node.join("concord.toml");
    let original = std::fs::read_to_string(&config).unwrap();
    for (text, expected) in [
        (format!("{original}\nunknown_key = 1\n"), "unknown_key"),
        (
            original.replace("cache_documents = 4096", "cache_documents = 0"),
            "store.cache_documents",
        ),
        ("[node\n".to_owned(), "concord.toml"),
        (
            format!("{original}\n[[policies]]\ncollection = \"c\"\npolicy = \"priority\"\n"),
            "needs an order",
        ),
        (
            format!("{original}\n[[policies]]\ncollection = \"c\"\npolicy = \"newest\"\n"),
            "newest",
        ),
        (
            format!(
                "{original}\n[[policies]]\ncollection = \"c\"\npolicy = \"custom\"\nscript = \"let = ;\"\n"
            ),
            "script does not compile",
        ),
        (
            format!(
                "{original}\n[[policies]]\ncollection = \"c\"\npolicy = \"lww\"\nscript = \"0\"\n"
            ),
            "script is for policy \"custom\"",
        ),
    ] {
        std::fs::write(&config, text).unwrap();
        let output = concord(&node, &["get", "c/1"]);
        assert_eq!(output.status.code(), Some(1));
        let message = stderr(&output);
        assert!(message.contains(expected), "{message}");
        assert!(message.contains("concord.toml"), "{message}");
    }
    std::fs::write(&config, original).unwrap();
    std::fs::write(node.join("node.id"), "zz\n").unwrap();
    refused(concord(&node, &["get", "c/1"]), 1, "node.id");
}

#[test]
fn load_writes_json_lines_and_refuses_bad_lines() {
    let temp = tempfile::tempdir().unwrap();
    let node = init_node(temp.path(), "a");
    let input = temp.path().join("in.jsonl");
    std::fs::write(
        &input,
        "{\"id\": 1, \"name\": \"Ada\"}\n\n{\"id\": \"two\", \"name\": \"Grace\"}\n",
    )
    .unwrap();
    let acked = ok(concord(
        &node,
        &["load", "people", input.to_str().unwrap(), "--ack"],
    ));
    assert_eq!(
        acked.lines().collect::<Vec<_>>(),
        vec!["people/1", "people/two"]
    );
    assert_eq!(
        get_json(&node, "people/two"),
        json!({"id": "two", "name": "Grace"})
    );
    std::fs::write(
        &input,
        "{\"id\": 3}\n{\"name\": \"no key\"}\nnot json\n{\"id\": 4}\n",
    )
    .unwrap();
    // The first bad line stops the load, naming it; the lines before it are loaded.
    refused(
        concord(&node, &["load", "people", input.to_str().unwrap()]),
        1,
        "line 2",
    );
    assert_eq!(get_json(&node, "people/3"), json!({"id": 3}));
    assert_eq!(concord(&node, &["get", "people/4"]).status.code(), Some(2));
    // --skip-bad names each bad line, loads the rest and sums up.
    let skipping = concord(
        &node,
        &["load", "people", input.to_str().unwrap(), "--skip-bad"],
    );
    let said = stderr(&skipping);
    assert!(skipping.status.success(), "{said}");
    assert!(said.contains("line 2") && said.contains("line 3"), "{said}");
    assert!(
        said.contains("loaded 2 records; skipped 2 bad lines"),
        "{said}"
    );
    assert_eq!(get_json(&node, "people/4"), json!({"id": 4}));
}

/// A saved Automerge document whose one change sets `field` to a string of `size` bytes.
fn document_with_value(size: usize) -> Vec<u8> {
    use automerge::transaction::Transactable;
    let mut doc = automerge::Automerge::new();
    let mut tx = doc.transaction();
    tx.put(automerge::ROOT, "blob", "d".repeat(size)).unwrap();
    tx.commit();
    doc.save()
}

#[test]
fn writes_over_the_change_limit_are_refused_with_the_limit_named() {
    let temp = tempfile::tempdir().unwrap();
    let data = init_node(temp.path(), "n");
    let limit = concord::record::document::CHANGE_BYTES_MAX.to_string();
    let big = temp.path().join("big.txt");
    std::fs::write(&big, "b".repeat(5_000_000)).unwrap();
    let output = concord(
        &data,
        &[
            "put",
            "t/big",
            "--value-file",
            &format!("blob={}", big.display()),
        ],
    );
    refused(output, 1, &limit);
    let missing = concord(&data, &["get", "t/big"]);
    assert_eq!(missing.status.code(), Some(2));
    let file = temp.path().join("big.automerge");
    std::fs::write(&file, document_with_value(5_000_000)).unwrap();
    let output = concord(&data, &["import", "t/imported", file.to_str().unwrap()]);
    assert_eq!(stderr(&output).lines().count(), 1, "{}", stderr(&output));
    refused(output, 1, &limit);
    assert_eq!(
        concord(&data, &["get", "t/imported"]).status.code(),
        Some(2)
    );
    // Just under: stored, and read back whole.
    let large = temp.path().join("large.txt");
    std::fs::write(&large, "l".repeat(3_000_000)).unwrap();
    ok(concord(
        &data,
        &[
            "put",
            "t/large",
            "--value-file",
            &format!("blob={}", large.display()),
        ],
    ));
    let record = get_json(&data, "t/large");
    assert_eq!(record["blob"].as_str().unwrap().len(), 3_000_000);
}

/// A saved Automerge document that `edit` writes, stamped `hlc` ms (as Concord stamps).
fn document(edit: impl FnOnce(&mut automerge::transaction::Transaction<'_>), hlc: u64) -> Vec<u8> {
    use automerge::transaction::CommitOptions;
    let mut doc = automerge::Automerge::new();
    let mut tx = doc.transaction();
    edit(&mut tx);
    tx.commit_with(
        CommitOptions::default()
            .with_message(format!("{{\"hlc\":{hlc}}}"))
            .with_time((hlc / 1000) as i64),
    );
    doc.save()
}

#[test]
fn import_refuses_documents_that_break_the_rules_and_stores_nothing() {
    use automerge::transaction::Transactable;
    let temp = tempfile::tempdir().unwrap();
    let node = init_node(temp.path(), "a");
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64;
    let deep = |tx: &mut automerge::transaction::Transaction<'_>| {
        let mut object = automerge::ROOT;
        for level in 0..41 {
            object = tx
                .put_object(&object, format!("l{level}"), automerge::ObjType::Map)
                .unwrap();
        }
    };
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        (
            "an empty field name",
            document(|tx| tx.put(automerge::ROOT, "", 1).unwrap(), now),
            "must not be empty",
        ),
        ("nesting 41 deep", document(deep, now), "nested deeper"),
        (
            "a field of Concord's own",
            document(|tx| tx.put(automerge::ROOT, "@evil", 1).unwrap(), now),
            "reserved",
        ),
        (
            "a tombstone that is not a boolean",
            document(
                |tx| tx.put(automerge::ROOT, "@deleted", "yes").unwrap(),
                now,
            ),
            "boolean",
        ),
        (
            "a tombstone set beside a field",
            document(
                |tx| {
                    tx.put(automerge::ROOT, "@deleted", true).unwrap();
                    tx.put(automerge::ROOT, "credit", 1).unwrap();
                },
                now,
            ),
            "sets @deleted beside other fields",
        ),
        (
            "a change stamped an hour ahead",
            document(
                |tx| tx.put(automerge::ROOT, "credit", 1).unwrap(),
                now + 3_600_000,
            ),
            "later than this node accepts",
        ),
    ];
    for (what, bytes, said) in cases {
        let file = temp.path().join("bad.automerge");
        std::fs::write(&file, bytes).unwrap();
        let output = concord(&node, &["import", "c/bad", file.to_str().unwrap()]);
        assert_eq!(output.status.code(), Some(1), "{what}: {}", stderr(&output));
        let message = stderr(&output);
        assert!(message.contains(said), "{what}: {message}");
        assert_eq!(
            message.trim().lines().count(),
            1,
            "{what}: one line: {message}"
        );
        // Nothing of it was stored.
        assert_eq!(
            concord(&node, &["get", "c/bad"]).status.code(),
            Some(2),
            "{what}"
        );
    }
    // A good document still imports, and the clock of the next write is this node's own.
    let file = temp.path().join("good.automerge");
    std::fs::write(
        &file,
        document(|tx| tx.put(automerge::ROOT, "credit", 1).unwrap(), now),
    )
    .unwrap();
    ok(concord(
        &node,
        &["import", "c/good", file.to_str().unwrap()],
    ));
    assert_eq!(get_json(&node, "c/good"), json!({"credit": 1}));
}
