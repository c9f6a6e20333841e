//! Conflict policies: whose value a field shows when several places wrote it concurrently.
//!
//! Automerge keeps every concurrent value of a field and picks one deterministically; a
//! policy, configured per collection or per field (`[[policies]]` in `concord.toml`), may
//! pick another:
//!
//! - `merge` (the default): Automerge's own choice;
//! - `lww`: the latest write by hybrid logical clock ([`crate::record::stamp`]), ties by actor;
//! - `priority`: the value of the highest-ranked source or site in `order`, ties by `lww`;
//! - `custom`: a Rhai script ([`Script`]) given the field and the candidates returns the
//!   winner's index. It runs sandboxed: no clock, no files, no output, and a fixed budget of
//!   operations, string, array and map sizes, so a script that loops or grows without end is
//!   cut off at the same point on every node. A script that fails, is cut off or returns
//!   something other than an index leaves Automerge's choice standing and the conflict
//!   waiting for a person, as under `manual`;
//! - `manual`: Automerge's choice stands and the conflict waits for a person, who settles it
//!   with a new write (`concord resolve`), which replicates like any other.
//!
//! Nodes compare [`Policies::hash`] when they connect, and warn when theirs differ: two nodes
//! with different policies hold the same documents but show different winners.
//!
//! Guarantee: resolution is a pure function of the document and the policy. Every input (the
//! candidates, their writers' names, their clocks) is read from the document's own changes,
//! so every node that holds the same changes shows the same winner, whatever order the
//! changes arrived in, with no coordination. Nothing here writes: the document keeps every
//! candidate, so a changed policy or a settlement never loses one.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

use automerge::{Automerge, ChangeHash, ObjId, ReadDoc, Value, ROOT};
use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use crate::record::document::{self, RecordState, RESERVED_FIELD_PREFIX};
use crate::record::stamp::ChangeStamp;
use crate::record::NodeId;

/// Whose value wins a field written concurrently at several places.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PolicySection {
    pub collection: String,
    /// One field only; without it, every field of the collection that no entry of its own
    /// names.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub field: Option<String>,
    pub policy: PolicyKind,
    /// For `priority`: sources or sites, highest first.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub order: Vec<String>,
    /// For `custom`: the Rhai script that picks the winner (see `crate::policy::Script`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub script: Option<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum PolicyKind {
    /// Automerge's own deterministic choice.
    Merge,
    /// The latest write by hybrid logical clock; ties by actor.
    Lww,
    /// The highest-ranked source or site in `order`; ties by `lww`.
    Priority,
    /// The candidate a sandboxed script picks; a failing script leaves it to a person.
    Custom,
    /// Automerge's choice stands while the conflict waits for a person.
    Manual,
}

impl PolicyKind {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Merge => "merge",
            Self::Lww => "lww",
            Self::Priority => "priority",
            Self::Custom => "custom",
            Self::Manual => "manual",
        }
    }
}

/// Longest custom script, in bytes.
pub const SCRIPT_BYTES_MAX: usize = 64 * 1024;
/// Operations one run of a custom script may take (about one expression, call or loop turn
/// each): far more than ranking a few candidates needs, a few milliseconds at most, and the
/// same cutoff on every node, unlike a wall-clock limit.
pub const SCRIPT_OPERATIONS_MAX: u64 = 100_000;
/// Longest string a custom script may build.
pub const SCRIPT_STRING_BYTES_MAX: usize = 64 * 1024;
/// Most elements of an array, and entries of a map, a custom script may build: with the
/// string limit, what one run can hold stays in tens of megabytes.
pub const SCRIPT_COLLECTION_LEN_MAX: usize = 1_000;
/// Deepest nesting of function calls in a custom script.
pub const SCRIPT_CALL_LEVELS_MAX: usize = 16;
/// Deepest nesting of expressions in a custom script, checked when it is compiled.
pub const SCRIPT_EXPRESSION_DEPTH_MAX: usize = 32;

/// Why a node's policies cannot be used.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PolicyError {
    #[error("policies[{index}].script is {bytes} bytes; the most is {SCRIPT_BYTES_MAX}")]
    ScriptTooLong { index: usize, bytes: usize },
    #[error("policies[{index}].script does not compile: {message}")]
    ScriptInvalid { index: usize, message: String },
    #[error("policies[{index}]: policy \"custom\" needs a script")]
    ScriptMissing { index: usize },
}

