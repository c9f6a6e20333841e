//! Backup, restore and recovery of a node's store: what an operator does after a disk dies.
//!
//! - [`backup`] copies a stopped node's store, and `GET /v1/backup` a running one's, in the
//!   backup format ([`crate::store::backup`]), with the node's `node.id` and `concord.toml`
//!   (not its TLS key: a restore onto a new disk issues a new certificate from the CA).
//! - [`restore`] brings a backup back into a data dir as a new incarnation: the copy is
//!   checked and mended ([`crate::store::salvage`]), the store takes a new writer, and the
//!   node catches up from its peers what was written after the backup, its own writes among
//!   them.
//! - [`recover`] salvages what a damaged store still holds: an engine may refuse, panic or hang
//!   on a damaged file, so the copy runs in a child process ([`salvage_copy`], reading each part of
//!   the key space forward, then backward from its end, so one bad page costs only the keys
//!   in it), watched and stopped if it makes no progress; what it copied is checked and
//!   mended, takes a new writer, and replaces the damaged store, kept aside.
//!
//! Guarantees: nothing replaces a store until its replacement is whole and checked; the store
//! replaced is moved aside, never deleted; a running node's store is never touched.

use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use super::{NodeError, NODE_ID_FILE, STORE_DIR, TLS_DIR};
use crate::config::{Config, CONFIG_FILE};
use crate::net::tls;
use crate::record::NodeId;
use crate::store::backup::{self, BackupError, Record};
use crate::store::engine::DamagedStore;
use crate::store::salvage::{self, SalvageReport};
use crate::store::{layout, Batch, DiskStore, Engine, Store, StoreError};

/// Store entries written per batch while restoring or salvaging.
const COPY_BATCH_ENTRIES: usize = 1000;
/// How long the salvage child may go without copying anything before it is stopped (an engine
/// can loop forever on a damaged file).
pub const SALVAGE_STALL_MAX: Duration = Duration::from_secs(20);
/// How long the salvage child may take to open the damaged store (a large store takes a
/// while to open even when whole).
pub const SALVAGE_OPEN_MAX: Duration = Duration::from_secs(60);
/// Files of a data dir that a backup carries.
const BACKUP_FILES: [&str; 2] = [NODE_ID_FILE, CONFIG_FILE];

#[derive(Debug, thiserror::Error)]
pub enum MaintenanceError {
    #[error(transparent)]
    Node(Box<NodeError>),
    #[error(transparent)]
    Backup(#[from] BackupError),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("{path}: {error}")]
    Io {
        path: PathBuf,
        error: std::io::Error,
    },
    #[error("{0}")]
    Refused(String),
}

impl From<NodeError> for MaintenanceError {
    fn from(error: NodeError) -> Self {
        Self::Node(Box::new(error))
    }
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> MaintenanceError + '_ {
    move |error| MaintenanceError::Io {
        path: path.to_owned(),
        error,
    }
}

/// The files a backup of `dir` carries beside its store.
pub fn backup_files(dir: &Path) -> Result<Vec<(String, Vec<u8>)>, MaintenanceError> {
    BACKUP_FILES
        .iter()
        .map(|name| {
            let path = dir.join(name);
            let contents = std::fs::read(&path).map_err(io(&path))?;
            Ok(((*name).to_owned(), contents))
        })
        .collect()
}

fn refuse_if_running(dir: &Path) -> Result<(), MaintenanceError> {
    if super::store_in_use(dir)? {
        return Err(MaintenanceError::Refused(format!(
            "the node in {} is running: stop it first (a running node is backed up with \
             `concord backup` through its API)",
            dir.display()
        )));
    }
    Ok(())
}

/// Writes a backup of the stopped node in `dir` to `out`; `progress` is told the bytes
/// written so far. Returns the records written.
pub fn backup(
    dir: &Path,
    out: impl Write,
    progress: impl FnMut(u64),
) -> Result<u64, MaintenanceError> {
    if !dir.join(CONFIG_FILE).exists() {
        return Err(NodeError::NotInitialized(dir.to_owned()).into());
    }
    let config = Config::load(&dir.join(CONFIG_FILE)).map_err(NodeError::from)?;
    if super::store_in_use(dir)? {
        return Err(MaintenanceError::Refused(format!(
            "the node in {} is running: a running node is backed up through its API",
            dir.display()
        )));
    }
    let files = backup_files(dir)?;
    let store = DiskStore::open(
        &dir.join(STORE_DIR),
        config.store.engine,
        config.store.page_cache_mib * 1024 * 1024,
    )?;
    Ok(backup::write_backup(&store, &files, out, progress)?)
}

/// What [`restore`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RestoreReport {
    pub node: String,
    /// The writer the restored store writes under: a new one.
    pub writer: String,
    pub entries: u64,
    pub checked: SalvageReport,
    /// The engine the restored store runs on.
    pub engine: Engine,
    /// Where the store it replaced was kept, if there was one.
    pub replaced: Option<PathBuf>,
}

