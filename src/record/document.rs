//! Record semantics inside one Automerge document.
//!
//! A record's fields are the keys of the document's root map. Keys starting with `@` are
//! Concord's own; the one used now is `@deleted`, the tombstone:
//!
//! - creating a record writes `@deleted = false`, so an empty record still exists;
//! - a delete writes `@deleted = true` and removes every field;
//! - a write to a deleted record (a re-creation, causally after the delete) writes
//!   `@deleted = false` and first removes whatever fields are left.
//!
//! Consequences that hold on every node, because Automerge merges deterministically: an edit
//! concurrent with a delete stays deleted (the edit never touches the tombstone), a record can
//! be created again after a delete, and two sites creating the same record at once merge field
//! by field (the root map exists in every document, so no object replaces another).

use std::collections::BTreeSet;

use automerge::{transaction::Transactable, ChangeHash, ReadDoc, ScalarValue, Value, ROOT};
use serde_json::{Map, Value as Json};

use super::value::{check_value, put_value, scalar_to_json, to_json, ValueWeight};
use super::RecordError;

/// The tombstone key.
pub const DELETED_KEY: &str = "@deleted";
/// Field names starting with this are reserved for Concord.
pub const RESERVED_FIELD_PREFIX: char = '@';
/// Longest field name, in bytes.
pub const FIELD_NAME_BYTES_MAX: usize = 256;
/// Most fields one write may set or remove.
pub const FIELDS_PER_WRITE_MAX: usize = 1024;
/// Most values (scalars, objects, array items) one write may hold: each is at least one
/// Automerge operation, and a write holds the store's lock while Automerge builds its change.
/// 10,000 list items take about 60 ms through the API (99,000 took 0.8 s), so one write
/// cannot hold every other writer up for long.
pub const VALUES_PER_WRITE_MAX: usize = 10_000;
/// Largest change a write may make: the one limit every way in shares with the wire.
pub const CHANGE_BYTES_MAX: usize = concord_proto::CHANGE_BYTES_MAX;

/// What a write does to a record's fields.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RecordWrite {
    /// Fields to set, with their new values.
    pub set: Vec<(String, Json)>,
    /// Fields to remove.
    pub remove: Vec<String>,
    /// Remove every field not named in `set`.
    pub replace: bool,
    /// An object in `set` is a JSON merge patch (RFC 7396) of the field: merged key by key
    /// into the object the field holds (a `null` removes a key), so that sites editing
    /// different keys of one object all keep their edits. Otherwise it replaces the field.
    pub merge: bool,
}

impl RecordWrite {
    /// A write that replaces the record with exactly `fields`.
    pub fn replace_with(fields: Map<String, Json>) -> Self {
        Self {
            set: fields.into_iter().collect(),
            remove: Vec::new(),
            replace: true,
            merge: false,
        }
    }

    /// The write a JSON merge patch (RFC 7396) of the record makes: each field given is set,
    /// an object merged into the one the field holds, and a field given as `null` removed.
    pub fn merge_patch(patch: Map<String, Json>) -> Self {
        let mut write = Self {
            merge: true,
            ..Self::default()
        };
        for (field, value) in patch {
            if value.is_null() {
                write.remove.push(field);
            } else {
                write.set.push((field, value));
            }
        }
        write
    }

    /// Checks field names and values against the rules and limits.
    pub fn check(&self) -> Result<(), RecordError> {
        let count = self.set.len() + self.remove.len();
        if count > FIELDS_PER_WRITE_MAX {
            return Err(RecordError::TooManyFields {
                count,
                fields_max: FIELDS_PER_WRITE_MAX,
            });
        }
        let mut weight = ValueWeight::default();
        for (field, value) in &self.set {
            check_field_name(field)?;
            check_value(field, value)?;
            weight.add(ValueWeight::of(field, value));
        }
        for field in &self.remove {
            check_field_name(field)?;
        }
        // Text is carried into the change byte for byte, so these refuse, before anything is
        // built, a write whose change could never be sent; the store checks the change made.
        if weight.bytes > CHANGE_BYTES_MAX {
            return Err(RecordError::WriteTooLarge {
                size: weight.bytes,
                size_max: CHANGE_BYTES_MAX,
            });
        }
        if weight.values > VALUES_PER_WRITE_MAX {
            return Err(RecordError::TooManyValues {
                count: weight.values,
                count_max: VALUES_PER_WRITE_MAX,
            });
        }
        Ok(())
    }
}