/// A compiled custom resolver. The script sees `field` (the field's name), `candidates` (an
/// array of maps with the fields of [`Candidate`]) and `default_index` (the index of
/// Automerge's choice), and returns the index of the winner.
pub struct Script {
    source: String,
    ast: rhai::AST,
}

impl std::fmt::Debug for Script {
    fn fmt(&self, formatter: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        formatter.debug_tuple("Script").field(&self.source).finish()
    }
}

impl PartialEq for Script {
    fn eq(&self, other: &Self) -> bool {
        self.source == other.source
    }
}

impl Eq for Script {}

/// The one engine every script runs on: sandboxed and bounded (see the `SCRIPT_*` limits).
/// Rhai's `no_time` and `no_module` features (Cargo.toml) leave it no clock and no file
/// access; it prints nothing and cannot `eval`.
fn script_engine() -> &'static rhai::Engine {
    static ENGINE: OnceLock<rhai::Engine> = OnceLock::new();
    ENGINE.get_or_init(|| {
        let mut engine = rhai::Engine::new();
        engine
            .set_max_operations(SCRIPT_OPERATIONS_MAX)
            .set_max_string_size(SCRIPT_STRING_BYTES_MAX)
            .set_max_array_size(SCRIPT_COLLECTION_LEN_MAX)
            .set_max_map_size(SCRIPT_COLLECTION_LEN_MAX)
            .set_max_call_levels(SCRIPT_CALL_LEVELS_MAX)
            .set_max_expr_depths(SCRIPT_EXPRESSION_DEPTH_MAX, SCRIPT_EXPRESSION_DEPTH_MAX)
            .disable_symbol("eval");
        engine.on_print(|_| {});
        engine.on_debug(|_, _, _| {});
        engine
    })
}

impl Script {
    pub fn compile(source: &str) -> Result<Self, String> {
        let ast = script_engine()
            .compile(source)
            .map_err(|error| error.to_string())?;
        Ok(Self {
            source: source.to_owned(),
            ast,
        })
    }

    /// Runs the script on one conflict: the winner's index, or why there is none.
    pub fn pick(
        &self,
        field: &str,
        candidates: &[Candidate],
        default: usize,
    ) -> Result<usize, String> {
        let given = rhai::serde::to_dynamic(candidates).map_err(|error| error.to_string())?;
        let mut scope = rhai::Scope::new();
        scope.push_constant("field", field.to_owned());
        scope.push_constant("candidates", given);
        scope.push_constant("default_index", i64::try_from(default).unwrap_or(i64::MAX));
        // Rhai reports every failure as an error; a panic inside it would be a bug there, and
        // must cost this conflict its resolution, not the node its thread.
        let run = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            script_engine().eval_ast_with_scope::<rhai::Dynamic>(&mut scope, &self.ast)
        }));
        let returned = match run {
            Ok(Ok(returned)) => returned,
            Ok(Err(error)) => return Err(error.to_string()),
            Err(_) => return Err("the script engine panicked".to_owned()),
        };
        let type_name = returned.type_name();
        returned
            .as_int()
            .ok()
            .and_then(|index| usize::try_from(index).ok())
            .filter(|index| *index < candidates.len())
            .ok_or_else(|| {
                format!(
                    "the script returned {type_name}, not an index below {}",
                    candidates.len()
                )
            })
    }
}

/// The rule for one field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Policy {
    Merge,
    Lww,
    /// Sources or sites, highest first.
    Priority(Vec<String>),
    Custom(Arc<Script>),
    Manual,
}

