//! The node's own rules, tested on real data dirs: times, retagging, grants.

use super::*;
use crate::scope::{Authority, Scope};
use serde_json::json;

#[test]
fn times_are_rfc_3339_with_any_offset_and_nothing_else() {
    let utc = parse_time("2026-12-06T00:00:00Z").unwrap();
    assert_eq!(utc, 1_796_515_200);
    assert_eq!(parse_time("2026-12-06T01:00:00+01:00").unwrap(), utc);
    assert_eq!(parse_time("2026-12-05T19:00:00-05:00").unwrap(), utc);
    assert_eq!(parse_time("2026-12-06T00:00:00.750z").unwrap(), utc);
    assert_eq!(parse_time("2026-12-06T00:00:00+01:00").unwrap(), utc - 3600);
    // RFC 3339 lets a space stand for the `T` (the note in its section 5.6).
    assert_eq!(parse_time("2026-12-06 00:00:00Z").unwrap(), utc);
    for bad in [
        "2026-12-06T00:00:00",
        "2026-12-06 09:00:00",
        "2026-12-06",
        "yesterday",
        "",
        " 2026-12-06T00:00:00Z",
    ] {
        assert!(
            matches!(parse_time(bad), Err(NodeError::BadTime(_))),
            "{bad:?}"
        );
    }
}

#[test]
fn entries_logged_before_a_filter_named_their_field_are_tagged_for_it() {
    let temp = tempfile::tempdir().unwrap();
    let ca = temp.path().join("ca");
    crate::net::tls::create_ca(&ca).unwrap();
    let make = |name: &str| {
        Node::create(
            &temp.path().join(name),
            &InitOptions {
                name: Some(name.into()),
                ca: Some(ca.clone()),
                ..InitOptions::default()
            },
        )
        .unwrap()
    };
    let (hq, edge) = (make("hq"), make("edge"));
    for (key, region) in [("1", "paris"), ("2", "tokyo"), ("3", "paris")] {
        let write = RecordWrite {
            set: vec![("region".to_owned(), json!(region))],
            ..RecordWrite::default()
        };
        hq.put(
            &RecordId::parse(&format!("customers/{key}")).unwrap(),
            &write,
        )
        .unwrap();
    }
    let writer = hq.writer();
    let customers = |docs: &DocStore<DiskStore>| {
        docs.log_entries(&writer, 0, 100)
            .unwrap()
            .into_iter()
            .filter(|(_, entry)| entry.doc_key.starts_with(b"customers/"))
            .map(|(_, entry)| entry)
            .collect::<Vec<_>>()
    };
    assert!(customers(hq.documents())
        .iter()
        .all(|entry| entry.tags.is_empty()));

    let scope = Scope::parse("customers:region=paris").unwrap();
    let signed = Authority::open(&ca)
        .unwrap()
        .grant(edge.id(), vec![scope.clone()], vec![scope], 1)
        .unwrap();
    hq.add_signed(&signed.to_bytes()).unwrap();
    hq.retag_all().unwrap();
    let tagged = customers(hq.documents());
    assert_eq!(tagged.len(), 3);
    for entry in &tagged {
        let region = if entry.doc_key == b"customers/2" {
            "\"tokyo\""
        } else {
            "\"paris\""
        };
        assert_eq!(
            entry.tags,
            vec![vec![("region".to_owned(), Some(region.to_owned()))]]
        );
    }
    // The edge is sent the Paris customers, judged by their tags.
    let sent = hq
        .documents()
        .log_readable_after(Some(&edge.id()), &writer, 0, 100, usize::MAX)
        .unwrap()
        .changes;
    let keys: Vec<&[u8]> = sent
        .iter()
        .map(|change| change.doc_key.as_slice())
        .filter(|key| key.starts_with(b"customers/"))
        .collect();
    assert_eq!(keys, [&b"customers/1"[..], b"customers/3"]);
    // Done: a second pass rewrites nothing.
    assert!(!hq.retag_step().unwrap());
}

/// A node in a new cluster, and the cluster's authority.
fn node_with_authority(parent: &Path) -> (Node, Authority) {
    let ca = parent.join("ca");
    crate::net::tls::create_ca(&ca).unwrap();
    let node = Node::create(
        &parent.join("hq"),
        &InitOptions {
            name: Some("hq".into()),
            ca: Some(ca.clone()),
            ..InitOptions::default()
        },
    )
    .unwrap();
    (node, Authority::open(&ca).unwrap())
}

fn grant_for(authority: &Authority, node: NodeId) -> Vec<u8> {
    let scope = Scope::parse("customers").unwrap();
    authority
        .grant(node, vec![scope.clone()], vec![scope], 1)
        .unwrap()
        .to_bytes()
}

