//! Tests of documents and write sessions over a memory store.

use super::*;
use crate::record::document::{apply_delete, apply_write, RecordWrite};
use crate::record::held::HeldDoc;
use crate::store::digest;
use crate::store::layout::SNAPSHOT_INLINE_BYTES_MAX;
use crate::store::MemoryStore;
use automerge::ReadDoc;
use serde_json::json;

fn open(store: MemoryStore, node: NodeId, compact: u32) -> DocStore<MemoryStore> {
    let config = DocStoreConfig {
        cache_documents: NonZeroUsize::new(2).unwrap(),
        compact_after_changes: compact,
        ..DocStoreConfig::default()
    };
    DocStore::open(store, node, config).unwrap()
}

/// Sets field `v` to `value` at wall clock `time_ms`.
fn set_at(docs: &DocStore<MemoryStore>, id: &RecordId, actor: &ActorId, time_ms: i64, value: i64) {
    let write = RecordWrite {
        set: vec![("v".to_owned(), json!(value))],
        ..Default::default()
    };
    docs.write(id, actor, time_ms, Durability::Durable, |tx| {
        apply_write(tx, &write)
    })
    .unwrap();
}

fn set(docs: &DocStore<MemoryStore>, id: &RecordId, actor: &ActorId, field: &str, value: i64) {
    let write = RecordWrite {
        set: vec![(field.to_owned(), json!(value))],
        ..Default::default()
    };
    docs.write(id, actor, 0, Durability::Durable, |tx| {
        apply_write(tx, &write)
    })
    .unwrap();
}

/// Every leaf of the digest of what `reader` may read, as cached now and as a build
/// from scratch finds it.
fn scoped_leaves(docs: &DocStore<MemoryStore>, reader: &NodeId) -> Vec<Option<digest::Aggregate>> {
    (0..digest::LEAVES)
        .map(|leaf| docs.scoped_digest(reader, &format!("{leaf:03x}")).unwrap())
        .collect()
}

#[test]
fn a_scoped_digest_follows_commits_made_while_and_after_it_is_built() {
    use crate::scope::{Grant, Scope, ScopeDoor, Scopes, Verified};
    let node = NodeId::random().unwrap();
    let reader = NodeId([9; 16]);
    let docs = open(MemoryStore::new(), node, 4);
    let mut scopes = Scopes::default();
    scopes.insert(
        Verified::Grant(Grant {
            cluster: [1; 16],
            node: reader.0,
            read: vec![Scope::parse("gw").unwrap()],
            write: Vec::new(),
            issued_ms: 1,
        }),
        b"signature",
    );
    let scopes = std::sync::Arc::new(std::sync::RwLock::new(scopes));
    docs.set_door(std::sync::Arc::new(ScopeDoor::new(node, scopes)));
    let actor = node.actor(0);
    let records = 3 * SCAN_PAGE_ENTRIES / 2;
    for n in 0..records {
        for collection in ["gw", "other"] {
            set(
                &docs,
                &RecordId::parse(&format!("{collection}/{n}")).unwrap(),
                &actor,
                "n",
                1,
            );
        }
    }
    // Built a page at a time while writes go on, before and after the pages read so far;
    // then kept up to date by each commit.
    let write_some = |round: usize| {
        for n in 0..records {
            let collection = if n % 2 == 0 { "gw" } else { "other" };
            let key = (n * 7 + round) % (2 * records);
            let id = RecordId::parse(&format!("{collection}/{key}")).unwrap();
            set(&docs, &id, &actor, "n", (n + round) as i64);
        }
    };
    docs.begin_scoped_build(&reader);
    let mut after = docs.scoped_build_page(None).unwrap();
    let mut round = 1;
    while let Some(last) = after {
        write_some(round);
        round += 1;
        after = docs.scoped_build_page(Some(&last)).unwrap();
    }
    let (tree, generation) = docs.finish_scoped_build().unwrap();
    assert_eq!(generation, Some(docs.inner().digest_generation));
    let built: Vec<_> = (0..digest::LEAVES)
        .map(|leaf| tree.get(&format!("{leaf:03x}")))
        .collect();
    docs.inner().scoped_digests.clear();
    assert_eq!(built, scoped_leaves(&docs, &reader));
    write_some(round);
    let kept = {
        let inner = docs.inner();
        assert_eq!(inner.scoped_digests.len(), 1);
        assert_eq!(inner.scoped_digests[0].generation, inner.digest_generation);
        inner.scoped_digests[0].tree.clone()
    };
    docs.inner().scoped_digests.clear();
    let fresh = scoped_leaves(&docs, &reader);
    let kept: Vec<_> = (0..digest::LEAVES)
        .map(|leaf| kept.get(&format!("{leaf:03x}")))
        .collect();
    assert_eq!(kept, fresh);
    assert_ne!(
        built, fresh,
        "the writes after the build changed the digest"
    );
    // It covers the readable collection alone.
    let count: u64 = fresh
        .iter()
        .flatten()
        .map(|aggregate| aggregate.count)
        .sum();
    let gw = crate::record::Collection::new("gw").unwrap();
    let held = docs.scan_collection(&gw, None, 10 * records).unwrap().len();
    assert!(held > records, "the writer added records to gw");
    assert_eq!(count, held as u64);
}

