//! JSON values in and out of Automerge documents.
//!
//! Owns the mapping between `serde_json::Value` and Automerge's data model: objects become
//! maps, arrays become lists, strings are registers (last writer wins per field, not
//! character-merged text), integers stay integers, other numbers are 64-bit floats. Reading
//! returns the same JSON that was written; values that only other Automerge writers can
//! produce (bytes, counters, timestamps, text objects) read back as their nearest JSON form.

use automerge::{hydrate, transaction::Transactable, ObjId, ObjType, ScalarValue};
use serde_json::{Map, Number, Value as Json};

use super::RecordError;

/// Deepest nesting of objects and arrays inside one field value.
pub const VALUE_DEPTH_MAX: usize = 32;

/// What a JSON value costs to write: how many values it holds (each is at least one Automerge
/// operation) and how many bytes of strings and keys (which a change carries as they are).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct ValueWeight {
    pub values: usize,
    pub bytes: usize,
}

impl ValueWeight {
    /// The weight of `value`, written under a field named `field`.
    pub fn of(field: &str, value: &Json) -> Self {
        fn walk(value: &Json, weight: &mut ValueWeight) {
            weight.values += 1;
            match value {
                Json::String(text) => weight.bytes += text.len(),
                Json::Array(items) => items.iter().for_each(|item| walk(item, weight)),
                Json::Object(map) => {
                    for (key, item) in map {
                        weight.bytes += key.len();
                        walk(item, weight);
                    }
                }
                Json::Null | Json::Bool(_) | Json::Number(_) => {}
            }
        }
        let mut weight = ValueWeight {
            values: 0,
            bytes: field.len(),
        };
        walk(value, &mut weight);
        weight
    }

    pub fn add(&mut self, other: Self) {
        self.values += other.values;
        self.bytes += other.bytes;
    }
}

/// Checks a value against the limits before anything is written.
pub fn check_value(field: &str, value: &Json) -> Result<(), RecordError> {
    fn depth(value: &Json) -> usize {
        match value {
            Json::Array(items) => 1 + items.iter().map(depth).max().unwrap_or(0),
            Json::Object(map) => 1 + map.values().map(depth).max().unwrap_or(0),
            _ => 0,
        }
    }
    if depth(value) > VALUE_DEPTH_MAX {
        return Err(RecordError::ValueTooDeep {
            field: field.to_owned(),
            depth_max: VALUE_DEPTH_MAX,
        });
    }
    Ok(())
}

fn scalar_of(value: &Json) -> Option<ScalarValue> {
    Some(match value {
        Json::Null => ScalarValue::Null,
        Json::Bool(b) => ScalarValue::Boolean(*b),
        Json::String(s) => ScalarValue::Str(s.as_str().into()),
        Json::Number(n) => {
            if let Some(i) = n.as_i64() {
                ScalarValue::Int(i)
            } else if let Some(u) = n.as_u64() {
                ScalarValue::Uint(u)
            } else {
                ScalarValue::F64(n.as_f64().unwrap_or(f64::NAN))
            }
        }
        Json::Array(_) | Json::Object(_) => return None,
    })
}

/// Writes `value` at `prop` of the map `obj`, creating nested objects as needed.
pub fn put_value<T: Transactable>(
    tx: &mut T,
    obj: &ObjId,
    prop: &str,
    value: &Json,
) -> Result<(), automerge::AutomergeError> {
    match value {
        Json::Object(map) => {
            let child = tx.put_object(obj, prop, ObjType::Map)?;
            fill_map(tx, &child, map)
        }
        Json::Array(items) => {
            let child = tx.put_object(obj, prop, ObjType::List)?;
            fill_list(tx, &child, items)
        }
        scalar => {
            let scalar = scalar_of(scalar).expect("non-container JSON is a scalar");
            tx.put(obj, prop, scalar)
        }
    }
}

fn fill_map<T: Transactable>(
    tx: &mut T,
    obj: &ObjId,
    map: &Map<String, Json>,
) -> Result<(), automerge::AutomergeError> {
    for (key, value) in map {
        put_value(tx, obj, key, value)?;
    }
    Ok(())
}

fn fill_list<T: Transactable>(
    tx: &mut T,
    obj: &ObjId,
    items: &[Json],
) -> Result<(), automerge::AutomergeError> {
    for (index, value) in items.iter().enumerate() {
        match value {
            Json::Object(map) => {
                let child = tx.insert_object(obj, index, ObjType::Map)?;
                fill_map(tx, &child, map)?;
            }
            Json::Array(inner) => {
                let child = tx.insert_object(obj, index, ObjType::List)?;
                fill_list(tx, &child, inner)?;
            }
            scalar => {
                let scalar = scalar_of(scalar).expect("non-container JSON is a scalar");
                tx.insert(obj, index, scalar)?;
            }
        }
    }
    Ok(())
}

