//! The spool: plain directories, one per state of a job, as in Postfix's and nullmailer's queues. A job
//! is a directory (`manifest.xml`, `documents/`, `reason`, `state`) and changes state only by rename(2)
//! inside one file system, never overwriting (RENAME_NOREPLACE). This module owns the layout, the lock,
//! the moves, the small `state` and `reason` files, and the directory fsyncs.

use std::cell::Cell;
use std::ffi::OsStr;
#[cfg(test)]
use std::ffi::OsString;
use std::fs::{self, File};
use std::io::{self, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use anyhow::Context;
use rustix::fs::{CWD, FlockOperation, RenameFlags};

/// The directories of the spool, one per state.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Place {
    Incoming,
    Active,
    Deferred,
    Failed,
    Sent,
    Receipts,
}

impl Place {
    pub const ALL: [Place; 6] = [
        Place::Incoming,
        Place::Active,
        Place::Deferred,
        Place::Failed,
        Place::Sent,
        Place::Receipts,
    ];

    pub fn dir_name(self) -> &'static str {
        match self {
            Place::Incoming => "incoming",
            Place::Active => "active",
            Place::Deferred => "deferred",
            Place::Failed => "failed",
            Place::Sent => "sent",
            Place::Receipts => "receipts",
        }
    }

    fn bit(self) -> u8 {
        1 << self as u8
    }
}

/// Names the uploader uses for files in flight; docmail never touches them.
pub fn is_ignored(name: &OsStr) -> bool {
    let b = name.as_encoded_bytes();
    b.starts_with(b".") || b.ends_with(b".part") || b.ends_with(b".tmp")
}

pub fn is_manifest_name(name: &OsStr) -> bool {
    !is_ignored(name) && name.as_encoded_bytes().ends_with(b".xml")
}

pub const MANIFEST: &str = "manifest.xml";
pub const DOCUMENTS: &str = "documents";
pub const REASON: &str = "reason";
pub const STATE: &str = "state";
/// Prefix of a job directory being built inside a state directory; see [`Spool::recover`].
const BUILDING: &str = ".new-";

pub struct Spool {
    root: PathBuf,
    /// Held open for the run's `flock`; see [`Spool::try_lock`].
    lock: Option<File>,
    /// Directories renamed into or out of since the last [`Spool::sync`].
    dirty: Cell<u8>,
}

impl Spool {
    /// Opens the spool at `root`, creating missing state directories (the package creates them with
    /// their owners and modes; this is for a spool an operator or a test sets up by hand).
    pub fn open(root: &Path) -> anyhow::Result<Spool> {
        let meta = fs::metadata(root).with_context(|| format!("spool {}", root.display()))?;
        anyhow::ensure!(meta.is_dir(), "spool {} is not a directory", root.display());
        for place in Place::ALL {
            let dir = root.join(place.dir_name());
            if !dir.is_dir() {
                fs::DirBuilder::new()
                    .mode(0o750)
                    .create(&dir)
                    .with_context(|| format!("creating {}", dir.display()))?;
            }
        }
        Ok(Spool {
            root: root.to_path_buf(),
            lock: None,
            dirty: Cell::new(0),
        })
    }

    pub fn dir(&self, place: Place) -> PathBuf {
        self.root.join(place.dir_name())
    }

    /// Takes the run lock: an exclusive flock on `active/`, which only docmail can open. Returns false
    /// when another process holds it.
    pub fn try_lock(&mut self) -> anyhow::Result<bool> {
        let dir = self.dir(Place::Active);
        let file = File::open(&dir)
            .with_context(|| format!("opening {} for the run lock", dir.display()))?;
        match rustix::fs::flock(&file, FlockOperation::NonBlockingLockExclusive) {
            Ok(()) => {
                self.lock = Some(file);
                Ok(true)
            }
            Err(rustix::io::Errno::WOULDBLOCK) => Ok(false),
            Err(e) => Err(io::Error::from(e)).with_context(|| format!("locking {}", dir.display())),
        }
    }

