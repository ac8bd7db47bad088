//! The runner's work dir: the one place that knows its layout.
//!
//! ```text
//! <work_dir>/
//!   runner.json              the cached credential (crate::credentials)
//!   attempts/
//!     <attempt_id>/          one per attempt holding a slot
//!       workspace/           the steps' working directory
//!       manifests/           where a set-image step clones the GitOps repository
//!     .spare/workspace/      the next attempt's dir, made ahead (SPARE)
//!   spool/
//!     <attempt_id>.log       an attempt's log spool (crate::logs::spool), kept
//!                            until the coordinator acknowledged its final report
//!     .spare                 the next attempt's spool file, made ahead
//! ```
//!
//! Attempt ids become file names, so only [`valid_attempt_id`]s are taken.
//! [`WorkDir`] makes, recycles and removes these files; the agent and the
//! attempts ask it for paths and never join them themselves. It imports
//! nothing of the crate but its [`Error`].

use std::path::{Path, PathBuf};

use tracing::{debug, info, warn};

use crate::Error;

/// Name of the spare attempt dir (with its empty `workspace`) in the
/// attempts dir and of the spare (empty) spool file in the spool dir. An
/// attempt id never starts with a dot, so it cannot be one.
pub(crate) const SPARE: &str = ".spare";
/// File name of the cached credential.
const CREDENTIALS: &str = "runner.json";
const WORKSPACE: &str = "workspace";

/// A runner's work dir (see the module docs for its layout).
#[derive(Debug)]
pub(crate) struct WorkDir {
    root: PathBuf,
    /// `<root>/attempts`
    attempts: PathBuf,
    /// `<root>/spool`
    spool: PathBuf,
}

/// Attempt ids become file names: allow only a safe alphabet.
pub(crate) fn valid_attempt_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.'))
}

impl WorkDir {
    pub(crate) fn new(root: impl Into<PathBuf>) -> Self {
        let root = root.into();
        Self {
            attempts: root.join("attempts"),
            spool: root.join("spool"),
            root,
        }
    }

    /// `<root>/runner.json`
    pub(crate) fn credentials_file(&self) -> PathBuf {
        self.root.join(CREDENTIALS)
    }

    /// `<root>/spool`, where [`crate::logs::spool::Spool`] makes
    /// [`WorkDir::spool_path`].
    pub(crate) fn spool_dir(&self) -> &Path {
        &self.spool
    }

    /// `<root>/spool/<attempt_id>.log`
    pub(crate) fn spool_path(&self, attempt_id: &str) -> PathBuf {
        self.spool.join(format!("{attempt_id}.log"))
    }

    /// `<root>/attempts/<attempt_id>`
    fn attempt_dir(&self, attempt_id: &str) -> PathBuf {
        self.attempts.join(attempt_id)
    }

    /// `<root>/attempts/<attempt_id>/workspace`
    pub(crate) fn workspace(&self, attempt_id: &str) -> PathBuf {
        self.attempt_dir(attempt_id).join(WORKSPACE)
    }

    /// `<root>/attempts/<attempt_id>/manifests`
    pub(crate) fn manifests_dir(&self, attempt_id: &str) -> PathBuf {
        self.attempt_dir(attempt_id).join("manifests")
    }