/// The JSON form of a hydrated Automerge value.
pub fn to_json(value: &hydrate::Value) -> Json {
    match value {
        hydrate::Value::Scalar(scalar) => scalar_to_json(scalar),
        hydrate::Value::Map(map) => Json::Object(
            map.iter()
                .map(|(key, entry)| (key.clone(), to_json(&entry.value)))
                .collect(),
        ),
        hydrate::Value::List(list) => {
            Json::Array(list.iter().map(|item| to_json(&item.value)).collect())
        }
        hydrate::Value::Text(text) => Json::String(String::from(text)),
    }
}

/// The JSON of an Automerge scalar. A `Timestamp` (a date, in ms since the Unix epoch) is the
/// ISO 8601 text PostgreSQL gives a `timestamptz` in UTC (`2026-11-26T10:00:00.5+00:00`), and
/// `Bytes` the `\x` and hex that `bytea` uses, so that both land in typed columns as what they
/// are and come back from them the same.
pub fn scalar_to_json(scalar: &ScalarValue) -> Json {
    match scalar {
        ScalarValue::Null | ScalarValue::Unknown { .. } => Json::Null,
        ScalarValue::Boolean(b) => Json::Bool(*b),
        ScalarValue::Str(s) => Json::String(s.to_string()),
        ScalarValue::Int(i) => Json::Number((*i).into()),
        ScalarValue::Timestamp(ms) => Json::String(timestamp_text(*ms)),
        ScalarValue::Uint(u) => Json::Number((*u).into()),
        ScalarValue::F64(f) => Number::from_f64(*f).map_or(Json::Null, Json::Number),
        ScalarValue::Counter(counter) => Json::Number(i64::from(counter).into()),
        ScalarValue::Bytes(bytes) => Json::String(format!("\\x{}", hex::encode(bytes))),
    }
}

/// A time in ms since the Unix epoch as ISO 8601 in UTC, fractions of a second only as far as
/// they go (`2026-11-26T10:00:00.5+00:00`). Before 1970 or past 9999 it is the number of ms.
pub fn timestamp_text(ms: i64) -> String {
    let Ok(since) = u64::try_from(ms) else {
        return ms.to_string();
    };
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(since);
    let text = humantime::format_rfc3339_millis(time).to_string();
    // `2026-11-26T10:00:00.500Z`: the fraction trimmed, the zone as PostgreSQL writes it.
    let Some(base) = text.strip_suffix('Z') else {
        return ms.to_string();
    };
    let base = match base.split_once('.') {
        Some((seconds, fraction)) => {
            let fraction = fraction.trim_end_matches('0');
            if fraction.is_empty() {
                seconds.to_owned()
            } else {
                format!("{seconds}.{fraction}")
            }
        }
        None => base.to_owned(),
    };
    format!("{base}+00:00")
}

#[cfg(test)]
mod tests {
    use super::*;
    use automerge::{Automerge, ReadDoc, ROOT};
    use serde_json::json;

    #[test]
    fn json_round_trips_through_a_document() {
        let value = json!({
            "s": "text", "i": -5, "u": u64::MAX, "f": 1.5, "b": true, "n": null,
            "o": {"nested": [1, "two", {"three": 3}, [4]]}
        });
        let mut doc = Automerge::new();
        let mut tx = doc.transaction();
        for (key, field) in value.as_object().unwrap() {
            put_value(&mut tx, &ROOT, key, field).unwrap();
        }
        tx.commit();
        assert_eq!(to_json(&doc.hydrate(None)), value);
        assert_eq!(doc.length(ROOT), 7);
    }

    #[test]
    fn dates_and_bytes_read_as_postgresql_writes_them() {
        assert_eq!(
            scalar_to_json(&ScalarValue::Timestamp(1_764_151_200_500)),
            json!("2025-11-26T10:00:00.5+00:00")
        );
        assert_eq!(
            scalar_to_json(&ScalarValue::Timestamp(1_764_151_200_000)),
            json!("2025-11-26T10:00:00+00:00")
        );
        assert_eq!(
            scalar_to_json(&ScalarValue::Bytes(vec![0xde, 0xad, 0xbe, 0xef])),
            json!("\\xdeadbeef")
        );
        assert_eq!(scalar_to_json(&ScalarValue::Counter(5.into())), json!(5));
    }

    #[test]
    fn refuses_values_nested_too_deep() {
        let mut value = json!(1);
        for _ in 0..=VALUE_DEPTH_MAX {
            value = json!([value]);
        }
        assert!(check_value("f", &value).is_err());
    }
}
