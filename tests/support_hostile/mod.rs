//! Harness for the hostile-upload tests (tests/hostile.rs).
//!
//! Every test builds its own [`Site`] in a fresh temporary directory: a spool, a Maildir outbox, the
//! example templates, a config with `linger = "0s"` and a short `settle`, and a **canary**: a private
//! file outside the spool that hostile uploads point at (symlinks, hard links, `..` paths). A test drops
//! one hostile job and one valid job beside it, runs the real `docmail run` once (under a timeout, in
//! its own process group, under `/usr/bin/time` for the peak RSS, with an inotify watch on the canary),
//! and then [`Site::finish`] checks the invariants every hostile test shares:
//!
//! - the run exited 0 within its timeout (a broken job never breaks the run);
//! - the valid job was delivered: in `sent/`, exactly one message with its Message-ID;
//! - the canary was never opened, read or written by docmail (inotify saw no IN_OPEN/IN_ACCESS/
//!   IN_MODIFY/IN_CLOSE_*), its content and mtime are unchanged, and its content appears in no
//!   delivered message (raw or decoded);
//! - nothing outside the spool and the outbox changed (names, sizes, mtimes, content hashes).
//!
//! The hostile job itself is checked by the test with [`Site::assert_failed`]: a `failed/NAME/reason`
//! naming the problem, and a `status=failed` log line for it.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::ffi::OsStr;
use std::fs;
use std::io::Read;
use std::os::fd::OwnedFd;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mail_parser::MessageParser;
use rustix::fs::inotify;
use sha2::{Digest, Sha256};
use tempfile::TempDir;

pub const RUN_TIMEOUT: Duration = Duration::from_secs(60);
/// Peak RSS a run may reach while refusing a huge upload. A run that read a 100 MB manifest or a 2 GiB
/// document into memory would be far above it; an idle debug build of docmail needs about 10 MiB.
pub const SMALL_RSS_KIB: u64 = 48 * 1024;

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_docmail")
}

pub fn sha256_hex(data: &[u8]) -> String {
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// `s` as XML text or attribute content.
pub fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// One `<attachment>` element naming `file`, with `size` and `sha256` of `bytes` when given.
pub fn attachment(file: &str, bytes: Option<&[u8]>) -> String {
    match bytes {
        Some(b) => format!(
            "<attachment file=\"{}\" size=\"{}\" sha256=\"{}\"/>",
            esc(file),
            b.len(),
            sha256_hex(b)
        ),
        None => format!("<attachment file=\"{}\"/>", esc(file)),
    }
}

/// A native manifest: `id`, one recipient, the variables the example templates need, then `body`
/// (more elements, usually the attachments).
pub fn manifest(id: &str, body: &str) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<job xmlns=\"urn:docmail:job:1\" id=\"{id}\">\n  \
         <to name=\"Jane Doe\">jane.doe@example.net</to>\n  \
         <var name=\"customer_name\">Jane Doe</var>\n  \
         <var name=\"invoice_number\">{id}</var>\n  {body}\n</job>\n"
    )
}

pub struct RunResult {
    pub code: Option<i32>,
    pub stderr: String,
    pub elapsed: Duration,
    /// Peak resident set size of `docmail run` in KiB (from `/usr/bin/time`), when available.
    pub max_rss_kib: Option<u64>,
    /// inotify events docmail caused on the canary (its mask bits), empty when it never touched it.
    pub canary_events: Vec<String>,
}

pub struct Site {
    pub dir: TempDir,
    pub canary_marker: String,
    canary_before: (String, i64, i64),
    outside_before: BTreeMap<PathBuf, String>,
    /// Whether opening the canary (without reading it) is tolerated; see [`Site::tolerate_canary_open`].
    canary_open_ok: bool,
}

#[derive(Default)]
pub struct Options<'a> {
    /// Lines for `[limits]`.
    pub limits: &'a str,
    /// Extra lines for `[intake]` (settle and linger are set).
    pub intake: &'a str,
}

impl Site {
    pub fn new() -> Site {
        Site::with(Options::default())
    }

