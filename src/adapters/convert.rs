//! Column kinds and the one mapping between a column's text form and a record field's JSON.
//!
//! Every adapter reads a column as text (PostgreSQL casts, SQLite's values printed) and writes
//! it from text (cast back by the database), so the rules live here once:
//!
//! | kind | field (JSON) | text form |
//! |---|---|---|
//! | text, uuid, date, time, timestamps | string | as the database prints it (ISO 8601 for times) |
//! | integer | number (i64) | decimal digits |
//! | float | number (f64) | shortest round-trip decimal |
//! | numeric | string, exact (never through a float) | decimal digits |
//! | boolean | `true` / `false` | `true` / `false` |
//! | json | any JSON value | JSON text |
//! | bytes | string `\x` + hex | `\x` + hex (PostgreSQL's own form) |
//!
//! SQL NULL is JSON `null` in every kind.

use serde_json::Value as Json;

/// What a column holds, as far as mapping it to a field goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ColumnKind {
    Text,
    Integer,
    Float,
    Numeric,
    Boolean,
    TimestampTz,
    Timestamp,
    Date,
    Time,
    Uuid,
    Json,
    Bytes,
}

/// A column's value in text form; `None` is SQL NULL.
pub type TextValue = Option<String>;

/// Longest column value mapped, in bytes: the largest change a write may make, since a longer
/// value could never be sent to a peer. Larger ones are refused as a bad row.
pub const COLUMN_VALUE_BYTES_MAX: usize = crate::record::document::CHANGE_BYTES_MAX;

impl ColumnKind {
    /// The field value of a column value in text form.
    pub fn to_json(self, text: Option<&str>) -> Result<Json, String> {
        let Some(text) = text else {
            return Ok(Json::Null);
        };
        if text.len() > COLUMN_VALUE_BYTES_MAX {
            return Err(format!(
                "value of {} bytes exceeds {COLUMN_VALUE_BYTES_MAX}",
                text.len()
            ));
        }
        match self {
            Self::Integer => text
                .trim()
                .parse::<i64>()
                .map(Json::from)
                .map_err(|_| format!("{text:?} is not a 64-bit integer")),
            Self::Float => {
                let value: f64 = text
                    .trim()
                    .parse()
                    .map_err(|_| format!("{text:?} is not a number"))?;
                serde_json::Number::from_f64(value)
                    .map(Json::Number)
                    .ok_or_else(|| format!("{text:?} has no JSON form (NaN or infinite)"))
            }
            Self::Boolean => match text.trim() {
                "true" | "t" | "1" => Ok(Json::Bool(true)),
                "false" | "f" | "0" => Ok(Json::Bool(false)),
                other => Err(format!("{other:?} is not a boolean")),
            },
            Self::Json => {
                serde_json::from_str(text).map_err(|error| format!("invalid JSON: {error}"))
            }
            Self::Text
            | Self::Numeric
            | Self::TimestampTz
            | Self::Timestamp
            | Self::Date
            | Self::Time
            | Self::Uuid
            | Self::Bytes => Ok(Json::String(text.to_owned())),
        }
    }

    /// The text form to write for a field value; `None` writes NULL.
    pub fn to_text(self, value: &Json) -> Result<TextValue, String> {
        let scalar_text = |value: &Json| match value {
            Json::String(text) => Some(text.clone()),
            Json::Number(number) => Some(number.to_string()),
            Json::Bool(flag) => Some(flag.to_string()),
            _ => None,
        };
        let text = match (self, value) {
            (_, Json::Null) => return Ok(None),
            (Self::Json, value) => value.to_string(),
            (Self::Integer, Json::Number(number)) if number.is_i64() => number.to_string(),
            (Self::Integer, Json::Number(number)) => {
                return Err(format!("{number} is not a 64-bit integer"))
            }
            (Self::Integer, Json::Bool(flag)) => i64::from(*flag).to_string(),
            (Self::Integer, Json::String(text)) => text
                .trim()
                .parse::<i64>()
                .map_err(|_| format!("{text:?} is not a 64-bit integer"))?
                .to_string(),
            (Self::Float, Json::Number(number)) => number.to_string(),
            (Self::Float, Json::String(text)) => text
                .trim()
                .parse::<f64>()
                .map_err(|_| format!("{text:?} is not a number"))?
                .to_string(),
            (Self::Numeric, Json::Number(number)) => number.to_string(),
            (Self::Numeric, Json::String(text)) => {
                if !is_decimal(text.trim()) {
                    return Err(format!("{text:?} is not a decimal number"));
                }
                text.trim().to_owned()
            }
            (Self::Boolean, Json::Bool(flag)) => flag.to_string(),
            (Self::Boolean, Json::Number(number)) => match number.as_i64() {
                Some(0) => "false".to_owned(),
                Some(1) => "true".to_owned(),
                _ => return Err(format!("{number} is not a boolean")),
            },
            (Self::Boolean, Json::String(text)) => match text.trim() {
                "true" | "t" | "1" => "true".to_owned(),
                "false" | "f" | "0" => "false".to_owned(),
                other => return Err(format!("{other:?} is not a boolean")),
            },
            (Self::Bytes, Json::String(text)) => {
                let hex_digits = text
                    .strip_prefix("\\x")
                    .ok_or_else(|| format!("{text:?} is not bytes (\\x followed by hex digits)"))?;
                hex::decode(hex_digits).map_err(|_| format!("{text:?} is not bytes"))?;
                text.clone()
            }
            (Self::Text, value @ (Json::Object(_) | Json::Array(_))) => {
                return Err(format!(
                    "a JSON {} does not fit a text column: declare the column JSON (SQLite: \
                     `JSON`, PostgreSQL: `jsonb`) to keep objects and arrays",
                    json_type(value)
                ))
            }
            (kind, value) => scalar_text(value).ok_or_else(|| {
                format!("a JSON {} does not fit a {kind:?} column", json_type(value))
            })?,
        };
        if text.len() > COLUMN_VALUE_BYTES_MAX {
            return Err(format!(
                "value of {} bytes exceeds {COLUMN_VALUE_BYTES_MAX}",
                text.len()
            ));
        }
        Ok(Some(text))
    }