#[test]
fn a_withdrawal_keeps_this_stores_own_changes_whether_or_not_the_document_is_loaded() {
    let node = NodeId::random().unwrap();
    let store = MemoryStore::new();
    let docs = open(store.clone(), node, 4);
    let own = node.actor(0);
    let other = NodeId::random().unwrap().actor(0);
    let ids: Vec<RecordId> = (0..5)
        .map(|n| RecordId::parse(&format!("c/{n}")).unwrap())
        .collect();
    let mut written = Vec::new();
    for id in &ids {
        set(&docs, id, &other, "a", 1);
        let theirs = docs.heads(&id.to_doc_key()).unwrap()[0];
        set(&docs, id, &own, "b", 2);
        let ours = docs.heads(&id.to_doc_key()).unwrap()[0];
        written.push((theirs, ours));
    }
    // The cache holds two documents: c/0 is read from its stored form, c/4 is in use.
    assert!(!docs.inner().cache.contains(&ids[0].to_doc_key()));
    assert!(docs.inner().cache.contains(&ids[4].to_doc_key()));
    let keys = [ids[0].to_doc_key(), ids[4].to_doc_key()];
    let taken = docs.withdraw(&[&keys[0], &keys[1]]).unwrap();
    assert_eq!(taken.len(), 2);
    for (key, index) in keys.iter().zip([0, 4]) {
        let (theirs, ours) = written[index];
        assert!(docs.heads(key).unwrap().is_empty());
        assert!(docs.keeps_own_change(key, &ours).unwrap());
        assert!(!docs.keeps_own_change(key, &theirs).unwrap());
    }
    assert_eq!(docs.count_live().unwrap(), 3);
    // Written afresh here, the record would take the sequence numbers of the kept change:
    // refused, by this store and once it is opened again.
    let write_again = |docs: &DocStore<MemoryStore>| {
        let write = RecordWrite {
            set: vec![("c".to_owned(), json!(3))],
            ..Default::default()
        };
        docs.write(&ids[0], &own, 0, Durability::Durable, |tx| {
            apply_write(tx, &write)
        })
    };
    assert!(matches!(
        write_again(&docs),
        Err(StoreError::OutsideGrant(_))
    ));
    drop(docs);
    let reopened = open(store, node, 4);
    assert!(matches!(
        write_again(&reopened),
        Err(StoreError::OutsideGrant(_))
    ));
    // A record never withdrawn is written as before.
    set(&reopened, &ids[1], &own, "c", 3);
}

#[test]
fn a_write_is_stamped_to_the_millisecond_with_its_writer() {
    let node = NodeId::random().unwrap();
    let docs = open(MemoryStore::new(), node, 4);
    let actor = node.actor(0);
    docs.name_writer(&actor, "erp", "paris", node);
    let id = RecordId::parse("c/1").unwrap();
    let write = |time_ms: i64, value: i64| {
        let write = RecordWrite {
            set: vec![("v".to_owned(), json!(value))],
            ..Default::default()
        };
        docs.write(&id, &actor, time_ms, Durability::Durable, |tx| {
            apply_write(tx, &write)
        })
        .unwrap();
    };
    write(1_764_000_000_250, 1);
    // A second write in the same millisecond still stamps after the first.
    write(1_764_000_000_250, 2);
    let stamps: Vec<(ChangeStamp, i64)> = docs
        .read(&id, |doc| {
            doc.changes(&[])
                .iter()
                .map(|change| {
                    let stamp = ChangeStamp::of_change(change.message(), change.timestamp());
                    (stamp, change.timestamp())
                })
                .collect()
        })
        .unwrap();
    // The same millisecond, the counter one up: the clock stays at the wall clock.
    let expected = |lc| ChangeStamp {
        hlc: 1_764_000_000_250,
        lc,
        src: Some("erp".into()),
        site: Some("paris".into()),
        node: Some(node.to_string()),
        reverts: None,
    };
    assert_eq!(
        stamps,
        vec![(expected(0), 1_764_000_000), (expected(1), 1_764_000_000)]
    );
}

