//! A scope: a collection, optionally narrowed by one field's value; its text form and the
//! test of a record against it.

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value as Json};

use super::*;
use crate::record::Collection;

/// A collection, optionally narrowed to the records whose `field` equals a value.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Scope {
    pub collection: String,
    pub filter: Option<Filter>,
}

/// A field and the value it must have, kept as its JSON text (one spelling per value, so that
/// the signed bytes of a grant are the same wherever it is made).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Filter {
    pub field: String,
    pub value_json: String,
}

impl Scope {
    /// Reads `COLLECTION` or `COLLECTION:FIELD=VALUE`; VALUE is JSON when it is valid JSON
    /// (`7`, `true`, `"x"`), a string otherwise, as `concord put` takes values.
    pub fn parse(text: &str) -> Result<Self, ScopeError> {
        let bad_part = |reason: String| ScopeError::BadPart {
            scope: text.to_owned(),
            reason,
        };
        let (collection, filter) = match text.split_once(':') {
            None => (text, None),
            Some((collection, filter)) => {
                let Some((field, value)) = filter.split_once('=') else {
                    return Err(ScopeError::BadScope(text.to_owned()));
                };
                crate::record::document::check_field_name(field)
                    .map_err(|error| bad_part(error.to_string()))?;
                let value: Json =
                    serde_json::from_str(value).unwrap_or_else(|_| Json::String(value.to_owned()));
                if value.is_object() || value.is_array() || value.is_null() {
                    return Err(bad_part(
                        "a filter's value is a string, number or boolean".to_owned(),
                    ));
                }
                let value_json = value.to_string();
                if value_json.len() > FILTER_VALUE_BYTES_MAX {
                    return Err(bad_part(format!(
                        "a filter's value is at most {FILTER_VALUE_BYTES_MAX} bytes"
                    )));
                }
                (
                    collection,
                    Some(Filter {
                        field: field.to_owned(),
                        value_json,
                    }),
                )
            }
        };
        Collection::new_user(collection).map_err(|error| bad_part(error.to_string()))?;
        Ok(Self {
            collection: collection.to_owned(),
            filter,
        })
    }

    /// Whether this scope covers a record of `collection` whose fields are `fields`.
    pub fn covers(&self, collection: &str, fields: &Map<String, Json>) -> bool {
        self.collection == collection
            && self.filter.as_ref().is_none_or(|filter| {
                fields
                    .get(&filter.field)
                    .and_then(|value| serde_json::to_string(value).ok())
                    .is_some_and(|text| text == filter.value_json)
            })
    }
}

impl std::fmt::Display for Scope {
    fn fmt(&self, out: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.filter {
            None => write!(out, "{}", self.collection),
            Some(filter) => {
                // A string value is written bare, as it is given.
                let value = match serde_json::from_str::<Json>(&filter.value_json) {
                    Ok(Json::String(text)) if serde_json::from_str::<Json>(&text).is_err() => text,
                    _ => filter.value_json.clone(),
                };
                write!(out, "{}:{}={value}", self.collection, filter.field)
            }
        }
    }
}