    /// Prepares the work dir and removes what an earlier, killed runner
    /// process left in `attempts/` and `spool/`: a restarted runner has lost
    /// those attempts (the coordinator requeues them). Then makes the spares.
    pub(crate) async fn prepare(&self) -> Result<(), Error> {
        let err = |path: &Path| {
            let path = path.to_owned();
            move |source| Error::WorkDir { path, source }
        };
        tokio::fs::create_dir_all(&self.root)
            .await
            .map_err(err(&self.root))?;
        // `runner.json` (the runner's credential) and the spooled logs are
        // the runner's alone. Other users of the host cannot get in; a shell
        // step runs as the runner's user and can (README "Executors and
        // isolation").
        {
            use std::os::unix::fs::PermissionsExt;
            tokio::fs::set_permissions(&self.root, std::fs::Permissions::from_mode(0o700))
                .await
                .map_err(err(&self.root))?;
        }
        for dir in [&self.attempts, &self.spool] {
            tokio::fs::create_dir_all(dir).await.map_err(err(dir))?;
            let mut entries = tokio::fs::read_dir(dir).await.map_err(err(dir))?;
            while let Some(entry) = entries.next_entry().await.map_err(err(dir))? {
                let path = entry.path();
                info!(path = %path.display(), "removing leftover of an attempt this runner no longer runs");
                let removed = if entry.file_type().await.is_ok_and(|t| t.is_dir()) {
                    tokio::fs::remove_dir_all(&path).await
                } else {
                    tokio::fs::remove_file(&path).await
                };
                removed.map_err(err(&path))?;
            }
        }
        let (attempts, spool) = (self.attempts.clone(), self.spool.clone());
        let _ = tokio::task::spawn_blocking(move || {
            make_spares(&attempts, &spool, "start");
        })
        .await;
        Ok(())
    }

    /// Makes attempt `attempt_id`'s dir with its workspace and puts the
    /// spool spare at its [`WorkDir::spool_path`], both by renaming the
    /// spares where there are some. `Err`: the dir could not be made (the
    /// spool file is made, truncating, by the spool itself).
    ///
    /// Inline on the calling worker: pickup waits for them, and a trip to
    /// the blocking pool and back (two cross-thread wake-ups) cost more than
    /// the calls themselves.
    pub(crate) fn start_attempt(&self, attempt_id: &str) -> std::io::Result<()> {
        let dir = self.attempt_dir(attempt_id);
        let made = match std::fs::rename(self.attempts.join(SPARE), &dir) {
            Ok(()) => Ok(()),
            Err(_) => make_workspace(&dir, &dir.join(WORKSPACE)),
        };
        let _ = std::fs::rename(self.spool.join(SPARE), self.spool_path(attempt_id));
        made
    }

    /// Replaces the attempt-dir spare if the attempt's dir did not become
    /// it, off the runtime's workers (`tag` names the temporary). The spool
    /// spare comes back when a spool is no longer needed
    /// ([`WorkDir::retire_spool`], once the coordinator has the final
    /// report); until then an attempt that starts makes its own spool file.
    pub(crate) async fn replace_dir_spare(&self, tag: &str) {
        let (attempts, tag) = (self.attempts.clone(), tag.to_owned());
        let _ = tokio::task::spawn_blocking(move || make_dir_spare(&attempts, &tag)).await;
    }

    /// Empties attempt `attempt_id`'s dir and keeps it as the next
    /// attempt's spare ([`recycle_dir`]), or else removes it.
    pub(crate) async fn retire_attempt_dir(&self, attempt_id: &str) {
        let (attempts, dir) = (self.attempts.clone(), self.attempt_dir(attempt_id));
        let removed = tokio::task::spawn_blocking(move || {
            match recycle_dir(&attempts, &dir) {
                Ok(()) => return Ok(()),
                Err(e) => debug!(
                    dir = %dir.display(),
                    error = %e,
                    "removing the attempt's dir instead of keeping it as the spare"
                ),
            }
            match std::fs::remove_dir_all(&dir) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err((dir, e)),
                _ => Ok(()),
            }
        })
        .await;
        if let Ok(Err((dir, e))) = removed {
            warn!(dir = %dir.display(), error = %e, "could not remove the attempt's work dir");
        }
    }

    /// Retires attempt `attempt_id`'s spool file ([`retire_spool`]) off the
    /// runtime's workers.
    pub(crate) async fn retire_spool(&self, attempt_id: &str) -> std::io::Result<()> {
        let path = self.spool_path(attempt_id);
        tokio::task::spawn_blocking(move || retire_spool(&path))
            .await
            .unwrap_or(Ok(()))
    }

    /// Removes what [`WorkDir::start_attempt`] and the spool made, for an
    /// attempt that never ran.
    pub(crate) async fn discard(&self, attempt_id: &str) {
        if let Err(e) = self.retire_spool(attempt_id).await {
            warn!(error = %e, "could not remove the dropped attempt's log spool");
        }
        self.retire_attempt_dir(attempt_id).await;
    }
}