    fn touch(&self, place: Place) {
        self.dirty.set(self.dirty.get() | place.bit());
    }

    /// Makes the renames since the last call durable: fsync of every directory they touched. Batched
    /// per pass: a rename lost to a power cut leaves the job in its previous state, where the next run
    /// finds it again (at worst it is sent twice with the same Message-ID, which the contract allows).
    pub fn sync(&self) -> io::Result<()> {
        let dirty = self.dirty.replace(0);
        for place in Place::ALL {
            if dirty & place.bit() != 0 {
                File::open(self.dir(place))?.sync_all()?;
            }
        }
        Ok(())
    }

    /// Renames `from` to `to_dir/name`, or `name.2`, `name.3`, … when taken; never replaces anything.
    /// The name a job called `name` gets in `place`: `name`, or `name.2`, `name.3`, … when taken, as
    /// the move will choose it (under the run lock nobody else adds names), so that a reason written
    /// before the move can tell the operator what to type.
    pub fn free_name(&self, place: Place, name: &str) -> String {
        let dir = self.dir(place);
        (1..10_000)
            .map(|n| {
                if n == 1 {
                    name.to_string()
                } else {
                    format!("{name}.{n}")
                }
            })
            .find(|candidate| dir.join(candidate).symlink_metadata().is_err())
            .unwrap_or_else(|| name.to_string())
    }

    fn rename_unique(&self, from: &Path, to_dir: &Path, name: &str) -> io::Result<PathBuf> {
        for n in 1..10_000 {
            let candidate = if n == 1 {
                to_dir.join(name)
            } else {
                to_dir.join(format!("{name}.{n}"))
            };
            match rename_noreplace(from, &candidate) {
                Ok(()) => return Ok(candidate),
                Err(e)
                    if e.kind() == io::ErrorKind::AlreadyExists
                        || e.raw_os_error() == Some(libc_enotempty()) =>
                {
                    continue;
                }
                Err(e) => return Err(e),
            }
        }
        Err(io::Error::new(
            io::ErrorKind::AlreadyExists,
            format!("no free name for {name} in {}", to_dir.display()),
        ))
    }

