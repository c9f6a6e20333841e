//! A record's state rebuilt change by change from the changes' own operations, as Automerge
//! defines them: a map key holds the values no later operation overwrote (its winner the one
//! with the greatest operation id), a list or text is a sequence of elements ordered as
//! Automerge orders concurrent inserts, and an object lives inside the root field that holds
//! it.
//!
//! Applying one change to an Automerge document costs what the document costs (it re-encodes
//! its columns), so replaying a long history through Automerge is quadratic; applying it
//! here costs what the change costs. Counters and marks are not followed: a change that holds
//! one leaves the state [`State::is_followed`] false, and callers describe the rest against
//! the whole document.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use automerge::legacy::{ElementId, Key, ObjectId, OpId, OpType};
use automerge::{ActorId, ExpandedChange, ObjType, ScalarValue};
use serde_json::{Map, Value as Json};

use crate::record::document::{RecordState, DELETED_KEY};
use crate::record::value::scalar_to_json;

/// An operation's id: its counter, then its actor, as Automerge orders them.
type OpKey = (u64, ActorId);

#[derive(Debug, Clone)]
enum Value {
    Scalar(ScalarValue),
    Object(OpKey),
}

/// The values of one map key or list element that no later operation overwrote.
type Values = Vec<(OpKey, Value)>;

#[derive(Debug)]
struct Element {
    id: OpKey,
    values: Values,
}

#[derive(Debug)]
enum Object {
    Map(BTreeMap<String, Values>),
    List(Vec<Element>),
    Text(Vec<Element>),
}

/// The record after the changes applied so far.
#[derive(Debug)]
pub struct State {
    root: BTreeMap<String, Values>,
    objects: HashMap<OpKey, Object>,
    /// The root field each object lies in.
    field_of: HashMap<OpKey, String>,
    followed: bool,
}

fn key_of(id: &OpId) -> OpKey {
    (id.0, id.1.clone())
}

fn winner(values: &Values) -> Option<&Value> {
    values
        .iter()
        .max_by(|a, b| a.0.cmp(&b.0))
        .map(|(_, value)| value)
}

impl Default for State {
    fn default() -> Self {
        Self {
            root: BTreeMap::new(),
            objects: HashMap::new(),
            field_of: HashMap::new(),
            followed: true,
        }
    }
}

impl State {
    /// Whether every change so far was one this state follows.
    pub fn is_followed(&self) -> bool {
        self.followed
    }

    /// Applies `change`; the root fields (and `@` keys) its operations touched. Once a
    /// change holds what this state does not follow, it stops: see [`State::is_followed`].
    pub fn apply(&mut self, change: &ExpandedChange) -> BTreeSet<String> {
        let mut touched = BTreeSet::new();
        if !self.followed {
            return touched;
        }
        for (index, op) in change.operations.iter().enumerate() {
            let id = (
                change.start_op.get() + index as u64,
                change.actor_id.clone(),
            );
            let applied = match &op.obj {
                ObjectId::Root => match &op.key {
                    Key::Map(key) => {
                        touched.insert(key.to_string());
                        self.apply_to_map(None, key, op.pred.iter(), &op.action, id)
                    }
                    Key::Seq(_) => false,
                },
                ObjectId::Id(object) => {
                    let object = key_of(object);
                    if let Some(field) = self.field_of.get(&object) {
                        touched.insert(field.clone());
                    }
                    match &op.key {
                        Key::Map(key) => {
                            self.apply_to_map(Some(object), key, op.pred.iter(), &op.action, id)
                        }
                        Key::Seq(element) => self.apply_to_sequence(
                            &object,
                            element,
                            op.insert,
                            op.pred.iter(),
                            &op.action,
                            id,
                        ),
                    }
                }
            };
            if !applied {
                self.followed = false;
                return touched;
            }
        }
        touched
    }

    /// The value a new operation `id` puts, creating the object it makes, as part of
    /// `field`; `None` for an action this state does not follow.
    fn new_value(&mut self, action: &OpType, id: &OpKey, field: &str) -> Option<Option<Value>> {
        Some(match action {
            OpType::Put(ScalarValue::Counter(_)) => return None,
            OpType::Put(scalar) => Some(Value::Scalar(scalar.clone())),
            OpType::Make(kind) => {
                let object = match kind {
                    ObjType::Map | ObjType::Table => Object::Map(BTreeMap::new()),
                    ObjType::List => Object::List(Vec::new()),
                    ObjType::Text => Object::Text(Vec::new()),
                };
                self.objects.insert(id.clone(), object);
                self.field_of.insert(id.clone(), field.to_owned());
                Some(Value::Object(id.clone()))
            }
            OpType::Delete => None,
            OpType::Increment(_) | OpType::MarkBegin(..) | OpType::MarkEnd(_) => return None,
        })
    }