    pub fn with(options: Options) -> Site {
        let dir = tempfile::Builder::new()
            .prefix("docmail-hostile-")
            .tempdir()
            .unwrap();
        let root = dir.path();
        fs::create_dir_all(root.join("spool/incoming")).unwrap();
        fs::create_dir_all(root.join("outbox")).unwrap();
        fs::create_dir_all(root.join("templates")).unwrap();
        let examples = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/templates");
        for t in ["invoice.subject", "invoice.txt", "invoice.html"] {
            fs::copy(examples.join(t), root.join("templates").join(t)).unwrap();
        }
        fs::write(
            root.join("docmail.toml"),
            format!(
                "spool = \"spool\"\nfrom = \"Shop Billing <billing@shop.example>\"\n\n\
                 [transport]\nkind = \"maildir\"\npath = \"outbox\"\n\n\
                 [templates]\ndir = \"templates\"\ndefault = \"invoice\"\n\n\
                 [limits]\n{}\n\n[intake]\nsettle = \"1s\"\nlinger = \"0s\"\n{}\n",
                options.limits, options.intake
            ),
        )
        .unwrap();
        // The canary: unique content, never to be opened by docmail nor to appear in a message.
        let marker = format!(
            "CANARY-{}",
            &sha256_hex(format!("{:?}{:?}", root, Instant::now()).as_bytes())[..24]
        );
        let mut content = String::new();
        while content.len() < 4096 {
            content.push_str(&marker);
            content.push('\n');
        }
        fs::write(root.join("canary.secret"), &content).unwrap();
        let mut site = Site {
            dir,
            canary_marker: marker,
            canary_before: (String::new(), 0, 0),
            outside_before: BTreeMap::new(),
            canary_open_ok: false,
        };
        site.canary_before = site.canary_state();
        site
    }

    /// For races that swap a hard link to the canary in and out of the drop: docmail may then open the
    /// canary's inode through the drop (it refuses it on the descriptor, before reading), so only
    /// reading or writing it counts.
    pub fn tolerate_canary_open(&mut self) {
        self.canary_open_ok = true;
    }

    pub fn root(&self) -> &Path {
        self.dir.path()
    }
    pub fn canary(&self) -> PathBuf {
        self.root().join("canary.secret")
    }
    pub fn spool(&self) -> PathBuf {
        self.root().join("spool")
    }
    pub fn incoming(&self) -> PathBuf {
        self.spool().join("incoming")
    }
    pub fn outbox(&self) -> PathBuf {
        self.root().join("outbox")
    }
    pub fn config(&self) -> PathBuf {
        self.root().join("docmail.toml")
    }

    /// Content hash and mtime of the canary (not its atime: reading it in the test must not count).
    fn canary_state(&self) -> (String, i64, i64) {
        let m = fs::symlink_metadata(self.canary()).unwrap();
        (
            sha256_hex(&fs::read(self.canary()).unwrap()),
            m.mtime(),
            m.mtime_nsec(),
        )
    }

    /// Everything under the site root outside `spool/` and `outbox/`: path → type, size, mtime, hash.
    fn outside_snapshot(&self) -> BTreeMap<PathBuf, String> {
        let mut out = BTreeMap::new();
        let mut stack = vec![self.root().to_path_buf()];
        while let Some(dir) = stack.pop() {
            for e in fs::read_dir(&dir).unwrap() {
                let p = e.unwrap().path();
                if p == self.spool() || p == self.outbox() || p == self.root().join("time.out") {
                    continue;
                }
                let m = fs::symlink_metadata(&p).unwrap();
                let hash = if m.is_file() {
                    sha256_hex(&fs::read(&p).unwrap())
                } else {
                    String::new()
                };
                if m.is_dir() {
                    stack.push(p.clone());
                }
                out.insert(
                    p,
                    format!(
                        "{:?} {} {}.{} {hash}",
                        m.file_type(),
                        m.len(),
                        m.mtime(),
                        m.mtime_nsec()
                    ),
                );
            }
        }
        out
    }

    pub fn write(&self, name: impl AsRef<OsStr>, bytes: &[u8]) -> PathBuf {
        let p = self.incoming().join(name.as_ref());
        fs::write(&p, bytes).unwrap();
        p
    }