    /// Moves an upload out of the drop into a new job directory `place/name`: the documents first, the
    /// manifest last, then the directory into view. Until the manifest has moved the job is still the
    /// drop's (a killed run leaves it there and [`Spool::recover`] puts the documents back); after, it
    /// is complete in `.new-NAME` and recovery only finishes the last rename. A `reason` is written
    /// into the job before it appears. Without a manifest (an orphaned
    /// document) an interrupted move is simply undone by recovery.
    pub fn adopt<D: AsRef<OsStr>>(
        &self,
        manifest: Option<&OsStr>,
        documents: &[D],
        place: Place,
        name: &str,
        reason: Option<&str>,
    ) -> io::Result<PathBuf> {
        let incoming = self.dir(Place::Incoming);
        let target = self.dir(place);
        let building = target.join(format!("{BUILDING}{name}"));
        fs::DirBuilder::new()
            .mode(0o750)
            .recursive(true)
            .create(building.join(DOCUMENTS))?;
        if let Some(text) = reason {
            write_note(&building.join(REASON), text, true)?;
        }
        for doc in documents {
            let doc = doc.as_ref();
            match rename_noreplace(&incoming.join(doc), &building.join(DOCUMENTS).join(doc)) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::NotFound => {} // named but never uploaded
                Err(e) => return Err(e),
            }
        }
        if let Some(manifest) = manifest {
            rename_noreplace(&incoming.join(manifest), &building.join(MANIFEST))?;
        }
        self.touch(Place::Incoming);
        self.touch(place);
        self.rename_unique(&building, &target, name)
    }

    /// Moves a job directory to another state, keeping its name when free.
    pub fn move_job(&self, job: &Path, place: Place) -> io::Result<PathBuf> {
        let name = job_name(job);
        let from = place_of(job);
        let to = self.rename_unique(job, &self.dir(place), &name)?;
        self.touch(place);
        if let Some(from) = from.and_then(|f| Place::ALL.into_iter().find(|p| p.dir_name() == f)) {
            self.touch(from);
        }
        Ok(to)
    }

    /// Finishes or undoes the work of a run that was killed: a `.new-NAME` directory with its manifest
    /// is complete and gets its name; one without gives its documents back to the drop.
    pub fn recover(&self) -> anyhow::Result<()> {
        for place in [Place::Active, Place::Failed, Place::Deferred, Place::Sent] {
            let dir = self.dir(place);
            for entry in fs::read_dir(&dir).with_context(|| format!("reading {}", dir.display()))? {
                let entry = entry?;
                let file_name = entry.file_name();
                let Some(name) = file_name.to_str().and_then(|n| n.strip_prefix(BUILDING)) else {
                    continue;
                };
                let building = entry.path();
                if building.join(MANIFEST).symlink_metadata().is_ok() {
                    self.rename_unique(&building, &dir, name)?;
                } else {
                    let docs = building.join(DOCUMENTS);
                    if let Ok(entries) = fs::read_dir(&docs) {
                        for doc in entries {
                            let doc = doc?;
                            let back = self.dir(Place::Incoming).join(doc.file_name());
                            if let Err(e) = rename_noreplace(&doc.path(), &back) {
                                // The uploader has put a new file under the same name meanwhile: keep both,
                                // this one as a failed job an operator can look at.
                                let reason = format!(
                                    "An interrupted run had taken this document from the drop; putting it back failed ({e}) because the drop has a new file of the same name.\n"
                                );
                                write_note(&building.join(REASON), &reason, true)?;
                                self.rename_unique(&building, &self.dir(Place::Failed), name)?;
                                break;
                            }
                        }
                    }
                    if building.exists() {
                        let _ = fs::remove_dir(&docs);
                        for note in [REASON, STATE] {
                            let _ = fs::remove_file(building.join(note));
                        }
                        fs::remove_dir(&building)
                            .with_context(|| format!("removing {}", building.display()))?;
                    }
                }
                self.touch(place);
                self.touch(Place::Incoming);
            }
        }
        self.sync()?;
        Ok(())
    }

    /// Job directories in `place`, oldest first.
    pub fn jobs(&self, place: Place) -> io::Result<Vec<PathBuf>> {
        let mut jobs = Vec::new();
        for entry in fs::read_dir(self.dir(place))? {
            let entry = entry?;
            if entry.file_name().as_encoded_bytes().starts_with(b".")
                || !entry.file_type()?.is_dir()
            {
                continue;
            }
            let mtime = entry
                .metadata()?
                .modified()
                .unwrap_or(SystemTime::UNIX_EPOCH);
            jobs.push((mtime, entry.path()));
        }
        jobs.sort();
        Ok(jobs.into_iter().map(|(_, p)| p).collect())
    }

    /// The job directory named `name` in `place`, if any.
    pub fn find(&self, place: Place, name: &str) -> Option<PathBuf> {
        let p = self.dir(place).join(name);
        (crate::manifest::valid_id(name) && p.is_dir()).then_some(p)
    }

    /// Writes a job's `reason`, durably: it is what an operator reads to decide what to do.
    pub fn write_reason(&self, job: &Path, text: &str) -> io::Result<()> {
        write_named(&job.join(REASON), text, true)
    }

    /// Writes a job's `state`. Not fsync'd: lost to a power cut, a sent job is resent with the same
    /// Message-ID (which the contract allows) and a deferred one is retried early; skipping it saves
    /// one fsync per delivered job.
    pub fn write_state(&self, job: &Path, state: &State) -> io::Result<()> {
        write_named(&job.join(STATE), &state.render(), false)
    }

    /// Removes a job directory for good (`docmail remove`, expired `sent/` jobs).
    pub fn remove_job(&self, job: &Path) -> io::Result<()> {
        fs::remove_dir_all(job)?;
        if let Some(place) =
            place_of(job).and_then(|f| Place::ALL.into_iter().find(|p| p.dir_name() == f))
        {
            self.touch(place);
        }
        Ok(())
    }
}

