//! Intake: looking at the drop. Decides for each manifest whether its job is complete (and then hands
//! over the exact bytes that were checked), must wait for an upload still in flight, or fails. Every
//! uploaded byte is hostile: files are opened without following symlinks or blocking on FIFOs, checked
//! to be regular, single-linked files on the opened descriptor, and read no further than the limits.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, Metadata};
use std::io::{self, Read};
use std::os::unix::fs::{FileTypeExt, MetadataExt};
use std::path::Path;
#[cfg(test)]
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::manifest::{self, Manifest, ManifestError, Rules};
use crate::spool;

/// A complete job, as read from the drop.
pub struct Upload {
    pub manifest_file: OsString,
    pub manifest: Manifest,
    pub manifest_sha256: [u8; 32],
    pub documents: Vec<Document>,
}

/// One document's bytes, read once: what was checked is what gets sent.
pub struct Document {
    pub bytes: Vec<u8>,
    /// The inode that was read, to notice a swap between the check and the claim.
    pub ino: u64,
}

pub enum Verdict {
    Ready(Box<Upload>),
    /// Not complete yet; look again at `until` at the latest, then fail it. `files` are the documents
    /// the manifest names (none when it does not parse yet), for [`Fingerprint`].
    Wait {
        until: SystemTime,
        why: String,
        files: Vec<String>,
    },
    /// Fail now. `name` names the job in `failed/`; `documents` are the files to take along.
    Fail {
        name: String,
        documents: Vec<String>,
        reason: String,
    },
    /// The manifest disappeared meanwhile (the uploader renamed or deleted it).
    Gone,
}

/// Why an uploaded file cannot be used (yet).
#[derive(Debug)]
pub enum Problem {
    /// Might still be uploading: wait for settle.
    Incomplete(String),
    /// Will never become valid.
    Bad(String),
    Missing,
}

/// Examines one manifest in the drop and everything it names. `taken` maps the documents this run
/// has claimed to their jobs and the time of the claim: a manifest that was already there then and
/// names one of them fails at once instead of waiting for a document that will not come back. (A
/// manifest uploaded later may reuse the name for a new document of its own, and waits for it.)
pub fn examine(
    incoming: &Path,
    manifest_file: &OsStr,
    config: &Config,
    now: SystemTime,
    taken: &HashMap<String, (String, SystemTime)>,
) -> Verdict {
    let shown = manifest_file.to_string_lossy();
    let fallback_name = spool::name_from_file(manifest_file);
    let settle = config.intake.settle.0;
    let (bytes, meta) = match read_upload(&incoming.join(manifest_file), Limit::manifest(config)) {
        Ok(r) => r,
        Err(Problem::Missing) => return Verdict::Gone,
        Err(Problem::Bad(why)) => {
            return Verdict::Fail {
                name: fallback_name,
                documents: vec![],
                reason: format!("manifest {shown} {why}"),
            };
        }
        Err(Problem::Incomplete(why)) => unreachable!("manifests are read whole: {why}"),
    };
    let modified = meta.modified().unwrap_or(now);
    let rules = Rules::of(config);
    let manifest = match manifest::parse(&bytes, rules) {
        Ok(m) => m,
        Err(ManifestError::Malformed(why)) if modified + settle > now => {
            return Verdict::Wait {
                until: modified + settle,
                why: format!("manifest {shown}: {why}"),
                files: vec![],
            };
        }
        Err(e) => {
            let waited = matches!(e, ManifestError::Malformed(_));
            return Verdict::Fail {
                name: fallback_name,
                documents: named_files(&bytes),
                reason: format!(
                    "manifest {shown}: {e}{}",
                    if waited {
                        format!(
                            " (still so {} after its last change)",
                            humantime::format_duration(settle)
                        )
                    } else {
                        String::new()
                    }
                ),
            };
        }
    };
    let manifest_sha256: [u8; 32] = Sha256::digest(&bytes).into();
    let files: Vec<String> = manifest
        .attachments
        .iter()
        .map(|a| a.file.clone())
        .collect();
    let fail = |reason: String| Verdict::Fail {
        name: manifest.id.clone(),
        documents: files.clone(),
        reason,
    };

    let mut documents = Vec::with_capacity(files.len());
    let mut latest = modified;
    let mut waiting = Vec::new();
    for spec in &manifest.attachments {
        let path = incoming.join(&spec.file);
        let doc = format!("document {}", spec.file);
        let checked = read_upload(&path, Limit::attachment(config)).and_then(|(bytes, meta)| {
            latest = latest.max(meta.modified().unwrap_or(now));
            verify(&bytes, spec).map(|()| Document {
                bytes,
                ino: meta.ino(),
            })
        });
        match checked {
            Ok(d) => documents.push(d),
            Err(Problem::Bad(why)) => return fail(format!("{doc} {why}")),
            Err(Problem::Incomplete(why)) => waiting.push(format!("{doc} {why}")),
            Err(Problem::Missing) => match taken.get(&spec.file) {
                Some((job, claimed)) if modified <= *claimed => {
                    return fail(format!(
                        "{doc} was claimed by job {job}, which names it too; a document belongs to one job"
                    ));
                }
                _ => waiting.push(format!("{doc} is missing from the drop")),
            },
        }
    }
    if !waiting.is_empty() {
        let why = waiting.join("; ");
        if latest + settle > now {
            return Verdict::Wait {
                until: latest + settle,
                why,
                files,
            };
        }
        return fail(format!(
            "{why} (still so {} after the last upload)",
            humantime::format_duration(settle)
        ));
    }
    Verdict::Ready(Box::new(Upload {
        manifest_file: manifest_file.to_os_string(),
        manifest,
        manifest_sha256,
        documents,
    }))
}