fn unix_seconds() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |elapsed| elapsed.as_secs())
}

/// The node id a data dir, or a backup's `node.id`, names.
fn parse_node_id(text: &[u8], what: &Path) -> Result<NodeId, MaintenanceError> {
    String::from_utf8_lossy(text)
        .trim()
        .parse::<NodeId>()
        .map_err(|error| {
            NodeError::BadIdentity {
                path: what.to_owned(),
                message: error.to_string(),
            }
            .into()
        })
}

/// Makes `store` whole and checked, under a new writer for `owner`.
fn check_and_reincarnate(
    store: &DiskStore,
    owner: NodeId,
    progress: &mut impl FnMut(&str, u64),
) -> Result<(SalvageReport, NodeId), MaintenanceError> {
    let checked = salvage::check_and_mend(store, &mut *progress)?;
    let writer = NodeId::random().map_err(NodeError::Random)?;
    crate::store::new_incarnation(store, owner, writer)?;
    Ok((checked, writer))
}

/// Brings the backup `file` back into the data dir `dir` as a new incarnation (see the module
/// doc). An existing data dir must be the same node's, stopped; its store is kept aside, and
/// only with `replace`. Without a data dir, `ca` issues the node a new certificate. The store
/// is made on `engine` when given (the config is changed to name it), else on the engine the
/// config names.
pub struct RestoreOptions<'a> {
    pub ca: Option<&'a Path>,
    pub replace: bool,
    pub engine: Option<Engine>,
}

pub fn restore(
    file: &Path,
    dir: &Path,
    options: &RestoreOptions<'_>,
    progress: impl FnMut(&str, u64),
) -> Result<RestoreReport, MaintenanceError> {
    // A restore that fails leaves nothing it made behind: not its half-written store, and
    // not the data dir it created for a new node.
    let created = !dir.exists();
    let restoring = dir.join(format!("{STORE_DIR}.restoring"));
    let outcome = restore_into(file, dir, options, &restoring, progress);
    if outcome.is_err() {
        if created {
            let _ = std::fs::remove_dir_all(dir);
        } else if restoring.exists() {
            let _ = std::fs::remove_dir_all(&restoring);
        }
    }
    outcome
}

/// The files a backup holds beside the store's entries, by name.
type BackupFiles = Vec<(String, Vec<u8>)>;

/// Reads the backup at `file` into `store`, durable on return: the number of entries
/// copied, and the files (`node.id`, config) it holds beside them.
fn copy_backup_into(
    file: &Path,
    store: &DiskStore,
    progress: &mut impl FnMut(&str, u64),
) -> Result<(u64, BackupFiles), MaintenanceError> {
    let input = std::fs::File::open(file).map_err(io(file))?;
    let mut files: Vec<(String, Vec<u8>)> = Vec::new();
    let mut batch = Batch::default();
    let mut entries = 0u64;
    backup::read_backup(
        std::io::BufReader::with_capacity(1 << 20, input),
        |_| {},
        |record| {
            match record {
                Record::Entry(key, value) => {
                    batch.put(key, value);
                    entries += 1;
                    if batch.len() >= COPY_BATCH_ENTRIES {
                        store.apply(std::mem::take(&mut batch))?;
                    }
                }
                Record::File(name, contents) => files.push((name, contents)),
            }
            Ok(())
        },
        |bytes| progress("bytes read", bytes),
    )?;
    store.apply(batch)?;
    store.flush()?;
    Ok((entries, files))
}