/// Turns a finished attempt's dir back into the [`SPARE`]: removes
/// everything in it but its `workspace`, and everything in that, then
/// renames it. The two directories' inodes are kept for the next attempt
/// instead of being freed and allocated again: on ext4 without a journal
/// every inode freed in the last minute slows each allocation in its group
/// (see [`make_spares`]), the step's own files included, so an attempt that
/// deletes its dirs makes the next one's steps slower to create files.
///
/// Refused (the caller removes the dir) when there already is a spare,
/// when either directory is not as [`make_spares`] would make it (a
/// symlink, or another mode or owner than the attempts dir: a step may
/// have changed them), or when the workspace is not empty after emptying
/// (something still writes there).
///
/// With the shell executor a process that left the step's process group
/// (`setsid`, a daemon) outlives the step, and one whose working directory
/// is the workspace now sits in the next attempt's. That executor isolates
/// nothing (such a process can write anywhere the runner can), and GitLab
/// Runner's shell executor and Buildbot's worker reuse build dirs the same
/// way; the docker executor's processes are gone with their containers.
fn recycle_dir(attempts_dir: &Path, dir: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::MetadataExt;
    let spare = attempts_dir.join(SPARE);
    if std::fs::symlink_metadata(&spare).is_ok() {
        return Err(std::io::Error::other("there already is a spare"));
    }
    let template = std::fs::metadata(attempts_dir)?;
    let workspace = dir.join(WORKSPACE);
    for d in [dir, workspace.as_path()] {
        let meta = std::fs::symlink_metadata(d)?;
        if !meta.is_dir()
            || meta.mode() & 0o7777 != template.mode() & 0o7777
            || (meta.uid(), meta.gid()) != (template.uid(), template.gid())
        {
            return Err(std::io::Error::other("not as a spare is made"));
        }
    }
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry.file_name() != WORKSPACE {
            remove_entry(&entry)?;
        }
    }
    for entry in std::fs::read_dir(&workspace)? {
        remove_entry(&entry?)?;
    }
    if std::fs::read_dir(&workspace)?.next().is_some() {
        return Err(std::io::Error::other(
            "the workspace filled again while it was emptied",
        ));
    }
    // Fails if another attempt's dir became the spare meanwhile (a spare is
    // never empty: it holds its workspace).
    std::fs::rename(dir, spare)
}

fn remove_entry(entry: &std::fs::DirEntry) -> std::io::Result<()> {
    if entry.file_type()?.is_dir() {
        std::fs::remove_dir_all(entry.path())
    } else {
        std::fs::remove_file(entry.path())
    }
}

/// Makes the spares the next attempt starts with, if they are missing.
///
/// Allocating an inode is the slowest part of an attempt's start: on ext4 it
/// scans the group's inode bitmap, and without a journal it also skips every
/// inode freed in the last few seconds, reading each one's inode-table
/// block. So they are made at start and kept between attempts off the
/// pickup path (a finished attempt's dir and, once acknowledged, its spool
/// become the next spares: [`recycle_dir`], [`retire_spool`]), and an
/// attempt's start renames them into place: a rename allocates no inode.
/// Each is built under a temporary name and renamed to [`SPARE`] only when
/// complete, so a spare dir always holds its `workspace`, and attempts that
/// start together each take a whole spare or none (the loser of the rename
/// makes its own). Best effort: without spares, attempts create their dir
/// and spool as before.
fn make_spares(attempts_dir: &Path, spool_dir: &Path, tag: &str) {
    make_dir_spare(attempts_dir, tag);
    make_spool_spare(spool_dir, tag);
}