/// What an upload looks like from outside (inode, size, modification time of the manifest and each
/// document it names), to tell whether a waiting upload has changed since it was examined. Looking
/// again at an unchanged one would only read and hash the same bytes: under a trickle of uploads that
/// is on every pass, and a large waiting document must not slow down the complete jobs.
#[derive(Debug, PartialEq, Eq)]
pub struct Fingerprint(Vec<Option<(u64, u64, i64, i64)>>);

impl Fingerprint {
    pub fn of(incoming: &Path, manifest_file: &OsStr, files: &[String]) -> Fingerprint {
        let look = |path: std::path::PathBuf| {
            fs::symlink_metadata(path)
                .ok()
                .map(|m| (m.ino(), m.len(), m.mtime(), m.mtime_nsec()))
        };
        let mut seen = vec![look(incoming.join(manifest_file))];
        seen.extend(files.iter().map(|f| look(incoming.join(f))));
        Fingerprint(seen)
    }
}

/// A job read whole from files that are complete by now: the manifest, its digest and the documents.
pub struct Loaded {
    pub manifest: Manifest,
    pub manifest_sha256: [u8; 32],
    pub documents: Vec<Vec<u8>>,
}

/// Reads a job back from a job directory (or, for `docmail render`, a manifest and the documents
/// beside it), checked as strictly as in the drop. The error is the reason, ready for a person.
pub fn load(manifest_path: &Path, documents: &Path, config: &Config) -> Result<Loaded, String> {
    let problem = |what: String, p: Problem| match p {
        Problem::Bad(why) | Problem::Incomplete(why) => format!("{what} {why}"),
        Problem::Missing => format!("{what} does not exist"),
    };
    let shown = manifest_path.display();
    let (bytes, _) = read_upload(manifest_path, Limit::manifest(config))
        .map_err(|p| problem(format!("manifest {shown}"), p))?;
    let manifest =
        manifest::parse(&bytes, Rules::of(config)).map_err(|e| format!("manifest {shown}: {e}"))?;
    let mut docs = Vec::with_capacity(manifest.attachments.len());
    for spec in &manifest.attachments {
        let path = documents.join(&spec.file);
        let what = format!("document {}", path.display());
        let (doc, _) =
            read_upload(&path, Limit::attachment(config)).map_err(|p| problem(what.clone(), p))?;
        verify(&doc, spec).map_err(|p| problem(what, p))?;
        docs.push(doc);
    }
    Ok(Loaded {
        manifest_sha256: Sha256::digest(&bytes).into(),
        manifest,
        documents: docs,
    })
}

