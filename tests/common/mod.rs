//! Shared harness for docmail's integration tests.
//!
//! Every test builds its own [`Site`] (spool, templates, config in a fresh temporary directory), drops
//! jobs built with [`Job`], runs the real `docmail` binary and looks at what arrived: at a real SMTP
//! server process ([`SmtpPeer`], aiosmtpd on loopback, port chosen by the kernel), in a Maildir, or in the
//! files a sendmail script wrote. Nothing is shared between tests, so they run in parallel.

#![allow(dead_code)]

use std::ffi::OsString;
use std::fmt::Write as _;
use std::fs;
use std::io::{BufRead, BufReader, Read};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use sha2::{Digest, Sha256};
use tempfile::TempDir;

#[allow(unused_imports)]
pub use mail_parser::{MessageParser, MimeHeaders};

pub const FROM: &str = "Shop Billing <billing@shop.example>";
pub const FROM_ADDR: &str = "billing@shop.example";

/// How long any single docmail invocation may take before the harness kills it and fails the test.
pub const RUN_TIMEOUT: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------------------------------
// small utilities

pub fn docmail_bin() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_docmail"))
}

/// The Python that has Debian's python3-aiosmtpd (a pyenv shim on PATH may not have it).
pub fn python() -> OsString {
    if let Some(p) = std::env::var_os("DOCMAIL_TEST_PYTHON") {
        return p;
    }
    if Path::new("/usr/bin/python3").exists() {
        return "/usr/bin/python3".into();
    }
    "python3".into()
}

pub fn peer_script() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/peers/smtp_peer.py")
}

pub fn sha256_hex(data: &[u8]) -> String {
    let d = Sha256::digest(data);
    let mut s = String::with_capacity(64);
    for b in d.iter() {
        write!(s, "{b:02x}").unwrap();
    }
    s
}

/// Deterministic binary content that looks like a PDF: header, every byte value, trailer.
pub fn pdf_bytes(seed: u64, len: usize) -> Vec<u8> {
    let mut v = b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n".to_vec();
    for b in 0..=255u8 {
        v.push(b);
    }
    // Lines of text mixed in, including ones that start with a dot and a lone dot (SMTP transparency).
    v.extend_from_slice(b"\r\n.\r\n..hidden\n.\n\r\nFrom the start\n");
    let mut x = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407)
        | 1;
    while v.len() + 7 < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        v.push((x >> 24) as u8);
    }
    v.extend_from_slice(b"\n%%EOF\n");
    v
}

pub fn xml_escape(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
        .replace('\'', "&apos;")
}

pub fn now_unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = if y >= 0 { y } else { y - 399 } / 400;
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146097 + doe - 719468
}

fn civil_from_days(z: i64) -> (i64, i64, i64) {
    let z = z + 719468;
    let era = if z >= 0 { z } else { z - 146096 } / 146097;
    let doe = z - era * 146097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    (if m <= 2 { y + 1 } else { y }, m, d)
}

/// Parse an RFC 3339 UTC time (`2026-12-03T17:01:00Z`, optional fraction, `+00:00` accepted).
pub fn parse_rfc3339_utc(s: &str) -> Option<i64> {
    let s = s.trim();
    let b = s.as_bytes();
    if b.len() < 20 || b[4] != b'-' || b[7] != b'-' || !(b[10] == b'T' || b[10] == b't') {
        return None;
    }
    let num = |r: std::ops::Range<usize>| s.get(r)?.parse::<i64>().ok();
    let (y, mo, d) = (num(0..4)?, num(5..7)?, num(8..10)?);
    let (h, mi, se) = (num(11..13)?, num(14..16)?, num(17..19)?);
    let mut rest = &s[19..];
    if let Some(r) = rest.strip_prefix('.') {
        rest = r.trim_start_matches(|c: char| c.is_ascii_digit());
    }
    let offset = match rest {
        "Z" | "z" | "+00:00" | "-00:00" => 0,
        _ => return None,
    };
    Some(days_from_civil(y, mo, d) * 86400 + h * 3600 + mi * 60 + se - offset)
}

pub fn format_rfc3339_utc(t: i64) -> String {
    let days = t.div_euclid(86400);
    let secs = t.rem_euclid(86400);
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        secs / 3600,
        secs / 60 % 60,
        secs % 60
    )
}

/// Names in a directory, sorted; empty when the directory does not exist.
pub fn list(dir: &Path) -> Vec<String> {
    let mut v: Vec<String> = match fs::read_dir(dir) {
        Ok(rd) => rd
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect(),
        Err(_) => Vec::new(),
    };
    v.sort();
    v
}

pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if Instant::now() >= deadline {
            return false;
        }
        thread::sleep(Duration::from_millis(25));
    }
}

// ---------------------------------------------------------------------------------------------------
// running docmail

/// What one docmail invocation did.
#[derive(Debug)]
pub struct RunOutput {
    pub code: i32,
    pub stdout: Vec<u8>,
    pub stderr: String,
    /// stderr lines with the time since the process started at which the harness read each one.
    pub stderr_lines: Vec<(Duration, String)>,
    pub elapsed: Duration,
}

impl RunOutput {
    pub fn stdout_str(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn all_output(&self) -> String {
        format!("{}{}", self.stdout_str(), self.stderr)
    }
    /// Log lines (`job=ID status=...`) for a job.
    pub fn job_lines(&self, id: &str) -> Vec<String> {
        let key = format!("job={id} ");
        self.stderr
            .lines()
            .filter(|l| l.contains(&key))
            .map(str::to_owned)
            .collect()
    }
    /// Time at which the first stderr line containing all of `needles` was read.
    pub fn line_time(&self, needles: &[&str]) -> Option<Duration> {
        self.stderr_lines
            .iter()
            .find(|(_, l)| needles.iter().all(|n| l.contains(n)))
            .map(|(t, _)| *t)
    }
}

/// A docmail process started in the background; `wait()` collects it like [`RunOutput`].
pub struct Running {
    child: Option<Child>,
    started: Instant,
    stdout_rx: mpsc::Receiver<Vec<u8>>,
    stderr_rx: mpsc::Receiver<Vec<(Duration, String)>>,
    what: String,
}

impl Running {
    pub fn wait(mut self) -> RunOutput {
        self.wait_for(RUN_TIMEOUT)
    }

    pub fn wait_for(&mut self, timeout: Duration) -> RunOutput {
        let mut child = self.child.take().expect("waited twice");
        let deadline = self.started + timeout;
        let status = loop {
            if let Some(st) = child.try_wait().unwrap() {
                break Some(st);
            }
            if Instant::now() >= deadline {
                let _ = child.kill();
                let _ = child.wait();
                break None;
            }
            thread::sleep(Duration::from_millis(10));
        };
        let elapsed = self.started.elapsed();
        let stdout = self.stdout_rx.recv().unwrap_or_default();
        let stderr_lines = self.stderr_rx.recv().unwrap_or_default();
        let stderr: String = stderr_lines.iter().map(|(_, l)| format!("{l}\n")).collect();
        let Some(status) = status else {
            panic!(
                "`{}` did not finish within {timeout:?}; killed it. stderr:\n{stderr}",
                self.what
            );
        };
        RunOutput {
            code: status.code().unwrap_or(-1),
            stdout,
            stderr,
            stderr_lines,
            elapsed,
        }
    }
}

impl Running {
    /// The process id (to signal it).
    pub fn pid(&self) -> u32 {
        self.child.as_ref().expect("already collected").id()
    }