fn restore_into(
    file: &Path,
    dir: &Path,
    options: &RestoreOptions<'_>,
    restoring: &Path,
    mut progress: impl FnMut(&str, u64),
) -> Result<RestoreReport, MaintenanceError> {
    let (ca, replace) = (options.ca, options.replace);
    let existing = dir.join(CONFIG_FILE).exists();
    let store_path = dir.join(STORE_DIR);
    if existing {
        refuse_if_running(dir)?;
        if store_path.exists() && !replace {
            return Err(MaintenanceError::Refused(format!(
                "{} holds a store: pass --replace to put the backup in its place (it is kept \
                 aside as {STORE_DIR}.replaced-<time>)",
                dir.display()
            )));
        }
    } else if ca.is_none() {
        return Err(MaintenanceError::Refused(format!(
            "{} is not a data dir: pass --ca CA_DIR to restore the node there with a new \
             certificate, or restore into its data dir",
            dir.display()
        )));
    } else {
        crate::files::create_private_dir(dir).map_err(io(dir))?;
    }
    // Into a store of its own first: nothing replaces the current one until it is whole.
    if restoring.exists() {
        std::fs::remove_dir_all(restoring).map_err(io(restoring))?;
    }
    let engine = match options.engine {
        Some(engine) => engine,
        None if existing => Config::load(&dir.join(CONFIG_FILE))
            .map_err(NodeError::from)?
            .store
            .engine
            .unwrap_or(Engine::UNNAMED),
        None => Engine::DEFAULT,
    };
    let store = DiskStore::create(restoring, engine, crate::store::PAGE_CACHE_BYTES_DEFAULT)?;
    let (entries, files) = copy_backup_into(file, &store, &mut progress)?;
    let file_named = |name: &str| {
        files
            .iter()
            .find(|(file, _)| file == name)
            .map(|(_, contents)| contents.clone())
            .ok_or_else(|| MaintenanceError::Refused(format!("the backup holds no {name}")))
    };
    let backed_up = parse_node_id(&file_named(NODE_ID_FILE)?, file)?;
    if existing {
        let id_path = dir.join(NODE_ID_FILE);
        let ours = parse_node_id(&std::fs::read(&id_path).map_err(io(&id_path))?, &id_path)?;
        if ours != backed_up {
            return Err(MaintenanceError::Refused(format!(
                "the backup is of node {backed_up}, and {} is node {ours}",
                dir.display()
            )));
        }
    } else {
        let ca = ca.expect("checked above");
        crate::files::write_private(&dir.join(NODE_ID_FILE), &file_named(NODE_ID_FILE)?)
            .map_err(io(dir))?;
        tls::issue_node_certificate(ca, &backed_up, &dir.join(TLS_DIR)).map_err(NodeError::from)?;
        // The config last: its presence marks a complete data dir.
        let config = file_named(CONFIG_FILE)?;
        let config = naming_engine(&config, engine)?.map_or(config, String::into_bytes);
        crate::files::write_private(&dir.join(CONFIG_FILE), &config).map_err(io(dir))?;
    }
    let (checked, writer) = check_and_reincarnate(&store, backed_up, &mut progress)?;
    drop(store);
    let replaced = put_in_place(dir, restoring, "replaced")?;
    if existing {
        let path = dir.join(CONFIG_FILE);
        if let Some(config) = naming_engine(&std::fs::read(&path).map_err(io(&path))?, engine)? {
            crate::files::write_private(&path, config.as_bytes()).map_err(io(&path))?;
        }
    }
    Ok(RestoreReport {
        node: backed_up.to_string(),
        writer: writer.to_string(),
        entries,
        checked,
        engine,
        replaced,
    })
}

/// The config `text` changed to name `engine`, if it implies another.
fn naming_engine(text: &[u8], engine: Engine) -> Result<Option<String>, MaintenanceError> {
    let text = String::from_utf8_lossy(text);
    let mut config = Config::parse(&text).map_err(|message| {
        MaintenanceError::Refused(format!(
            "the backup's {CONFIG_FILE} is not valid: {message}"
        ))
    })?;
    if config.store.engine.unwrap_or(Engine::UNNAMED) == engine {
        return Ok(None);
    }
    config.store.engine = Some(engine);
    Ok(Some(config.to_toml()))
}

