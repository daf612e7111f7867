//! Reporting: one log line per job outcome (with the syslog priority prefix journald understands when
//! stderr goes to the journal), sd_notify to the service manager, and the receipts the back office
//! fetches from `receipts/`.

use std::fmt::Write as _;
use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime};

use sd_notify::NotifyState;

use crate::spool::{one_line, rfc3339};

/// What became of a job.
pub enum Outcome<'a> {
    Sent {
        message_id: &'a str,
        reply: &'a str,
    },
    Deferred {
        attempt: u32,
        next_attempt: SystemTime,
        reason: &'a str,
    },
    Failed {
        reason: &'a str,
    },
}

#[derive(Default, Debug, Clone, Copy)]
pub struct Counts {
    pub sent: u64,
    pub deferred: u64,
    pub failed: u64,
}

pub struct Reporter {
    journal: bool,
    receipts: Option<PathBuf>,
    pub counts: Counts,
    watchdog: Option<std::time::Duration>,
    last_ping: Instant,
}

/// syslog priorities (sd-daemon.h).
const ERR: u8 = 3;
const WARNING: u8 = 4;
const INFO: u8 = 6;

impl Reporter {
    /// `receipts` is the directory for receipts, when they are on.
    pub fn new(receipts: Option<PathBuf>) -> Reporter {
        Reporter {
            journal: std::env::var_os("JOURNAL_STREAM").is_some(),
            receipts,
            counts: Counts::default(),
            watchdog: sd_notify::watchdog_enabled(),
            last_ping: Instant::now(),
        }
    }

    fn line(&self, priority: u8, text: &str) {
        let prefix = if self.journal {
            format!("<{priority}>")
        } else {
            String::new()
        };
        // One write per line, so lines of concurrent processes never interleave.
        let _ = io::stderr()
            .lock()
            .write_all(format!("{prefix}{text}\n").as_bytes());
    }

    pub fn info(&self, text: &str) {
        self.line(INFO, text);
    }

    pub fn warn(&self, text: &str) {
        self.line(WARNING, text);
    }

    /// Logs a job's outcome and, for final ones, writes its receipt.
    pub fn job(&mut self, job: &str, to: &str, outcome: Outcome) {
        self.receipt_first(job, &outcome);
        self.logged(job, to, outcome);
    }

    /// Writes the receipt of a final outcome now, before the job moves to its final place: once
    /// there it is never looked at again, so a receipt due after the move would be lost to a run
    /// killed in between. Then [`Reporter::logged`] logs the outcome under the job's final name.
    pub fn receipt_first(&self, job: &str, outcome: &Outcome) {
        if let Err(e) = self.receipt(job, outcome) {
            self.warn(&format!("job={job} receipt not written: {e}"));
        }
    }

    /// The log line of an outcome whose receipt [`Reporter::receipt_first`] has written.
    pub fn logged(&mut self, job: &str, to: &str, outcome: Outcome) {
        let mut text = format!("job={job} status=");
        let priority = match &outcome {
            Outcome::Sent { message_id, reply } => {
                self.counts.sent += 1;
                let _ = write!(
                    text,
                    "sent to={to} message_id={message_id} reply={}",
                    quote(reply)
                );
                INFO
            }
            Outcome::Deferred {
                attempt,
                next_attempt,
                reason,
            } => {
                self.counts.deferred += 1;
                let _ = write!(
                    text,
                    "deferred to={to} attempt={attempt} next_attempt={} reason={}",
                    rfc3339(*next_attempt),
                    quote(reason)
                );
                WARNING
            }
            Outcome::Failed { reason } => {
                self.counts.failed += 1;
                let _ = write!(text, "failed to={to} reason={}", quote(reason));
                ERR
            }
        };
        self.line(priority, &text);
        self.status("");
    }

    fn receipt(&self, job: &str, outcome: &Outcome) -> io::Result<()> {
        let Some(dir) = &self.receipts else {
            return Ok(());
        };
        let (status, detail) = match outcome {
            Outcome::Sent { message_id, reply } => (
                "sent",
                format!(
                    "  <message-id>{}</message-id>\n  <reply>{}</reply>\n",
                    xml_escape(message_id),
                    xml_escape(reply)
                ),
            ),
            Outcome::Failed { reason } => (
                "failed",
                format!("  <reason>{}</reason>\n", xml_escape(reason)),
            ),
            Outcome::Deferred { .. } => return Ok(()),
        };
        let xml = format!(
            "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<receipt xmlns=\"urn:docmail:receipt:1\" id=\"{}\" status=\"{status}\" at=\"{}\">\n{detail}</receipt>\n",
            xml_escape(job),
            rfc3339(SystemTime::now())
        );
        // A refused re-upload of a sent id must not replace the receipt that says it was sent, which
        // the back office may not have fetched yet.
        let mut name = format!("{job}.xml");
        if status == "failed"
            && fs::read_to_string(dir.join(&name)).is_ok_and(|r| r.contains("status=\"sent\""))
        {
            name = format!("{job}.duplicate.xml");
        }
        write_replace(dir, &name, xml.as_bytes())
    }

    /// Tells the service manager how far the run is (STATUS=) and keeps its watchdog fed.
    pub fn status(&mut self, waiting: &str) {
        let c = self.counts;
        let status = format!(
            "{} sent, {} deferred, {} failed{waiting}",
            c.sent, c.deferred, c.failed
        );
        let _ = sd_notify::notify(&[NotifyState::Status(&status)]);
        self.ping();
    }

    /// WATCHDOG=1 at most every half of the watchdog interval.
    pub fn ping(&mut self) {
        if let Some(interval) = self.watchdog {
            if self.last_ping.elapsed() >= interval / 4 {
                let _ = sd_notify::notify(&[NotifyState::Watchdog]);
                self.last_ping = Instant::now();
            }
        }
    }

    pub fn ready(&self) {
        let _ = sd_notify::notify(&[NotifyState::Ready, NotifyState::Status("delivering")]);
    }

    pub fn stopping(&self) {
        let _ = sd_notify::notify(&[NotifyState::Stopping]);
    }
}

/// `key=value` values with spaces or quotes are quoted, so that a line splits on spaces unambiguously.
fn quote(s: &str) -> String {
    let s = one_line(s);
    format!("\"{}\"", s.replace('\\', "\\\\").replace('"', "\\\""))
}

fn xml_escape(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control() || *c == '\n' || *c == '\t')
        .map(|c| match c {
            '<' => "&lt;".to_string(),
            '>' => "&gt;".to_string(),
            '&' => "&amp;".to_string(),
            '"' => "&quot;".to_string(),
            c => c.to_string(),
        })
        .collect()
}

/// Writes `dir/name` atomically (a hidden temporary name, then rename), readable by the directory's group.
fn write_replace(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!(".{name}.tmp"));
    let mut f = fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o640)
        .open(&tmp)?;
    f.write_all(bytes)?;
    drop(f);
    fs::rename(&tmp, dir.join(name))
}