    /// SIGKILL the process now (a crash, a power cut for the process) and collect what it wrote.
    pub fn kill(mut self) -> RunOutput {
        let mut child = self.child.take().expect("already collected");
        let _ = child.kill();
        let status = child.wait().unwrap();
        let elapsed = self.started.elapsed();
        let stdout = self.stdout_rx.recv().unwrap_or_default();
        let stderr_lines = self.stderr_rx.recv().unwrap_or_default();
        let stderr: String = stderr_lines.iter().map(|(_, l)| format!("{l}\n")).collect();
        RunOutput {
            code: status.code().unwrap_or(-1),
            stdout,
            stderr,
            stderr_lines,
            elapsed,
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Start docmail with `args`, a clean environment for the variables docmail reads, plus `envs`.
pub fn spawn_docmail(args: &[OsString], envs: &[(String, OsString)]) -> Running {
    let mut cmd = Command::new(docmail_bin());
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    for v in [
        "DOCMAIL_CONFIG",
        "JOURNAL_STREAM",
        "NOTIFY_SOCKET",
        "WATCHDOG_USEC",
        "WATCHDOG_PID",
        "CREDENTIALS_DIRECTORY",
        "SSL_CERT_FILE",
        "SSL_CERT_DIR",
    ] {
        cmd.env_remove(v);
    }
    for (k, v) in envs {
        cmd.env(k, v);
    }
    let what = format!(
        "docmail {}",
        args.iter()
            .map(|a| a.to_string_lossy().into_owned())
            .collect::<Vec<_>>()
            .join(" ")
    );
    let started = Instant::now();
    let mut child = cmd
        .spawn()
        .unwrap_or_else(|e| panic!("cannot start {}: {e}", docmail_bin().display()));
    let mut out = child.stdout.take().unwrap();
    let err = child.stderr.take().unwrap();
    let (otx, stdout_rx) = mpsc::channel();
    thread::spawn(move || {
        let mut v = Vec::new();
        let _ = out.read_to_end(&mut v);
        let _ = otx.send(v);
    });
    let (etx, stderr_rx) = mpsc::channel();
    thread::spawn(move || {
        let mut lines = Vec::new();
        let mut r = BufReader::new(err);
        let mut buf = Vec::new();
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(_) => {
                    let l = String::from_utf8_lossy(&buf)
                        .trim_end_matches('\n')
                        .to_owned();
                    lines.push((started.elapsed(), l));
                }
            }
        }
        let _ = etx.send(lines);
    });
    Running {
        child: Some(child),
        started,
        stdout_rx,
        stderr_rx,
        what,
    }
}

// ---------------------------------------------------------------------------------------------------
// configuration

#[derive(Clone, Debug)]
pub enum Transport {
    Smtp {
        url: String,
        user: Option<String>,
        password_file: Option<PathBuf>,
        timeout: String,
    },
    Maildir(PathBuf),
    Sendmail(PathBuf),
}

impl Transport {
    pub fn smtp(url: impl Into<String>) -> Transport {
        Transport::Smtp {
            url: url.into(),
            user: None,
            password_file: None,
            timeout: "5s".into(),
        }
    }
}

fn toml_str(s: &str) -> String {
    let mut o = String::from("\"");
    for c in s.chars() {
        match c {
            '"' => o.push_str("\\\""),
            '\\' => o.push_str("\\\\"),
            c if (c as u32) < 0x20 => write!(o, "\\u{:04x}", c as u32).unwrap(),
            c => o.push(c),
        }
    }
    o.push('"');
    o
}

fn toml_path(p: &Path) -> String {
    toml_str(p.to_str().expect("utf-8 path"))
}

/// The knobs of a test's docmail.toml. `Site::write_config` renders it.
#[derive(Clone, Debug)]
pub struct Config {
    pub from: String,
    pub reply_to: Option<String>,
    pub bcc: Option<String>,
    pub transport: Transport,
    pub template_default: String,
    pub settle: String,
    pub linger: String,
    pub orphan_after: Option<String>,
    pub retry_first: String,
    pub retry_max: String,
    pub give_up_after: Option<String>,
    pub max_recipients: Option<u32>,
    pub max_attachment_size: Option<String>,
    /// Raw TOML lines put at the top level (before any table).
    pub extra_top: String,
    /// Raw TOML appended at the end (may open new tables).
    pub extra_end: String,
}

// ---------------------------------------------------------------------------------------------------
// a site: spool + templates + config in a temporary directory

pub const TPL_INVOICE_SUBJECT: &str = "Your invoice {{ invoice_number }}";
pub const TPL_INVOICE_TXT: &str = "Dear {{ customer_name }},\n\nplease find attached your invoice {{ invoice_number }}.\n\nKind regards\nShop Billing\n";

pub struct Site {
    pub tmp: TempDir,
    pub root: PathBuf,
    pub spool: PathBuf,
    pub templates: PathBuf,
    pub config_path: PathBuf,
    /// The Maildir of the default maildir transport.
    pub outbox: PathBuf,
    pub cfg: Config,
    /// Extra environment for every docmail process of this site.
    pub env: Vec<(String, OsString)>,
}

impl Site {
    /// A site delivering to a local Maildir (`outbox`), settle 2 s, linger 0 s.
    pub fn new() -> Site {
        let tmp = tempfile::Builder::new()
            .prefix("docmail-test-")
            .tempdir()
            .unwrap();
        let root = tmp.path().to_path_buf();
        let spool = root.join("spool");
        let templates = root.join("templates");
        let outbox = root.join("outbox");
        fs::create_dir(&spool).unwrap();
        fs::set_permissions(&spool, fs::Permissions::from_mode(0o750)).unwrap();
        for d in [
            "incoming", "active", "deferred", "failed", "sent", "receipts",
        ] {
            fs::create_dir(spool.join(d)).unwrap();
            fs::set_permissions(spool.join(d), fs::Permissions::from_mode(0o750)).unwrap();
        }
        for d in ["tmp", "new", "cur"] {
            fs::create_dir_all(outbox.join(d)).unwrap();
        }
        fs::create_dir(&templates).unwrap();
        let tpl = |name: &str, body: &str| fs::write(templates.join(name), body).unwrap();
        tpl("invoice.subject", TPL_INVOICE_SUBJECT);
        tpl("invoice.txt", TPL_INVOICE_TXT);
        // Uses the variables docmail provides itself: id, to, attachments.
        tpl("full.subject", "Documents for job {{ id }}");
        tpl(
            "full.txt",
            "Dear {{ customer_name }},\n\njob {{ id }} for {% for t in to %}{{ t.name }} <{{ t.email }}>{% if not loop.last %}, {% endif %}{% endfor %}.\n{% for a in attachments %}* {{ a.name }} [{{ a.file }}] {{ a.type }} {{ a.size }} bytes\n{% endfor %}.\n.leading dot\n..two dots\nend\n",
        );
        // Text and HTML: multipart/alternative.
        tpl("letter.subject", "A letter for {{ customer_name }}");
        tpl(
            "letter.txt",
            "Hello {{ customer_name }}, this is the plain text.\n",
        );
        tpl(
            "letter.html",
            "<html><body><p>Hello <b>{{ customer_name }}</b>, this is the HTML part.</p></body></html>\n",
        );
        let config_path = root.join("docmail.toml");
        let cfg = Config {
            from: FROM.into(),
            reply_to: None,
            bcc: None,
            transport: Transport::Maildir(outbox.clone()),
            template_default: "invoice".into(),
            settle: "2s".into(),
            linger: "0s".into(),
            orphan_after: None,
            retry_first: "1m".into(),
            retry_max: "1h".into(),
            give_up_after: None,
            max_recipients: None,
            max_attachment_size: None,
            extra_top: String::new(),
            extra_end: String::new(),
        };
        let site = Site {
            tmp,
            root,
            spool,
            templates,
            config_path,
            outbox,
            cfg,
            env: Vec::new(),
        };
        site.write_config();
        site
    }

