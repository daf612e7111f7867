//! Helpers shared by the issue-3 fault tests (crash, idempotency, disk full, SMTP faults, retry):
//! a site (spool, templates, config) in its own temporary directory, jobs written the way the back
//! office uploads them, the real `docmail` binary with a time limit, the aiosmtpd peers in
//! `tests/peers/{fault,crash}_smtpd.py`, and a seeded random generator. Nothing is shared between
//! tests: each has its own directories and a port the kernel picks, so they run in parallel.

#![allow(dead_code)]

use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};

pub const STATES: [&str; 5] = ["incoming", "active", "deferred", "failed", "sent"];

pub fn docmail_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_docmail"))
}

/// Debian's python3 has python3-aiosmtpd; a python3 earlier on PATH may not.
pub fn python() -> PathBuf {
    if let Some(p) = std::env::var_os("DOCMAIL_TEST_PYTHON") {
        return p.into();
    }
    if Path::new("/usr/bin/python3").exists() {
        return "/usr/bin/python3".into();
    }
    "python3".into()
}

pub fn peer_script(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/peers")
        .join(name)
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

pub fn unix_now() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// splitmix64: small, seeded, good enough to pick kill moments.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo + 1)
    }
}

/// Document bytes that look like a small PDF, different per `seed`.
pub fn document(seed: u64, len: usize) -> Vec<u8> {
    let mut v = b"%PDF-1.4\n".to_vec();
    let mut r = Rng::new(seed);
    while v.len() + 7 < len {
        v.push((r.next_u64() >> 56) as u8);
    }
    v.extend_from_slice(b"\n%%EOF\n");
    v
}

/// Everything one test's docmail needs, in a fresh temporary directory (or with the spool elsewhere).
pub struct Site {
    /// The temporary directory the site lives in, when it owns one.
    pub tmp: Option<tempfile::TempDir>,
    pub root: PathBuf,
    pub spool: PathBuf,
    pub config: PathBuf,
    pub templates: PathBuf,
    /// `[transport]` table body, e.g. `kind = "smtp"\nurl = "…"`.
    pub transport: String,
    /// Extra tables and keys appended verbatim (`[retry]`, `[limits]`, …).
    pub extra: String,
    /// `[intake]` body; linger 0 s so that a run exits when the work is done.
    pub intake: String,
}

impl Site {
    pub fn new(transport: &str) -> Site {
        let tmp = tempfile::Builder::new()
            .prefix("docmail-faults-")
            .tempdir()
            .unwrap();
        let root = tmp.path().to_path_buf();
        let mut site = Site::in_dir(&root, root.join("spool"), transport);
        site.tmp = Some(tmp);
        site
    }

    /// A site in `root` (which the caller cleans up) whose spool is `spool` (which may be a mount
    /// point of its own).
    pub fn in_dir(root: &Path, spool: PathBuf, transport: &str) -> Site {
        fs::create_dir_all(&spool).unwrap();
        fs::set_permissions(&spool, fs::Permissions::from_mode(0o750)).unwrap();
        let templates = root.join("templates");
        fs::create_dir_all(&templates).unwrap();
        fs::write(templates.join("doc.subject"), "Your document {{ id }}").unwrap();
        fs::write(
            templates.join("doc.txt"),
            "Hello,\n\nplease find document {{ id }} attached.\n",
        )
        .unwrap();
        let site = Site {
            config: root.join("docmail.toml"),
            tmp: None,
            root: root.to_path_buf(),
            spool,
            templates,
            transport: transport.to_string(),
            extra: String::new(),
            intake: "settle = \"2s\"\nlinger = \"0s\"\n".into(),
        };
        site.write_config();
        site
    }

    pub fn smtp(port: u16, timeout: &str) -> Site {
        Site::new(&smtp_transport(port, timeout))
    }

    pub fn smtp_in(root: &Path, port: u16, timeout: &str) -> Site {
        Site::in_dir(root, root.join("spool"), &smtp_transport(port, timeout))
    }

    pub fn write_config(&self) {
        let text = format!(
            "spool = \"{}\"\nfrom = \"Shop Billing <billing@shop.example>\"\n\n[transport]\n{}\n[templates]\ndir = \"{}\"\ndefault = \"doc\"\n\n[intake]\n{}\n{}\n",
            self.spool.display(),
            self.transport,
            self.templates.display(),
            self.intake,
            self.extra
        );
        fs::write(&self.config, text).unwrap();
    }

    pub fn dir(&self, place: &str) -> PathBuf {
        self.spool.join(place)
    }

    pub fn incoming(&self) -> PathBuf {
        self.dir("incoming")
    }

    /// Uploads a job the recommended way (document first, manifest last, each renamed into place).
    pub fn upload(&self, id: &str, doc_len: usize) -> Vec<u8> {
        let to = format!("customer-{}@example.net", id.to_ascii_lowercase());
        self.upload_to(id, &to, doc_len)
    }