    /// A valid job `id` with one document; returns the document's bytes.
    pub fn valid_job(&self, id: &str) -> Vec<u8> {
        let doc = format!("%PDF-1.4\n% valid document of {id}\n%%EOF\n").into_bytes();
        let file = format!("{id}.pdf");
        self.write(&file, &doc);
        self.write(
            format!("{id}.xml"),
            manifest(id, &attachment(&file, Some(&doc))).as_bytes(),
        );
        doc
    }

    /// Runs `docmail run` once, under the timeout, with the canary watched. Takes the "before"
    /// snapshot of everything outside the spool first, so set-up done before this call is not counted.
    pub fn run(&mut self) -> RunResult {
        self.outside_before = self.outside_snapshot();
        self.canary_before = self.canary_state();
        let watch = CanaryWatch::new(&self.canary(), self.canary_open_ok);
        let time_out = self.root().join("time.out");
        let time = Path::new("/usr/bin/time");
        let mut cmd = if time.exists() {
            let mut c = Command::new(time);
            c.arg("-f").arg("%M").arg("-o").arg(&time_out).arg(bin());
            c
        } else {
            Command::new(bin())
        };
        cmd.arg("run")
            .arg("--config")
            .arg(self.config())
            .env_remove("JOURNAL_STREAM")
            .env_remove("NOTIFY_SOCKET")
            .env_remove("WATCHDOG_USEC")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        std::os::unix::process::CommandExt::process_group(&mut cmd, 0);
        let started = Instant::now();
        let mut child = cmd.spawn().expect("spawning docmail run");
        let mut stderr = child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut s = Vec::new();
            let _ = stderr.read_to_end(&mut s);
            String::from_utf8_lossy(&s).into_owned()
        });
        let status = loop {
            if let Some(status) = child.try_wait().unwrap() {
                break status;
            }
            if started.elapsed() > RUN_TIMEOUT {
                let pgid = rustix::process::Pid::from_raw(child.id() as i32).unwrap();
                let _ = rustix::process::kill_process_group(pgid, rustix::process::Signal::KILL);
                let _ = child.wait();
                panic!(
                    "docmail run did not finish within {RUN_TIMEOUT:?} (killed); stderr:\n{}",
                    reader.join().unwrap()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        let elapsed = started.elapsed();
        let stderr = reader.join().unwrap();
        let max_rss_kib = fs::read_to_string(&time_out)
            .ok()
            .and_then(|s| s.lines().last().and_then(|l| l.trim().parse().ok()));
        eprintln!(
            "docmail run: exit {:?} after {elapsed:?}, peak RSS {max_rss_kib:?} KiB\n{stderr}",
            status.code()
        );
        RunResult {
            code: status.code(),
            stderr,
            elapsed,
            max_rss_kib,
            canary_events: watch.events(),
        }
    }

    /// The raw messages in the outbox.
    pub fn messages(&self) -> Vec<Vec<u8>> {
        let new = self.outbox().join("new");
        let Ok(entries) = fs::read_dir(&new) else {
            return vec![];
        };
        entries
            .map(|e| fs::read(e.unwrap().path()).unwrap())
            .collect()
    }

    /// The messages whose Message-ID belongs to job `id` (`<ID.digest@domain>`).
    pub fn messages_of(&self, id: &str) -> Vec<Vec<u8>> {
        self.messages()
            .into_iter()
            .filter(|m| {
                let p = MessageParser::default()
                    .parse(m)
                    .expect("a parsable message");
                p.message_id()
                    .is_some_and(|mid| mid.starts_with(&format!("{id}.")))
            })
            .collect()
    }

    pub fn names_in(&self, place: &str) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.spool().join(place))
            .map(|r| {
                r.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    /// Asserts that `failed/NAME` exists, that its reason contains every needle, and that the run
    /// logged `job=NAME status=failed`. Returns the reason.
    pub fn assert_failed(&self, run: &RunResult, name: &str, needles: &[&str]) -> String {
        let job = self.spool().join("failed").join(name);
        let reason = fs::read_to_string(job.join("reason")).unwrap_or_else(|e| {
            panic!(
                "expected failed/{name}/reason ({e}); failed/ has {:?}, sent/ has {:?}, incoming/ has {:?}; stderr:\n{}",
                self.names_in("failed"),
                self.names_in("sent"),
                self.names_in("incoming"),
                run.stderr
            )
        });
        for n in needles {
            assert!(
                reason.contains(n),
                "failed/{name}/reason does not mention {n:?}:\n{reason}"
            );
        }
        assert!(
            run.stderr
                .lines()
                .any(|l| l.starts_with(&format!("job={name} status=failed"))),
            "no log line `job={name} status=failed`; stderr:\n{}",
            run.stderr
        );
        if !self.names_in("sent").contains(&name.to_string()) {
            assert!(
                self.messages_of(name).is_empty(),
                "failed job {name} was mailed all the same"
            );
        }
        reason
    }

    /// The invariants every hostile test shares; see the module documentation.
    pub fn finish(&self, run: &RunResult, valid_id: &str) {
        assert_eq!(
            run.code,
            Some(0),
            "docmail run must exit 0 when single jobs fail; stderr:\n{}",
            run.stderr
        );
        // The valid job beside the hostile one went out, once.
        assert!(
            self.spool().join("sent").join(valid_id).is_dir(),
            "valid job {valid_id} is not in sent/ (sent/ {:?}, failed/ {:?}); stderr:\n{}",
            self.names_in("sent"),
            self.names_in("failed"),
            run.stderr
        );
        assert_eq!(
            self.messages_of(valid_id).len(),
            1,
            "valid job {valid_id}: exactly one message"
        );
        // The canary: untouched, unread, and in no message.
        assert!(
            run.canary_events.is_empty(),
            "docmail touched the canary outside the spool: {:?}",
            run.canary_events
        );
        assert_eq!(
            self.canary_state(),
            self.canary_before,
            "the canary outside the spool changed"
        );
        for m in self.messages() {
            assert_no_canary(&m, &self.canary_marker);
        }
        assert_eq!(
            self.outside_snapshot(),
            self.outside_before,
            "something outside the spool changed"
        );
    }
}

impl Default for Site {
    fn default() -> Self {
        Site::new()
    }
}

/// Fails if the canary's marker appears in the raw message or in any decoded part of it.
pub fn assert_no_canary(raw: &[u8], marker: &str) {
    let m = marker.as_bytes();
    assert!(
        !raw.windows(m.len()).any(|w| w == m),
        "the canary appears in a delivered message"
    );
    let p = MessageParser::default()
        .parse(raw)
        .expect("parsable message");
    for part in p.parts.iter() {
        let body = part.contents();
        assert!(
            !body.windows(m.len()).any(|w| w == m),
            "the canary appears in a decoded part of a delivered message"
        );
    }
}

/// Names of the top-level headers of a message, lower-case, in order.
pub fn header_names(raw: &[u8]) -> Vec<String> {
    let p = MessageParser::default()
        .parse(raw)
        .expect("parsable message");
    p.headers()
        .iter()
        .map(|h| h.name.as_str().to_ascii_lowercase())
        .collect()
}

/// An inotify watch on the canary, set before the run: docmail must cause no event on it that means
/// opening, reading or writing (a rename of a hard link to it in the drop moves a spool entry, which
/// inotify reports as IN_MOVE_SELF/IN_ATTRIB on the inode; those do not count).
struct CanaryWatch {
    fd: OwnedFd,
}

impl CanaryWatch {
    fn new(path: &Path, open_ok: bool) -> CanaryWatch {
        let fd =
            inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK).unwrap();
        let mut flags = inotify::WatchFlags::ACCESS
            | inotify::WatchFlags::MODIFY
            | inotify::WatchFlags::CLOSE_WRITE
            | inotify::WatchFlags::DELETE_SELF;
        if !open_ok {
            flags |= inotify::WatchFlags::OPEN | inotify::WatchFlags::CLOSE_NOWRITE;
        }
        inotify::add_watch(&fd, path, flags).unwrap();
        CanaryWatch { fd }
    }

    fn events(&self) -> Vec<String> {
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
        let mut reader = inotify::Reader::new(&self.fd, &mut buf);
        let mut out = Vec::new();
        while let Ok(ev) = reader.next() {
            out.push(format!("{:?}", ev.events()));
        }
        out
    }
}

/// A file name from raw bytes (for non-UTF-8 names).
pub fn raw_name(bytes: &[u8]) -> &OsStr {
    OsStr::from_bytes(bytes)
}