    /// A site whose transport is SMTP to `url` (timeout 5 s).
    pub fn smtp(url: &str) -> Site {
        let mut s = Site::new();
        s.cfg.transport = Transport::smtp(url);
        s.write_config();
        s
    }

    pub fn config_text(&self) -> String {
        let c = &self.cfg;
        let mut t = String::new();
        writeln!(t, "spool = {}", toml_path(&self.spool)).unwrap();
        writeln!(t, "from = {}", toml_str(&c.from)).unwrap();
        if let Some(r) = &c.reply_to {
            writeln!(t, "reply_to = {}", toml_str(r)).unwrap();
        }
        if let Some(b) = &c.bcc {
            writeln!(t, "bcc = {}", toml_str(b)).unwrap();
        }
        t.push_str(&c.extra_top);
        t.push_str("\n[transport]\n");
        match &c.transport {
            Transport::Smtp {
                url,
                user,
                password_file,
                timeout,
            } => {
                writeln!(t, "kind = \"smtp\"\nurl = {}", toml_str(url)).unwrap();
                if let Some(u) = user {
                    writeln!(t, "user = {}", toml_str(u)).unwrap();
                }
                if let Some(p) = password_file {
                    writeln!(t, "password_file = {}", toml_path(p)).unwrap();
                }
                writeln!(t, "timeout = {}", toml_str(timeout)).unwrap();
            }
            Transport::Maildir(p) => {
                writeln!(t, "kind = \"maildir\"\npath = {}", toml_path(p)).unwrap()
            }
            Transport::Sendmail(p) => {
                writeln!(t, "kind = \"sendmail\"\npath = {}", toml_path(p)).unwrap()
            }
        }
        writeln!(
            t,
            "\n[templates]\ndir = {}\ndefault = {}",
            toml_path(&self.templates),
            toml_str(&c.template_default)
        )
        .unwrap();
        if c.max_recipients.is_some() || c.max_attachment_size.is_some() {
            t.push_str("\n[limits]\n");
            if let Some(n) = c.max_recipients {
                writeln!(t, "max_recipients = {n}").unwrap();
            }
            if let Some(s) = &c.max_attachment_size {
                writeln!(t, "max_attachment_size = {}", toml_str(s)).unwrap();
            }
        }
        writeln!(
            t,
            "\n[intake]\nsettle = {}\nlinger = {}",
            toml_str(&c.settle),
            toml_str(&c.linger)
        )
        .unwrap();
        if let Some(o) = &c.orphan_after {
            writeln!(t, "orphan_after = {}", toml_str(o)).unwrap();
        }
        writeln!(
            t,
            "\n[retry]\nfirst = {}\nmax = {}",
            toml_str(&c.retry_first),
            toml_str(&c.retry_max)
        )
        .unwrap();
        if let Some(g) = &c.give_up_after {
            writeln!(t, "give_up_after = {}", toml_str(g)).unwrap();
        }
        t.push_str(&c.extra_end);
        t
    }

    pub fn write_config(&self) {
        fs::write(&self.config_path, self.config_text()).unwrap();
    }