    /// Like [`Site::upload`], to the address `to`.
    pub fn upload_to(&self, id: &str, to: &str, doc_len: usize) -> Vec<u8> {
        let incoming = self.incoming();
        fs::create_dir_all(&incoming).unwrap();
        let doc = document(fnv(id), doc_len);
        let file = format!("{id}.pdf");
        put(&incoming, &file, &doc);
        put(
            &incoming,
            &format!("{id}.xml"),
            manifest_to(id, to, &file, &doc).as_bytes(),
        );
        doc
    }

    /// Runs `docmail ARGS --config …`; kills it and panics after `limit`.
    pub fn docmail(&self, args: &[&str], limit: Duration) -> Output {
        let mut all: Vec<String> = args.iter().map(|s| s.to_string()).collect();
        all.push("--config".into());
        all.push(self.config.display().to_string());
        run_with_limit(&all, limit)
    }

    pub fn run(&self) -> Output {
        self.docmail(&["run"], Duration::from_secs(120))
    }

    /// Spawns `docmail run` without waiting.
    pub fn spawn_run(&self) -> Child {
        docmail_command(&[
            "run".into(),
            "--config".into(),
            self.config.display().to_string(),
        ])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start docmail")
    }

    /// Job directory names in a state directory (hidden ones left out).
    pub fn jobs(&self, place: &str) -> Vec<String> {
        let mut v: Vec<String> = fs::read_dir(self.dir(place))
            .map(|rd| {
                rd.map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                    .filter(|n| !n.starts_with('.'))
                    .collect()
            })
            .unwrap_or_default();
        v.sort();
        v
    }

    pub fn read(&self, place: &str, job: &str, file: &str) -> String {
        fs::read_to_string(self.dir(place).join(job).join(file)).unwrap_or_default()
    }

    /// `key=value` lines of a job's `state` file.
    pub fn state(&self, place: &str, job: &str) -> Vec<(String, String)> {
        self.read(place, job, "state")
            .lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    pub fn state_value(&self, place: &str, job: &str, key: &str) -> Option<String> {
        self.state(place, job)
            .into_iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v)
    }

    /// Counts the jobs in the spool by their manifests: uploaded ones in `incoming/` and one per job
    /// directory (complete or still being built) in the state directories. Also returns the count of
    /// documents, wherever they are.
    pub fn census(&self) -> Census {
        let mut c = Census::default();
        for name in list(&self.incoming()) {
            if name.starts_with('.') {
                continue;
            }
            if name.ends_with(".xml") {
                c.manifests += 1;
                *c.by_place.entry("incoming".into()).or_default() += 1;
            } else {
                c.documents += 1;
            }
        }
        for place in &STATES[1..] {
            for name in list(&self.dir(place)) {
                let job = self.dir(place).join(&name);
                if !job.is_dir() {
                    continue;
                }
                if job.join("manifest.xml").exists() {
                    c.manifests += 1;
                    let key = if name.starts_with('.') {
                        format!("{place}/(building)")
                    } else {
                        place.to_string()
                    };
                    *c.by_place.entry(key).or_default() += 1;
                }
                c.documents += list(&job.join("documents")).len();
            }
        }
        c
    }

    /// Everything in the spool, for a failure message.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        for place in STATES {
            s.push_str(&format!("{place}/: {:?}\n", list(&self.dir(place))));
        }
        s
    }
}

pub fn smtp_transport(port: u16, timeout: &str) -> String {
    format!("kind = \"smtp\"\nurl = \"smtp://127.0.0.1:{port}\"\ntimeout = \"{timeout}\"\n")
}

#[derive(Debug, Default)]
pub struct Census {
    pub manifests: usize,
    pub documents: usize,
    pub by_place: std::collections::BTreeMap<String, usize>,
}

fn fnv(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x100_0000_01b3)
    })
}

/// Writes `dir/name` under a temporary name and renames it into place (sftp's put + rename).
pub fn put(dir: &Path, name: &str, bytes: &[u8]) {
    let tmp = dir.join(format!(".{name}.part"));
    fs::write(&tmp, bytes).unwrap();
    fs::rename(&tmp, dir.join(name)).unwrap();
}

pub fn manifest(id: &str, file: &str, doc: &[u8]) -> String {
    let to = format!("customer-{}@example.net", id.to_ascii_lowercase());
    manifest_to(id, &to, file, doc)
}

pub fn manifest_to(id: &str, to: &str, file: &str, doc: &[u8]) -> String {
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<job xmlns=\"urn:docmail:job:1\" id=\"{id}\">\n  <to name=\"Customer {id}\">{to}</to>\n  <attachment file=\"{file}\" type=\"application/pdf\" size=\"{}\" sha256=\"{}\"/>\n</job>\n",
        doc.len(),
        hex(&Sha256::digest(doc)),
    )
}