/// Moves `dir`'s store aside (as `store.<what>-<time>`) and `new` into its place.
fn put_in_place(dir: &Path, new: &Path, what: &str) -> Result<Option<PathBuf>, MaintenanceError> {
    let store_path = dir.join(STORE_DIR);
    let aside = if store_path.exists() {
        // Within a second of the last one, the name takes a count: nothing set aside before
        // is overwritten.
        let stamp = unix_seconds();
        let mut aside = dir.join(format!("{STORE_DIR}.{what}-{stamp}"));
        let mut count = 1;
        while aside.exists() {
            count += 1;
            aside = dir.join(format!("{STORE_DIR}.{what}-{stamp}-{count}"));
        }
        std::fs::rename(&store_path, &aside).map_err(io(&store_path))?;
        Some(aside)
    } else {
        None
    };
    std::fs::rename(new, &store_path).map_err(io(new))?;
    crate::files::restrict_tree(&store_path).map_err(io(&store_path))?;
    Ok(aside)
}

/// What [`salvage_copy`] copied.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize, PartialEq, Eq)]
pub struct CopyReport {
    pub entries: u64,
    /// Key spaces whose reading stopped at a damaged part.
    pub damaged_spaces: u64,
}

/// What [`salvage_range`] hands each key and value it reads.
type CopyEntry<'a> = dyn FnMut(&[u8], &[u8]) -> Result<(), MaintenanceError> + 'a;

/// How deep [`salvage_copy`] splits a key range around damaged pages: each level halves what
/// is left between the last key read going forward and the last read going backward.
const SALVAGE_SPLITS_MAX: u32 = 32;

/// The key halfway between `low` and `high` (taken as big-endian numbers, the shorter padded
/// with zeros), or `None` if there is none strictly between them.
fn key_between(low: &[u8], high: &[u8]) -> Option<Vec<u8>> {
    let length = low.len().max(high.len()) + 1;
    let pad = |key: &[u8]| {
        let mut padded = key.to_vec();
        padded.resize(length, 0);
        padded
    };
    let (low, high) = (pad(low), pad(high));
    // (low + high) / 2, byte by byte from the most significant.
    let mut sum = vec![0u16; length];
    let mut carry = 0u16;
    for index in (0..length).rev() {
        let total = u16::from(low[index]) + u16::from(high[index]) + carry;
        sum[index] = total & 0xff;
        carry = total >> 8;
    }
    let mut middle = vec![0u8; length];
    let mut remainder = carry;
    for index in 0..length {
        let value = (remainder << 8) | sum[index];
        middle[index] = (value / 2) as u8;
        remainder = value % 2;
    }
    (middle.as_slice() > low.as_slice() && middle.as_slice() < high.as_slice()).then_some(middle)
}

/// Copies what reads of `from`'s keys in `[low, high)`: forward until an error, then backward
/// from `high` until an error, then, between where the two stopped (a damaged page or more),
/// the same again on each half, `depth` levels down.
fn salvage_range(
    source: &DamagedStore,
    low: Vec<u8>,
    high: Vec<u8>,
    depth: u32,
    copy: &mut CopyEntry<'_>,
    out: &mut dyn Write,
) -> Result<(), MaintenanceError> {
    let mut forward_stop: Option<Vec<u8>> = None;
    for entry in source.range(&low, &high, false) {
        match entry {
            Ok((key, value)) => {
                copy(&key, &value)?;
                forward_stop = Some(key.to_vec());
            }
            Err(error) => {
                let _ = writeln!(
                    out,
                    "damaged after {:?}: {error}",
                    forward_stop.as_deref().map(String::from_utf8_lossy)
                );
                let gap_low = forward_stop.unwrap_or_else(|| low.clone());
                let mut backward_stop: Option<Vec<u8>> = None;
                for entry in source.range(&gap_low, &high, true) {
                    match entry {
                        Ok((key, value)) => {
                            if key.as_slice() <= gap_low.as_slice() {
                                return Ok(());
                            }
                            copy(&key, &value)?;
                            backward_stop = Some(key.to_vec());
                        }
                        Err(_) => break,
                    }
                }
                let gap_high = backward_stop.unwrap_or_else(|| high.clone());
                if depth >= SALVAGE_SPLITS_MAX {
                    return Ok(());
                }
                let Some(middle) = key_between(&gap_low, &gap_high) else {
                    return Ok(());
                };
                // The key just after the last one read: where the rest of the gap starts.
                let mut after_low = gap_low.clone();
                after_low.push(0);
                salvage_range(source, middle.clone(), gap_high, depth + 1, copy, out)?;
                return salvage_range(source, after_low, middle, depth + 1, copy, out);
            }
        }
    }
    Ok(())
}

