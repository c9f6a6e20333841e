//! Conflict policies: whose value a field shows when several places wrote it concurrently.
//!
//! Automerge keeps every concurrent value of a field and picks one deterministically; a
//! policy, configured per collection or per field (`[[policies]]` in `concord.toml`), may
//! pick another:
//!
//! - `merge` (the default): Automerge's own choice;
//! - `lww`: the latest write by hybrid logical clock ([`crate::record::stamp`]), ties by actor;
//! - `priority`: the value of the highest-ranked source or site in `order`, ties by `lww`;
//! - `manual`: Automerge's choice stands and the conflict waits for a person, who settles it
//!   with a new write (`concord resolve`), which replicates like any other.
//!
//! Guarantee: resolution is a pure function of the document and the policy. Every input (the
//! candidates, their writers' names, their clocks) is read from the document's own changes,
//! so every node that holds the same changes shows the same winner, whatever order the
//! changes arrived in, with no coordination. Nothing here writes: the document keeps every
//! candidate, so a changed policy or a settlement never loses one.

use std::collections::BTreeMap;

use automerge::{Automerge, ChangeHash, ObjId, ReadDoc, Value, ROOT};
use serde::Serialize;
use serde_json::{Map, Value as Json};

use crate::config::{PolicyKind, PolicySection};
use crate::record::document::{self, RESERVED_FIELD_PREFIX};
use crate::record::stamp::ChangeStamp;
use crate::record::NodeId;

/// The rule for one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    Merge,
    Lww,
    /// Sources or sites, highest first.
    Priority(Vec<String>),
    Manual,
}

impl Policy {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Merge => "merge",
            Self::Lww => "lww",
            Self::Priority(_) => "priority",
            Self::Manual => "manual",
        }
    }

    fn of_section(section: &PolicySection) -> Self {
        match section.policy {
            PolicyKind::Merge => Self::Merge,
            PolicyKind::Lww => Self::Lww,
            PolicyKind::Priority => Self::Priority(section.order.clone()),
            PolicyKind::Manual => Self::Manual,
        }
    }
}

/// The policies of a node, by collection and by field.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Policies {
    collections: BTreeMap<String, Policy>,
    fields: BTreeMap<(String, String), Policy>,
}

const MERGE: Policy = Policy::Merge;

impl Policies {
    pub fn from_config(sections: &[PolicySection]) -> Self {
        let mut policies = Self::default();
        for section in sections {
            let policy = Policy::of_section(section);
            match &section.field {
                Some(field) => {
                    policies
                        .fields
                        .insert((section.collection.clone(), field.clone()), policy);
                }
                None => {
                    policies
                        .collections
                        .insert(section.collection.clone(), policy);
                }
            }
        }
        policies
    }

    /// The rule for `field` of `collection`: its own, else the collection's, else `merge`.
    pub fn policy(&self, collection: &str, field: &str) -> &Policy {
        self.fields
            .get(&(collection.to_owned(), field.to_owned()))
            .or_else(|| self.collections.get(collection))
            .unwrap_or(&MERGE)
    }

    /// Whether every field of `collection` is left to Automerge (reads need no resolving).
    pub fn all_merge(&self, collection: &str) -> bool {
        self.collections
            .get(collection)
            .is_none_or(|policy| *policy == Policy::Merge)
            && self
                .fields
                .iter()
                .all(|((of, _), policy)| of != collection || *policy == Policy::Merge)
    }
}

/// One value written concurrently to a field, and what its change says of its writer.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Candidate {
    pub value: Json,
    /// The Automerge actor, hex.
    pub actor: String,
    /// The node the actor belongs to, when it is a Concord actor.
    pub node: Option<String>,
    pub source: Option<String>,
    pub site: Option<String>,
    /// Hybrid logical clock of the change, ms since the Unix epoch.
    pub hlc: u64,
    /// The same as a time (RFC 3339, ms), by the writer's clock as pushed past its parents'.
    pub time: String,
    /// The change that wrote it.
    pub change: String,
}

/// A field with more than one concurrent value.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldConflict {
    pub field: String,
    pub candidates: Vec<Candidate>,
    /// Index into `candidates` of the value the record shows.
    pub winner: usize,
    /// The policy that picked it.
    pub rule: &'static str,
    /// A `manual` conflict that waits for a person.
    pub pending: bool,
}