#[test]
fn a_refresh_built_before_a_newer_one_never_publishes_after_it() {
    let temp = tempfile::tempdir().unwrap();
    let (node, authority) = node_with_authority(temp.path());
    let (first, second) = (NodeId([1; 16]), NodeId([2; 16]));
    // The first refresh stops between building its set (with `first` only) and publishing
    // it, until the second refresh (with both) finished or had time to.
    let (built, built_seen) = std::sync::mpsc::channel();
    let (go, go_seen) = std::sync::mpsc::channel::<()>();
    *node.registry.before_publish.lock().unwrap() = Some(Box::new(move || {
        built.send(()).unwrap();
        go_seen.recv().unwrap();
    }));
    let (node, authority) = (&node, &authority);
    std::thread::scope(|threads| {
        let older = threads.spawn(|| node.add_signed(&grant_for(authority, first)).unwrap());
        built_seen.recv().unwrap();
        let (done, done_seen) = std::sync::mpsc::channel();
        let newer = threads.spawn(move || {
            node.add_signed(&grant_for(authority, second)).unwrap();
            done.send(()).unwrap();
        });
        // Refreshes run one at a time: the newer one waits for the older to publish.
        let waited = done_seen.recv_timeout(std::time::Duration::from_millis(300));
        assert!(
            waited.is_err(),
            "the newer refresh published before the older one"
        );
        go.send(()).unwrap();
        older.join().unwrap();
        newer.join().unwrap();
    });
    let scopes = node.scopes();
    assert!(scopes.grant(&first).is_some());
    assert!(
        scopes.grant(&second).is_some(),
        "the newest set does not stand"
    );
}

#[test]
fn every_grant_counts_past_the_ten_thousandth() {
    let temp = tempfile::tempdir().unwrap();
    let (node, authority) = node_with_authority(temp.path());
    let count = 10_001u32;
    let nth = |i: u32| {
        let mut id = [0xee; 16];
        id[..4].copy_from_slice(&i.to_be_bytes());
        NodeId(id)
    };
    for i in 0..count {
        node.store_signed(&grant_for(&authority, nth(i)), Durability::Deferred)
            .unwrap();
    }
    node.refresh_scopes().unwrap();
    let scopes = node.scopes();
    for i in [0, 9_999, 10_000] {
        assert!(scopes.grant(&nth(i)).is_some(), "grant {i}");
    }
}

#[test]
fn a_compacted_records_history_starts_with_the_record_it_was_compacted_to() {
    let temp = tempfile::tempdir().unwrap();
    let node = Node::create(&temp.path().join("hq"), &InitOptions::default()).unwrap();
    let id = RecordId::parse("customers/1").unwrap();
    let write = |n: usize| RecordWrite {
        set: vec![
            ("n".to_owned(), json!(n)),
            ("name".to_owned(), json!("Ada")),
        ],
        ..RecordWrite::default()
    };
    let updates = 200;
    for n in 0..updates {
        node.put(&id, &write(n)).unwrap();
    }
    // Every change is stable (this node knows no other): the history is compacted.
    let docs = node.documents();
    let writer = node.writer();
    docs.reclaim_log(&[(writer, docs.origin_mark(&writer))])
        .unwrap();
    assert_eq!(docs.compact_stable().unwrap().documents, 1);
    // The compacted history is one entry; the change at the stable mark stays as written.
    let history = node.history(&id, None, 100).unwrap();
    assert!(history.len() <= 2, "{history:?}");
    let compacted = &history[0];
    assert_eq!(compacted.effect.action, "compacted");
    let at_cut = compacted.effect.set["n"].as_u64().unwrap() as usize;
    assert!(at_cut + history.len() == updates, "{history:?}");
    assert_eq!(compacted.effect.set["name"], json!("Ada"));
    // Its version is one the record can be read and paged at.
    let version: ChangeHash = compacted.hash.parse().unwrap();
    assert_eq!(
        node.get_at(&id, &version).unwrap().unwrap()["n"],
        json!(at_cut)
    );
    node.put(&id, &write(1_000)).unwrap();
    let history = node.history(&id, None, 100).unwrap();
    assert_eq!(history[0].effect.action, "compacted");
    assert_eq!(history.last().unwrap().effect.set["n"], json!(1_000));
    let after = node.history(&id, Some(&version), 100).unwrap();
    assert_eq!(after.len(), history.len() - 1);
    assert_eq!(after.last().unwrap().effect.set["n"], json!(1_000));
    assert!(node.revert(&id, &version).unwrap());
    assert_eq!(node.get(&id).unwrap().unwrap()["n"], json!(at_cut));
}