pub fn list(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

// ---------------------------------------------------------------------------------------------------
// running docmail

#[derive(Debug)]
pub struct Output {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
    pub elapsed: Duration,
}

impl Output {
    /// The outcome lines of one job (`job=ID status=…`).
    pub fn job_lines(&self, job: &str) -> Vec<&str> {
        let key = format!("job={job} ");
        self.stderr.lines().filter(|l| l.contains(&key)).collect()
    }
}

fn docmail_command(args: &[String]) -> Command {
    let mut cmd = Command::new(docmail_bin());
    cmd.args(args).stdin(Stdio::null());
    for v in [
        "DOCMAIL_CONFIG",
        "JOURNAL_STREAM",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "CREDENTIALS_DIRECTORY",
    ] {
        cmd.env_remove(v);
    }
    cmd
}

pub fn run_with_limit(args: &[String], limit: Duration) -> Output {
    let started = Instant::now();
    let mut child = docmail_command(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start docmail");
    let out = reader(child.stdout.take().unwrap());
    let err = reader(child.stderr.take().unwrap());
    let status = loop {
        if let Some(st) = child.try_wait().unwrap() {
            break st;
        }
        if started.elapsed() > limit {
            let _ = child.kill();
            let _ = child.wait();
            let stderr = err.recv().unwrap_or_default();
            panic!(
                "`docmail {}` did not end within {limit:?}; killed it. stderr:\n{stderr}",
                args.join(" ")
            );
        }
        thread::sleep(Duration::from_millis(10));
    };
    Output {
        code: status.code().unwrap_or(-1),
        stdout: out.recv().unwrap_or_default(),
        stderr: err.recv().unwrap_or_default(),
        elapsed: started.elapsed(),
    }
}

fn reader(mut r: impl Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    thread::spawn(move || {
        let mut v = Vec::new();
        let _ = r.read_to_end(&mut v);
        let _ = tx.send(String::from_utf8_lossy(&v).into_owned());
    });
    rx
}

// ---------------------------------------------------------------------------------------------------
// SMTP peers

/// A peer process (`tests/peers/*.py`), killed when dropped.
pub struct Peer {
    child: Child,
    pub port: u16,
    pub out: PathBuf,
}

impl Peer {
    pub fn start(script: &str, out: &Path, args: &[&str]) -> Peer {
        fs::create_dir_all(out).unwrap();
        let stderr = fs::File::create(out.join("peer.stderr")).unwrap();
        let mut child = Command::new(python())
            .arg(peer_script(script))
            .arg("--out")
            .arg(out)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {script}: {e}"));
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
        let Some(port) = line
            .trim()
            .strip_prefix("READY port=")
            .and_then(|p| p.parse().ok())
        else {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "{script} did not start (needs python3-aiosmtpd): {line:?}\n{}",
                fs::read_to_string(out.join("peer.stderr")).unwrap_or_default()
            );
        };
        Peer {
            child,
            port,
            out: out.to_path_buf(),
        }
    }

    /// `fault_smtpd.py` in `mode` (see the script), writing into `out`.
    pub fn fault(out: &Path, mode: &str) -> Peer {
        Peer::start("fault_smtpd.py", out, &["--mode", mode])
    }

    pub fn events(&self) -> String {
        fs::read_to_string(self.out.join("events.log")).unwrap_or_default()
    }

    /// Messages stored by `fault_smtpd.py`, in arrival order.
    pub fn messages(&self) -> Vec<Vec<u8>> {
        list(&self.out.join("msgs"))
            .into_iter()
            .filter(|n| n.ends_with(".eml"))
            .map(|n| fs::read(self.out.join("msgs").join(n)).unwrap())
            .collect()
    }
}

impl Drop for Peer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The Message-ID header of a raw message.
pub fn message_id(raw: &[u8]) -> Option<String> {
    let text = String::from_utf8_lossy(raw);
    let head = text.split("\r\n\r\n").next().unwrap_or("");
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.eq_ignore_ascii_case("message-id")
            .then(|| v.trim().to_string())
    })
}

/// Parses the RFC 3339 UTC times docmail writes (`2026-12-03T17:01:00Z`) into Unix seconds.
pub fn parse_time(s: &str) -> Option<i64> {
    let s = s.trim();
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[10] != b'T' {
        return None;
    }
    let n = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, m, d) = (n(0..4)?, n(5..7)?, n(8..10)?);
    let (hh, mm, ss) = (n(11..13)?, n(14..16)?, n(17..19)?);
    // days from civil (Howard Hinnant)
    let y2 = if m <= 2 { y - 1 } else { y };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146097 + doe - 719468;
    Some(days * 86400 + hh * 3600 + mm * 60 + ss)
}
