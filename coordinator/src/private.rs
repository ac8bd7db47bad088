//! The coordinator's files are its own: the data dir and the log dir are
//! 0700, and every file it creates there (`state.redb`, its write-ahead log,
//! task logs) is 0600. Task logs hold what steps printed, and the state
//! holds every run's parameters; no other user of the host may read them.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// The mode of every file the coordinator creates.
pub(crate) const FILE_MODE: u32 = 0o600;

/// Creates `dir` (and its parents) if needed and makes it 0700, also when
/// it already existed with a wider mode.
pub(crate) fn private_dir(dir: &Path) -> io::Result<()> {
    std::fs::create_dir_all(dir)?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

/// Makes an existing file 0600 (for files a library creates itself).
pub(crate) fn private_file(path: &Path) -> io::Result<()> {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(FILE_MODE))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::MetadataExt;

    #[test]
    fn dirs_become_0700_and_files_0600() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("a/b");
        private_dir(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        private_dir(&dir).unwrap();
        assert_eq!(std::fs::metadata(&dir).unwrap().mode() & 0o777, 0o700);
        let file = dir.join("f");
        std::fs::write(&file, b"x").unwrap();
        private_file(&file).unwrap();
        assert_eq!(std::fs::metadata(&file).unwrap().mode() & 0o777, 0o600);
    }
}