/// Checks a document's bytes against what the manifest declares.
pub fn verify(bytes: &[u8], spec: &manifest::AttachmentSpec) -> Result<(), Problem> {
    if bytes.is_empty() {
        return Err(Problem::Incomplete("is empty (0 bytes)".into()));
    }
    if let Some(size) = spec.size {
        if bytes.len() as u64 != size {
            return Err(Problem::Incomplete(format!(
                "has {} bytes, the manifest's size says {size}",
                bytes.len()
            )));
        }
    }
    if let Some(want) = spec.sha256 {
        let got: [u8; 32] = Sha256::digest(bytes).into();
        if got != want {
            return Err(Problem::Incomplete(format!(
                "does not match the manifest's sha256 (file has {}, manifest says {})",
                manifest::hex(&got),
                manifest::hex(&want)
            )));
        }
    }
    Ok(())
}

/// Reads an uploaded file whole, refusing anything but a regular file with one link, and never more
/// than `limit` bytes. The type is checked before opening (so a device is never opened) and again on
/// the descriptor (so a swap in between is noticed).
pub fn read_upload(path: &Path, limit: Limit) -> Result<(Vec<u8>, Metadata), Problem> {
    let before = match fs::symlink_metadata(path) {
        Ok(m) => m,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(Problem::Missing),
        Err(e) => return Err(Problem::Bad(format!("cannot be examined: {e}"))),
    };
    check_kind(&before, limit)?;
    let file = spool::open_nofollow(path).map_err(|e| match e.kind() {
        io::ErrorKind::NotFound => Problem::Missing,
        _ if e.raw_os_error() == Some(rustix::io::Errno::LOOP.raw_os_error()) => {
            Problem::Bad("is a symbolic link; only regular files are accepted".into())
        }
        _ => Problem::Bad(format!("cannot be opened: {e}")),
    })?;
    let meta = file
        .metadata()
        .map_err(|e| Problem::Bad(format!("cannot be examined: {e}")))?;
    check_kind(&meta, limit)?;
    if meta.ino() != before.ino() || meta.dev() != before.dev() {
        return Err(Problem::Incomplete("was replaced while being read".into()));
    }
    let bytes = read_at_most(file, limit.bytes)
        .map_err(|e| Problem::Bad(format!("cannot be read: {e}")))?;
    if bytes.len() as u64 > limit.bytes {
        return Err(too_big(limit));
    }
    Ok((bytes, meta))
}

/// Checks a document after the claim moved it from the drop into a job directory: it must still be
/// the file that was read (`ino`), and have no other link. Only here is the link count settled: in the
/// drop the uploader can add and remove links at any moment, and a path lookup and the count it reports
/// are not one atomic step, so [`read_upload`] can be shown a single link for a file that also has a
/// name outside the drop (a race; see the tests). In the job directory nobody but docmail can add a
/// link, so one link here means the file has no name outside the spool.
pub fn verify_claimed(path: &Path, ino: u64) -> Result<(), Problem> {
    match fs::symlink_metadata(path) {
        Ok(m) if m.ino() != ino => Err(Problem::Bad(
            "was replaced in the drop while the job was being claimed; upload the job again".into(),
        )),
        Ok(m) if !m.file_type().is_file() || m.nlink() != 1 => Err(Problem::Bad(format!(
            "has {} hard links; only files with a single link are accepted (a hard link could expose a file outside the drop)",
            m.nlink()
        ))),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Err(Problem::Missing),
        Err(e) => Err(Problem::Bad(format!("cannot be examined: {e}"))),
    }
}

