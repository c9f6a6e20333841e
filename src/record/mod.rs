//! Record model: a record is one Automerge document, addressed `collection/key`.
//!
//! Owns record ids ([`id`]), the JSON mapping ([`value`]), the record semantics inside a
//! document — fields, tombstone, re-creation, history effects ([`document`]) — and the
//! identity of writers ([`origin`]) and the stamp each change carries ([`stamp`]). Nothing here touches storage or the network; the store
//! hands documents in and persists what comes out.

mod base;
pub mod compaction;
pub mod document;
pub mod held;
pub mod history;
pub mod id;
pub mod origin;
pub mod stamp;
pub mod value;

pub use document::{RecordState, RecordWrite};
pub use id::{Collection, Key, RecordId, RecordIdError};
pub use origin::NodeId;

/// Why a record operation failed.
#[derive(Debug, thiserror::Error)]
pub enum RecordError {
    #[error(transparent)]
    InvalidId(#[from] RecordIdError),
    #[error("field name {field:?} is invalid: {reason}")]
    InvalidFieldName { field: String, reason: &'static str },
    #[error("value of field {field:?} is nested deeper than {depth_max} levels")]
    ValueTooDeep { field: String, depth_max: usize },
    #[error("a write may touch at most {fields_max} fields; this one touches {count}")]
    TooManyFields { count: usize, fields_max: usize },
    #[error(
        "this write holds {size} bytes of text; one change may be at most {size_max} bytes \
         (4 MiB less 4 KiB), so the write was refused and nothing was stored"
    )]
    WriteTooLarge { size: usize, size_max: usize },
    #[error(
        "this write holds {count} values (strings, numbers, objects, array items); one write may \
         hold at most {count_max}, so it was refused and nothing was stored"
    )]
    TooManyValues { count: usize, count_max: usize },
    #[error("automerge: {0}")]
    Automerge(#[from] automerge::AutomergeError),
    #[error("field {field:?} is reserved for Concord and may not be written")]
    ReservedField { field: String },
    #[error("field {field:?} must be a boolean")]
    NotABoolean { field: String },
    #[error(
        "change {change} sets @deleted beside other fields: a deleted record holds no fields \
         (delete the record, or write its fields, not both)"
    )]
    TombstoneBesideFields { change: String },
}
