//! Disk full in the middle of a run: the spool lives on a small tmpfs of its own (the SMTP server's
//! store is elsewhere), filled up so that only a few pages are left when the run starts. The run
//! must lose nothing (every manifest and document is still somewhere in the spool), say clearly what
//! happened, and once space is back the next run must finish the work: every job in `sent/`, each
//! delivered, and none twice.
//!
//! Needs to mount a tmpfs (the tests run as root); where mounting is not permitted the test says so
//! and skips.

mod support_faults;

use std::collections::BTreeMap;
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use support_faults::*;

/// A tmpfs mounted for one test, unmounted when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(at: &Path, size: &str) -> Option<Tmpfs> {
        Tmpfs::mount_with(at, &format!("size={size}"))
    }

    fn mount_with(at: &Path, options: &str) -> Option<Tmpfs> {
        fs::create_dir_all(at).unwrap();
        let out = Command::new("mount")
            .args(["-t", "tmpfs", "-o"])
            .arg(format!("{options},mode=0750"))
            .arg("tmpfs")
            .arg(at)
            .output()
            .ok()?;
        if !out.status.success() {
            eprintln!(
                "SKIPPED: cannot mount a tmpfs at {} (not root, or no CAP_SYS_ADMIN here): {}",
                at.display(),
                String::from_utf8_lossy(&out.stderr).trim()
            );
            return None;
        }
        Some(Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// Fills the file system of `dir` with `dir/filler` until it is full, then gives back `keep` bytes.
fn fill(dir: &Path, keep: u64) -> PathBuf {
    let path = dir.join("filler");
    let mut f = fs::File::create(&path).unwrap();
    let chunk = vec![0xa5u8; 4096];
    let mut written = 0u64;
    loop {
        match f.write(&chunk) {
            Ok(0) => break,
            Ok(n) => written += n as u64,
            Err(e) if e.raw_os_error() == Some(28) => break, // ENOSPC
            Err(e) => panic!("filling {}: {e}", path.display()),
        }
    }
    let _ = f.flush();
    drop(f);
    let size = written.saturating_sub(keep);
    fs::OpenOptions::new()
        .write(true)
        .open(&path)
        .unwrap()
        .set_len(size)
        .unwrap();
    path
}

#[test]
fn disk_full_mid_run_loses_nothing_and_the_next_run_finishes() {
    let tmp = tempfile::Builder::new()
        .prefix("docmail-diskfull-")
        .tempdir()
        .unwrap();
    let Some(mount) = Tmpfs::mount(&tmp.path().join("spool"), "2m") else {
        return;
    };
    let peer = Peer::fault(&tmp.path().join("peer"), "ok");
    let site = Site::in_dir(
        tmp.path(),
        mount.0.clone(),
        &smtp_transport(peer.port, "5s"),
    );
    let jobs = 24;
    let ids: Vec<String> = (1..=jobs).map(|n| format!("FULL-{n:02}")).collect();
    for id in &ids {
        site.upload(id, 30_000);
    }
    // A few pages left: enough for some jobs' state files and receipts, not for all.
    let filler = fill(&site.spool, 6 * 4096);

    let full = site.run();
    let sent_while_full = site.jobs("sent").len();
    println!(
        "disk_full: run with a full spool: exit {}, {sent_while_full} of {jobs} in sent/, {} messages at the server, {:.2}s; said: {}",
        full.code,
        peer.messages().len(),
        full.elapsed.as_secs_f64(),
        full.stderr.lines().last().unwrap_or("")
    );
    let c = site.census();
    assert_eq!(
        (c.manifests, c.documents),
        (jobs, jobs),
        "a full disk must not lose a job: {c:?}\n{}\n{}",
        site.describe(),
        full.stderr
    );
    assert!(
        sent_while_full < jobs,
        "the disk did not fill up mid-run; the test is not testing anything:\n{}",
        full.stderr
    );
    assert!(
        full.stderr
            .lines()
            .any(|l| l.contains("No space left on device")
                && l.contains(&format!("writing {}", site.spool.display()))),
        "a clear log line must say the disk is full and where:\n{}",
        full.stderr
    );

    // Space is back: the next run finishes the work.
    fs::remove_file(&filler).unwrap();
    let next = site.run();
    println!(
        "disk_full: run after freeing space: exit {}, {:.2}s",
        next.code,
        next.elapsed.as_secs_f64()
    );
    assert_eq!(next.code, 0, "{}", next.stderr);
    assert_eq!(
        site.jobs("sent"),
        ids,
        "{}\n{}\n{}",
        site.describe(),
        full.stderr,
        next.stderr
    );
    for place in ["incoming", "active", "deferred", "failed"] {
        assert!(site.jobs(place).is_empty(), "{place}: {}", site.describe());
    }
    let c = site.census();
    assert_eq!((c.manifests, c.documents), (jobs, jobs), "{c:?}");

    // Each job reached the server, none twice.
    let mut per_id: BTreeMap<String, usize> = BTreeMap::new();
    for m in peer.messages() {
        *per_id.entry(message_id(&m).unwrap()).or_default() += 1;
    }
    assert_eq!(per_id.len(), jobs, "{per_id:?}");
    let twice: Vec<_> = per_id.iter().filter(|(_, n)| **n > 1).collect();
    println!("disk_full: duplicates {}", twice.len());
    assert!(
        twice.is_empty(),
        "sent twice because a full disk kept docmail from recording the delivery: {twice:?}\n{}",
        full.stderr
    );
}

#[test]
fn disk_full_while_deferring_loses_nothing() {
    let tmp = tempfile::Builder::new()
        .prefix("docmail-diskfull-")
        .tempdir()
        .unwrap();
    let Some(mount) = Tmpfs::mount(&tmp.path().join("spool"), "1m") else {
        return;
    };
    // The server is busy (451 at RCPT): every job is deferred, which writes a reason and a state.
    let peer = Peer::fault(&tmp.path().join("peer"), "rcpt451");
    let mut site = Site::in_dir(
        tmp.path(),
        mount.0.clone(),
        &smtp_transport(peer.port, "5s"),
    );
    site.extra = "[retry]\nfirst = \"1s\"\n".into();
    site.write_config();
    let jobs = 10;
    for n in 1..=jobs {
        site.upload(&format!("DFULL-{n:02}"), 20_000);
    }
    let filler = fill(&site.spool, 3 * 4096);
    let full = site.run();
    println!(
        "disk_full: deferring with a full spool: exit {}, deferred {}",
        full.code,
        site.jobs("deferred").len()
    );
    let c = site.census();
    assert_eq!(
        (c.manifests, c.documents),
        (jobs, jobs),
        "{c:?}\n{}\n{}",
        site.describe(),
        full.stderr
    );
    assert!(
        full.stderr.contains("No space left on device"),
        "{}",
        full.stderr
    );
    fs::remove_file(&filler).unwrap();
    let next = site.run();
    assert_eq!(next.code, 0, "{}", next.stderr);
    assert_eq!(
        site.jobs("deferred").len(),
        jobs,
        "{}\n{}",
        site.describe(),
        next.stderr
    );
    for n in 1..=jobs {
        let id = format!("DFULL-{n:02}");
        assert!(
            site.read("deferred", &id, "reason").contains("fault-peer"),
            "{id}: a deferred job carries its reason"
        );
    }
    assert!(peer.messages().is_empty());
}

/// Out of inodes instead of blocks: claiming a job needs new directories, writing a note a new file.
#[test]
fn out_of_inodes_mid_run_loses_nothing_and_the_next_run_finishes() {
    let tmp = tempfile::Builder::new()
        .prefix("docmail-diskfull-")
        .tempdir()
        .unwrap();
    let Some(mount) = Tmpfs::mount_with(&tmp.path().join("spool"), "size=8m,nr_inodes=400") else {
        return;
    };
    let peer = Peer::fault(&tmp.path().join("peer"), "ok");
    let site = Site::in_dir(
        tmp.path(),
        mount.0.clone(),
        &smtp_transport(peer.port, "5s"),
    );
    let jobs = 40;
    let ids: Vec<String> = (1..=jobs).map(|n| format!("INODE-{n:02}")).collect();
    for id in &ids {
        site.upload(id, 2000);
    }
    // Take every free inode, then give back a few: enough for a job or two, not for all.
    let fill_dir = site.spool.join("fill");
    fs::create_dir(&fill_dir).unwrap();
    let mut fillers = Vec::new();
    for n in 0.. {
        let p = fill_dir.join(format!("f{n}"));
        match fs::File::create(&p) {
            Ok(_) => fillers.push(p),
            Err(e) if e.raw_os_error() == Some(28) => break,
            Err(e) => panic!("{e}"),
        }
    }
    for p in fillers.drain(fillers.len() - 7..) {
        fs::remove_file(p).unwrap();
    }
    let full = site.run();
    let sent_while_full = site.jobs("sent").len();
    println!(
        "disk_full: out of inodes: exit {}, {sent_while_full} of {jobs} sent; said: {}",
        full.code,
        full.stderr.lines().last().unwrap_or("")
    );
    let c = site.census();
    assert_eq!(
        (c.manifests, c.documents),
        (jobs, jobs),
        "{c:?}\n{}\n{}",
        site.describe(),
        full.stderr
    );
    assert!(sent_while_full < jobs, "{}", full.stderr);
    assert!(
        full.stderr.contains("No space left on device"),
        "{}",
        full.stderr
    );
    fs::remove_dir_all(&fill_dir).unwrap();
    let next = site.run();
    assert_eq!(next.code, 0, "{}", next.stderr);
    assert_eq!(
        site.jobs("sent"),
        ids,
        "{}\n{}",
        site.describe(),
        next.stderr
    );
    for place in ["incoming", "active", "deferred", "failed"] {
        assert!(site.jobs(place).is_empty(), "{place}: {}", site.describe());
    }
    let mut per_id: BTreeMap<String, usize> = BTreeMap::new();
    for m in peer.messages() {
        *per_id.entry(message_id(&m).unwrap()).or_default() += 1;
    }
    assert_eq!(per_id.len(), jobs);
    assert!(
        per_id.values().all(|&n| n == 1),
        "duplicates: {per_id:?}\n{}",
        full.stderr
    );
}