/// A burst of writes to one record, faster than one a millisecond, keeps its stamps at the
/// wall clock: the logical counter counts, the milliseconds do not run ahead (peers would
/// hold changes stamped too far ahead of their own clocks).
#[test]
fn a_burst_to_one_record_keeps_its_stamps_at_the_wall_clock() {
    let node = NodeId::random().unwrap();
    let docs = open(MemoryStore::new(), node, 1_000_000);
    let id = RecordId::parse("c/hot").unwrap();
    let wall = 1_764_000_000_000;
    for value in 0..1_000 {
        set_at(&docs, &id, &node.actor(0), wall + value / 100, value);
    }
    let last = docs
        .read(&id, |doc| {
            doc.changes(&[])
                .iter()
                .map(|change| ChangeStamp::of_change(change.message(), change.timestamp()))
                .max_by_key(ChangeStamp::clock)
        })
        .unwrap()
        .unwrap();
    // 1,000 writes over 10 ms of wall clock: the last is stamped at the last wall millisecond.
    assert_eq!(last.hlc, u64::try_from(wall + 9).unwrap());
    assert_eq!(last.lc, 99);
}

#[test]
fn writes_survive_reopen_and_compaction() {
    let store = MemoryStore::new();
    let node = NodeId::random().unwrap();
    let docs = open(store.clone(), node, 4);
    let actor = node.actor(0);
    let ids: Vec<_> = (0..5)
        .map(|i| RecordId::parse(&format!("c/{i}")).unwrap())
        .collect();
    for round in 0..10 {
        for id in &ids {
            set(&docs, id, &actor, "n", round);
        }
    }
    docs.write(&ids[0], &actor, 0, Durability::Durable, |tx| {
        apply_delete(tx)
    })
    .unwrap();
    store.crash(0);
    let reopened = open(store, node, 4);
    assert_eq!(
        reopened
            .read(&ids[0], |doc| document::read(doc.local()))
            .unwrap(),
        None
    );
    // The repair digest rebuilt from disk equals the one kept up to date by the writes.
    for prefix in crate::store::digest::children("") {
        assert_eq!(reopened.digest(&prefix), docs.digest(&prefix));
    }
    // The live count rebuilt from disk equals the one kept by the writes: 4 of 5 live.
    assert_eq!(reopened.count_live().unwrap(), 4);
    assert_eq!(docs.count_live().unwrap(), 4);
    let documents: u64 = crate::store::digest::children("")
        .iter()
        .map(|prefix| reopened.digest(prefix).unwrap().count)
        .sum();
    assert_eq!(documents, 5);
    for id in &ids[1..] {
        let fields = reopened
            .read(id, |doc| document::read(doc.local()))
            .unwrap()
            .unwrap();
        assert_eq!(fields.get("n"), Some(&json!(9)));
    }
    let listed = reopened
        .scan_collection(&Collection::new("c").unwrap(), None, 100)
        .unwrap();
    assert_eq!(listed.len(), 5);
    assert_eq!(
        listed[0].stored.record_state(),
        document::RecordState::Deleted
    );
    // 10 rounds of 5 records plus a delete, all logged in order under this node.
    let log = reopened.log_entries(&node, 0, 1000).unwrap();
    assert_eq!(log.len(), 51);
    assert!(log.windows(2).all(|pair| pair[0].0 + 1 == pair[1].0));
}