/// Checks one field name.
pub fn check_field_name(field: &str) -> Result<(), RecordError> {
    let reason = if field.is_empty() {
        "it must not be empty"
    } else if field.len() > FIELD_NAME_BYTES_MAX {
        "it must be at most 256 bytes"
    } else if field.starts_with(RESERVED_FIELD_PREFIX) {
        "names starting with '@' are reserved for Concord"
    } else if field.chars().any(char::is_control) {
        "it must not contain control characters"
    } else {
        return Ok(());
    };
    Err(RecordError::InvalidFieldName {
        field: field.to_owned(),
        reason,
    })
}

/// Whether a document holds a live record, a deleted one, or nothing at all.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecordState {
    Missing,
    Deleted,
    Live,
}

/// The record's state at `heads` (or now, for `None`).
pub fn state_at<D: ReadDoc>(doc: &D, heads: Option<&[ChangeHash]>) -> RecordState {
    // Every concurrent value of the tombstone, not just Automerge's winner: a delete wins over
    // a concurrent creation, so a record stays deleted unless a write made after the delete
    // (which overwrites every value it saw) creates it again.
    let tombstones = match heads {
        Some(heads) => doc.get_all_at(ROOT, DELETED_KEY, heads),
        None => doc.get_all(ROOT, DELETED_KEY),
    }
    .unwrap_or_default();
    if !tombstones.is_empty() {
        let deleted = tombstones.iter().any(|(value, _)| {
            matches!(value, Value::Scalar(scalar) if matches!(scalar.as_ref(), ScalarValue::Boolean(true)))
        });
        return if deleted {
            RecordState::Deleted
        } else {
            RecordState::Live
        };
    }
    // A document written by another Automerge program, with no tombstone: live if it holds
    // anything at all.
    let length = match heads {
        Some(heads) => doc.length_at(ROOT, heads),
        None => doc.length(ROOT),
    };
    if length == 0 {
        RecordState::Missing
    } else {
        RecordState::Live
    }
}

/// The record's state now.
pub fn state<D: ReadDoc>(doc: &D) -> RecordState {
    state_at(doc, None)
}

/// The record as a JSON object, or `None` when it is deleted or was never written.
pub fn read<D: ReadDoc>(doc: &D) -> Option<Map<String, Json>> {
    read_at(doc, None)
}

/// The record as it was at `heads` (or now, for `None`).
pub fn read_at<D: ReadDoc>(doc: &D, heads: Option<&[ChangeHash]>) -> Option<Map<String, Json>> {
    if state_at(doc, heads) != RecordState::Live {
        return None;
    }
    let mut fields = Map::new();
    let keys: Vec<String> = match heads {
        Some(heads) => doc.keys_at(ROOT, heads).collect(),
        None => doc.keys(ROOT).collect(),
    };
    for key in keys {
        if key.starts_with(RESERVED_FIELD_PREFIX) {
            continue;
        }
        if let Some(value) = field_json(doc, &key, heads) {
            fields.insert(key, value);
        }
    }
    Some(fields)
}

fn field_json<D: ReadDoc>(doc: &D, field: &str, heads: Option<&[ChangeHash]>) -> Option<Json> {
    let found = match heads {
        Some(heads) => doc.get_at(ROOT, field, heads),
        None => doc.get(ROOT, field),
    };
    let (value, obj) = found.ok()??;
    value_json(doc, &value, &obj, heads)
}

/// The JSON of one value of a field (`obj` is its id, for an object), as of `heads`.
pub fn value_json<D: ReadDoc>(
    doc: &D,
    value: &Value<'_>,
    obj: &automerge::ObjId,
    heads: Option<&[ChangeHash]>,
) -> Option<Json> {
    Some(match value {
        Value::Scalar(scalar) => scalar_to_json(scalar),
        Value::Object(_) => to_json(&doc.hydrate(obj, heads).ok()?),
    })
}