    fn apply_to_map<'a>(
        &mut self,
        object: Option<OpKey>,
        key: &str,
        pred: impl Iterator<Item = &'a OpId>,
        action: &OpType,
        id: OpKey,
    ) -> bool {
        let field = match &object {
            None => key.to_owned(),
            Some(object) => match self.field_of.get(object) {
                Some(field) => field.clone(),
                None => return false,
            },
        };
        let Some(value) = self.new_value(action, &id, &field) else {
            return false;
        };
        let pred: Vec<OpKey> = pred.map(key_of).collect();
        let map = match &object {
            None => &mut self.root,
            Some(object) => match self.objects.get_mut(object) {
                Some(Object::Map(map)) => map,
                _ => return false,
            },
        };
        let values = map.entry(key.to_owned()).or_default();
        values.retain(|(held, _)| !pred.contains(held));
        if let Some(value) = value {
            values.push((id, value));
        }
        if values.is_empty() {
            map.remove(key);
        }
        true
    }

    fn apply_to_sequence<'a>(
        &mut self,
        object: &OpKey,
        element: &ElementId,
        insert: bool,
        pred: impl Iterator<Item = &'a OpId>,
        action: &OpType,
        id: OpKey,
    ) -> bool {
        let Some(field) = self.field_of.get(object).cloned() else {
            return false;
        };
        let Some(value) = self.new_value(action, &id, &field) else {
            return false;
        };
        let pred: Vec<OpKey> = pred.map(key_of).collect();
        let elements = match self.objects.get_mut(object) {
            Some(Object::List(elements) | Object::Text(elements)) => elements,
            _ => return false,
        };
        let position = |elements: &Vec<Element>, wanted: &OpId| {
            let wanted = key_of(wanted);
            elements.iter().position(|element| element.id == wanted)
        };
        if insert {
            let Some(value) = value else {
                return false;
            };
            let mut at = match element {
                ElementId::Head => 0,
                ElementId::Id(after) => match position(elements, after) {
                    Some(index) => index + 1,
                    None => return false,
                },
            };
            // Concurrent inserts after the same element: the greater id comes first, and
            // what was inserted after it follows it.
            while elements.get(at).is_some_and(|next| next.id > id) {
                at += 1;
            }
            elements.insert(
                at,
                Element {
                    id: id.clone(),
                    values: vec![(id, value)],
                },
            );
            return true;
        }
        let ElementId::Id(target) = element else {
            return false;
        };
        let Some(index) = position(elements, target) else {
            return false;
        };
        let values = &mut elements[index].values;
        values.retain(|(held, _)| !pred.contains(held));
        if let Some(value) = value {
            values.push((id, value));
        }
        true
    }

    /// The record's state, as [`crate::record::document::state`] reads it of a document.
    pub fn record_state(&self) -> RecordState {
        if let Some(tombstones) = self.root.get(DELETED_KEY) {
            let deleted = tombstones
                .iter()
                .any(|(_, value)| matches!(value, Value::Scalar(ScalarValue::Boolean(true))));
            return if deleted {
                RecordState::Deleted
            } else {
                RecordState::Live
            };
        }
        if self.root.is_empty() {
            RecordState::Missing
        } else {
            RecordState::Live
        }
    }

    /// The JSON of root field `field`'s winning value, if it holds one.
    pub fn field(&self, field: &str) -> Option<Json> {
        self.root
            .get(field)
            .and_then(winner)
            .map(|value| self.json(value))
    }

    fn json(&self, value: &Value) -> Json {
        let id = match value {
            Value::Scalar(scalar) => return scalar_to_json(scalar),
            Value::Object(id) => id,
        };
        match self.objects.get(id) {
            Some(Object::Map(map)) => Json::Object(
                map.iter()
                    .filter_map(|(key, values)| Some((key.clone(), self.json(winner(values)?))))
                    .collect::<Map<String, Json>>(),
            ),
            Some(Object::List(elements)) => Json::Array(
                elements
                    .iter()
                    .filter_map(|element| winner(&element.values))
                    .map(|value| self.json(value))
                    .collect(),
            ),
            Some(Object::Text(elements)) => Json::String(
                elements
                    .iter()
                    .filter_map(|element| winner(&element.values))
                    .map(|value| match value {
                        Value::Scalar(ScalarValue::Str(text)) => text.to_string(),
                        _ => String::new(),
                    })
                    .collect(),
            ),
            None => Json::Null,
        }
    }
}