#[test]
fn deferred_writes_are_lost_only_until_synced() {
    let store = MemoryStore::new();
    let node = NodeId::random().unwrap();
    let docs = open(store.clone(), node, 32);
    let id = RecordId::parse("c/x").unwrap();
    let write = RecordWrite {
        set: vec![("a".to_owned(), json!(1))],
        ..Default::default()
    };
    docs.write(&id, &node.actor(0), 0, Durability::Deferred, |tx| {
        apply_write(tx, &write)
    })
    .unwrap();
    store.crash(0);
    let reopened = open(store.clone(), node, 32);
    assert_eq!(
        reopened
            .read(&id, |doc| document::read(doc.local()))
            .unwrap(),
        None
    );
    reopened
        .write(&id, &node.actor(0), 0, Durability::Deferred, |tx| {
            apply_write(tx, &write)
        })
        .unwrap();
    reopened.sync().unwrap();
    store.crash(0);
    let again = open(store, node, 32);
    assert!(again
        .read(&id, |doc| document::read(doc.local()))
        .unwrap()
        .is_some());
}

#[test]
fn a_store_of_an_older_format_opens_and_is_marked_with_this_one() {
    let store = MemoryStore::new();
    let node = NodeId::random().unwrap();
    open(store.clone(), node, 32);
    let mut batch = Batch::default();
    batch.put(
        layout::meta_key(layout::META_FORMAT),
        1u32.to_be_bytes().to_vec(),
    );
    store.apply(batch).unwrap();
    open(store.clone(), node, 32);
    assert_eq!(
        store.get(&layout::meta_key(layout::META_FORMAT)).unwrap(),
        Some(layout::STORE_FORMAT_VERSION.to_be_bytes().to_vec())
    );
}

#[test]
fn refuses_a_store_of_an_unknown_format() {
    let store = MemoryStore::new();
    let node = NodeId::random().unwrap();
    open(store.clone(), node, 32);
    let mut batch = Batch::default();
    batch.put(
        layout::meta_key(layout::META_FORMAT),
        (layout::STORE_FORMAT_VERSION + 1).to_be_bytes().to_vec(),
    );
    store.apply(batch).unwrap();
    let refused = DocStore::open(store, node, DocStoreConfig::default());
    let Err(error) = refused else {
        panic!("a store of a newer format opened");
    };
    assert!(matches!(error, StoreError::UnknownFormat { .. }));
    assert!(error.to_string().contains("newer concord"), "{error}");
}

#[test]
fn refuses_another_nodes_store() {
    let store = MemoryStore::new();
    open(store.clone(), NodeId::random().unwrap(), 32);
    let other = DocStore::open(store, NodeId::random().unwrap(), DocStoreConfig::default());
    assert!(matches!(other, Err(StoreError::WrongNode { .. })));
}

#[test]
fn failed_edit_writes_nothing() {
    let store = MemoryStore::new();
    let node = NodeId::random().unwrap();
    let docs = open(store.clone(), node, 32);
    let id = RecordId::parse("c/x").unwrap();
    let result = docs.write(&id, &node.actor(0), 0, Durability::Durable, |tx| {
        apply_write(tx, &RecordWrite::default())?;
        Err::<(), _>(RecordError::InvalidFieldName {
            field: String::new(),
            reason: "test",
        })
    });
    assert!(result.is_err());
    assert_eq!(store.unflushed_batches(), 0);
    assert_eq!(docs.read(&id, |doc| doc.heads()).unwrap(), vec![]);
}