    pub fn dir(&self, sub: &str) -> PathBuf {
        self.spool.join(sub)
    }
    pub fn incoming(&self) -> PathBuf {
        self.dir("incoming")
    }
    /// Entries of a spool directory (`incoming`, `active`, `sent`, ...).
    pub fn entries(&self, sub: &str) -> Vec<String> {
        list(&self.dir(sub))
    }

    pub fn docmail(&self, args: &[&str]) -> RunOutput {
        self.spawn(args).wait()
    }

    pub fn spawn(&self, args: &[&str]) -> Running {
        let args: Vec<OsString> = args.iter().map(OsString::from).collect();
        spawn_docmail(&args, &self.env)
    }

    /// `docmail run --config PATH`.
    pub fn run(&self) -> RunOutput {
        self.spawn_run().wait()
    }

    pub fn spawn_run(&self) -> Running {
        let cfg = self.config_path.to_str().unwrap().to_owned();
        self.spawn(&["run", "--config", &cfg])
    }

    /// `docmail run` that must exit 0; panics with its output otherwise.
    pub fn run_ok(&self) -> RunOutput {
        let out = self.run();
        assert_eq!(
            out.code, 0,
            "docmail run exited {} (expected 0). stderr:\n{}",
            out.code, out.stderr
        );
        out
    }

    pub fn check(&self) -> RunOutput {
        let cfg = self.config_path.to_str().unwrap().to_owned();
        self.docmail(&["check", "--config", &cfg])
    }

    pub fn read_in(&self, sub: &str, job: &str, file: &str) -> Option<Vec<u8>> {
        fs::read(self.dir(sub).join(job).join(file)).ok()
    }

    /// `failed/NAME/reason`, panicking with the spool's state when it is missing.
    pub fn failed_reason(&self, name: &str) -> String {
        let p = self.dir("failed").join(name).join("reason");
        fs::read_to_string(&p).unwrap_or_else(|e| {
            panic!(
                "no readable {} ({e}); spool: {}",
                p.display(),
                self.describe()
            )
        })
    }

    /// `deferred/ID/state` as key/value pairs.
    pub fn deferred_state(&self, id: &str) -> Vec<(String, String)> {
        let p = self.dir("deferred").join(id).join("state");
        let t = fs::read_to_string(&p).unwrap_or_else(|e| {
            panic!(
                "no readable {} ({e}); spool: {}",
                p.display(),
                self.describe()
            )
        });
        t.lines()
            .filter_map(|l| l.split_once('='))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect()
    }

    /// A one-line picture of the spool for assertion messages.
    pub fn describe(&self) -> String {
        let mut s = String::new();
        for d in ["incoming", "active", "deferred", "failed", "sent"] {
            write!(s, "{d}/{:?} ", self.entries(d)).unwrap();
        }
        s
    }