impl Policy {
    pub fn name(&self) -> &'static str {
        match self {
            Self::Merge => "merge",
            Self::Lww => "lww",
            Self::Priority(_) => "priority",
            Self::Custom(_) => "custom",
            Self::Manual => "manual",
        }
    }

    fn of_section(index: usize, section: &PolicySection) -> Result<Self, PolicyError> {
        Ok(match section.policy {
            PolicyKind::Merge => Self::Merge,
            PolicyKind::Lww => Self::Lww,
            PolicyKind::Priority => Self::Priority(section.order.clone()),
            PolicyKind::Custom => {
                let source = section
                    .script
                    .as_deref()
                    .ok_or(PolicyError::ScriptMissing { index })?;
                if source.len() > SCRIPT_BYTES_MAX {
                    return Err(PolicyError::ScriptTooLong {
                        index,
                        bytes: source.len(),
                    });
                }
                let script = Script::compile(source)
                    .map_err(|message| PolicyError::ScriptInvalid { index, message })?;
                Self::Custom(Arc::new(script))
            }
            PolicyKind::Manual => Self::Manual,
        })
    }
}

/// The policies of a node, by collection and by field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Policies {
    collections: BTreeMap<String, Policy>,
    fields: BTreeMap<(String, String), Policy>,
    hash: [u8; 32],
}

impl Default for Policies {
    fn default() -> Self {
        Self::from_config(&[]).expect("no sections cannot fail")
    }
}

const MERGE: Policy = Policy::Merge;

impl Policies {
    pub fn from_config(sections: &[PolicySection]) -> Result<Self, PolicyError> {
        let mut collections = BTreeMap::new();
        let mut fields = BTreeMap::new();
        for (index, section) in sections.iter().enumerate() {
            let policy = Policy::of_section(index, section)?;
            match &section.field {
                Some(field) => {
                    fields.insert((section.collection.clone(), field.clone()), policy);
                }
                None => {
                    collections.insert(section.collection.clone(), policy);
                }
            }
        }
        let hash = hash_of(&collections, &fields);
        Ok(Self {
            collections,
            fields,
            hash,
        })
    }

