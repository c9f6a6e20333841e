//! Record addresses: `collection/key`.
//!
//! Owns the rules for what a collection name and a record key may be, and the byte form of a
//! record id used as the store's document key. Every id that reaches the store went through
//! [`RecordId::parse`] or [`RecordId::new`], so the store may rely on the invariants below:
//! a collection never contains `/` or a NUL byte, a key never contains a NUL byte.

use std::fmt;

/// Longest collection name, in bytes.
pub const COLLECTION_BYTES_MAX: usize = 64;
/// Longest record key, in bytes.
pub const KEY_BYTES_MAX: usize = 256;
/// Collections whose names start with this are Concord's own (the actor registry, for one).
pub const SYSTEM_COLLECTION_PREFIX: char = '_';

/// Why a record id was refused; each variant names the rule it broke.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum RecordIdError {
    #[error("record id {0:?} must have the form COLLECTION/KEY")]
    MissingSeparator(String),
    #[error(
        "collection {0:?} is invalid: it must be 1-{COLLECTION_BYTES_MAX} characters of a-z, 0-9, '_' or '-'"
    )]
    InvalidCollection(String),
    #[error("key {0:?} is invalid: it must be 1-{KEY_BYTES_MAX} bytes long")]
    KeyLength(String),
    #[error("key {0:?} is invalid: it must be printable UTF-8 (no control characters)")]
    KeyNotPrintable(String),
    #[error("key {0:?} is invalid: it must not start or end with '/'")]
    KeySlashAtEnd(String),
    #[error("collection {0:?} is reserved for Concord's own records (names starting with '_')")]
    ReservedCollection(String),
}

/// A validated collection name: `[a-z0-9_-]{1,64}`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Collection(String);

impl Collection {
    pub fn new(name: &str) -> Result<Self, RecordIdError> {
        let valid = !name.is_empty()
            && name.len() <= COLLECTION_BYTES_MAX
            && name
                .bytes()
                .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'_' || b == b'-');
        if valid {
            Ok(Self(name.to_owned()))
        } else {
            Err(RecordIdError::InvalidCollection(name.to_owned()))
        }
    }

    /// A collection that users and adapters may write; system collections are refused.
    pub fn new_user(name: &str) -> Result<Self, RecordIdError> {
        let collection = Self::new(name)?;
        if collection.is_system() {
            return Err(RecordIdError::ReservedCollection(name.to_owned()));
        }
        Ok(collection)
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }

    pub fn is_system(&self) -> bool {
        self.0.starts_with(SYSTEM_COLLECTION_PREFIX)
    }
}

impl fmt::Display for Collection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A validated record key: 1-256 bytes of printable UTF-8, not starting or ending with `/`.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Key(String);

impl Key {
    pub fn new(key: &str) -> Result<Self, RecordIdError> {
        if key.is_empty() || key.len() > KEY_BYTES_MAX {
            return Err(RecordIdError::KeyLength(key.to_owned()));
        }
        if key.chars().any(char::is_control) {
            return Err(RecordIdError::KeyNotPrintable(key.to_owned()));
        }
        if key.starts_with('/') || key.ends_with('/') {
            return Err(RecordIdError::KeySlashAtEnd(key.to_owned()));
        }
        Ok(Self(key.to_owned()))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Key {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The address of one record: one Automerge document.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct RecordId {
    pub collection: Collection,
    pub key: Key,
}

impl RecordId {
    pub fn new(collection: Collection, key: Key) -> Self {
        Self { collection, key }
    }

    /// Parses `collection/key`; the key may itself contain `/` (only the first one separates).
    pub fn parse(text: &str) -> Result<Self, RecordIdError> {
        let (collection, key) = text
            .split_once('/')
            .ok_or_else(|| RecordIdError::MissingSeparator(text.to_owned()))?;
        Ok(Self::new(Collection::new(collection)?, Key::new(key)?))
    }

    /// Like [`RecordId::parse`], refusing Concord's system collections.
    pub fn parse_user(text: &str) -> Result<Self, RecordIdError> {
        let id = Self::parse(text)?;
        if id.collection.is_system() {
            return Err(RecordIdError::ReservedCollection(
                id.collection.as_str().to_owned(),
            ));
        }
        Ok(id)
    }

    /// The store's document key: `collection '/' key`. Since a collection holds no `/`, the
    /// first `/` splits it back, and byte order groups a collection's records together.
    pub fn to_doc_key(&self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(self.collection.0.len() + 1 + self.key.0.len());
        bytes.extend_from_slice(self.collection.0.as_bytes());
        bytes.push(b'/');
        bytes.extend_from_slice(self.key.0.as_bytes());
        bytes
    }

    /// Inverse of [`RecordId::to_doc_key`], validating again (stored bytes are checked on read).
    pub fn from_doc_key(bytes: &[u8]) -> Result<Self, RecordIdError> {
        let text = std::str::from_utf8(bytes)
            .map_err(|_| RecordIdError::KeyNotPrintable(String::from_utf8_lossy(bytes).into()))?;
        Self::parse(text)
    }
}

impl fmt::Display for RecordId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.collection, self.key)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_valid_ids() {
        let id = RecordId::parse("customers/42").unwrap();
        assert_eq!(id.collection.as_str(), "customers");
        assert_eq!(id.key.as_str(), "42");
        let nested = RecordId::parse("orders/2024/07/abc").unwrap();
        assert_eq!(nested.key.as_str(), "2024/07/abc");
        assert_eq!(
            RecordId::from_doc_key(&nested.to_doc_key()).unwrap(),
            nested
        );
        assert!(RecordId::parse("a/ünïcødé key").is_ok());
    }

    #[test]
    fn refuses_each_rule() {
        assert!(matches!(
            RecordId::parse("nokey"),
            Err(RecordIdError::MissingSeparator(_))
        ));
        assert!(matches!(
            RecordId::parse("Customers/1"),
            Err(RecordIdError::InvalidCollection(_))
        ));
        assert!(matches!(
            RecordId::parse("/1"),
            Err(RecordIdError::InvalidCollection(_))
        ));
        let long = "c".repeat(COLLECTION_BYTES_MAX + 1);
        assert!(matches!(
            RecordId::parse(&format!("{long}/1")),
            Err(RecordIdError::InvalidCollection(_))
        ));
        assert!(matches!(
            RecordId::parse("c/"),
            Err(RecordIdError::KeyLength(_))
        ));
        let long_key = "k".repeat(KEY_BYTES_MAX + 1);
        assert!(matches!(
            RecordId::parse(&format!("c/{long_key}")),
            Err(RecordIdError::KeyLength(_))
        ));
        assert!(matches!(
            RecordId::parse("c/a\nb"),
            Err(RecordIdError::KeyNotPrintable(_))
        ));
        assert!(matches!(
            RecordId::parse("c//a"),
            Err(RecordIdError::KeySlashAtEnd(_))
        ));
        assert!(matches!(
            RecordId::parse("c/a/"),
            Err(RecordIdError::KeySlashAtEnd(_))
        ));
        assert!(matches!(
            RecordId::parse_user("_actors/x"),
            Err(RecordIdError::ReservedCollection(_))
        ));
    }
}
