//! The backup format: a store's every key and value, and a node's identity files, as one
//! stream with a checksum at its end.
//!
//! ```text
//! "CONCORD-BACKUP\n"  u32 version (big endian)  u64 bytes the store took on disk (a hint for progress)
//! then records:       u8 kind, u32 length, bytes, u32 length, bytes
//!                     kind 1: a store key and its value; kind 2: a file's name and contents
//! then the end:       u8 0, u64 records, 32 bytes: SHA-256 of everything before them
//! ```
//!
//! Written page by page ([`write_backup`]) and read record by record ([`read_backup`]), so
//! memory stays bounded whatever the store holds. A copy taken while the node writes is not a
//! single moment of the store: every key is copied as it was when its page was read. What a
//! restore makes of it is checked ([`super::salvage`]) before the node opens it, which drops a
//! log entry whose change the copy lacks and keeps every document that reads back whole; the
//! node then takes a new writer and catches up from its peers.

use std::io::{Read, Write};

use super::{Store, StoreError};

pub const MAGIC: &[u8; 15] = b"CONCORD-BACKUP\n";
pub const BACKUP_FORMAT_VERSION: u32 = 1;
/// Longest key or value a backup record may carry: a store's values are bounded by the
/// largest change and snapshot well below this.
pub const RECORD_PART_BYTES_MAX: usize = 256 * 1024 * 1024;
/// Entries read from the store per page while writing a backup.
const PAGE_ENTRIES: usize = 512;

const KIND_END: u8 = 0;
const KIND_ENTRY: u8 = 1;
const KIND_FILE: u8 = 2;

/// One record of a backup, as [`read_backup`] hands it over.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Record {
    /// A store key and its value.
    Entry(Vec<u8>, Vec<u8>),
    /// A file of the data dir, by its name relative to it.
    File(String, Vec<u8>),
}