    /// SHA-256 over every rule in a canonical order: equal on two nodes exactly when they
    /// resolve every field alike, however their `concord.toml` lists the rules.
    pub fn hash(&self) -> [u8; 32] {
        self.hash
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
    /// The clock's logical counter within that millisecond.
    pub lc: u32,
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
    /// A conflict that waits for a person: under `manual`, or when a `custom` script failed.
    pub pending: bool,
    /// Why the `custom` script picked no winner.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// The record as it is (or was, at `heads`) with every conflicting field resolved by its
/// policy; `None` when it is deleted or was never written.
pub fn read(
    doc: &Automerge,
    heads: Option<&[ChangeHash]>,
    collection: &str,
    policies: &Policies,
) -> Option<Map<String, Json>> {
    if policies.all_merge(collection) {
        return document::read_at(doc, heads);
    }
    if document::state_at(doc, heads) != RecordState::Live {
        return None;
    }
    // One pass over the fields: a field with one value is read as it is; of a conflicting
    // one, `merge` and `manual` show Automerge's choice, the others what they pick.
    let mut fields = Map::new();
    for (field, values) in field_values(doc, heads) {
        let policy = policies.policy(collection, &field);
        let shown = if values.len() < 2 || matches!(policy, Policy::Merge | Policy::Manual) {
            default_index(doc, heads, &field, &values)
        } else {
            let conflict = field_conflict(doc, heads, field.clone(), &values, policy);
            conflict.winner
        };
        let (value, id) = &values[shown];
        if let Some(value) = document::value_json(doc, value, id, heads) {
            fields.insert(field, value);
        }
    }
    Some(fields)
}

/// Every field of the record that holds more than one concurrent value, with the winner its
/// policy picks. Empty for a deleted record.
pub fn conflicts(doc: &Automerge, collection: &str, policies: &Policies) -> Vec<FieldConflict> {
    if document::state_at(doc, None) != RecordState::Live {
        return Vec::new();
    }
    field_values(doc, None)
        .filter(|(_, values)| values.len() > 1)
        .map(|(field, values)| {
            let policy = policies.policy(collection, &field);
            field_conflict(doc, None, field, &values, policy)
        })
        .collect()
}

type FieldValues<'a> = Vec<(Value<'a>, ObjId)>;

/// Each user field of the record (reserved ones left out) with all its concurrent values.
fn field_values<'a>(
    doc: &'a Automerge,
    heads: Option<&'a [ChangeHash]>,
) -> impl Iterator<Item = (String, FieldValues<'a>)> + 'a {
    let keys: Vec<String> = match heads {
        Some(heads) => doc.keys_at(ROOT, heads).collect(),
        None => doc.keys(ROOT).collect(),
    };
    keys.into_iter()
        .filter(|field| !field.starts_with(RESERVED_FIELD_PREFIX))
        .filter_map(move |field| {
            let values = match heads {
                Some(heads) => doc.get_all_at(ROOT, field.as_str(), heads),
                None => doc.get_all(ROOT, field.as_str()),
            };
            let mut values = values.ok().filter(|values| !values.is_empty())?;
            if values.len() > 1 {
                // Candidates in the order they were written (by clock, then actor), the same for
                // every field and on every node, so that `resolve --pick N` means one thing.
                values.sort_by_cached_key(|(_, id)| {
                    let clock = doc
                        .hash_for_opid(id)
                        .and_then(|hash| ChangeStamp::of_hash(doc, &hash))
                        .map(|stamp| stamp.clock())
                        .unwrap_or_default();
                    let actor = match id {
                        ObjId::Id(_, actor, _) => actor.to_hex_string(),
                        ObjId::Root => String::new(),
                    };
                    (clock, actor)
                });
            }
            Some((field, values))
        })
}

/// The index in `values` of Automerge's own choice for `field`.
fn default_index(
    doc: &Automerge,
    heads: Option<&[ChangeHash]>,
    field: &str,
    values: &FieldValues<'_>,
) -> usize {
    if values.len() < 2 {
        return 0;
    }
    let default = match heads {
        Some(heads) => doc.get_at(ROOT, field, heads),
        None => doc.get(ROOT, field),
    };
    let default = default.ok().flatten().map(|(_, id)| id);
    values
        .iter()
        .position(|(_, id)| Some(id) == default.as_ref())
        .unwrap_or(0)
}

/// The conflict of `field`, whose concurrent values are `values`, as `policy` resolves it.
fn field_conflict(
    doc: &Automerge,
    heads: Option<&[ChangeHash]>,
    field: String,
    values: &FieldValues<'_>,
    policy: &Policy,
) -> FieldConflict {
    let default = default_index(doc, heads, &field, values);
    let candidates: Vec<Candidate> = values
        .iter()
        .map(|(value, id)| candidate(doc, heads, value, id))
        .collect();
    let (winner, error) = match pick(policy, &field, &candidates, default) {
        Ok(winner) => (winner, None),
        Err(error) => (default, Some(error)),
    };
    FieldConflict {
        field,
        candidates,
        winner,
        rule: policy.name(),
        pending: *policy == Policy::Manual || error.is_some(),
        error,
    }
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
        lc: stamp.lc,
        time: humantime::format_rfc3339_millis(
            std::time::UNIX_EPOCH + std::time::Duration::from_millis(stamp.hlc),
        )
        .to_string(),
        change: change.map(|hash| hash.to_string()).unwrap_or_default(),
    }
}

/// The index of the winning candidate of `field` under `policy`, `default` being Automerge's
/// choice; or why a `custom` script picked none.
pub fn pick(
    policy: &Policy,
    field: &str,
    candidates: &[Candidate],
    default: usize,
) -> Result<usize, String> {
    let latest = |among: &mut dyn Iterator<Item = usize>| {
        among
            .max_by(|a, b| {
                let (a, b) = (&candidates[*a], &candidates[*b]);
                (a.hlc, a.lc, &a.actor).cmp(&(b.hlc, b.lc, &b.actor))
            })
            .unwrap_or(default)
    };
    Ok(match policy {
        Policy::Merge | Policy::Manual => default,
        Policy::Lww => latest(&mut (0..candidates.len())),
        Policy::Custom(script) => return script.pick(field, candidates, default),
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
    })
}