/// Applies a write inside a transaction. The write must have passed [`RecordWrite::check`].
/// Fields whose value is already the one asked for, and the only one, are not written
/// again, so an unchanged write produces no change at all; a field in conflict is always
/// written, since the write settles the conflict whichever candidate it names.
pub fn apply_write<T: Transactable + ReadDoc>(
    tx: &mut T,
    write: &RecordWrite,
) -> Result<(), RecordError> {
    let current = state(tx);
    let named: BTreeSet<&str> = write.set.iter().map(|(field, _)| field.as_str()).collect();
    match current {
        RecordState::Missing => tx.put(ROOT, DELETED_KEY, false)?,
        RecordState::Deleted => {
            tx.put(ROOT, DELETED_KEY, false)?;
            remove_fields_except(tx, &BTreeSet::new())?;
        }
        RecordState::Live if write.replace => remove_fields_except(tx, &named)?,
        RecordState::Live => {}
    }
    for (field, value) in &write.set {
        if let (true, Json::Object(patch)) = (write.merge, value) {
            merge_into(tx, &ROOT, field, patch)?;
            continue;
        }
        // The conflict check only for an equal value: a different one is written anyway.
        if field_json(tx, field, None).as_ref() != Some(value)
            || tx.get_all(ROOT, field.as_str())?.len() > 1
        {
            put_value(tx, &ROOT, field, value)?;
        }
    }
    for field in &write.remove {
        if !named.contains(field.as_str()) && tx.get(ROOT, field.as_str())?.is_some() {
            tx.delete(ROOT, field.as_str())?;
        }
    }
    Ok(())
}

/// Merges `patch` into the map at `key` of `parent` (RFC 7396): each key of the patch is set
/// in the map, an object merged into the object there, a `null` removing the key. Where `key`
/// holds no map (or several, concurrently), the patch, its `null`s left out, becomes the map.
fn merge_into<T: Transactable + ReadDoc>(
    tx: &mut T,
    parent: &automerge::ObjId,
    key: &str,
    patch: &Map<String, Json>,
) -> Result<(), RecordError> {
    let existing = match tx.get_all(parent, key)?.as_slice() {
        [(automerge::Value::Object(automerge::ObjType::Map), id)] => Some(id.clone()),
        _ => None,
    };
    let Some(map) = existing else {
        put_value(tx, parent, key, &without_nulls(patch))?;
        return Ok(());
    };
    for (inner, value) in patch {
        match value {
            Json::Null => {
                if tx.get(&map, inner.as_str())?.is_some() {
                    tx.delete(&map, inner.as_str())?;
                }
            }
            Json::Object(nested) => merge_into(tx, &map, inner, nested)?,
            other => {
                let current = tx
                    .get(&map, inner.as_str())?
                    .and_then(|(value, id)| value_json(tx, &value, &id, None));
                if current.as_ref() != Some(other) || tx.get_all(&map, inner.as_str())?.len() > 1 {
                    put_value(tx, &map, inner, other)?;
                }
            }
        }
    }
    Ok(())
}

/// `patch` with its `null`s taken out, at every depth: what a merge patch makes of a key that
/// held no object.
fn without_nulls(patch: &Map<String, Json>) -> Json {
    Json::Object(
        patch
            .iter()
            .filter(|(_, value)| !value.is_null())
            .map(|(key, value)| {
                let value = match value {
                    Json::Object(nested) => without_nulls(nested),
                    other => other.clone(),
                };
                (key.clone(), value)
            })
            .collect(),
    )
}

/// Checks a whole document by the rules a write follows (field names, values, nesting), as a
/// document that came from elsewhere must be: of Concord's own fields it may hold only the
/// tombstone, a boolean. Every value of a field in conflict is checked.
pub fn check_document<D: ReadDoc>(doc: &D) -> Result<(), RecordError> {
    for field in doc.keys(ROOT) {
        let values = doc.get_all(ROOT, field.as_str())?;
        if field.starts_with(RESERVED_FIELD_PREFIX) {
            if field != DELETED_KEY {
                return Err(RecordError::ReservedField { field });
            }
            let boolean = values
                .iter()
                .all(|(value, _)| matches!(value, Value::Scalar(scalar) if matches!(scalar.as_ref(), automerge::ScalarValue::Boolean(_))));
            if !boolean {
                return Err(RecordError::NotABoolean { field });
            }
            continue;
        }
        check_field_name(&field)?;
        for (value, id) in &values {
            if let Some(json) = value_json(doc, value, id, None) {
                check_value(&field, &json)?;
            }
        }
    }
    Ok(())
}

