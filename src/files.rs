//! Files a node creates: readable by their owner only, since they hold its keys and its data.
//!
//! Guarantees: every dir Concord creates for a node is 0700 and every file it writes there
//! 0600, created so from the start (no moment in which another user could open a key); the
//! store's own files are set so whenever the node opens it; and a node refuses a data dir that
//! another user can write, since whoever can write it can replace its keys or its records.

use std::fs::{DirBuilder, OpenOptions, Permissions};
use std::io::Write;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::path::Path;

/// Mode of the dirs Concord creates.
pub const DIR_MODE: u32 = 0o700;
/// Mode of the files Concord writes.
pub const FILE_MODE: u32 = 0o600;
/// Mode bits that let users other than the owner write.
const WRITABLE_BY_OTHERS: u32 = 0o022;
/// Most entries [`restrict_tree`] visits: a store holds a handful of files, or some hundreds of
/// tables on an LSM engine.
const TREE_ENTRIES_MAX: usize = 10_000;

/// Creates `dir` and its missing parents, owner-only; an existing `dir` is made owner-only.
pub fn create_private_dir(dir: &Path) -> std::io::Result<()> {
    DirBuilder::new()
        .recursive(true)
        .mode(DIR_MODE)
        .create(dir)?;
    std::fs::set_permissions(dir, Permissions::from_mode(DIR_MODE))
}

/// Writes `contents` to `path`, replacing it, readable by the owner only. The file is
/// written beside `path` and renamed over it, so a crash leaves the old contents or the new,
/// never a part.
pub fn write_private(path: &Path, contents: &[u8]) -> std::io::Result<()> {
    let mut partial = path.as_os_str().to_owned();
    partial.push(".partial");
    let partial = std::path::PathBuf::from(partial);
    let mut file = OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(FILE_MODE)
        .open(&partial)?;
    // A file left from an earlier attempt keeps its mode on open: set it.
    file.set_permissions(Permissions::from_mode(FILE_MODE))?;
    file.write_all(contents)?;
    file.sync_all()?;
    std::fs::rename(&partial, path)?;
    if let Some(parent) = path
        .parent()
        .filter(|parent| !parent.as_os_str().is_empty())
    {
        std::fs::File::open(parent)?.sync_all()?;
    }
    Ok(())
}

/// Makes `dir` and everything under it owner-only (dirs 0700, files 0600).
pub fn restrict_tree(dir: &Path) -> std::io::Result<()> {
    let mut pending = vec![dir.to_owned()];
    let mut visited = 0;
    while let Some(path) = pending.pop() {
        visited += 1;
        if visited > TREE_ENTRIES_MAX {
            break;
        }
        let metadata = std::fs::symlink_metadata(&path)?;
        if metadata.is_dir() {
            std::fs::set_permissions(&path, Permissions::from_mode(DIR_MODE))?;
            for entry in std::fs::read_dir(&path)? {
                pending.push(entry?.path());
            }
        } else if metadata.is_file() {
            std::fs::set_permissions(&path, Permissions::from_mode(FILE_MODE))?;
        }
    }
    Ok(())
}

/// The mode of `dir` if users other than its owner can write it.
pub fn writable_by_others(dir: &Path) -> std::io::Result<Option<u32>> {
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
    Ok((mode & WRITABLE_BY_OTHERS != 0).then_some(mode))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn mode(path: &Path) -> u32 {
        std::fs::metadata(path).unwrap().permissions().mode() & 0o777
    }

    #[test]
    fn what_is_created_is_owner_only_and_others_writing_is_seen() {
        let temp = tempfile::tempdir().unwrap();
        let dir = temp.path().join("a/b");
        create_private_dir(&dir).unwrap();
        assert_eq!(mode(&dir), DIR_MODE);
        let file = dir.join("key");
        std::fs::write(&file, "old").unwrap();
        std::fs::set_permissions(&file, Permissions::from_mode(0o644)).unwrap();
        write_private(&file, b"new").unwrap();
        assert_eq!(mode(&file), FILE_MODE);
        assert_eq!(std::fs::read(&file).unwrap(), b"new");

        let store = temp.path().join("store");
        std::fs::create_dir_all(store.join("blobs")).unwrap();
        std::fs::write(store.join("db"), "x").unwrap();
        std::fs::set_permissions(&store, Permissions::from_mode(0o755)).unwrap();
        restrict_tree(&store).unwrap();
        assert_eq!(mode(&store), DIR_MODE);
        assert_eq!(mode(&store.join("blobs")), DIR_MODE);
        assert_eq!(mode(&store.join("db")), FILE_MODE);

        assert_eq!(writable_by_others(&dir).unwrap(), None);
        std::fs::set_permissions(&dir, Permissions::from_mode(0o777)).unwrap();
        assert_eq!(writable_by_others(&dir).unwrap(), Some(0o777));
    }
}
