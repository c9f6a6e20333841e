//! Random histories over three replicas, one of them compacted part way: every replica must
//! read alike (values, conflicts and their winners, list and text order, counters) and name the
//! same heads, and compacting at the same cut must give the same base wherever it is done.

use automerge::transaction::Transactable;
use automerge::{ActorId, Automerge, Change, ObjId, ObjType, ReadDoc, ScalarValue, Value, ROOT};

use super::*;
use crate::record::held::HeldDoc;

/// A small deterministic generator (xorshift), so a failing seed replays.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

fn actor(byte: u8) -> ActorId {
    ActorId::from(vec![byte; 18])
}

/// What a document reads, with every conflict and the id of every value, as text.
fn dump(doc: &Automerge) -> String {
    let mut out = String::new();
    dump_object(doc, &ROOT, ObjType::Map, &mut out);
    out
}

fn dump_object(doc: &Automerge, obj: &ObjId, kind: ObjType, out: &mut String) {
    let mut values = Vec::new();
    match kind {
        ObjType::Map | ObjType::Table => {
            for key in doc.keys(obj) {
                for (value, id) in doc.get_all(obj, key.as_str()).unwrap() {
                    values.push((key.clone(), value, id));
                }
            }
        }
        ObjType::List | ObjType::Text => {
            if kind == ObjType::Text {
                out.push_str(&format!("text {:?}\n", doc.text(obj).unwrap()));
            }
            for index in 0..doc.length(obj) {
                for (value, id) in doc.get_all(obj, index).unwrap() {
                    values.push((format!("[{index}]"), value, id));
                }
            }
        }
    }
    for (at, value, id) in values {
        match value {
            Value::Object(kind) => {
                out.push_str(&format!("{obj} {at} = {kind:?} {id}\n"));
                dump_object(doc, &id, kind, out);
            }
            Value::Scalar(scalar) => out.push_str(&format!("{obj} {at} = {scalar} {id}\n")),
        }
    }
}

/// One random edit in one transaction: fields, counters, a nested map, a list and a text.
fn edit(doc: &mut Automerge, rng: &mut Rng) {
    let mut tx = doc.transaction();
    let field = format!("f{}", rng.below(4));
    let found = |tx: &automerge::transaction::Transaction<'_>, name: &str, kind: ObjType| match tx
        .get(ROOT, name)
        .unwrap()
    {
        Some((Value::Object(found), id)) if found == kind => Some(id),
        _ => None,
    };
    match rng.below(12) {
        0 | 1 => tx.put(ROOT, field, rng.below(100) as i64).unwrap(),
        2 => {
            if tx.get(ROOT, field.as_str()).unwrap().is_some() {
                tx.delete(ROOT, field).unwrap();
            }
        }
        3 => match found(&tx, "count", ObjType::Map) {
            _ if matches!(
                tx.get(ROOT, "n").unwrap(),
                Some((Value::Scalar(ref s), _)) if matches!(s.as_ref(), ScalarValue::Counter(_))
            ) =>
            {
                tx.increment(ROOT, "n", rng.below(5) as i64 + 1).unwrap()
            }
            _ => tx.put(ROOT, "n", ScalarValue::counter(10)).unwrap(),
        },
        4 => {
            let map = match found(&tx, "m", ObjType::Map) {
                Some(map) => map,
                None => tx.put_object(ROOT, "m", ObjType::Map).unwrap(),
            };
            tx.put(&map, format!("k{}", rng.below(3)), rng.below(9) as i64)
                .unwrap();
        }
        5..=8 => {
            let list = match found(&tx, "l", ObjType::List) {
                Some(list) => list,
                None => tx.put_object(ROOT, "l", ObjType::List).unwrap(),
            };
            let length = tx.length(&list) as u64;
            match rng.below(6) {
                0 | 1 => tx
                    .insert(&list, rng.below(length + 1) as usize, rng.below(50) as i64)
                    .unwrap(),
                2 if length > 0 => tx.delete(&list, rng.below(length) as usize).unwrap(),
                3 if length > 0 => tx
                    .put(
                        &list,
                        rng.below(length) as usize,
                        rng.below(50) as i64 + 100,
                    )
                    .unwrap(),
                // Objects inside elements: a map inserted, and written into.
                4 => {
                    let at = rng.below(length + 1) as usize;
                    let map = tx.insert_object(&list, at, ObjType::Map).unwrap();
                    tx.put(&map, "v", rng.below(9) as i64).unwrap();
                }
                5 if length > 0 => {
                    let at = rng.below(length) as usize;
                    if let Some((Value::Object(ObjType::Map), map)) = tx.get(&list, at).unwrap() {
                        tx.put(&map, format!("k{}", rng.below(2)), rng.below(9) as i64)
                            .unwrap();
                    }
                }
                _ => {}
            }
        }
        _ => {
            let text = match found(&tx, "t", ObjType::Text) {
                Some(text) => text,
                None => tx.put_object(ROOT, "t", ObjType::Text).unwrap(),
            };
            let length = tx.length(&text) as u64;
            let at = rng.below(length + 1) as usize;
            let delete = rng.below(3).min(length - at as u64) as isize;
            let words = ["a", "bc", "def", ""];
            tx.splice_text(&text, at, delete, words[rng.below(4) as usize])
                .unwrap();
        }
    }
    // Each change stamped as a node stamps it, so that the base carries stamps too.
    let stamp = crate::record::stamp::ChangeStamp {
        hlc: rng.below(1_000),
        ..Default::default()
    };
    tx.commit_with(
        automerge::transaction::CommitOptions::default()
            .with_message(stamp.to_message())
            .with_time(rng.below(1_000) as i64),
    );
}