    /// `value` as this column would store and read it back: compare these, not raw JSON, so a
    /// value equal in the column's terms (`"42"` and `42` in an integer column) is not
    /// written again.
    pub fn normalize(self, value: &Json) -> Result<Json, String> {
        let text = self.to_text(value)?;
        self.to_json(text.as_deref())
    }
}

fn json_type(value: &Json) -> &'static str {
    match value {
        Json::Null => "null",
        Json::Bool(_) => "boolean",
        Json::Number(_) => "number",
        Json::String(_) => "string",
        Json::Array(_) => "array",
        Json::Object(_) => "object",
    }
}

/// `-12.50`, `3`, `1e5`: what an exact decimal column accepts.
fn is_decimal(text: &str) -> bool {
    let body = text.strip_prefix(['-', '+']).unwrap_or(text);
    let (mantissa, exponent) = match body.split_once(['e', 'E']) {
        Some((mantissa, exponent)) => (mantissa, Some(exponent)),
        None => (body, None),
    };
    let (whole, fraction) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let digits = |part: &str| part.bytes().all(|byte| byte.is_ascii_digit());
    let exponent_ok = exponent.is_none_or(|exponent| {
        let exponent = exponent.strip_prefix(['-', '+']).unwrap_or(exponent);
        !exponent.is_empty() && digits(exponent)
    });
    (!whole.is_empty() || !fraction.is_empty()) && digits(whole) && digits(fraction) && exponent_ok
}

/// Bytes in the text form `\x` + hex.
pub fn bytes_to_text(bytes: &[u8]) -> String {
    format!("\\x{}", hex::encode(bytes))
}

/// The bytes of a `\x` + hex text form.
pub fn text_to_bytes(text: &str) -> Result<Vec<u8>, String> {
    text.strip_prefix("\\x")
        .and_then(|digits| hex::decode(digits).ok())
        .ok_or_else(|| format!("{text:?} is not bytes (\\x followed by hex digits)"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn an_object_for_a_text_column_says_to_declare_it_json() {
        let error = ColumnKind::Text.to_text(&json!({"a": 1})).unwrap_err();
        assert!(error.contains("declare the column JSON"), "{error}");
    }

    #[test]
    fn each_kind_round_trips_through_text() {
        let cases = [
            (ColumnKind::Integer, json!(-42)),
            (ColumnKind::Float, json!(1.5)),
            (
                ColumnKind::Numeric,
                json!("12345678901234567890.0123456789"),
            ),
            (ColumnKind::Boolean, json!(true)),
            (ColumnKind::Json, json!({"a": [1, "x", null]})),
            (ColumnKind::Bytes, json!("\\x00ff10")),
            (
                ColumnKind::TimestampTz,
                json!("2026-11-26T10:00:00.5+00:00"),
            ),
            (
                ColumnKind::Uuid,
                json!("6f1c8c1e-7a8b-4b8e-9a57-0b3f0e3c2a11"),
            ),
            (ColumnKind::Text, json!("Ada")),
            (ColumnKind::Text, Json::Null),
        ];
        for (kind, value) in cases {
            let text = kind.to_text(&value).unwrap();
            assert_eq!(kind.to_json(text.as_deref()).unwrap(), value, "{kind:?}");
        }
    }

    #[test]
    fn numeric_stays_exact_and_equal_values_normalize_alike() {
        let exact = "0.1000000000000000000000000001";
        assert_eq!(
            ColumnKind::Numeric.to_json(Some(exact)).unwrap(),
            json!(exact)
        );
        assert_eq!(
            ColumnKind::Integer.normalize(&json!("42")).unwrap(),
            ColumnKind::Integer.normalize(&json!(42)).unwrap()
        );
        assert_eq!(
            ColumnKind::Boolean.normalize(&json!(1)).unwrap(),
            json!(true)
        );
    }

    #[test]
    fn mismatches_are_refused_with_the_reason() {
        assert!(ColumnKind::Integer
            .to_text(&json!("forty"))
            .unwrap_err()
            .contains("integer"));
        assert!(ColumnKind::Integer.to_text(&json!(1.5)).is_err());
        assert!(ColumnKind::Numeric.to_text(&json!("1.2.3")).is_err());
        assert!(ColumnKind::Text.to_text(&json!({"a": 1})).is_err());
        assert!(ColumnKind::Bytes.to_text(&json!("zz")).is_err());
        assert!(ColumnKind::Float.to_json(Some("NaN")).is_err());
        assert!(ColumnKind::Json.to_json(Some("{")).is_err());
    }
}