#[test]
fn large_documents_keep_their_snapshot_apart() {
    let store = MemoryStore::new();
    let node = NodeId::random().unwrap();
    let docs = open(store.clone(), node, 32);
    let id = RecordId::parse("c/big").unwrap();
    // Incompressible text, since snapshots are compressed.
    let mut state = 0x2545_f491_4f6c_dd1d_u64;
    let text: String = (0..3 * SNAPSHOT_INLINE_BYTES_MAX)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            char::from(b'a' + (state % 26) as u8)
        })
        .collect();
    let write = RecordWrite {
        set: vec![("text".to_owned(), json!(text))],
        ..Default::default()
    };
    docs.write(&id, &node.actor(0), 0, Durability::Durable, |tx| {
        apply_write(tx, &write)
    })
    .unwrap();
    assert_eq!(
        docs.stored(&id).unwrap().unwrap().snapshot,
        Snapshot::External
    );
    set(&docs, &id, &node.actor(0), "small", 1);
    // The change went under a key of its own; the `D` value holds no change.
    assert_eq!(prefix_bytes(&docs, layout::APPENDED_PREFIX).0, 1);
    assert!(docs.stored(&id).unwrap().unwrap().changes.is_empty());
    store.crash(0);
    let reopened = open(store.clone(), node, 32);
    let fields = reopened
        .read(&id, |doc| document::read(doc.local()))
        .unwrap()
        .unwrap();
    assert_eq!(fields["text"], json!(text));
    assert_eq!(fields["small"], json!(1));
    // The log serves it from there.
    let logged = reopened.log_after(&node, 1, 10, usize::MAX).unwrap();
    assert_eq!(logged.len(), 1);
    assert_eq!(
        Some(
            automerge::Change::from_bytes(logged[0].change.clone())
                .unwrap()
                .hash()
        ),
        reopened
            .read(&id, |doc| doc.heads())
            .unwrap()
            .first()
            .copied()
    );
    // The snapshot is taken again only once the changes appended to it weigh a quarter of
    // it, and then they go.
    let snapshot_bytes = prefix_bytes(&reopened, layout::SNAPSHOTS_PREFIX).1;
    let mut writes = 1;
    let mut appended_bytes = 0;
    loop {
        let (count, bytes) = prefix_bytes(&reopened, layout::APPENDED_PREFIX);
        if count == 0 {
            break;
        }
        appended_bytes = bytes;
        writes += 1;
        set(&reopened, &id, &node.actor(0), "small", writes);
        assert!(writes < 1000, "the appended changes were never folded");
    }
    assert!(writes >= 32, "folded after {writes} changes");
    // Keys and values, short of the change that tipped it.
    assert!(
        appended_bytes >= snapshot_bytes / 4 - 200,
        "folded at {appended_bytes} bytes appended to a snapshot of {snapshot_bytes}"
    );
    store.crash(0);
    let reopened = open(store, node, 32);
    let fields = reopened
        .read(&id, |doc| document::read(doc.local()))
        .unwrap()
        .unwrap();
    assert_eq!(fields["small"], json!(writes));
}

#[test]
fn uncommitted_session_leaves_nothing_behind() {
    let store = MemoryStore::new();
    let node = NodeId::random().unwrap();
    let docs = open(store.clone(), node, 32);
    let first = RecordId::parse("c/1").unwrap();
    let second = RecordId::parse("c/2").unwrap();
    let write = RecordWrite {
        set: vec![("a".to_owned(), json!(1))],
        ..Default::default()
    };
    {
        let mut session = docs.session();
        session
            .write(&first, &node.actor(0), 0, |tx| apply_write(tx, &write))
            .unwrap();
        session
            .write(&second, &node.actor(0), 0, |tx| apply_write(tx, &write))
            .unwrap();
        // Dropped without commit, as after an error in a bulk load.
    }
    assert_eq!(
        docs.read(&first, |doc| document::read(doc.local()))
            .unwrap(),
        None
    );
    assert_eq!(
        docs.read(&second, |doc| document::read(doc.local()))
            .unwrap(),
        None
    );
    let mut session = docs.session();
    session
        .write(&first, &node.actor(0), 0, |tx| apply_write(tx, &write))
        .unwrap();
    session
        .write(&second, &node.actor(0), 0, |tx| apply_write(tx, &write))
        .unwrap();
    session.commit(Durability::Durable).unwrap();
    // One session, one atomic batch, then one flush.
    assert_eq!(store.unflushed_batches(), 0);
    assert!(docs
        .read(&second, |doc| document::read(doc.local()))
        .unwrap()
        .is_some());
    assert_eq!(docs.log_entries(&node, 0, 10).unwrap().len(), 2);
}