/// Three replicas sharing their changes now and then; replica 0 is compacted at a moment all
/// three hold the same heads, later again, and the edits go on throughout.
struct Mesh {
    plain: Vec<Automerge>,
    /// Replica 0 compacted, once it is.
    compacted: Option<(Automerge, Epoch)>,
    /// Every original change, in the order it was made.
    log: Vec<Change>,
}

impl Mesh {
    fn new() -> Self {
        Self {
            plain: (0..3u8)
                .map(|i| Automerge::new().with_actor(actor(i + 1)))
                .collect(),
            compacted: None,
            log: Vec::new(),
        }
    }

    fn edit(&mut self, replica: usize, rng: &mut Rng) {
        match (&mut self.compacted, replica) {
            (Some((doc, epoch)), 0) => {
                let before = doc.get_heads();
                edit(doc, rng);
                if let Some(local) = doc
                    .get_last_local_change()
                    .filter(|_| doc.get_heads() != before)
                {
                    let original = epoch.native(&local).unwrap_or_else(|e| {
                        let chain: Vec<_> = doc
                            .get_changes(&[])
                            .iter()
                            .map(|c| (c.hash(), c.actor_id().clone(), c.seq(), c.deps().to_vec()))
                            .collect();
                        panic!(
                            "{e}: local {:?} deps {:?}, base {:?}, changes {chain:?}",
                            local.hash(),
                            local.deps(),
                            epoch.base
                        )
                    });
                    if !self.log.iter().any(|c| c.hash() == original.hash()) {
                        self.log.push(original);
                    }
                }
            }
            _ => {
                let doc = &mut self.plain[replica];
                let before = doc.get_heads();
                edit(doc, rng);
                if let Some(local) = doc
                    .get_last_local_change()
                    .filter(|_| doc.get_heads() != before)
                {
                    if !self.log.iter().any(|c| c.hash() == local.hash()) {
                        self.log.push(local);
                    }
                }
            }
        }
    }

    /// Replica `to` takes every change `from` holds.
    fn sync(&mut self, from: usize, to: usize) {
        let held: Vec<Change> = self
            .log
            .iter()
            .filter(|change| self.holds(from, change))
            .cloned()
            .collect();
        for change in held {
            self.give(to, &change);
        }
    }

    fn holds(&self, replica: usize, change: &Change) -> bool {
        match (&self.compacted, replica) {
            (Some((_, epoch)), 0) => {
                epoch.holds_inside(change) || epoch.local_heads(&[change.hash()]).is_some()
            }
            _ => self.plain[replica]
                .get_change_by_hash(&change.hash())
                .is_some(),
        }
    }