/// Refuses a change that sets the tombstone (`@deleted` = true) and, in the same change, a
/// value of another field: a record deleted with values hidden inside it, which no write of
/// Concord's makes (a delete removes every field). Imports pass it, as `put` refuses `@`
/// fields.
pub fn check_change(change: &automerge::Change) -> Result<(), RecordError> {
    use automerge::legacy::{Key, ObjectId, OpType};
    let (mut tombstone, mut field) = (false, false);
    for op in change.decode().operations {
        let (ObjectId::Root, Key::Map(name)) = (&op.obj, &op.key) else {
            continue;
        };
        match &op.action {
            OpType::Put(automerge::ScalarValue::Boolean(true)) if name == DELETED_KEY => {
                tombstone = true;
            }
            OpType::Delete => {}
            _ if !name.starts_with(RESERVED_FIELD_PREFIX) => field = true,
            _ => {}
        }
    }
    if tombstone && field {
        return Err(RecordError::TombstoneBesideFields {
            change: change.hash().to_string(),
        });
    }
    Ok(())
}

/// Deletes the record: tombstone plus removal of every field. Returns whether it was live.
pub fn apply_delete<T: Transactable + ReadDoc>(tx: &mut T) -> Result<bool, RecordError> {
    if state(tx) != RecordState::Live {
        return Ok(false);
    }
    tx.put(ROOT, DELETED_KEY, true)?;
    remove_fields_except(tx, &BTreeSet::new())?;
    Ok(true)
}

fn remove_fields_except<T: Transactable + ReadDoc>(
    tx: &mut T,
    keep: &BTreeSet<&str>,
) -> Result<(), RecordError> {
    let doomed: Vec<String> = tx
        .keys(ROOT)
        .filter(|key| !key.starts_with(RESERVED_FIELD_PREFIX) && !keep.contains(key.as_str()))
        .collect();
    for key in doomed {
        tx.delete(ROOT, key.as_str())?;
    }
    Ok(())
}

/// Whether the document holds the change `hash`. Cheap: it asks the change graph, where
/// `get_change_by_hash` would encode the whole change.
pub fn holds_change<D: ReadDoc>(doc: &D, hash: &ChangeHash) -> bool {
    doc.get_missing_deps(std::slice::from_ref(hash)).is_empty()
}

/// Fields that hold more than one concurrent value: Automerge picked a winner
/// deterministically, and the others are conflicts a policy or a person may revisit.
pub fn conflicting_fields<D: ReadDoc>(doc: &D) -> std::collections::BTreeSet<String> {
    doc.keys(ROOT)
        .filter(|key| {
            !key.starts_with(RESERVED_FIELD_PREFIX)
                && doc
                    .get_all(ROOT, key.as_str())
                    .is_ok_and(|values| values.len() > 1)
        })
        .collect()
}

/// What one change did to a record, for history and audit.
#[derive(Debug, Clone, PartialEq, serde::Serialize)]
pub struct ChangeEffect {
    /// `create`, `update`, `delete` or `recreate` (or, in a history, `revert`, and
    /// `compacted` for the one entry that stands for a compacted history: `set` is then the
    /// whole record as the compaction left it).
    pub action: &'static str,
    /// Fields written, with their values just after the change.
    pub set: Map<String, Json>,
    /// Fields removed (not listed for a delete, which removes them all).
    pub removed: Vec<String>,
    /// For a revert (`action` is then `revert`): the version it brought the record back to.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub reverts: Option<String>,
}

/// Describes the effect of the change `hash`, whose dependencies are `deps`, against the
/// whole document (each call walks its history: [`super::history::Replay`] describes a whole
/// history in one pass).
pub fn describe_change(
    doc: &automerge::Automerge,
    deps: &[ChangeHash],
    hash: ChangeHash,
) -> ChangeEffect {
    let after = [hash];
    let before_state = state_at(doc, Some(deps));
    let after_state = state_at(doc, Some(&after));
    let patches = doc.diff(deps, &after);
    effect_of(doc, before_state, after_state, &patches, Some(&after))
}