/// Copies every key of key space `space` (a tag of [`layout`]) of the (possibly damaged) store
/// `from` that still reads into the store `to`, reading around damaged pages
/// ([`salvage_range`]). Flushes as
/// it goes, so whatever it copied before a panic or a hang survives. Prints `copied N` lines
/// to `out` as it makes progress. Meant for a child process (see [`recover`]).
pub fn salvage_copy(
    from: &Path,
    to: &Path,
    space: u8,
    mut out: impl Write,
) -> Result<CopyReport, MaintenanceError> {
    let engine = Engine::of_store(from).unwrap_or(Engine::UNNAMED);
    let target = DiskStore::create(to, engine, crate::store::PAGE_CACHE_BYTES_DEFAULT)?;
    let source = DamagedStore::open(from)?;
    let _ = writeln!(out, "opened");
    let _ = out.flush();
    let mut report = CopyReport::default();
    let mut batch = Batch::default();
    let mut lines = Vec::new();
    let mut copy = |key: &[u8], value: &[u8]| -> Result<(), MaintenanceError> {
        batch.put(key.to_vec(), value.to_vec());
        report.entries += 1;
        if batch.len() >= COPY_BATCH_ENTRIES {
            target.apply(std::mem::take(&mut batch))?;
            target.flush()?;
            let _ = writeln!(out, "copied {}", report.entries);
            let _ = out.flush();
        }
        Ok(())
    };
    salvage_range(
        &source,
        vec![space],
        vec![space + 1],
        0,
        &mut copy,
        &mut lines,
    )?;
    if !lines.is_empty() {
        report.damaged_spaces += 1;
        let notes = String::from_utf8_lossy(&lines).into_owned();
        if let Some(first) = notes.lines().next() {
            let _ = writeln!(out, "space {}: {first}", space as char);
        }
    }
    target.apply(std::mem::take(&mut batch))?;
    target.flush()?;
    let _ = writeln!(out, "copied {}", report.entries);
    let _ = out.flush();
    Ok(report)
}

/// What [`recover`] did.
#[derive(Debug, Clone, serde::Serialize)]
pub struct RecoverReport {
    /// Store entries the salvage copied, and how its run ended.
    pub copied: u64,
    pub copy: String,
    pub checked: SalvageReport,
    pub writer: String,
    /// Where the damaged store was kept.
    pub damaged: Option<PathBuf>,
}