    fn give(&mut self, replica: usize, change: &Change) {
        if let (Some((_, epoch)), 0) = (&mut self.compacted, replica) {
            // Seen again, a change inside the cut shows where changes concurrent with it go.
            epoch.note_inside(change);
        }
        if self.holds(replica, change) {
            return;
        }
        match (&mut self.compacted, replica) {
            (Some((doc, epoch)), 0) => match epoch.forward(change).unwrap() {
                Forwarded::Local(local) => {
                    let mut batch = Vec::new();
                    add_forwarded(doc, epoch, &mut batch, *local).unwrap();
                    doc.apply_changes(batch).unwrap();
                }
                Forwarded::InsideCut => {}
            },
            _ => self.plain[replica].apply_changes([change.clone()]).unwrap(),
        }
    }

    fn sync_all(&mut self) {
        for (from, to) in [(0, 1), (1, 2), (2, 0), (0, 1), (1, 2)] {
            self.sync(from, to);
        }
    }

    /// Replica 0's heads, as original hashes.
    fn heads(&self) -> Vec<ChangeHash> {
        match &self.compacted {
            Some((doc, epoch)) => epoch.original_heads(&doc.get_heads()).unwrap(),
            None => self.plain[0].get_heads(),
        }
    }

    /// Compacts replica 0 at `cut` (original heads every replica held when it was taken),
    /// whatever it took in since.
    fn compact(&mut self, cut: &[ChangeHash]) {
        let (doc, epoch) = match self.compacted.take() {
            Some((doc, epoch)) => (doc, Some(epoch)),
            None => (self.plain[0].clone(), None),
        };
        let local = match &epoch {
            Some(epoch) => epoch.local_heads(cut).unwrap(),
            None => cut.to_vec(),
        };
        let (mut compacted, next) = compact(&doc, epoch.as_ref(), &local).unwrap();
        compacted.set_actor(actor(1));
        assert_eq!(dump(&compacted), dump(&doc));
        // Saved and loaded again, as the store keeps it.
        let compacted = Automerge::load(&super::save_changes(&compacted))
            .unwrap_or_else(|error| {
                let changes: Vec<_> = compacted
                    .get_changes(&[])
                    .iter()
                    .map(|c| {
                        (
                            c.actor_id().clone(),
                            c.seq(),
                            c.start_op(),
                            c.len(),
                            c.deps().to_vec(),
                            c.message().map(str::to_owned),
                        )
                    })
                    .collect();
                panic!("{error}: {changes:?}")
            })
            .with_actor(actor(1));
        // The same cut, compacted from replica 1's whole history: the same base.
        let (_, whole) = compact(&self.plain[1], None, cut).unwrap();
        assert_eq!(whole.cut(), next.cut());
        assert_eq!(whole.base, next.base, "the base depends on the cut alone");
        // Kept as the store keeps it.
        let next = Epoch::from_bytes(&next.to_bytes()).unwrap();
        self.compacted = Some((compacted, next));
    }

    fn check(&self) {
        let (doc, epoch) = self.compacted.as_ref().unwrap();
        let reads = dump(doc);
        let heads = epoch.original_heads(&doc.get_heads()).unwrap();
        for plain in &self.plain[1..] {
            assert_eq!(dump(plain), reads);
            assert_eq!(plain.get_heads(), heads);
        }
    }
}

/// Random histories; with `lagging`, replica 2 is left out of every other cut (a node
/// restored from an old backup, say) and writes concurrently with it.
fn run(seed: u64, lagging: bool) {
    let mut rng = Rng(seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1);
    let mut mesh = Mesh::new();
    let mut cut: Option<Vec<ChangeHash>> = None;
    for _ in 0..4 {
        for _ in 0..40 {
            let replica = rng.below(3) as usize;
            match rng.below(10) {
                0 => mesh.sync(replica, rng.below(3) as usize),
                _ => mesh.edit(replica, &mut rng),
            }
        }
        // Compacted at the heads all held at the end of the round before, with what came
        // after them (all of it after the whole cut) kept on top.
        if let Some(cut) = cut.take() {
            mesh.compact(&cut);
        }
        if lagging && rng.below(2) == 0 {
            mesh.sync(0, 1);
            mesh.sync(1, 0);
        } else {
            mesh.sync_all();
        }
        cut = Some(mesh.heads());
    }
    mesh.sync_all();
    mesh.check();
}