/// The directory name of a job, e.g. `INV-1` or `INV-1.2`.
pub fn job_name(job: &Path) -> String {
    job.file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default()
}

fn place_of(job: &Path) -> Option<String> {
    job.parent()?
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
}

fn libc_enotempty() -> i32 {
    rustix::io::Errno::NOTEMPTY.raw_os_error()
}

pub fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    rustix::fs::renameat_with(CWD, from, CWD, to, RenameFlags::NOREPLACE).map_err(io::Error::from)
}

/// Writes a small file completely and durably; it becomes visible with its job directory's rename.
fn write_note(path: &Path, text: &str, durable: bool) -> io::Result<()> {
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o640)
        .open(path)?;
    f.write_all(text.as_bytes())?;
    if durable { f.sync_data() } else { Ok(()) }
}

/// [`write_note`] with an error that names the file, so that a full disk is reported with where it
/// struck.
fn write_named(path: &Path, text: &str, durable: bool) -> io::Result<()> {
    write_note(path, text, durable)
        .map_err(|e| io::Error::new(e.kind(), format!("writing {}: {e}", path.display())))
}

/// A name for a failed upload whose id is unknown: the manifest's file name, made safe.
pub fn name_from_file(file: &OsStr) -> String {
    let stem = file
        .as_encoded_bytes()
        .strip_suffix(b".xml")
        .unwrap_or(file.as_encoded_bytes());
    let mut name: String = String::from_utf8_lossy(stem)
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-') {
                c
            } else {
                '_'
            }
        })
        .take(100)
        .collect();
    if name.is_empty() || name.starts_with('.') {
        name.insert(0, '_');
    }
    name
}

/// The `state` file of a job: attempts, times, and what the server said. Plain `key=value` lines.
#[derive(Debug, Default, Clone)]
pub struct State {
    pub attempts: u32,
    pub first_attempt: Option<SystemTime>,
    pub next_attempt: Option<SystemTime>,
    pub last_error: Option<String>,
    pub message_id: Option<String>,
    pub sent_at: Option<SystemTime>,
    pub reply: Option<String>,
    /// Set by `docmail retry --force`: deliver even if a job of the same id was sent before.
    pub force: bool,
    /// The run decided to fail the job: a run that resumes it after a kill moves it to `failed/`
    /// instead of delivering what was refused.
    pub failed: bool,
}

impl State {
    pub fn read(job: &Path) -> State {
        let text = fs::read_to_string(job.join(STATE)).unwrap_or_default();
        let mut s = State::default();
        for line in text.lines() {
            let Some((k, v)) = line.split_once('=') else {
                continue;
            };
            let time = || humantime::parse_rfc3339(v).ok();
            match k {
                "attempts" => s.attempts = v.parse().unwrap_or(0),
                "first_attempt" => s.first_attempt = time(),
                "next_attempt" => s.next_attempt = time(),
                "last_error" => s.last_error = Some(v.to_string()),
                "message_id" => s.message_id = Some(v.to_string()),
                "sent_at" => s.sent_at = time(),
                "reply" => s.reply = Some(v.to_string()),
                "force" => s.force = v == "1",
                "failed" => s.failed = v == "1",
                _ => {}
            }
        }
        s
    }