/// A size limit and the configuration key that sets it, so that a refusal can name it.
#[derive(Debug, Clone, Copy)]
pub struct Limit {
    pub bytes: u64,
    pub key: &'static str,
}

impl Limit {
    pub fn manifest(config: &Config) -> Limit {
        Limit {
            bytes: config.limits.max_manifest_size.0,
            key: "limits.max_manifest_size",
        }
    }

    pub fn attachment(config: &Config) -> Limit {
        Limit {
            bytes: config.limits.max_attachment_size.0,
            key: "limits.max_attachment_size",
        }
    }
}

fn too_big(limit: Limit) -> Problem {
    Problem::Bad(format!(
        "is larger than the limit of {} bytes ({})",
        limit.bytes, limit.key
    ))
}

fn check_kind(meta: &Metadata, limit: Limit) -> Result<(), Problem> {
    let t = meta.file_type();
    let kind = if t.is_symlink() {
        "a symbolic link"
    } else if t.is_dir() {
        "a directory"
    } else if t.is_fifo() {
        "a FIFO"
    } else if t.is_socket() {
        "a socket"
    } else if t.is_block_device() || t.is_char_device() {
        "a device node"
    } else {
        ""
    };
    if !kind.is_empty() {
        return Err(Problem::Bad(format!(
            "is {kind}; only regular files are accepted"
        )));
    }
    if meta.nlink() > 1 {
        return Err(Problem::Bad(format!(
            "has {} hard links; only files with a single link are accepted (a hard link could expose a file outside the drop)",
            meta.nlink()
        )));
    }
    if meta.len() > limit.bytes {
        return Err(too_big(limit));
    }
    Ok(())
}

fn read_at_most(file: File, limit: u64) -> io::Result<Vec<u8>> {
    let mut bytes = Vec::new();
    file.take(limit + 1).read_to_end(&mut bytes)?;
    Ok(bytes)
}

/// The documents an invalid manifest names, so that they fail with it instead of lingering as orphans.
/// Only plain names are returned; nothing here is trusted beyond that.
fn named_files(bytes: &[u8]) -> Vec<String> {
    let Ok(text) = std::str::from_utf8(bytes) else {
        return vec![];
    };
    let options = roxmltree::ParsingOptions {
        allow_dtd: false,
        nodes_limit: 100_000,
        ..Default::default()
    };
    let Ok(doc) = roxmltree::Document::parse_with_options(text, options) else {
        return vec![];
    };
    let mut files: Vec<String> = doc
        .descendants()
        .filter(|n| n.has_tag_name((manifest::NAMESPACE, "attachment")))
        .filter_map(|n| n.attribute("file"))
        .filter(|f| manifest::bad_file_name(f).is_none())
        .map(str::to_string)
        .collect();
    files.sort();
    files.dedup();
    files
}