#[test]
fn random_histories_read_alike_compacted_or_not() {
    for seed in 0..150 {
        run(seed, false);
    }
}

#[test]
fn random_histories_with_changes_concurrent_with_the_cut_read_alike() {
    for seed in 0..150 {
        run(seed, true);
    }
}

#[test]
fn a_record_updated_ten_thousand_times_compacts_to_almost_nothing() {
    let mut doc = Automerge::new().with_actor(actor(1));
    for i in 0..10_000i64 {
        let mut tx = doc.transaction();
        tx.put(ROOT, "price", i).unwrap();
        tx.put(ROOT, "@deleted", false).unwrap();
        tx.commit();
    }
    let before = doc.save().len();
    let (mut compacted, mut epoch) = compact(&doc, None, &doc.get_heads()).unwrap();
    let after = compacted.save().len();
    assert!(after < 300, "{before} bytes compacted to {after}");
    assert!(before > 20 * after);
    // A change written after the cut on the full history goes on in the compacted one.
    let mut tx = doc.transaction();
    tx.put(ROOT, "price", -1).unwrap();
    tx.commit();
    let change = doc.get_last_local_change().unwrap();
    let Forwarded::Local(local) = epoch.forward(&change).unwrap() else {
        panic!("a change after the cut");
    };
    compacted.apply_changes([(*local).clone()]).unwrap();
    assert_eq!(dump(&compacted), dump(&doc));
    assert_eq!(epoch.back(&local).unwrap().hash(), change.hash());
    assert_eq!(
        epoch.original_heads(&compacted.get_heads()).unwrap(),
        doc.get_heads()
    );
}

#[test]
fn a_change_concurrent_with_the_cut_merges_once_its_dependency_is_seen_again() {
    let mut a = Automerge::new().with_actor(actor(1));
    let first = put(&mut a, "x", 1);
    put(&mut a, "y", 1);
    let mut b = a.fork().with_actor(actor(2));
    let mut c = a.fork().with_actor(actor(3));
    put(&mut a, "x", 2);
    put(&mut a, "z", 1);
    // b writes concurrently with a's last changes (a node restored from an old backup, say),
    // and so does c, which deletes a field a wrote again.
    let late = put(&mut b, "x", 3);
    let mut tx = c.transaction();
    tx.delete(ROOT, "y").unwrap();
    tx.put(ROOT, "w", 1).unwrap();
    tx.commit();
    let other = c.get_last_local_change().unwrap();
    let mut held = HeldDoc::default();
    held.apply(a.get_changes(&[])).unwrap();
    held.compact(&a.get_heads(), usize::MAX).unwrap();
    // Its dependency lies inside the cut, which a compacted document cannot tell from one
    // not received yet: it waits, until the dependency is seen again.
    held.apply(vec![late.clone()]).unwrap();
    assert!(!held.holds_change(&late));
    let second = a.get_changes(&[])[1].clone();
    held.apply(vec![late.clone(), second, other.clone()])
        .unwrap();
    assert!(held.holds_change(&late) && held.holds_change(&other) && held.holds_change(&first));
    let mut whole = a.clone();
    whole.apply_changes([late, other]).unwrap();
    assert_eq!(dump(held.local()), dump(&whole));
    assert_eq!(held.heads(), whole.get_heads());
    // Kept, loaded again and compacted once more, it still reads as the history.
    eprintln!(
        "heads {:?} base {:?}",
        held.local().get_heads(),
        held.epoch().unwrap().base()
    );
    for change in held.local().get_changes(&[]) {
        eprintln!("{} <- {:?}", change.hash(), change.deps());
    }
    let (saved, epoch) = held.save();
    let mut loaded = HeldDoc::load(&saved, epoch.as_deref()).unwrap();
    assert_eq!(loaded.heads(), whole.get_heads());
    loaded.compact(&whole.get_heads(), usize::MAX).unwrap();
    assert_eq!(dump(loaded.local()), dump(&whole));
    assert_eq!(loaded.heads(), whole.get_heads());
}