/// The effect of a change that took the record from `before` to `after`, Automerge's
/// `patches` for it, on `doc` as of `heads` (just after the change; `None`: now).
pub fn effect_of<D: ReadDoc>(
    doc: &D,
    before: RecordState,
    after: RecordState,
    patches: &[automerge::Patch],
    heads: Option<&[ChangeHash]>,
) -> ChangeEffect {
    let action = super::history::action(before, after);
    let mut touched = BTreeSet::new();
    let mut removed = BTreeSet::new();
    for patch in patches {
        let root_key = match (patch.path.first(), &patch.action) {
            (Some((_, automerge::Prop::Map(key))), _) => key.clone(),
            (None, automerge::PatchAction::PutMap { key, .. }) => key.clone(),
            (None, automerge::PatchAction::DeleteMap { key }) => {
                if super::history::is_field(key) {
                    removed.insert(key.clone());
                }
                continue;
            }
            _ => continue,
        };
        if super::history::is_field(&root_key) {
            touched.insert(root_key);
        }
    }
    let mut set = Map::new();
    for field in touched {
        if let Some(value) = field_json(doc, &field, heads) {
            removed.remove(&field);
            set.insert(field, value);
        }
    }
    ChangeEffect {
        reverts: None,
        action,
        set,
        removed: if action == "delete" {
            Vec::new()
        } else {
            removed.into_iter().collect()
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::{ActorId, Automerge};
    use serde_json::json;

    fn write(doc: &mut Automerge, fields: Json) {
        let write = RecordWrite {
            set: fields.as_object().unwrap().clone().into_iter().collect(),
            ..Default::default()
        };
        write.check().unwrap();
        let mut tx = doc.transaction();
        apply_write(&mut tx, &write).unwrap();
        tx.commit();
    }

    fn delete(doc: &mut Automerge) {
        let mut tx = doc.transaction();
        assert!(apply_delete(&mut tx).unwrap());
        tx.commit();
    }

    fn patch(doc: &mut Automerge, patch: Json) {
        let write = RecordWrite::merge_patch(patch.as_object().unwrap().clone());
        write.check().unwrap();
        let mut tx = doc.transaction();
        apply_write(&mut tx, &write).unwrap();
        tx.commit();
    }

    #[test]
    fn a_patch_merges_nested_objects_as_rfc_7396_says() {
        let mut doc = Automerge::new();
        write(
            &mut doc,
            json!({"a": {"x": 1, "y": 2, "z": {"deep": 1}}, "b": 1}),
        );
        patch(
            &mut doc,
            json!({"a": {"y": 3, "x": null, "z": {"more": 2}}, "b": null, "c": [1]}),
        );
        assert_eq!(
            Json::Object(read(&doc).unwrap()),
            json!({"a": {"y": 3, "z": {"deep": 1, "more": 2}}, "c": [1]})
        );
        // A key that held no object takes the patch, its nulls left out.
        patch(&mut doc, json!({"c": {"k": 1, "gone": null}}));
        assert_eq!(read(&doc).unwrap()["c"], json!({"k": 1}));
        // The RFC's own example.
        let mut doc = Automerge::new();
        write(
            &mut doc,
            json!({"title": "Goodbye!", "author": {"givenName": "John", "familyName": "Doe"},
                   "tags": ["example", "sample"], "content": "This will be unchanged"}),
        );
        patch(
            &mut doc,
            json!({"title": "Hello!", "phoneNumber": "+01-123-456-7890",
                   "author": {"familyName": null}, "tags": ["example"]}),
        );
        assert_eq!(
            Json::Object(read(&doc).unwrap()),
            json!({"title": "Hello!", "author": {"givenName": "John"}, "tags": ["example"],
                   "content": "This will be unchanged", "phoneNumber": "+01-123-456-7890"})
        );
    }

    #[test]
    fn two_sites_patching_different_keys_of_one_object_both_keep_their_edit() {
        let mut paris = Automerge::new();
        paris.set_actor(ActorId::from(vec![1u8; 18]));
        write(
            &mut paris,
            json!({"address": {"city": "Paris", "street": "Rue A"}}),
        );
        let mut tokyo = paris.fork();
        tokyo.set_actor(ActorId::from(vec![2u8; 18]));
        patch(&mut paris, json!({"address": {"street": "Rue B"}}));
        patch(&mut tokyo, json!({"address": {"zip": "75001"}}));
        paris.merge(&mut tokyo).unwrap();
        tokyo.merge(&mut paris).unwrap();
        let expected = json!({"address": {"city": "Paris", "street": "Rue B", "zip": "75001"}});
        assert_eq!(Json::Object(read(&paris).unwrap()), expected);
        assert_eq!(Json::Object(read(&tokyo).unwrap()), expected);
    }

    #[test]
    fn write_read_delete_recreate() {
        let mut doc = Automerge::new();
        assert_eq!(read(&doc), None);
        write(&mut doc, json!({"name": "Ada", "age": 36}));
        assert_eq!(
            read(&doc),
            Some(
                json!({"name": "Ada", "age": 36})
                    .as_object()
                    .unwrap()
                    .clone()
            )
        );
        delete(&mut doc);
        assert_eq!(read(&doc), None);
        assert_eq!(state(&doc), RecordState::Deleted);
        write(&mut doc, json!({"name": "Grace"}));
        assert_eq!(
            read(&doc),
            Some(json!({"name": "Grace"}).as_object().unwrap().clone())
        );
    }

    #[test]
    fn unchanged_write_makes_no_change() {
        let mut doc = Automerge::new();
        write(&mut doc, json!({"name": "Ada", "tags": ["a", "b"]}));
        let heads = doc.get_heads();
        write(&mut doc, json!({"name": "Ada", "tags": ["a", "b"]}));
        assert_eq!(doc.get_heads(), heads);
    }

    #[test]
    fn concurrent_edit_and_delete_merge_to_deleted_in_both_orders() {
        let mut base = Automerge::new().with_actor(ActorId::from(&[1u8; 18][..]));
        write(&mut base, json!({"name": "Ada", "city": "London"}));
        let mut editor = base.fork().with_actor(ActorId::from(&[2u8; 18][..]));
        let mut deleter = base.fork().with_actor(ActorId::from(&[3u8; 18][..]));
        write(&mut editor, json!({"city": "Paris"}));
        delete(&mut deleter);

        let mut one = editor.clone();
        one.merge(&mut deleter.clone()).unwrap();
        let mut two = deleter.clone();
        two.merge(&mut editor.clone()).unwrap();
        assert_eq!(one.get_heads(), two.get_heads());
        assert_eq!(read(&one), None);
        assert_eq!(read(&two), None);
        assert_eq!(one.hydrate(None), two.hydrate(None));
    }

    #[test]
    fn a_delete_wins_over_a_concurrent_creation() {
        let mut base = Automerge::new().with_actor(ActorId::from(&[1u8; 18][..]));
        write(&mut base, json!({"name": "Ada"}));
        let mut deleter = base.fork().with_actor(ActorId::from(&[2u8; 18][..]));
        delete(&mut deleter);
        // A site that never saw the record creates it, concurrently with the delete.
        let mut creator = Automerge::new().with_actor(ActorId::from(&[9u8; 18][..]));
        write(&mut creator, json!({"name": "Grace"}));
        for (mut one, mut two) in [
            (deleter.clone(), creator.clone()),
            (creator.clone(), deleter.clone()),
        ] {
            one.merge(&mut two).unwrap();
            assert_eq!(state(&one), RecordState::Deleted);
        }
        // A write made after the delete re-creates it.
        let mut merged = deleter.clone();
        merged.merge(&mut creator.clone()).unwrap();
        write(&mut merged, json!({"name": "Barbara"}));
        assert_eq!(
            read(&merged),
            Some(json!({"name": "Barbara"}).as_object().unwrap().clone())
        );
    }

    #[test]
    fn concurrent_creates_merge_field_by_field() {
        let mut a = Automerge::new().with_actor(ActorId::from(&[1u8; 18][..]));
        let mut b = Automerge::new().with_actor(ActorId::from(&[2u8; 18][..]));
        write(&mut a, json!({"name": "Ada"}));
        write(&mut b, json!({"email": "ada@example.com"}));
        a.merge(&mut b).unwrap();
        assert_eq!(
            read(&a),
            Some(
                json!({"name": "Ada", "email": "ada@example.com"})
                    .as_object()
                    .unwrap()
                    .clone()
            )
        );
    }

    #[test]
    fn describes_changes() {
        let mut doc = Automerge::new();
        write(&mut doc, json!({"name": "Ada"}));
        write(&mut doc, json!({"name": "Grace"}));
        delete(&mut doc);
        let changes = doc.get_changes(&[]);
        let effects: Vec<_> = changes
            .iter()
            .map(|c| describe_change(&doc, c.deps(), c.hash()))
            .collect();
        assert_eq!(effects[0].action, "create");
        assert_eq!(effects[1].action, "update");
        assert_eq!(effects[1].set.get("name"), Some(&json!("Grace")));
        assert_eq!(effects[2].action, "delete");
    }

    #[test]
    fn refuses_bad_field_names() {
        for bad in ["", "@deleted", "a\u{0}b"] {
            assert!(check_field_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_field_name(&"x".repeat(FIELD_NAME_BYTES_MAX + 1)).is_err());
    }

    #[derive(Debug, Clone)]
    enum Op {
        Set(u8, i64),
        Remove(u8),
        Delete,
        Replace(u8, i64),
    }

    fn op_strategy() -> impl proptest::strategy::Strategy<Value = (usize, Op)> {
        use proptest::prelude::*;
        let op = prop_oneof![
            4 => (0u8..4, any::<i64>()).prop_map(|(f, v)| Op::Set(f, v)),
            1 => (0u8..4).prop_map(Op::Remove),
            1 => Just(Op::Delete),
            1 => (0u8..4, any::<i64>()).prop_map(|(f, v)| Op::Replace(f, v)),
        ];
        (0usize..3, op)
    }

    fn apply(doc: &mut Automerge, op: &Op) {
        let mut tx = doc.transaction();
        match op {
            Op::Set(field, value) | Op::Replace(field, value) => {
                let write = RecordWrite {
                    set: vec![(format!("f{field}"), json!(value))],
                    remove: Vec::new(),
                    replace: matches!(op, Op::Replace(..)),
                    merge: false,
                };
                apply_write(&mut tx, &write).unwrap();
            }
            Op::Remove(field) => {
                let write = RecordWrite {
                    remove: vec![format!("f{field}")],
                    ..Default::default()
                };
                apply_write(&mut tx, &write).unwrap();
            }
            Op::Delete => {
                apply_delete(&mut tx).unwrap();
            }
        }
        tx.commit();
    }

    proptest::proptest! {
        /// Three sites edit, delete and re-create one record concurrently (with merges along
        /// the way); every order of merging gives every site the same heads and the same JSON.
        #[test]
        fn every_merge_order_converges(
            ops in proptest::collection::vec(op_strategy(), 1..40),
            syncs in proptest::collection::vec((0usize..3, 0usize..3, 0usize..40), 0..6),
        ) {
            let mut sites: Vec<Automerge> = (0..3u8)
                .map(|i| Automerge::new().with_actor(ActorId::from(&[i + 1; 18][..])))
                .collect();
            for (index, (site, op)) in ops.iter().enumerate() {
                apply(&mut sites[*site], op);
                for (from, to, at) in &syncs {
                    if *at == index && from != to {
                        let mut source = sites[*from].clone();
                        sites[*to].merge(&mut source).unwrap();
                    }
                }
            }
            let orders = [[0, 1, 2], [0, 2, 1], [1, 0, 2], [1, 2, 0], [2, 0, 1], [2, 1, 0]];
            let mut outcomes = Vec::new();
            for order in orders {
                let mut merged = sites[order[0]].clone();
                for &next in &order[1..] {
                    let mut other = sites[next].clone();
                    merged.merge(&mut other).unwrap();
                }
                let mut heads = merged.get_heads();
                heads.sort();
                outcomes.push((heads, read(&merged), state(&merged)));
            }
            for outcome in &outcomes[1..] {
                proptest::prop_assert_eq!(outcome, &outcomes[0]);
            }
        }
    }
}