#[test]
fn the_cache_holds_no_more_memory_than_its_budget_however_long_the_histories() {
    let budget = 256 * 1024;
    let config = DocStoreConfig {
        cache_documents: NonZeroUsize::new(1000).unwrap(),
        cache_bytes: budget,
        compact_after_changes: 8,
        ..DocStoreConfig::default()
    };
    let node = NodeId::random().unwrap();
    let docs = DocStore::open(MemoryStore::new(), node, config).unwrap();
    let actor = node.actor(0);
    let ids: Vec<RecordId> = (0..40)
        .map(|i| RecordId::parse(&format!("t/r{i}")).unwrap())
        .collect();
    for round in 0..60 {
        for id in &ids {
            set(&docs, id, &actor, &format!("f{}", round % 5), round);
        }
        let (held, bytes) = docs.inner().cache.usage();
        assert!(
            bytes <= budget || held == 1,
            "{held} documents, {bytes} bytes"
        );
    }
    let (held, _) = docs.inner().cache.usage();
    assert!(
        held < ids.len(),
        "the budget, not the count, bounded the cache: {held}"
    );
    // What left the cache reads back whole.
    for id in &ids {
        let value = docs.read(id, |doc| document::read(doc.local())).unwrap();
        assert_eq!(value.map(|fields| fields.len()), Some(5));
    }
}

/// The weight of a loaded document per byte of its saved form (see
/// [`LOADED_BYTES_PER_SAVED_BYTE`]): documents as the store loads them (snapshot, then
/// changes), kept alive, against the process's resident memory.
#[test]
#[ignore = "a measurement: cargo test --release -p concord loaded_document_memory -- --ignored --nocapture"]
fn loaded_document_memory() {
    use automerge::transaction::Transactable;
    fn resident_bytes() -> usize {
        let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
        let pages: usize = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
        pages * 4096
    }
    // One size a process (`CONCORD_MEASURE_CHANGES`), since freed memory is reused.
    let changes: usize = std::env::var("CONCORD_MEASURE_CHANGES")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(100);
    // The saved forms first, then the documents loaded from them, as the store loads.
    let saved: Vec<Vec<u8>> = (0..300)
        .map(|d| {
            let mut doc = Automerge::new();
            for i in 0..changes {
                let mut tx = doc.transaction();
                tx.put(automerge::ROOT, format!("f{}", i % 6), (d * i) as i64)
                    .unwrap();
                tx.put(automerge::ROOT, "name", format!("customer {d} {i}"))
                    .unwrap();
                tx.commit();
            }
            doc.save()
        })
        .collect();
    let before = resident_bytes();
    let held: Vec<Automerge> = saved
        .iter()
        .map(|bytes| Automerge::load(bytes).unwrap())
        .collect();
    let grown = resident_bytes().saturating_sub(before);
    let ops: usize = held.iter().map(|doc| doc.stats().num_ops as usize).sum();
    let weights: usize = held
        .iter()
        .map(|doc| {
            Loaded {
                doc: HeldDoc::new(doc.clone(), None),
                stored: StoredDoc::default(),
                appended: Default::default(),
            }
            .weight()
        })
        .sum();
    println!(
        "{changes} changes a document: {grown} resident bytes for {} documents, {ops} ops: \
         {:.0} per document, {:.0} per op; weighed at {weights} ({:.2} of resident)",
        held.len(),
        grown as f64 / held.len() as f64,
        grown as f64 / ops as f64,
        weights as f64 / grown as f64,
    );
}

#[test]
fn a_session_larger_than_the_cache_loses_nothing() {
    // Found by the simulator: a session that touched more documents than the cache holds
    // reloaded an evicted one from the store, which did not have the session's writes yet.
    let store = MemoryStore::new();
    let node = NodeId::random().unwrap();
    let docs = open(store.clone(), node, 32);
    let ids: Vec<_> = (0..5)
        .map(|i| RecordId::parse(&format!("c/{i}")).unwrap())
        .collect();
    let mut session = docs.session();
    for (round, id) in ids.iter().chain(ids.iter()).enumerate() {
        let write = RecordWrite {
            set: vec![(format!("f{round}"), json!(round))],
            ..Default::default()
        };
        session
            .write(id, &node.actor(0), 0, |tx| apply_write(tx, &write))
            .unwrap();
    }
    session.commit(Durability::Durable).unwrap();
    let reopened = open(store, node, 32);
    let first = reopened
        .read(&ids[0], |doc| document::read(doc.local()))
        .unwrap()
        .unwrap();
    assert_eq!(first.get("f0"), Some(&json!(0)));
    assert_eq!(first.get("f5"), Some(&json!(5)));
    // Every log entry names a change its document holds.
    assert_eq!(
        reopened.log_after(&node, 0, 100, usize::MAX).unwrap().len(),
        10
    );
}