/// The record as it is (or was, at `heads`) with every conflicting field resolved by its
/// policy; `None` when it is deleted or was never written.
pub fn read(
    doc: &Automerge,
    heads: Option<&[ChangeHash]>,
    collection: &str,
    policies: &Policies,
) -> Option<Map<String, Json>> {
    let mut fields = document::read_at(doc, heads)?;
    if policies.all_merge(collection) {
        return Some(fields);
    }
    for conflict in conflicts_at(doc, heads, collection, policies) {
        let winner = conflict.candidates[conflict.winner].value.clone();
        fields.insert(conflict.field, winner);
    }
    Some(fields)
}

/// Every field of the record that holds more than one concurrent value, with the winner its
/// policy picks. Empty for a deleted record.
pub fn conflicts(doc: &Automerge, collection: &str, policies: &Policies) -> Vec<FieldConflict> {
    conflicts_at(doc, None, collection, policies)
}

fn conflicts_at(
    doc: &Automerge,
    heads: Option<&[ChangeHash]>,
    collection: &str,
    policies: &Policies,
) -> Vec<FieldConflict> {
    if document::read_at(doc, heads).is_none() {
        return Vec::new();
    }
    let keys: Vec<String> = match heads {
        Some(heads) => doc.keys_at(ROOT, heads).collect(),
        None => doc.keys(ROOT).collect(),
    };
    let mut found = Vec::new();
    for field in keys {
        if field.starts_with(RESERVED_FIELD_PREFIX) {
            continue;
        }
        let values = match heads {
            Some(heads) => doc.get_all_at(ROOT, field.as_str(), heads),
            None => doc.get_all(ROOT, field.as_str()),
        };
        let Ok(values) = values else { continue };
        if values.len() < 2 {
            continue;
        }
        let default = match heads {
            Some(heads) => doc.get_at(ROOT, field.as_str(), heads),
            None => doc.get(ROOT, field.as_str()),
        }
        .ok()
        .flatten()
        .map(|(_, id)| id);
        let mut candidates = Vec::with_capacity(values.len());
        let mut default_index = 0;
        for (value, id) in &values {
            if Some(id) == default.as_ref() {
                default_index = candidates.len();
            }
            candidates.push(candidate(doc, heads, value, id));
        }
        let policy = policies.policy(collection, &field);
        let winner = pick(policy, &candidates, default_index);
        found.push(FieldConflict {
            field,
            candidates,
            winner,
            rule: policy.name(),
            pending: *policy == Policy::Manual,
        });
    }
    found
}

fn candidate(
    doc: &Automerge,
    heads: Option<&[ChangeHash]>,
    value: &Value<'_>,
    id: &ObjId,
) -> Candidate {
    let change = doc.hash_for_opid(id);
    let stamp = change
        .and_then(|hash| ChangeStamp::of_hash(doc, &hash))
        .unwrap_or_default();
    let actor = match id {
        ObjId::Id(_, actor, _) => Some(actor.clone()),
        ObjId::Root => None,
    };
    Candidate {
        value: document::value_json(doc, value, id, heads).unwrap_or(Json::Null),
        actor: actor
            .as_ref()
            .map(|actor| actor.to_hex_string())
            .unwrap_or_default(),
        node: actor
            .as_ref()
            .and_then(NodeId::split_actor)
            .map(|(node, _)| node.to_string()),
        source: stamp.src,
        site: stamp.site,
        hlc: stamp.hlc,
        time: humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(stamp.hlc),
        )
        .to_string(),
        change: change.map(|hash| hash.to_string()).unwrap_or_default(),
    }
}