/// The attempt-dir half of [`make_spares`].
fn make_dir_spare(attempts_dir: &Path, tag: &str) {
    let spare = attempts_dir.join(SPARE);
    if std::fs::symlink_metadata(&spare).is_err() {
        let tmp = attempts_dir.join(format!("{SPARE}-{tag}"));
        let made = std::fs::create_dir(&tmp)
            .and_then(|()| std::fs::create_dir(tmp.join(WORKSPACE)))
            .and_then(|()| std::fs::rename(&tmp, &spare));
        if made.is_err() {
            // Another attempt made one meanwhile (the rename onto its
            // non-empty dir fails), or the dir is gone.
            let _ = std::fs::remove_dir_all(&tmp);
        }
    }
}

/// The spool half of [`make_spares`].
fn make_spool_spare(spool_dir: &Path, tag: &str) {
    let spare = spool_dir.join(SPARE);
    if std::fs::symlink_metadata(&spare).is_err() {
        let tmp = spool_dir.join(format!("{SPARE}-{tag}"));
        let made = std::fs::File::create(&tmp).and_then(|_| std::fs::rename(&tmp, &spare));
        if made.is_err() {
            let _ = std::fs::remove_file(&tmp);
        }
    }
}

/// Empties a spool file that is no longer needed and keeps it as the spool
/// [`SPARE`] if there is none, or else removes it: the inode is kept for
/// the next attempt instead of being freed (see [`recycle_dir`] for why).
/// The spare, beside it in the spool dir, is made by a hard link, which
/// unlike a rename never replaces one that is there already, and the
/// spool's own name is then removed.
fn retire_spool(path: &Path) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    // Not through a symlink: only a regular file the runner made is kept.
    let _kept = std::fs::OpenOptions::new()
        .write(true)
        .custom_flags(nix::fcntl::OFlag::O_NOFOLLOW.bits())
        .open(path)
        .and_then(|file| {
            if file.metadata()?.is_file() {
                file.set_len(0)
            } else {
                Err(std::io::Error::other("not a regular file"))
            }
        })
        .and_then(|()| std::fs::hard_link(path, path.with_file_name(SPARE)));
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// `<attempt dir>/workspace`: two mkdirs where `create_dir_all` makes
/// three calls (it tries the leaf first); the whole path only if the
/// attempts dir itself is gone.
fn make_workspace(dir: &Path, workspace: &Path) -> std::io::Result<()> {
    match std::fs::create_dir(dir) {
        Ok(()) => std::fs::create_dir(workspace),
        Err(_) => std::fs::create_dir_all(workspace),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::logs::spool::Spool;
    use crate::testing::dir_names as names;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn attempt_ids_are_safe_file_names() {
        assert!(valid_attempt_id("att-0194f3a2b7c84d1e"));
        assert!(!valid_attempt_id(""));
        assert!(!valid_attempt_id("../etc"));
        assert!(!valid_attempt_id("a/b"));
        assert!(!valid_attempt_id(".hidden"));
    }

    #[tokio::test]
    async fn prepare_makes_the_work_dir_private() {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("work");
        std::fs::create_dir(&root).unwrap();
        std::fs::set_permissions(&root, std::fs::Permissions::from_mode(0o755)).unwrap();
        WorkDir::new(&root).prepare().await.unwrap();
        assert_eq!(std::fs::metadata(&root).unwrap().mode() & 0o777, 0o700);
    }

    #[tokio::test]
    async fn prepare_work_dir_removes_leftovers() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(dir.path().join("attempts/att-old/workspace")).unwrap();
        std::fs::create_dir_all(dir.path().join("spool")).unwrap();
        std::fs::write(dir.path().join("spool/att-old.log"), b"x").unwrap();
        std::fs::write(dir.path().join("runner.json"), b"{}").unwrap();
        WorkDir::new(dir.path()).prepare().await.unwrap();
        // What is left is the spares the next attempt starts with.
        let names = |sub: &str| names(&dir.path().join(sub));
        assert_eq!(names("attempts"), [SPARE]);
        assert_eq!(names("spool"), [SPARE]);
        assert!(dir.path().join("attempts/.spare/workspace").is_dir());
        assert_eq!(
            std::fs::metadata(dir.path().join("spool/.spare"))
                .unwrap()
                .len(),
            0
        );
        assert!(dir.path().join("runner.json").exists());
    }

    #[test]
    fn spares_are_made_once_whole_and_taken_by_rename() {
        let root = tempfile::tempdir().unwrap();
        let work = WorkDir::new(root.path());
        let (attempts, spool) = (root.path().join("attempts"), root.path().join("spool"));
        std::fs::create_dir(&attempts).unwrap();
        std::fs::create_dir(&spool).unwrap();
        make_spares(&attempts, &spool, "att-1");
        assert_eq!(names(&attempts), [SPARE]);
        assert_eq!(names(&spool), [SPARE]);
        // A file written into the spare before a second call survives it:
        // an existing spare is kept, and no temporary is left behind.
        std::fs::write(attempts.join(SPARE).join("workspace/mark"), b"x").unwrap();
        make_spares(&attempts, &spool, "att-2");
        assert_eq!(names(&attempts), [SPARE]);
        assert!(attempts.join(SPARE).join("workspace/mark").exists());
        std::fs::remove_file(attempts.join(SPARE).join("workspace/mark")).unwrap();

        // What an attempt's start does with them.
        work.start_attempt("att-3").unwrap();
        assert!(attempts.join("att-3/workspace").is_dir());
        assert_eq!(work.workspace("att-3"), attempts.join("att-3/workspace"));
        let log = Spool::create_now(work.spool_dir(), "att-3").unwrap();
        assert_eq!(log.path(), spool.join("att-3.log"));
        assert_eq!(log.path(), work.spool_path("att-3"));
        assert_eq!(names(&attempts), ["att-3"]);
        assert_eq!(names(&spool), ["att-3.log"]);
        // Gone spares are made again.
        make_spares(&attempts, &spool, "att-3");
        assert_eq!(names(&attempts), [SPARE, "att-3"]);
        assert_eq!(names(&spool), [SPARE, "att-3.log"]);
    }

    /// An attempts dir holding a finished attempt's dir `att-1`, with files
    /// in its workspace and beside it.
    fn finished_attempt() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let root = tempfile::tempdir().unwrap();
        let attempts = root.path().join("attempts");
        std::fs::create_dir(&attempts).unwrap();
        let dir = attempts.join("att-1");
        make_workspace(&dir, &dir.join("workspace")).unwrap();
        std::fs::create_dir_all(dir.join("workspace/src/deep")).unwrap();
        std::fs::write(dir.join("workspace/src/deep/f"), b"x").unwrap();
        std::fs::write(dir.join("workspace/top"), b"x").unwrap();
        std::os::unix::fs::symlink("/etc", dir.join("workspace/link")).unwrap();
        std::fs::create_dir(dir.join("manifests")).unwrap();
        std::fs::write(dir.join("manifests/m.yaml"), b"x").unwrap();
        (root, attempts, dir)
    }
    #[test]
    fn a_finished_attempts_dir_becomes_the_empty_spare() {
        let (_root, attempts, dir) = finished_attempt();
        let ino = |p: &std::path::Path| std::fs::metadata(p).unwrap().ino();
        let (dir_ino, ws_ino) = (ino(&dir), ino(&dir.join("workspace")));
        recycle_dir(&attempts, &dir).unwrap();
        assert_eq!(names(&attempts), [SPARE]);
        let spare = attempts.join(SPARE);
        assert_eq!(names(&spare), ["workspace"]);
        assert!(names(&spare.join("workspace")).is_empty());
        // The same inodes, not new ones; the symlink's target is untouched.
        assert_eq!(
            (ino(&spare), ino(&spare.join("workspace"))),
            (dir_ino, ws_ino)
        );
        assert!(std::path::Path::new("/etc").is_dir());
        // The next attempt takes it as it takes any spare.
        std::fs::rename(&spare, attempts.join("att-2")).unwrap();
        assert!(attempts.join("att-2/workspace").is_dir());
    }

    #[test]
    fn a_dir_is_not_recycled_over_an_existing_spare() {
        let (root, attempts, dir) = finished_attempt();
        let spool = root.path().join("spool");
        std::fs::create_dir(&spool).unwrap();
        make_spares(&attempts, &spool, "x");
        std::fs::write(attempts.join(SPARE).join("workspace/mark"), b"x").unwrap();
        assert!(recycle_dir(&attempts, &dir).is_err());
        // Both left as they were: the caller removes the attempt's dir.
        assert!(dir.join("workspace/top").exists());
        assert!(attempts.join(SPARE).join("workspace/mark").exists());
    }

    #[test]
    fn a_workspace_a_step_changed_is_not_recycled() {
        let (_root, attempts, dir) = finished_attempt();
        let ws = dir.join("workspace");
        std::fs::set_permissions(&ws, std::fs::Permissions::from_mode(0o700)).unwrap();
        assert!(recycle_dir(&attempts, &dir).is_err());
        assert!(ws.join("top").exists(), "nothing removed before the check");
        // A workspace replaced by a symlink is refused too.
        let (_root, attempts, dir) = finished_attempt();
        let ws = dir.join("workspace");
        std::fs::remove_dir_all(&ws).unwrap();
        std::os::unix::fs::symlink("/tmp", &ws).unwrap();
        assert!(recycle_dir(&attempts, &dir).is_err());
        assert!(std::path::Path::new("/tmp").is_dir());
    }

    #[test]
    fn a_spool_no_longer_needed_becomes_the_empty_spare() {
        let dir = tempfile::tempdir().unwrap();
        let spool = dir.path().join("att-1.log");
        std::fs::write(&spool, vec![b'x'; 10_000]).unwrap();
        let ino = std::fs::metadata(&spool).unwrap().ino();
        retire_spool(&spool).unwrap();
        assert_eq!(names(dir.path()), [SPARE]);
        let spare = std::fs::metadata(dir.path().join(SPARE)).unwrap();
        assert_eq!((spare.ino(), spare.len(), spare.nlink()), (ino, 0, 1));
    }

    #[test]
    fn a_spool_is_removed_when_there_is_a_spare_already() {
        let dir = tempfile::tempdir().unwrap();
        make_spool_spare(dir.path(), "x");
        std::fs::write(dir.path().join(SPARE), b"mark").unwrap();
        let spool = dir.path().join("att-1.log");
        std::fs::write(&spool, b"log").unwrap();
        retire_spool(&spool).unwrap();
        assert_eq!(names(dir.path()), [SPARE]);
        // The spare there is kept, not replaced.
        assert_eq!(std::fs::read(dir.path().join(SPARE)).unwrap(), b"mark");
        // A spool already gone is no error.
        retire_spool(&spool).unwrap();
    }

    #[test]
    fn a_symlinked_spool_is_removed_and_its_target_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let target = dir.path().join("elsewhere");
        std::fs::write(&target, b"keep me").unwrap();
        let spool = dir.path().join("att-1.log");
        std::os::unix::fs::symlink(&target, &spool).unwrap();
        retire_spool(&spool).unwrap();
        assert_eq!(names(dir.path()), ["elsewhere"]);
        assert_eq!(std::fs::read(&target).unwrap(), b"keep me");
    }
}