#[test]
fn withdrawals_are_numbered_in_order_and_survive_a_crash() {
    let store = MemoryStore::new();
    let node = NodeId::random().unwrap();
    let docs = open(store.clone(), node, 4);
    let actor = node.actor(0);
    let ids: Vec<_> = (0..3)
        .map(|i| RecordId::parse(&format!("c/{i}")).unwrap())
        .collect();
    for id in &ids {
        set(&docs, id, &actor, "n", 1);
    }
    assert_eq!(docs.last_withdrawal(), 0);
    let (two, zero) = (ids[2].to_doc_key(), ids[0].to_doc_key());
    // A document not held is not withdrawn, and takes no number.
    let taken = docs.withdraw(&[&two, b"c/absent", &zero]).unwrap();
    assert_eq!(taken, vec![two.clone(), zero.clone()]);
    // One batch numbers its withdrawals in key order.
    assert_eq!(
        docs.withdrawals_after(0, 10).unwrap(),
        vec![(1, zero.clone()), (2, two.clone())]
    );
    assert_eq!(docs.withdrawals_after(1, 10).unwrap(), vec![(2, two)]);
    // Withdrawals are written without a flush of their own: the next durable write makes
    // them durable with it.
    set(&docs, &ids[1], &actor, "n", 2);
    store.crash(0);
    let reopened = open(store, node, 4);
    assert_eq!(reopened.last_withdrawal(), 2);
    let one = ids[1].to_doc_key();
    assert_eq!(reopened.withdraw(&[&one]).unwrap(), vec![one.clone()]);
    assert_eq!(
        reopened.withdrawals_after(2, 10).unwrap(),
        vec![(3, ids[1].to_doc_key())]
    );
}

#[test]
fn a_document_withdrawn_twice_in_one_batch_is_counted_out_once() {
    let node = NodeId::random().unwrap();
    let docs = open(MemoryStore::new(), node, 4);
    let actor = node.actor(0);
    let (kept, twice) = (
        RecordId::parse("c/kept").unwrap(),
        RecordId::parse("c/twice").unwrap(),
    );
    set(&docs, &kept, &actor, "n", 1);
    set(&docs, &twice, &actor, "n", 1);
    assert_eq!(docs.count_live().unwrap(), 2);
    let key = twice.to_doc_key();
    // Once from its stored form, once from the cache: both asked in one session.
    assert_eq!(docs.withdraw(&[&key, &key]).unwrap(), vec![key.clone()]);
    assert_eq!(docs.count_live().unwrap(), 1);
    docs.read(&twice, |_| ()).unwrap();
    assert_eq!(docs.withdraw(&[&key, &key]).unwrap(), Vec::<Vec<u8>>::new());
    assert_eq!(docs.count_live().unwrap(), 1);
}

/// Keys under `prefix`, and the bytes of their keys and values.
fn prefix_bytes(docs: &DocStore<MemoryStore>, prefix: &[u8]) -> (usize, usize) {
    let (mut count, mut bytes) = (0, 0);
    for_each_entry(docs.backend(), prefix, |key, value| {
        count += 1;
        bytes += key.len() + value.len();
        Ok(())
    })
    .unwrap();
    (count, bytes)
}