/// Salvages the damaged store of the stopped node in `dir` (see the module doc), running the
/// copy as `salvage_command` (this program, with its hidden salvage subcommand and the two
/// store paths appended). `progress` is told the entries copied so far.
pub fn recover(
    dir: &Path,
    salvage_command: &[std::ffi::OsString],
    mut progress: impl FnMut(&str, u64),
) -> Result<RecoverReport, MaintenanceError> {
    if !dir.join(CONFIG_FILE).exists() {
        return Err(NodeError::NotInitialized(dir.to_owned()).into());
    }
    refuse_if_running(dir)?;
    let id_path = dir.join(NODE_ID_FILE);
    let owner = parse_node_id(&std::fs::read(&id_path).map_err(io(&id_path))?, &id_path)?;
    let store_path = dir.join(STORE_DIR);
    let salvaged = dir.join(format!("{STORE_DIR}.salvaged"));
    if salvaged.exists() {
        std::fs::remove_dir_all(&salvaged).map_err(io(&salvaged))?;
    }
    // A child for each key space: one that the engine makes hang costs only that space.
    let mut copied = 0u64;
    let mut how = Vec::new();
    if store_path.exists() {
        for space in layout::KEY_SPACES {
            let (count, ended) = run_salvage_child(
                salvage_command,
                &store_path,
                &salvaged,
                space,
                copied,
                &mut progress,
            )?;
            copied += count;
            how.push(format!("{}: {ended}", space as char));
        }
    } else {
        how.push("no store to salvage".to_owned());
    }
    let how = how.join("; ");
    // What the child copied is a store of its own making, flushed as it went.
    let engine = Engine::of_store(&store_path).unwrap_or(Engine::UNNAMED);
    let store = DiskStore::create(&salvaged, engine, crate::store::PAGE_CACHE_BYTES_DEFAULT)?;
    let (checked, writer) = check_and_reincarnate(&store, owner, &mut progress)?;
    drop(store);
    let damaged = put_in_place(dir, &salvaged, "damaged")?;
    Ok(RecoverReport {
        copied,
        copy: how,
        checked,
        writer: writer.to_string(),
        damaged,
    })
}

/// Runs the salvage copy in a child process, stopping it once it makes no progress for
/// [`SALVAGE_STALL_MAX`]. Returns the entries it said it copied and how it ended.
fn run_salvage_child(
    command: &[std::ffi::OsString],
    from: &Path,
    to: &Path,
    space: u8,
    copied_before: u64,
    progress: &mut impl FnMut(&str, u64),
) -> Result<(u64, String), MaintenanceError> {
    let (program, args) = command
        .split_first()
        .ok_or_else(|| MaintenanceError::Refused("no salvage command".to_owned()))?;
    let mut child = std::process::Command::new(program)
        .args(args)
        .arg(from)
        .arg(to)
        .arg((space as char).to_string())
        .stdin(std::process::Stdio::null())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(io(Path::new(program)))?;
    let stdout = child.stdout.take().expect("piped above");
    let (lines, seen) = std::sync::mpsc::channel::<String>();
    let reader = std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let mut copied = 0u64;
    let mut opened = false;
    let mut last_progress = Instant::now();
    let mut notes = Vec::new();
    let ended = loop {
        match seen.recv_timeout(Duration::from_millis(200)) {
            Ok(line) => {
                if line == "opened" {
                    opened = true;
                    last_progress = Instant::now();
                } else if let Some(count) =
                    line.strip_prefix("copied ").and_then(|n| n.parse().ok())
                {
                    if count > copied {
                        copied = count;
                        last_progress = Instant::now();
                        progress("entries copied", copied_before + copied);
                    }
                } else if notes.len() < 16 {
                    notes.push(line);
                }
            }
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            Err(std::sync::mpsc::RecvTimeoutError::Disconnected) => {
                let status = child.wait().map_err(io(Path::new(program)))?;
                break if status.success() {
                    "complete".to_owned()
                } else {
                    format!("the copy stopped early ({status})")
                };
            }
        }
        let allowed = if opened {
            SALVAGE_STALL_MAX
        } else {
            SALVAGE_OPEN_MAX
        };
        if last_progress.elapsed() >= allowed {
            let _ = child.kill();
            let _ = child.wait();
            break format!(
                "the copy made no progress for {} s and was stopped",
                allowed.as_secs()
            );
        }
    };
    let _ = reader.join();
    let mut how = ended;
    if !notes.is_empty() {
        how.push_str(&format!("; {}", notes.join("; ")));
    }
    Ok((copied, how))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_key_between_two_keys_sorts_between_them() {
        for (low, high) in [
            (&b"D"[..], &b"E"[..]),
            (b"Dt/r1", b"Dt/r9"),
            (b"Dt/r1", b"Dt/r1\x00\x01"),
            (b"L\x00\x00\xff", b"L\x00\x01\x00"),
        ] {
            let middle = key_between(low, high).unwrap();
            assert!(
                middle.as_slice() > low && middle.as_slice() < high,
                "{middle:?}"
            );
        }
        assert_eq!(key_between(b"a", b"a"), None);
    }
}