fn hash_of(
    collections: &BTreeMap<String, Policy>,
    fields: &BTreeMap<(String, String), Policy>,
) -> [u8; 32] {
    let mut context = ring::digest::Context::new(&ring::digest::SHA256);
    // Every string is length-prefixed, so no two rule sets encode alike.
    let mut put = |text: &str| {
        context.update(&(text.len() as u64).to_be_bytes());
        context.update(text.as_bytes());
    };
    // A collection's `merge` is what no rule gives: left out, so the two hash alike.
    let rules =
        collections
            .iter()
            .filter(|(_, policy)| **policy != Policy::Merge)
            .map(|(collection, policy)| (collection.as_str(), "", policy))
            .chain(fields.iter().map(|((collection, field), policy)| {
                (collection.as_str(), field.as_str(), policy)
            }));
    for (collection, field, policy) in rules {
        put(collection);
        put(field);
        put(policy.name());
        match policy {
            Policy::Priority(order) => {
                put(&order.len().to_string());
                order.iter().for_each(|name| put(name));
            }
            Policy::Custom(script) => put(&script.source),
            Policy::Merge | Policy::Lww | Policy::Manual => {}
        }
    }
    let digest = context.finish();
    let mut hash = [0u8; 32];
    hash.copy_from_slice(digest.as_ref());
    hash
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::record::document::{apply_write, RecordWrite};
    use crate::record::stamp::{next_clock, ChangeStamp};
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
        let clock = next_clock(doc, wall_ms);
        doc.set_actor(NodeId([writer.node; 16]).actor(0));
        let stamp = ChangeStamp {
            hlc: clock.ms,
            lc: clock.counter,
            src: Some(writer.source.to_owned()),
            site: Some(writer.site.to_owned()),
            ..ChangeStamp::default()
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

    fn section(policy: &str, order: &[&str], script: Option<&str>) -> PolicySection {
        PolicySection {
            collection: "customers".into(),
            field: None,
            policy: serde_json::from_value(json!(policy)).unwrap(),
            order: order.iter().map(|name| (*name).to_owned()).collect(),
            script: script.map(str::to_owned),
        }
    }

    fn policies(policy: &str, order: &[&str]) -> Policies {
        Policies::from_config(&[section(policy, order, None)]).unwrap()
    }

    fn custom(script: &str) -> Policies {
        Policies::from_config(&[section("custom", &[], Some(script))]).unwrap()
    }

    /// A resolver that keeps the longest value, ties by the earliest clock.
    const LONGEST: &str = r#"
        let best = 0;
        for i in 1..candidates.len() {
            let c = candidates[i];
            let b = candidates[best];
            if c.value.len() > b.value.len() || (c.value.len() == b.value.len() && c.hlc < b.hlc) {
                best = i;
            }
        }
        best
    "#;

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
            section("lww", &[], None),
            PolicySection {
                field: Some("billing_address".into()),
                ..section("priority", &["erp"], None)
            },
        ])
        .unwrap();
        assert_eq!(policies.policy("customers", "name"), &Policy::Lww);
        assert_eq!(
            policies.policy("customers", "billing_address"),
            &Policy::Priority(vec!["erp".into()])
        );
        assert_eq!(policies.policy("orders", "name"), &Policy::Merge);
        assert!(policies.all_merge("orders"));
        assert!(!policies.all_merge("customers"));
    }

    /// A record whose `address` the ERP and the CRM wrote concurrently.
    fn conflicted() -> Automerge {
        let mut erp = base().fork();
        let mut crm = base().fork();
        write(
            &mut erp,
            &ERP,
            NOW_MS,
            "address",
            json!("1 Long ERP Street"),
        );
        write(&mut crm, &CRM, NOW_MS + 1, "address", json!("2 CRM Rd"));
        erp.merge(&mut crm).unwrap();
        erp
    }

    #[test]
    fn a_custom_script_picks_the_winner_from_the_candidates() {
        let doc = conflicted();
        let longest = custom(LONGEST);
        assert_eq!(field(&doc, &longest), json!("1 Long ERP Street"));
        let found = conflicts(&doc, "customers", &longest);
        assert_eq!(found[0].rule, "custom");
        assert!(!found[0].pending);
        assert_eq!(found[0].error, None);
        // The script sees sources and the field's name too.
        let by_source = custom(
            r#"if field != "address" { throw "wrong field" }
               let i = 0;
               for c in candidates { if c.source == "crm" { return i } i += 1 }
               default_index"#,
        );
        assert_eq!(field(&doc, &by_source), json!("2 CRM Rd"));
    }

    #[test]
    fn the_readme_status_ranking_script_works() {
        let readme = include_str!("../README.md");
        let start = readme.find("script = '''\nfn rank").unwrap() + "script = '''\n".len();
        let script = &readme[start..start + readme[start..].find("'''").unwrap()];
        let ranked = |ours: &str, theirs: &str| {
            let mut erp = base().fork();
            let mut crm = base().fork();
            write(&mut erp, &ERP, NOW_MS, "address", json!(ours));
            write(&mut crm, &CRM, NOW_MS, "address", json!(theirs));
            erp.merge(&mut crm).unwrap();
            let found = conflicts(&erp, "customers", &custom(script));
            assert_eq!(found[0].error, None);
            field(&erp, &custom(script))
        };
        assert_eq!(ranked("paid", "cancelled"), json!("cancelled"));
        assert_eq!(ranked("new", "shipped"), json!("shipped"));
        assert_eq!(ranked("lost", "paid"), json!("paid"));
    }

    #[test]
    fn a_custom_script_that_loops_or_fails_is_cut_off_and_the_conflict_waits_for_a_person() {
        let doc = conflicted();
        let automerge_choice = field(&doc, &policies("merge", &[]));
        let broken = [
            ("loop {}", "operations"),
            ("let s = \"x\"; loop { s += s; }", "string"),
            ("let a = []; loop { a.push(1); }", "array"),
            ("fn f(n) { f(n + 1) } f(0)", "stack overflow"),
            ("throw \"no winner for you\"", "no winner for you"),
            ("1 / 0", "zero"),
            ("candidates[99]", "out of bounds"),
            ("\"first\"", "string"),
            ("5", "not an index below 2"),
            ("-1", "not an index below 2"),
            ("print(\"side effect\"); debug(1); ()", "()"),
        ];
        for (script, says) in broken {
            let policies = custom(script);
            assert_eq!(field(&doc, &policies), automerge_choice, "{script}");
            let found = conflicts(&doc, "customers", &policies);
            assert!(found[0].pending, "{script}");
            let error = found[0].error.clone().unwrap_or_default();
            assert!(error.to_lowercase().contains(says), "{script}: {error}");
        }
    }

    #[test]
    fn a_custom_script_can_reach_no_clock_file_or_eval() {
        for script in ["timestamp()", "import \"os\" as os; 0", "eval(\"0\")"] {
            let outcome = Policies::from_config(&[section("custom", &[], Some(script))]);
            if let Ok(policies) = outcome {
                let found = conflicts(&conflicted(), "customers", &policies);
                assert!(found[0].pending, "{script} ran");
            }
        }
        assert!(matches!(
            Policies::from_config(&[section("custom", &[], Some("let = ;"))]),
            Err(PolicyError::ScriptInvalid { index: 0, .. })
        ));
        assert!(matches!(
            Policies::from_config(&[section("custom", &[], None)]),
            Err(PolicyError::ScriptMissing { index: 0 })
        ));
    }

    #[test]
    fn the_policy_hash_is_equal_exactly_when_the_rules_are() {
        let lww = section("lww", &[], None);
        let billing = PolicySection {
            field: Some("billing_address".into()),
            ..section("priority", &["erp", "crm"], None)
        };
        let hash = |sections: &[PolicySection]| Policies::from_config(sections).unwrap().hash();
        assert_eq!(
            hash(&[lww.clone(), billing.clone()]),
            hash(&[billing.clone(), lww.clone()])
        );
        assert_eq!(hash(&[]), hash(&[section("merge", &[], None)]));
        assert_ne!(hash(&[]), hash(std::slice::from_ref(&lww)));
        let reordered = PolicySection {
            order: vec!["crm".into(), "erp".into()],
            ..billing.clone()
        };
        assert_ne!(hash(&[billing]), hash(&[reordered]));
        assert_ne!(
            hash(&[section("custom", &[], Some("0"))]),
            hash(&[section("custom", &[], Some("1"))])
        );
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
                custom(LONGEST),
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
                    let best = conflict.candidates.iter().map(|c| (c.hlc, c.lc, c.actor.clone())).max().unwrap();
                    let winner = &conflict.candidates[conflict.winner];
                    prop_assert_eq!((winner.hlc, winner.lc, winner.actor.clone()), best);
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