#[test]
#[ignore = "a measurement: cargo test --release -p concord --lib bytes_by_key_space -- --ignored --nocapture"]
fn bytes_by_key_space() {
    let records = 10_000usize;
    let docs = open(
        MemoryStore::new(),
        NodeId([1; 16]),
        COMPACT_AFTER_CHANGES_DEFAULT,
    );
    let actor = NodeId([1; 16]).actor(0);
    let ids: Vec<RecordId> = (0..records)
        .map(|n| RecordId::parse(&format!("customers/{n}")).unwrap())
        .collect();
    let record = |n: usize| {
        json!({
            "name": format!("Customer {n}"),
            "email": format!("customer{n}@example.com"),
            "balance": n % 100_000,
            "active": !n.is_multiple_of(3),
        })
        .as_object()
        .unwrap()
        .clone()
    };
    let measure = |what: &str| {
        let mut total = 0;
        let mut line = Vec::new();
        for tag in layout::KEY_SPACES {
            let (count, bytes) = prefix_bytes(&docs, &[tag]);
            total += bytes;
            if count > 0 {
                line.push(format!(
                    "{}: {count} keys, {} B/record",
                    tag as char,
                    bytes / records
                ));
            }
        }
        println!("{what}: {} B/record; {}", total / records, line.join("; "));
    };
    for chunk in ids.chunks(1000) {
        let mut session = docs.session();
        for id in chunk {
            let n: usize = id.key.as_str().parse().unwrap();
            let write = RecordWrite::replace_with(record(n));
            session
                .write(id, &actor, 1_700_000_000_000, |tx| apply_write(tx, &write))
                .unwrap();
        }
        session.commit(Durability::Deferred).unwrap();
    }
    measure("loaded");
    for round in 0..5 {
        let mut session = docs.session();
        for (u, id) in ids.iter().enumerate().filter(|(u, _)| u % 2 == round % 2) {
            let write = RecordWrite {
                set: vec![("balance".to_owned(), json!(u + round))],
                ..RecordWrite::default()
            };
            session
                .write(id, &actor, 1_700_000_000_000 + round as i64, |tx| {
                    apply_write(tx, &write)
                })
                .unwrap();
        }
        session.commit(Durability::Deferred).unwrap();
    }
    measure("after 5 rounds of updates of half the records");
}

#[test]
#[ignore = "a measurement: cargo test --release -p concord --lib one_record_updated_many_times -- --ignored --nocapture"]
fn one_record_updated_many_times() {
    let updates: i64 = std::env::var("CONCORD_MEASURE_UPDATES")
        .ok()
        .and_then(|text| text.parse().ok())
        .unwrap_or(100_000);
    let node = NodeId([1; 16]);
    let docs = open(MemoryStore::new(), node, COMPACT_AFTER_CHANGES_DEFAULT);
    let actor = node.actor(0);
    let id = RecordId::parse("customers/1").unwrap();
    let start = std::time::Instant::now();
    let mut lap = std::time::Instant::now();
    for value in 0..updates {
        if value > 0 && value % (updates / 10).max(1) == 0 {
            println!(
                "{value} updates: the last {} took {:.2} s",
                (updates / 10).max(1),
                lap.elapsed().as_secs_f64()
            );
            lap = std::time::Instant::now();
        }
        let write = RecordWrite {
            set: vec![("balance".to_owned(), json!(value))],
            ..RecordWrite::default()
        };
        docs.write(
            &id,
            &actor,
            1_700_000_000_000 + value,
            Durability::Deferred,
            |tx| apply_write(tx, &write),
        )
        .unwrap();
    }
    let bytes = |prefix: &[u8]| prefix_bytes(&docs, prefix).1;
    println!(
        "{updates} updates of one field in {:.1} s: document {} bytes (snapshot apart {} bytes, \
         changes appended to it {} bytes), log {} bytes",
        start.elapsed().as_secs_f64(),
        bytes(layout::DOCS_PREFIX),
        bytes(layout::SNAPSHOTS_PREFIX),
        bytes(layout::APPENDED_PREFIX),
        bytes(layout::LOG_PREFIX),
    );
}

#[test]
fn a_durable_commit_that_adds_to_this_nodes_log_wakes_the_engine_and_nothing_else_does() {
    let node = NodeId::random().unwrap();
    let docs = open(MemoryStore::new(), node, 32);
    let id = RecordId::parse("c/x").unwrap();
    assert!(!docs.local_writes().take(), "nothing written yet");
    set(&docs, &id, &node.actor(0), "a", 1);
    assert!(docs.local_writes().take(), "a durable write is told");
    assert!(!docs.local_writes().take(), "told once");
    set(&docs, &id, &node.actor(0), "a", 1);
    assert!(!docs.local_writes().take(), "a write that changed nothing");
    let write = RecordWrite {
        set: vec![("b".to_owned(), json!(2))],
        ..Default::default()
    };
    docs.write(&id, &node.actor(0), 0, Durability::Deferred, |tx| {
        apply_write(tx, &write)
    })
    .unwrap();
    assert!(!docs.local_writes().take(), "not durable yet");
    let mut session = docs.session();
    session.put_state(b"binding.cursor", b"7".to_vec());
    session.commit(Durability::Durable).unwrap();
    assert!(
        !docs.local_writes().take(),
        "state only: the log did not grow"
    );
}