    /// Messages in the default Maildir transport's `new/` (and `cur/`), oldest name first.
    pub fn outbox_messages(&self) -> Vec<Vec<u8>> {
        read_maildir(&self.outbox)
    }
}

impl Default for Site {
    fn default() -> Self {
        Site::new()
    }
}

pub fn read_maildir(dir: &Path) -> Vec<Vec<u8>> {
    let mut v = Vec::new();
    for sub in ["new", "cur"] {
        for n in list(&dir.join(sub)) {
            if n.starts_with('.') {
                continue;
            }
            v.push(fs::read(dir.join(sub).join(n)).unwrap());
        }
    }
    v
}

// ---------------------------------------------------------------------------------------------------
// jobs (manifest + documents)

#[derive(Clone, Debug)]
pub struct Attachment {
    pub file: Option<String>,
    pub name: Option<String>,
    pub ctype: Option<String>,
    pub size: Option<String>,
    pub sha256: Option<String>,
    /// Raw attributes appended to the element, e.g. ` colour="red"`.
    pub extra_attrs: String,
    pub content: Vec<u8>,
    /// Write the document at all (false: the manifest names a file that is not there).
    pub write: bool,
}

impl Attachment {
    /// A document `file` with its real size and sha256 in the manifest.
    pub fn new(file: &str, content: Vec<u8>) -> Attachment {
        Attachment {
            file: Some(file.into()),
            name: None,
            ctype: None,
            size: Some(content.len().to_string()),
            sha256: Some(sha256_hex(&content)),
            extra_attrs: String::new(),
            content,
            write: true,
        }
    }
    fn xml(&self) -> String {
        let mut s = String::from("  <attachment");
        let mut attr = |k: &str, v: &Option<String>| {
            if let Some(v) = v {
                write!(s, " {k}=\"{}\"", xml_escape(v)).unwrap();
            }
        };
        attr("file", &self.file);
        attr("name", &self.name);
        attr("type", &self.ctype);
        attr("size", &self.size);
        attr("sha256", &self.sha256);
        s.push_str(&self.extra_attrs);
        s.push_str("/>\n");
        s
    }
}

/// A job: builds the manifest XML and writes documents and manifest into a drop.
#[derive(Clone, Debug)]
pub struct Job {
    /// The `id` attribute (None: left out).
    pub id: Option<String>,
    /// The manifest's file name without `.xml`.
    pub stem: String,
    pub xmlns: String,
    pub doctype: Option<String>,
    pub root_extra_attrs: String,
    pub to: Vec<(Option<String>, String)>,
    pub cc: Vec<String>,
    pub bcc: Vec<String>,
    pub reply_to: Vec<String>,
    pub template: Vec<String>,
    pub subject: Vec<String>,
    pub vars: Vec<(String, String)>,
    pub attachments: Vec<Attachment>,
    /// Raw XML inserted before `</job>`.
    pub extra_children: String,
}

impl Job {
    /// An invoice for Jane Doe with one PDF-like document `ID.pdf` (size and sha256 given).
    pub fn invoice(id: &str) -> Job {
        let seed = id
            .bytes()
            .fold(7u64, |a, b| a.wrapping_mul(31).wrapping_add(b as u64));
        let mut att = Attachment::new(&format!("{id}.pdf"), pdf_bytes(seed, 6000));
        att.name = Some(format!("Invoice {id}.pdf"));
        att.ctype = Some("application/pdf".into());
        Job {
            id: Some(id.into()),
            stem: id.into(),
            xmlns: "urn:docmail:job:1".into(),
            doctype: None,
            root_extra_attrs: String::new(),
            to: vec![(Some("Jane Doe".into()), "jane.doe@example.net".into())],
            cc: vec![],
            bcc: vec![],
            reply_to: vec![],
            template: vec![],
            subject: vec![],
            vars: vec![
                ("customer_name".into(), "Jane Doe".into()),
                ("invoice_number".into(), id.into()),
            ],
            attachments: vec![att],
            extra_children: String::new(),
        }
    }

    pub fn id(&self) -> &str {
        self.id.as_deref().unwrap_or(&self.stem)
    }

    pub fn manifest_name(&self) -> String {
        format!("{}.xml", self.stem)
    }

    pub fn xml(&self) -> String {
        let mut s = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
        if let Some(d) = &self.doctype {
            s.push_str(d);
            s.push('\n');
        }
        write!(s, "<job xmlns=\"{}\"", xml_escape(&self.xmlns)).unwrap();
        if let Some(id) = &self.id {
            write!(s, " id=\"{}\"", xml_escape(id)).unwrap();
        }
        s.push_str(&self.root_extra_attrs);
        s.push_str(">\n");
        for (name, addr) in &self.to {
            match name {
                Some(n) => writeln!(
                    s,
                    "  <to name=\"{}\">{}</to>",
                    xml_escape(n),
                    xml_escape(addr)
                )
                .unwrap(),
                None => writeln!(s, "  <to>{}</to>", xml_escape(addr)).unwrap(),
            }
        }
        let mut el = |tag: &str, vals: &[String]| {
            for v in vals {
                writeln!(s, "  <{tag}>{}</{tag}>", xml_escape(v)).unwrap();
            }
        };
        el("cc", &self.cc);
        el("bcc", &self.bcc);
        el("reply-to", &self.reply_to);
        el("template", &self.template);
        el("subject", &self.subject);
        for (k, v) in &self.vars {
            writeln!(
                s,
                "  <var name=\"{}\">{}</var>",
                xml_escape(k),
                xml_escape(v)
            )
            .unwrap();
        }
        for a in &self.attachments {
            s.push_str(&a.xml());
        }
        s.push_str(&self.extra_children);
        s.push_str("</job>\n");
        s
    }

    pub fn write_documents(&self, dir: &Path) {
        for a in &self.attachments {
            if let (true, Some(f)) = (a.write, &a.file) {
                if f.contains('/') {
                    continue;
                }
                fs::write(dir.join(f), &a.content).unwrap();
            }
        }
    }

    pub fn write_manifest(&self, dir: &Path) {
        fs::write(dir.join(self.manifest_name()), self.xml()).unwrap();
    }