/// The index of the winning candidate under `policy`; `default` is Automerge's choice.
pub fn pick(policy: &Policy, candidates: &[Candidate], default: usize) -> usize {
    let latest = |among: &mut dyn Iterator<Item = usize>| {
        among
            .max_by(|a, b| {
                let (a, b) = (&candidates[*a], &candidates[*b]);
                (a.hlc, &a.actor).cmp(&(b.hlc, &b.actor))
            })
            .unwrap_or(default)
    };
    match policy {
        Policy::Merge | Policy::Manual => default,
        Policy::Lww => latest(&mut (0..candidates.len())),
        Policy::Priority(order) => {
            let rank = |candidate: &Candidate| {
                [&candidate.source, &candidate.site]
                    .into_iter()
                    .flatten()
                    .filter_map(|name| order.iter().position(|ranked| ranked == name))
                    .min()
                    .unwrap_or(order.len())
            };
            let best = candidates.iter().map(rank).min().unwrap_or(order.len());
            latest(&mut (0..candidates.len()).filter(|index| rank(&candidates[*index]) == best))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::document::{apply_write, RecordWrite};
    use crate::record::stamp::{next_hlc, ChangeStamp};
    use automerge::transaction::CommitOptions;
    use proptest::prelude::*;
    use serde_json::json;

    /// A writer: its node (one byte repeated), source and site names, and wall clock.
    #[derive(Debug, Clone)]
    struct Writer {
        node: u8,
        source: &'static str,
        site: &'static str,
    }

    /// Writes `field = value` as the store does: stamped with the writer's names and a
    /// clock pushed past the document's heads.
    fn write(doc: &mut Automerge, writer: &Writer, wall_ms: u64, field: &str, value: Json) {
        let hlc = next_hlc(doc, wall_ms);
        doc.set_actor(NodeId([writer.node; 16]).actor(0));
        let stamp = ChangeStamp {
            hlc,
            src: Some(writer.source.to_owned()),
            site: Some(writer.site.to_owned()),
        };
        let mut tx = doc.transaction();
        let write = RecordWrite {
            set: vec![(field.to_owned(), value)],
            ..RecordWrite::default()
        };
        apply_write(&mut tx, &write).unwrap();
        tx.commit_with(
            CommitOptions::default()
                .with_time(i64::try_from(wall_ms / 1000).unwrap())
                .with_message(stamp.to_message()),
        );
    }

    fn policies(policy: &str, order: &[&str]) -> Policies {
        Policies::from_config(&[PolicySection {
            collection: "customers".into(),
            field: None,
            policy: serde_json::from_value(json!(policy)).unwrap(),
            order: order.iter().map(|name| (*name).to_owned()).collect(),
        }])
    }

    fn field(doc: &Automerge, policies: &Policies) -> Json {
        read(doc, None, "customers", policies).unwrap()["address"].clone()
    }

    const ERP: Writer = Writer {
        node: 1,
        source: "erp",
        site: "paris",
    };
    const CRM: Writer = Writer {
        node: 2,
        source: "crm",
        site: "tokyo",
    };
    const WEB: Writer = Writer {
        node: 3,
        source: "web",
        site: "nyc",
    };
    const HOUR_MS: u64 = 3_600_000;
    const NOW_MS: u64 = 1_764_000_000_000;

    /// A record created at one place, then forked to each writer.
    fn base() -> Automerge {
        let mut doc = Automerge::new();
        write(&mut doc, &ERP, NOW_MS - 60_000, "name", json!("Ada"));
        doc
    }

    #[test]
    fn priority_keeps_the_erp_value_even_when_the_crm_wrote_later() {
        let mut erp = base().fork();
        let mut crm = base().fork();
        write(&mut erp, &ERP, NOW_MS, "address", json!("1 ERP Street"));
        write(
            &mut crm,
            &CRM,
            NOW_MS + 60_000,
            "address",
            json!("2 CRM Road"),
        );
        let mut merged = erp.clone();
        merged.merge(&mut crm.clone()).unwrap();
        let priority = policies("priority", &["erp", "crm"]);
        assert_eq!(field(&merged, &priority), json!("1 ERP Street"));
        // Ranked by site works too, and an unranked writer loses to a ranked one.
        assert_eq!(
            field(&merged, &policies("priority", &["tokyo"])),
            json!("2 CRM Road")
        );
        assert_eq!(field(&merged, &policies("lww", &[])), json!("2 CRM Road"));
        let found = conflicts(&merged, "customers", &priority);
        assert_eq!(found.len(), 1);
        let conflict = &found[0];
        assert_eq!(conflict.rule, "priority");
        assert_eq!(conflict.candidates.len(), 2);
        assert_eq!(
            conflict.candidates[conflict.winner].source.as_deref(),
            Some("erp")
        );
        assert!(!conflict.pending);
    }

    #[test]
    fn lww_is_not_fooled_by_a_clock_an_hour_ahead() {
        // The CRM node's clock runs an hour ahead. It writes; the ERP node sees that write,
        // then writes the field again a minute later by its own (right) clock.
        let mut doc = base();
        write(&mut doc, &CRM, NOW_MS + HOUR_MS, "address", json!("ahead"));
        write(&mut doc, &ERP, NOW_MS + 60_000, "address", json!("later"));
        let lww = policies("lww", &[]);
        assert_eq!(field(&doc, &lww), json!("later"));
        // Concurrently with that: a third site that never saw the ahead write, writing
        // after the ERP's, by a right clock, beats both.
        let mut web = base().fork();
        write(
            &mut web,
            &WEB,
            NOW_MS + HOUR_MS + 120_000,
            "address",
            json!("latest"),
        );
        doc.merge(&mut web).unwrap();
        assert_eq!(field(&doc, &lww), json!("latest"));
        // The record's next write, seen after all of that, wins whatever its wall clock.
        write(&mut doc, &ERP, NOW_MS, "address", json!("settled"));
        assert_eq!(field(&doc, &lww), json!("settled"));
        assert!(conflicts(&doc, "customers", &lww).is_empty());
    }

    #[test]
    fn manual_keeps_the_default_and_a_settlement_ends_the_conflict() {
        let mut erp = base().fork();
        let mut crm = base().fork();
        write(&mut erp, &ERP, NOW_MS, "address", json!("a"));
        write(&mut crm, &CRM, NOW_MS, "address", json!("b"));
        erp.merge(&mut crm).unwrap();
        let manual = policies("manual", &[]);
        let merge = policies("merge", &[]);
        assert_eq!(field(&erp, &manual), field(&erp, &merge));
        let found = conflicts(&erp, "customers", &manual);
        assert!(found[0].pending);
        // A person settles it: a new write after both candidates.
        write(&mut erp, &WEB, NOW_MS + 1, "address", json!("c"));
        assert!(conflicts(&erp, "customers", &manual).is_empty());
        assert_eq!(field(&erp, &manual), json!("c"));
    }

    #[test]
    fn a_field_policy_overrides_the_collection_policy() {
        let policies = Policies::from_config(&[
            PolicySection {
                collection: "customers".into(),
                field: None,
                policy: PolicyKind::Lww,
                order: Vec::new(),
            },
            PolicySection {
                collection: "customers".into(),
                field: Some("billing_address".into()),
                policy: PolicyKind::Priority,
                order: vec!["erp".into()],
            },
        ]);
        assert_eq!(policies.policy("customers", "name"), &Policy::Lww);
        assert_eq!(
            policies.policy("customers", "billing_address"),
            &Policy::Priority(vec!["erp".into()])
        );
        assert_eq!(policies.policy("orders", "name"), &Policy::Merge);
        assert!(policies.all_merge("orders"));
        assert!(!policies.all_merge("customers"));
    }

    fn writer(index: usize) -> Writer {
        [ERP, CRM, WEB][index % 3].clone()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(64))]

        /// Two or three sites write one field concurrently (some of them twice, the second
        /// time after seeing another site's write); every merge order gives every node the
        /// same winner under every policy, and the winner is the one the policy names.
        #[test]
        fn every_merge_order_resolves_the_same(
            sites in 2usize..=3,
            clocks in proptest::collection::vec(0u64..5_000, 3),
            rewrite in proptest::collection::vec(any::<bool>(), 3),
            order in Just(vec![0usize, 1, 2]).prop_shuffle(),
        ) {
            let mut docs: Vec<Automerge> = (0..sites).map(|_| base().fork()).collect();
            for (index, doc) in docs.iter_mut().enumerate() {
                let value = json!(format!("from site {index}"));
                write(doc, &writer(index), NOW_MS + clocks[index], "address", value);
            }
            // A site that rewrites first merges its neighbour's document.
            for index in 0..sites {
                if rewrite[index] {
                    let mut neighbour = docs[(index + 1) % sites].clone();
                    docs[index].merge(&mut neighbour).unwrap();
                    let value = json!(format!("rewritten at site {index}"));
                    write(&mut docs[index], &writer(index), NOW_MS + clocks[index], "address", value);
                }
            }
            let all_policies = [
                policies("merge", &[]),
                policies("lww", &[]),
                policies("priority", &["crm", "web", "erp"]),
                policies("manual", &[]),
            ];
            let mut outcomes: Vec<Vec<Json>> = Vec::new();
            for start in 0..sites {
                // Merge every document into site `start`'s, in the shuffled order.
                let mut merged = docs[start].clone();
                for &index in order.iter().filter(|index| **index < sites) {
                    let mut other = docs[index].clone();
                    merged.merge(&mut other).unwrap();
                }
                outcomes.push(all_policies.iter().map(|p| field(&merged, p)).collect());
                let found = conflicts(&merged, "customers", &all_policies[1]);
                if let Some(conflict) = found.first() {
                    let best = conflict.candidates.iter().map(|c| (c.hlc, c.actor.clone())).max().unwrap();
                    let winner = &conflict.candidates[conflict.winner];
                    prop_assert_eq!((winner.hlc, winner.actor.clone()), best);
                }
                let found = conflicts(&merged, "customers", &all_policies[2]);
                if let Some(conflict) = found.first() {
                    let rank = |c: &Candidate| ["crm", "web", "erp"].iter().position(|n| Some(*n) == c.source.as_deref()).unwrap();
                    let best = conflict.candidates.iter().map(rank).min().unwrap();
                    prop_assert_eq!(rank(&conflict.candidates[conflict.winner]), best);
                }
            }
            for outcome in &outcomes[1..] {
                prop_assert_eq!(outcome, &outcomes[0]);
            }
        }
    }
}