/// Documents in the drop that no manifest names and that have not changed for `orphan_after`.
pub fn orphans(
    incoming: &Path,
    orphan_after: Duration,
    now: SystemTime,
) -> io::Result<Vec<OsString>> {
    let mut found = Vec::new();
    for entry in fs::read_dir(incoming)? {
        let entry = entry?;
        let name = entry.file_name();
        if spool::is_ignored(&name) || spool::is_manifest_name(&name) {
            continue;
        }
        let meta = entry.metadata()?;
        let changed = meta
            .modified()
            .unwrap_or(now)
            .max(SystemTime::UNIX_EPOCH + Duration::from_secs(meta.ctime().max(0) as u64));
        if changed + orphan_after <= now {
            found.push(name);
        }
    }
    Ok(found)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};
    use std::time::Instant;

    use rustix::fs::inotify;

    const GOOD: &[u8] = b"GOOD document uploaded into the drop";
    const SECRET: &[u8] = b"SECRET outside the drop";

    struct Race {
        _dir: tempfile::TempDir,
        drop: PathBuf,
        secret: PathBuf,
        target: PathBuf,
    }

    fn race() -> Race {
        let dir = tempfile::tempdir().unwrap();
        let drop = dir.path().join("incoming");
        fs::create_dir(&drop).unwrap();
        let secret = dir.path().join("secret");
        fs::write(&secret, SECRET).unwrap();
        let target = drop.join("doc.pdf");
        fs::write(&target, GOOD).unwrap();
        Race {
            drop,
            secret,
            target,
            _dir: dir,
        }
    }

    /// Keeps replacing `target` by rename(2) (atomically) with what `make` puts at a temporary name,
    /// cycling through `kinds`, until `stop`. Returns the number of swaps.
    fn swapper(
        r: &Race,
        kinds: &'static [&'static str],
        stop: Arc<AtomicBool>,
    ) -> std::thread::JoinHandle<u64> {
        let (drop, secret, target) = (r.drop.clone(), r.secret.clone(), r.target.clone());
        std::thread::spawn(move || {
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let tmp = drop.join(format!(".swap-{n}"));
                match kinds[n as usize % kinds.len()] {
                    "file" => fs::write(&tmp, GOOD).unwrap(),
                    "symlink" => symlink(&secret, &tmp).unwrap(),
                    "hardlink" => fs::hard_link(&secret, &tmp).unwrap(),
                    "fifo" => rustix::fs::mknodat(
                        rustix::fs::CWD,
                        &tmp,
                        rustix::fs::FileType::Fifo,
                        rustix::fs::Mode::from_raw_mode(0o600),
                        0,
                    )
                    .unwrap(),
                    other => unreachable!("{other}"),
                }
                fs::rename(&tmp, &target).unwrap();
                n += 1;
            }
            n
        })
    }

    fn watch(path: &Path, flags: inotify::WatchFlags) -> std::os::fd::OwnedFd {
        let fd = inotify::init(inotify::CreateFlags::NONBLOCK).unwrap();
        inotify::add_watch(&fd, path, flags).unwrap();
        fd
    }

    fn events(fd: &std::os::fd::OwnedFd) -> usize {
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
        let mut reader = inotify::Reader::new(fd, &mut buf);
        let mut n = 0;
        while reader.next().is_ok() {
            n += 1;
        }
        n
    }

    fn count(
        outcomes: &mut std::collections::BTreeMap<String, u32>,
        r: &Result<(Vec<u8>, Metadata), Problem>,
    ) {
        let key = match r {
            Ok(_) => "read".to_string(),
            Err(Problem::Bad(why) | Problem::Incomplete(why)) => why.clone(),
            Err(Problem::Missing) => "missing".into(),
        };
        *outcomes.entry(key).or_default() += 1;
    }

    /// Symlinks and FIFOs swapped in between the checks: `read_upload` never follows a link (the secret
    /// is never even opened), never blocks, and returns only the bytes of a regular file of the drop.
    #[test]
    fn swapping_in_symlinks_and_fifos_never_yields_another_file() {
        let r = race();
        let seen = watch(
            &r.secret,
            inotify::WatchFlags::OPEN | inotify::WatchFlags::ACCESS,
        );
        let stop = Arc::new(AtomicBool::new(false));
        let swaps = swapper(
            &r,
            &["file", "symlink", "fifo", "file", "symlink"],
            stop.clone(),
        );
        let mut outcomes = std::collections::BTreeMap::new();
        let started = Instant::now();
        while started.elapsed() < Duration::from_millis(1500) {
            let result = read_upload(
                &r.target,
                Limit {
                    bytes: 1 << 20,
                    key: "limits.max_attachment_size",
                },
            );
            if let Ok((bytes, meta)) = &result {
                assert_eq!(
                    bytes.as_slice(),
                    GOOD,
                    "read_upload returned another file's bytes"
                );
                // nlink 0: replaced after it was opened; the claim notices (verify_claimed).
                assert!(meta.file_type().is_file() && meta.nlink() <= 1);
            }
            count(&mut outcomes, &result);
        }
        stop.store(true, Ordering::Relaxed);
        let swaps = swaps.join().unwrap();
        eprintln!("{swaps} swaps; outcomes: {outcomes:#?}");
        assert_eq!(
            events(&seen),
            0,
            "the secret outside the drop was opened or read"
        );
        assert!(outcomes.contains_key("read"), "{outcomes:?}");
        assert!(
            outcomes.keys().any(|k| k.contains("symbolic link")),
            "{outcomes:?}"
        );
        assert!(outcomes.keys().any(|k| k.contains("FIFO")), "{outcomes:?}");
    }

    /// Hard links swapped in and out: the link count `read_upload` sees can be stale (lookup and count
    /// are not atomic), so now and then it reads a file that has a name outside the drop. The claim
    /// moves the file into a directory only docmail can write, where `verify_claimed` sees the true
    /// link count: whatever `read_upload` returned, nothing but the uploaded document passes both.
    #[test]
    fn swapping_in_hard_links_is_caught_at_the_claim() {
        let r = race();
        let claimed_dir = r.drop.parent().unwrap().join("active");
        fs::create_dir(&claimed_dir).unwrap();
        let stop = Arc::new(AtomicBool::new(false));
        let swaps = swapper(&r, &["file", "hardlink", "symlink"], stop.clone());
        let mut outcomes = std::collections::BTreeMap::new();
        let (mut secret_read, mut accepted) = (0, 0);
        let started = Instant::now();
        let mut n = 0;
        while started.elapsed() < Duration::from_millis(2500) {
            let result = read_upload(
                &r.target,
                Limit {
                    bytes: 1 << 20,
                    key: "limits.max_attachment_size",
                },
            );
            count(&mut outcomes, &result);
            let Ok((bytes, meta)) = result else { continue };
            if bytes != GOOD {
                secret_read += 1;
            }
            // The claim: rename out of the drop, then check what arrived.
            let claimed = claimed_dir.join(format!("doc-{n}"));
            n += 1;
            if fs::rename(&r.target, &claimed).is_err() {
                continue;
            }
            if verify_claimed(&claimed, meta.ino()).is_ok() {
                accepted += 1;
                assert_eq!(
                    bytes, GOOD,
                    "a file with a name outside the drop passed the claim"
                );
            }
            let _ = fs::remove_file(&claimed);
        }
        stop.store(true, Ordering::Relaxed);
        let swaps = swaps.join().unwrap();
        eprintln!(
            "{swaps} swaps; read_upload returned the secret {secret_read} times, the claim accepted {accepted} (all the uploaded document); outcomes: {outcomes:#?}"
        );
        assert!(accepted > 0, "{outcomes:?}");
        assert_eq!(fs::read(&r.secret).unwrap(), SECRET);
    }

    #[test]
    fn verify_claimed_wants_the_same_single_linked_file() {
        let dir = tempfile::tempdir().unwrap();
        let a = dir.path().join("a");
        fs::write(&a, b"x").unwrap();
        let ino = fs::metadata(&a).unwrap().ino();
        assert!(verify_claimed(&a, ino).is_ok());
        assert!(
            matches!(verify_claimed(&a, ino + 1), Err(Problem::Bad(w)) if w.contains("replaced"))
        );
        fs::hard_link(&a, dir.path().join("b")).unwrap();
        assert!(
            matches!(verify_claimed(&a, ino), Err(Problem::Bad(w)) if w.contains("2 hard links"))
        );
        assert!(matches!(
            verify_claimed(&dir.path().join("c"), ino),
            Err(Problem::Missing)
        ));
    }
}