    pub fn render(&self) -> String {
        let mut out = String::new();
        let mut line = |k: &str, v: &str| {
            out.push_str(k);
            out.push('=');
            out.push_str(&one_line(v));
            out.push('\n');
        };
        line("attempts", &self.attempts.to_string());
        if self.force {
            line("force", "1");
        }
        if self.failed {
            line("failed", "1");
        }
        for (k, t) in [
            ("first_attempt", self.first_attempt),
            ("next_attempt", self.next_attempt),
            ("sent_at", self.sent_at),
        ] {
            if let Some(t) = t {
                line(k, &rfc3339(t));
            }
        }
        for (k, v) in [
            ("last_error", &self.last_error),
            ("message_id", &self.message_id),
            ("reply", &self.reply),
        ] {
            if let Some(v) = v {
                line(k, v);
            }
        }
        out
    }
}

pub fn rfc3339(t: SystemTime) -> String {
    humantime::format_rfc3339_seconds(t).to_string()
}

/// Collapses line breaks so a server's multi-line reply stays on one line of a note or log.
pub fn one_line(s: &str) -> String {
    s.split(['\r', '\n'])
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" / ")
}

#[cfg(test)]
pub fn entry_names(dir: &Path) -> io::Result<Vec<OsString>> {
    let mut v: Vec<OsString> = fs::read_dir(dir)?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<io::Result<_>>()?;
    v.sort();
    Ok(v)
}

/// Opens a file under `dir` for reading without following a symlink or blocking on a FIFO.
pub fn open_nofollow(path: &Path) -> io::Result<File> {
    fs::OpenOptions::new()
        .read(true)
        .custom_flags(
            (rustix::fs::OFlags::NOFOLLOW
                | rustix::fs::OFlags::NONBLOCK
                | rustix::fs::OFlags::NOCTTY)
                .bits() as i32,
        )
        .open(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ignored_names() {
        for n in [".x.xml", "a.xml.part", "a.tmp", ".hidden"] {
            assert!(is_ignored(OsStr::new(n)), "{n}");
        }
        assert!(is_manifest_name(OsStr::new("INV-1.xml")));
        assert!(!is_manifest_name(OsStr::new("INV-1.xml.part")));
    }

    #[test]
    fn state_round_trips() {
        let dir = tempfile::tempdir().unwrap();
        let s = State {
            attempts: 2,
            next_attempt: Some(SystemTime::UNIX_EPOCH),
            reply: Some("451 a\r\nb".into()),
            ..State::default()
        };
        fs::write(dir.path().join(STATE), s.render()).unwrap();
        let r = State::read(dir.path());
        assert_eq!(r.attempts, 2);
        assert_eq!(r.next_attempt, Some(SystemTime::UNIX_EPOCH));
        assert_eq!(r.reply.as_deref(), Some("451 a / b"));
    }

    #[test]
    fn adopt_and_recover() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let inc = spool.dir(Place::Incoming);
        fs::write(inc.join("a.pdf"), b"pdf").unwrap();
        fs::write(inc.join("J.xml"), b"<job/>").unwrap();
        let job = spool
            .adopt(
                Some(OsStr::new("J.xml")),
                &["a.pdf"],
                Place::Active,
                "J",
                None,
            )
            .unwrap();
        assert_eq!(job, spool.dir(Place::Active).join("J"));
        assert_eq!(fs::read(job.join("documents/a.pdf")).unwrap(), b"pdf");
        assert!(entry_names(&inc).unwrap().is_empty());
        // A second job of the same name does not replace the first.
        fs::write(inc.join("J.xml"), b"<job/>").unwrap();
        let second = spool
            .adopt::<&str>(Some(OsStr::new("J.xml")), &[], Place::Active, "J", None)
            .unwrap();
        assert_eq!(second, spool.dir(Place::Active).join("J.2"));
        // An interrupted claim gives its documents back.
        let building = spool.dir(Place::Active).join(".new-K");
        fs::create_dir_all(building.join(DOCUMENTS)).unwrap();
        fs::write(building.join(DOCUMENTS).join("k.pdf"), b"k").unwrap();
        spool.recover().unwrap();
        assert_eq!(fs::read(inc.join("k.pdf")).unwrap(), b"k");
        assert!(!building.exists());
    }
}