/// Why a backup could not be written or read.
#[derive(Debug, thiserror::Error)]
pub enum BackupError {
    #[error("{0}")]
    Store(#[from] StoreError),
    #[error("backup stream: {0}")]
    Io(#[from] std::io::Error),
    #[error("not a Concord backup (no CONCORD-BACKUP header)")]
    NotABackup,
    #[error("backup format {0} is newer than this build reads ({BACKUP_FORMAT_VERSION})")]
    UnknownVersion(u32),
    #[error("the backup is damaged: {0}")]
    Damaged(String),
}

/// A writer that hashes what passes through it.
struct Hashing<W: Write> {
    inner: W,
    digest: ring::digest::Context,
    bytes: u64,
}

impl<W: Write> Hashing<W> {
    fn put(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.digest.update(bytes);
        self.bytes += bytes.len() as u64;
        self.inner.write_all(bytes)
    }

    fn record(&mut self, kind: u8, first: &[u8], second: &[u8]) -> std::io::Result<()> {
        assert!(first.len() <= RECORD_PART_BYTES_MAX && second.len() <= RECORD_PART_BYTES_MAX);
        self.put(&[kind])?;
        self.put(&(first.len() as u32).to_be_bytes())?;
        self.put(first)?;
        self.put(&(second.len() as u32).to_be_bytes())?;
        self.put(second)
    }
}

/// Writes every key of `store` and each of `files` to `out` as a backup; `progress` is told
/// the bytes written so far after each page. Returns the records written.
pub fn write_backup<S: Store>(
    store: &S,
    files: &[(String, Vec<u8>)],
    out: impl Write,
    mut progress: impl FnMut(u64),
) -> Result<u64, BackupError> {
    let mut out = Hashing {
        inner: out,
        digest: ring::digest::Context::new(&ring::digest::SHA256),
        bytes: 0,
    };
    out.put(MAGIC)?;
    out.put(&BACKUP_FORMAT_VERSION.to_be_bytes())?;
    out.put(&store.size_on_disk()?.to_be_bytes())?;
    let mut records = 0u64;
    for (name, contents) in files {
        out.record(KIND_FILE, name.as_bytes(), contents)?;
        records += 1;
    }
    let mut after: Option<Vec<u8>> = None;
    loop {
        let page = store.scan_prefix(&[], after.as_deref(), PAGE_ENTRIES)?;
        for (key, value) in &page {
            out.record(KIND_ENTRY, key, value)?;
            records += 1;
        }
        progress(out.bytes);
        if page.len() < PAGE_ENTRIES {
            break;
        }
        after = page.last().map(|(key, _)| key.clone());
    }
    out.put(&[KIND_END])?;
    out.put(&records.to_be_bytes())?;
    let digest = out.digest.clone().finish();
    out.inner.write_all(digest.as_ref())?;
    out.inner.flush()?;
    Ok(records)
}

/// A reader that hashes what it reads.
struct Reading<R: Read> {
    inner: R,
    digest: ring::digest::Context,
    bytes: u64,
}

impl<R: Read> Reading<R> {
    fn take(&mut self, buffer: &mut [u8]) -> Result<(), BackupError> {
        self.inner.read_exact(buffer).map_err(|error| {
            if error.kind() == std::io::ErrorKind::UnexpectedEof {
                BackupError::Damaged("it ends before its last record (cut short?)".to_owned())
            } else {
                BackupError::Io(error)
            }
        })?;
        self.digest.update(buffer);
        self.bytes += buffer.len() as u64;
        Ok(())
    }

    fn part(&mut self) -> Result<Vec<u8>, BackupError> {
        let mut length = [0u8; 4];
        self.take(&mut length)?;
        let length = u32::from_be_bytes(length) as usize;
        if length > RECORD_PART_BYTES_MAX {
            return Err(BackupError::Damaged(format!(
                "a record of {length} bytes is over the limit"
            )));
        }
        let mut bytes = vec![0u8; length];
        self.take(&mut bytes)?;
        Ok(bytes)
    }
}

/// What [`read_backup`] found in a backup's header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Bytes the store took on disk when the backup was taken.
    pub store_bytes: u64,
}

/// Reads a backup from `input`, handing each record to `visit` in order, and checks its end:
/// the count and the checksum. A caller must not rely on what it was handed unless this
/// returns `Ok`. `progress` is told the bytes read so far now and then.
pub fn read_backup(
    input: impl Read,
    mut on_header: impl FnMut(Header),
    mut visit: impl FnMut(Record) -> Result<(), BackupError>,
    mut progress: impl FnMut(u64),
) -> Result<u64, BackupError> {
    let mut input = Reading {
        inner: input,
        digest: ring::digest::Context::new(&ring::digest::SHA256),
        bytes: 0,
    };
    let mut magic = [0u8; 15];
    input
        .take(&mut magic)
        .map_err(|_| BackupError::NotABackup)?;
    if &magic != MAGIC {
        return Err(BackupError::NotABackup);
    }
    let mut version = [0u8; 4];
    input.take(&mut version)?;
    let version = u32::from_be_bytes(version);
    if version > BACKUP_FORMAT_VERSION {
        return Err(BackupError::UnknownVersion(version));
    }
    let mut size = [0u8; 8];
    input.take(&mut size)?;
    on_header(Header {
        store_bytes: u64::from_be_bytes(size),
    });
    let mut records = 0u64;
    loop {
        let mut kind = [0u8; 1];
        input.take(&mut kind)?;
        match kind[0] {
            KIND_END => break,
            KIND_ENTRY => {
                let key = input.part()?;
                let value = input.part()?;
                visit(Record::Entry(key, value))?;
            }
            KIND_FILE => {
                let name = String::from_utf8(input.part()?)
                    .map_err(|_| BackupError::Damaged("a file name is not UTF-8".to_owned()))?;
                let contents = input.part()?;
                visit(Record::File(name, contents))?;
            }
            other => {
                return Err(BackupError::Damaged(format!("unknown record kind {other}")));
            }
        }
        records += 1;
        if records.is_multiple_of(4096) {
            progress(input.bytes);
        }
    }
    let mut count = [0u8; 8];
    input.take(&mut count)?;
    let expected = input.digest.clone().finish();
    let mut checksum = [0u8; 32];
    input
        .inner
        .read_exact(&mut checksum)
        .map_err(|_| BackupError::Damaged("its checksum is missing".to_owned()))?;
    if checksum != expected.as_ref() {
        return Err(BackupError::Damaged(
            "its checksum does not match".to_owned(),
        ));
    }
    if u64::from_be_bytes(count) != records {
        return Err(BackupError::Damaged(format!(
            "it says {} records and holds {records}",
            u64::from_be_bytes(count)
        )));
    }
    progress(input.bytes);
    Ok(records)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::{Batch, MemoryStore};

    fn backup_of(store: &MemoryStore) -> Vec<u8> {
        let files = vec![("node.id".to_owned(), b"abc\n".to_vec())];
        let mut out = Vec::new();
        write_backup(store, &files, &mut out, |_| {}).unwrap();
        out
    }

    #[test]
    fn a_backup_reads_back_whole_and_any_damage_is_found() {
        let store = MemoryStore::new();
        let mut batch = Batch::default();
        for i in 0..2000u32 {
            batch.put(format!("D{i:05}").into_bytes(), vec![i as u8; 40]);
        }
        store.apply(batch).unwrap();
        store.flush().unwrap();
        let bytes = backup_of(&store);
        let mut entries = 0;
        let mut files = Vec::new();
        let records = read_backup(
            bytes.as_slice(),
            |_| {},
            |record| {
                match record {
                    Record::Entry(..) => entries += 1,
                    Record::File(name, _) => files.push(name),
                }
                Ok(())
            },
            |_| {},
        )
        .unwrap();
        assert_eq!((records, entries), (2001, 2000));
        assert_eq!(files, vec!["node.id".to_owned()]);
        // A flipped byte, a cut, or another file altogether is refused.
        let mut flipped = bytes.clone();
        flipped[bytes.len() / 2] ^= 1;
        let cut = &bytes[..bytes.len() - 40];
        for (damaged, what) in [(flipped.as_slice(), "flipped"), (cut, "cut")] {
            let outcome = read_backup(damaged, |_| {}, |_| Ok(()), |_| {});
            assert!(
                matches!(outcome, Err(BackupError::Damaged(_))),
                "{what}: {outcome:?}"
            );
        }
        let outcome = read_backup(&b"hello"[..], |_| {}, |_| Ok(()), |_| {});
        assert!(matches!(outcome, Err(BackupError::NotABackup)));
    }
}