    /// Upload as the contract says: documents first, manifest last.
    pub fn drop_into(&self, site: &Site) {
        self.write_documents(&site.incoming());
        self.write_manifest(&site.incoming());
    }
}

// ---------------------------------------------------------------------------------------------------
// the SMTP peer (tests/peers/smtp_peer.py, aiosmtpd)

#[derive(Clone, Debug, Default)]
pub struct PeerOpts {
    /// Listen on this port (0: the kernel picks one).
    pub port: u16,
    /// STARTTLS with (cert.pem, key.pem).
    pub tls: Option<(PathBuf, PathBuf)>,
    pub require_starttls: bool,
    /// Require AUTH with (user, password).
    pub auth: Option<(String, String)>,
    /// RCPT addresses matching this regex get 550.
    pub reject_rcpt: Option<String>,
    /// RCPT addresses matching this regex get 451.
    pub tempfail_rcpt: Option<String>,
    /// Also listen on [::1] (for `localhost` URLs).
    pub also_ipv6: bool,
}

/// One message as the peer received it.
#[derive(Clone, Debug)]
pub struct Received {
    pub name: String,
    pub raw: Vec<u8>,
    pub mail_from: String,
    pub rcpt_to: Vec<String>,
    pub tls: bool,
    pub auth_user: String,
    pub conn: u64,
    /// Arrival time, seconds since the Unix epoch.
    pub time: f64,
}

impl Received {
    pub fn parsed(&self) -> mail_parser::Message<'_> {
        MessageParser::default()
            .parse(&self.raw)
            .expect("mail-parser cannot parse the received message")
    }
}

pub struct SmtpPeer {
    child: Child,
    pub port: u16,
    pub out: PathBuf,
}

impl SmtpPeer {
    /// Start a peer writing into `out` (created). Panics when it does not come up within 20 s.
    pub fn start(out: &Path, opts: &PeerOpts) -> SmtpPeer {
        fs::create_dir_all(out).unwrap();
        let mut cmd = Command::new(python());
        cmd.arg(peer_script())
            .arg("--out")
            .arg(out)
            .arg("--port")
            .arg(opts.port.to_string());
        if let Some((c, k)) = &opts.tls {
            cmd.arg("--tls-cert").arg(c).arg("--tls-key").arg(k);
        }
        if opts.require_starttls {
            cmd.arg("--require-starttls");
        }
        if let Some((u, p)) = &opts.auth {
            cmd.arg("--auth-user").arg(u).arg("--auth-password").arg(p);
        }
        if let Some(r) = &opts.reject_rcpt {
            cmd.arg("--reject-rcpt").arg(r);
        }
        if let Some(r) = &opts.tempfail_rcpt {
            cmd.arg("--tempfail-rcpt").arg(r);
        }
        if opts.also_ipv6 {
            cmd.arg("--also-ipv6");
        }
        let stderr = fs::File::create(out.join("peer.stderr")).unwrap();
        cmd.stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(stderr);
        let mut child = cmd.spawn().unwrap_or_else(|e| {
            panic!(
                "cannot start the SMTP peer ({:?} {}): {e}",
                python(),
                peer_script().display()
            )
        });
        let stdout = child.stdout.take().unwrap();
        let (tx, rx) = mpsc::channel();
        thread::spawn(move || {
            let mut line = String::new();
            let _ = BufReader::new(stdout).read_line(&mut line);
            let _ = tx.send(line);
        });
        let line = rx.recv_timeout(Duration::from_secs(20)).unwrap_or_default();
        let port = line
            .trim()
            .strip_prefix("READY port=")
            .and_then(|p| p.parse::<u16>().ok());
        let Some(port) = port else {
            let _ = child.kill();
            let _ = child.wait();
            let err = fs::read_to_string(out.join("peer.stderr")).unwrap_or_default();
            panic!(
                "SMTP peer did not start (needs python3-aiosmtpd); said {line:?}; stderr:\n{err}"
            );
        };
        SmtpPeer {
            child,
            port,
            out: out.to_path_buf(),
        }
    }

    /// `smtp://127.0.0.1:PORT` (plain SMTP).
    pub fn url(&self) -> String {
        format!("smtp://127.0.0.1:{}", self.port)
    }

    pub fn events(&self) -> String {
        fs::read_to_string(self.out.join("events.log")).unwrap_or_default()
    }

    /// Number of TCP connections the server accepted.
    pub fn connections(&self) -> usize {
        self.events()
            .lines()
            .filter(|l| l.ends_with(" CONNECT"))
            .count()
    }

    /// Number of SMTP sessions (EHLO/HELO before TLS, i.e. once per session).
    pub fn sessions(&self) -> usize {
        self.events()
            .lines()
            .filter(|l| l.contains(" EHLO ") && l.ends_with("tls=False"))
            .count()
    }

    pub fn message_names(&self) -> Vec<String> {
        list(&self.out.join("msgs"))
            .into_iter()
            .filter(|n| n.ends_with(".eml"))
            .collect()
    }

