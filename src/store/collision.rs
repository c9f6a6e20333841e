//! Colliding changes: two different changes with one actor and sequence number.
//!
//! Automerge refuses a change whose actor already has a change of that sequence in the
//! document, and no merge can hold both. Incarnations ([`super::incarnation`]) keep a node
//! from ever writing such a pair, but a store copied byte for byte, or brought back from an
//! older copy by hand, can still write under a writer whose sequence numbers were used. Such a
//! change must not split the cluster, nor storm its sender with disconnects. The rule:
//!
//! - of two colliding changes, the one whose stamp's clock is earlier stands (ties: the lower
//!   hash); the rule is a pure function of the two changes, so every node picks alike,
//!   whichever it received first;
//! - the other is refused, and so is every change that depends on a refused one: refused
//!   changes are kept apart (`R` keys) with the reason, listed by `concord refused`, counted in
//!   `concord_changes_refused_total{reason}`, and still take their place in their origin's
//!   log, which goes on serving them, so the sender's stream and every peer's marks move on;
//! - a node that holds the change that loses takes it out of the document, with everything
//!   that depends on it (the document is rebuilt from the changes that remain), and applies
//!   the one that stands;
//! - what a node's own writers wrote and lost this way is not lost: its effect is queued
//!   ([`super::layout::Reissue`], in the same atomic batch) and written again as a new change
//!   under the node's current writer ([`super::DocStore::reissue_pending`]), once the node took
//!   a new writer when its own was shown shared.
//!
//! Bounded: at most [`REFUSED_CHANGES_MAX`] refused changes keep their bytes, and at most
//! [`REFUSED_BYTES_MAX`] bytes of them; past that a refusal is still recorded and counted,
//! without the change, whose log place then serves nothing.

use automerge::{Change, ChangeHash};

use crate::record::stamp::{ChangeStamp, Clock};

/// Refused changes kept with their bytes, at most.
pub const REFUSED_CHANGES_MAX: usize = 100_000;
/// Bytes of refused changes kept, at most.
pub const REFUSED_BYTES_MAX: usize = 256 * 1024 * 1024;

/// The order of the rule: the change that sorts first stands.
fn rank(change: &Change) -> (Clock, ChangeHash) {
    let stamp = ChangeStamp::of_change(change.message(), change.timestamp());
    (stamp.clock(), change.hash())
}

/// Whether `incoming` stands against `held`, a different change with its actor and sequence.
pub fn stands_against(incoming: &Change, held: &Change) -> bool {
    assert!(
        incoming.actor_id() == held.actor_id() && incoming.seq() == held.seq(),
        "only colliding changes are ranked"
    );
    assert!(
        incoming.hash() != held.hash(),
        "a change does not collide with itself"
    );
    rank(incoming) < rank(held)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::held::HeldDoc;
    use automerge::transaction::{CommitOptions, Transactable};
    use automerge::ReadDoc;
    use automerge::{ActorId, Automerge};

    fn change(doc: &mut Automerge, actor: &ActorId, hlc: u64, value: i64) -> Change {
        doc.set_actor(actor.clone());
        let mut tx = doc.transaction();
        tx.put(automerge::ROOT, "credit", value).unwrap();
        let stamp = ChangeStamp {
            hlc,
            ..ChangeStamp::default()
        };
        let (hash, _) = tx.commit_with(CommitOptions::default().with_message(stamp.to_message()));
        doc.get_change_by_hash(&hash.unwrap()).unwrap()
    }

    #[test]
    fn the_earlier_of_two_colliding_changes_stands_and_the_later_comes_out_with_its_followers() {
        let actor = ActorId::from(vec![7u8; 18]);
        let other = ActorId::from(vec![8u8; 18]);
        let mut base = Automerge::new();
        let first = change(&mut base, &actor, 10, 1);
        // Two copies of one history go on under the same actor.
        let mut copy = base.fork();
        let early = change(&mut base, &actor, 20, 0);
        let late = change(&mut copy, &actor, 30, 42);
        let follower = change(&mut copy, &other, 31, 43);
        assert_eq!(early.seq(), late.seq());
        assert!(stands_against(&early, &late) && !stands_against(&late, &early));
        let copy = HeldDoc::new(copy, None);
        assert_eq!(copy.change_at(&actor, 2).unwrap().hash(), late.hash());
        let (mut rebuilt, removed) = copy.without(&[late.hash()]).unwrap();
        let removed: Vec<ChangeHash> = removed.iter().map(Change::hash).collect();
        assert_eq!(removed, vec![late.hash(), follower.hash()]);
        assert_eq!(rebuilt.heads(), vec![first.hash()]);
        rebuilt.apply(vec![early.clone()]).unwrap();
        assert_eq!(rebuilt.heads(), base.get_heads());
    }
}