#[test]
fn a_deleted_record_compacts_to_its_tombstone() {
    let mut doc = Automerge::new().with_actor(actor(1));
    for i in 0..1_000i64 {
        let mut tx = doc.transaction();
        tx.put(ROOT, "name", format!("name {i}")).unwrap();
        tx.put(ROOT, "note", "x".repeat(100)).unwrap();
        tx.commit();
    }
    let mut tx = doc.transaction();
    tx.delete(ROOT, "name").unwrap();
    tx.delete(ROOT, "note").unwrap();
    tx.put(ROOT, "@deleted", true).unwrap();
    tx.commit();
    let (compacted, _) = compact(&doc, None, &doc.get_heads()).unwrap();
    assert!(compacted.save().len() < 200, "{}", compacted.save().len());
    assert_eq!(dump(&compacted), dump(&doc));
}

/// Commits one put on `doc` and returns its change.
fn put(doc: &mut Automerge, field: &str, value: i64) -> Change {
    let mut tx = doc.transaction();
    tx.put(ROOT, field, value).unwrap();
    tx.commit();
    doc.get_last_local_change().unwrap()
}

#[test]
fn a_history_made_afresh_beside_the_cut_keeps_its_place_through_two_compactions() {
    // Two documents made afresh for the same record, merged later.
    let mut left = Automerge::new().with_actor(actor(1));
    let b1 = put(&mut left, "x", 1);
    let b2 = put(&mut left, "x", 2);
    let mut right = Automerge::new().with_actor(actor(2));
    let a1 = put(&mut right, "y", 1);
    let a2 = put(&mut right, "y", 2);
    let mut whole = Automerge::new().with_actor(actor(3));
    whole
        .apply_changes([b1.clone(), b2.clone(), a1, a2])
        .unwrap();
    right.apply_changes([b1.clone(), b2.clone()]).unwrap();
    let merge = put(&mut right, "y", 3);
    whole.apply_changes([merge.clone()]).unwrap();
    let mut held = HeldDoc::default();
    held.apply(whole.get_changes(&[]).into_iter().collect())
        .unwrap();
    held.compact(&[b1.hash()], usize::MAX).unwrap();
    assert_eq!(held.heads(), whole.get_heads());
    held.compact(&[b2.hash()], usize::MAX).unwrap();
    assert_eq!(held.heads(), whole.get_heads());
    assert_eq!(dump(held.local()), dump(&whole));
    let (saved, epoch) = held.save();
    let loaded = HeldDoc::load(&saved, epoch.as_deref()).unwrap();
    assert_eq!(loaded.heads(), whole.get_heads());
}

#[test]
fn an_actor_with_nothing_visible_stays_inside_the_cut_through_two_compactions() {
    let mut first = Automerge::new().with_actor(actor(2));
    let early = put(&mut first, "x", 1);
    let mut doc = Automerge::new().with_actor(actor(1));
    doc.apply_changes([early.clone()]).unwrap();
    let b1 = put(&mut doc, "x", 2);
    let mut held = HeldDoc::default();
    held.apply(doc.get_changes(&[])).unwrap();
    held.compact(&[b1.hash()], usize::MAX).unwrap();
    let b2 = put(&mut doc, "x", 3);
    held.apply(vec![b2.clone()]).unwrap();
    held.compact(&[b2.hash()], usize::MAX).unwrap();
    // The early change, sent again late, is known to lie inside the compacted history.
    held.apply(vec![early.clone()]).unwrap();
    assert_eq!(held.heads(), doc.get_heads());
    assert!(held.holds_change(&early));
    let (saved, epoch) = held.save();
    let loaded = HeldDoc::load(&saved, epoch.as_deref()).unwrap();
    assert!(loaded.holds_change(&early));
}