    pub fn message_count(&self) -> usize {
        self.message_names().len()
    }

    pub fn messages(&self) -> Vec<Received> {
        let dir = self.out.join("msgs");
        self.message_names()
            .into_iter()
            .map(|n| {
                let raw = fs::read(dir.join(&n)).unwrap();
                let stem = n.trim_end_matches(".eml");
                let meta = fs::read_to_string(dir.join(format!("{stem}.env"))).unwrap();
                let mut r = Received {
                    name: stem.to_owned(),
                    raw,
                    mail_from: String::new(),
                    rcpt_to: vec![],
                    tls: false,
                    auth_user: String::new(),
                    conn: 0,
                    time: 0.0,
                };
                for l in meta.lines() {
                    let Some((k, v)) = l.split_once('=') else {
                        continue;
                    };
                    match k {
                        "mail_from" => r.mail_from = v.into(),
                        "rcpt_to" => r.rcpt_to.push(v.into()),
                        "tls" => r.tls = v == "1",
                        "auth_user" => r.auth_user = v.into(),
                        "conn" => r.conn = v.parse().unwrap(),
                        "time" => r.time = v.parse().unwrap(),
                        _ => {}
                    }
                }
                r
            })
            .collect()
    }
}

impl Drop for SmtpPeer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A port on loopback that nothing listens on right now.
pub fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    l.local_addr().unwrap().port()
}

/// A self-signed certificate for `localhost` that rustls accepts as an end-entity trust anchor:
/// subjectAltName=DNS:localhost, basicConstraints=critical,CA:FALSE. Returns (cert.pem, key.pem).
pub fn make_cert(dir: &Path) -> (PathBuf, PathBuf) {
    let cert = dir.join("cert.pem");
    let key = dir.join("key.pem");
    let out = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-days",
            "3",
            "-subj",
            "/CN=localhost",
            "-addext",
            "subjectAltName=DNS:localhost",
            "-addext",
            "basicConstraints=critical,CA:FALSE",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl must be installed");
    assert!(
        out.status.success(),
        "openssl req failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    (cert, key)
}

// ---------------------------------------------------------------------------------------------------
// assertions

/// The raw header section of a message (up to the first empty line), unfolded, as (name, value) pairs.
pub fn raw_headers(raw: &[u8]) -> Vec<(String, String)> {
    let text = String::from_utf8_lossy(raw);
    let head = text
        .split("\r\n\r\n")
        .next()
        .unwrap()
        .split("\n\n")
        .next()
        .unwrap();
    let mut v: Vec<(String, String)> = Vec::new();
    for line in head.lines() {
        let line = line.trim_end_matches('\r');
        if line.starts_with(' ') || line.starts_with('\t') {
            if let Some(last) = v.last_mut() {
                last.1.push(' ');
                last.1.push_str(line.trim());
            }
        } else if let Some((k, val)) = line.split_once(':') {
            v.push((k.trim().to_owned(), val.trim().to_owned()));
        }
    }
    v
}

pub fn header_count(raw: &[u8], name: &str) -> usize {
    raw_headers(raw)
        .iter()
        .filter(|(k, _)| k.eq_ignore_ascii_case(name))
        .count()
}

/// Addresses (lower-cased) of an address header.
pub fn addrs(a: Option<&mail_parser::Address<'_>>) -> Vec<String> {
    a.map(|a| {
        a.iter()
            .filter_map(|x| x.address())
            .map(|s| s.to_ascii_lowercase())
            .collect()
    })
    .unwrap_or_default()
}

/// Assert that a job was delivered and left the drop: in `sent/ID`, nowhere else.
pub fn assert_sent(site: &Site, id: &str) {
    assert!(
        site.dir("sent").join(id).is_dir(),
        "job {id} should be in sent/; spool: {}",
        site.describe()
    );
    for d in ["active", "deferred", "failed"] {
        assert!(
            !site.dir(d).join(id).exists(),
            "job {id} must not also be in {d}/; spool: {}",
            site.describe()
        );
    }
    assert!(
        !site.incoming().join(format!("{id}.xml")).exists(),
        "manifest {id}.xml still in incoming/; spool: {}",
        site.describe()
    );
}

/// Find the one message whose Message-ID or Subject mentions `needle`.
pub fn find_message<'a>(msgs: &'a [Vec<u8>], needle: &str) -> Option<&'a Vec<u8>> {
    msgs.iter().find(|m| {
        let p = MessageParser::default().parse(m.as_slice());
        p.map(|p| {
            p.message_id().unwrap_or("").contains(needle)
                || p.subject().unwrap_or("").contains(needle)
        })
        .unwrap_or(false)
    })
}
