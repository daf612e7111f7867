//! `docmail run`: delivers every complete job in the drop and every due retry, lingers a moment
//! watching the drop with inotify (so a trickle of uploads is served by one run, not one run per
//! upload), then exits. This module ties the stages together; each decision is made in its stage.

use std::collections::HashMap;
use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::Context;
use rustix::fs::inotify;

use crate::compose::Composer;
use crate::config::Config;
use crate::deliver::{self, Failure, Transport};
use crate::error::Sysexit;
use crate::intake::{self, Fingerprint, Upload, Verdict};
use crate::manifest::Manifest;
use crate::report::{Outcome, Reporter};
use crate::spool::{self, Place, Spool, State};

/// Runs once. Errors are those of the installation (configuration, spool, permissions); a job that
/// fails is quarantined and logged, and the run still succeeds.
pub fn run(config: &Config) -> anyhow::Result<()> {
    let mut spool = Spool::open(&config.spool).context(Sysexit::Config)?;
    let receipts = config.archive.receipts.then(|| spool.dir(Place::Receipts));
    let reporter = Reporter::new(receipts);
    if !lock(&mut spool, &reporter)? {
        reporter.info("another docmail run holds the spool lock; it delivers these jobs");
        return Ok(());
    }
    spool.recover().context(Sysexit::IoErr)?;
    let transport = deliver::open(config).context(Sysexit::Config)?;
    let watcher = Watcher::new(&spool.dir(Place::Incoming)).context(Sysexit::IoErr)?;
    // SIGTERM (systemctl stop, an upgrade's restart) and SIGINT end the run after the job in hand,
    // instead of in the middle of it; the next run delivers what is left.
    let terminate = Arc::new(AtomicBool::new(false));
    for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
        signal_hook::flag::register(signal, Arc::clone(&terminate)).context(Sysexit::IoErr)?;
    }
    reporter.ready();

    let mut run = Run {
        config,
        spool,
        transport,
        composer: Composer::new(config),
        reporter,
        unavailable: None,
        taken: HashMap::new(),
        waiting: HashMap::new(),
        deadline: Instant::now() + config.limits.max_run_time.0,
        terminate,
    };
    let result = run.deliver_all(&watcher);
    run.reporter.stopping();
    result
}

/// Takes the spool lock. Under systemd a run started while another holds it (say an operator's
/// `docmail run`) waits a while: exiting at once would have the path unit start it again at once,
/// towards the start limit. From a shell it leaves the work to the run that holds the lock.
fn lock(spool: &mut Spool, reporter: &Reporter) -> anyhow::Result<bool> {
    let patience = if std::env::var_os("INVOCATION_ID").is_some() {
        Duration::from_secs(60)
    } else {
        Duration::ZERO
    };
    let deadline = Instant::now() + patience;
    let mut waiting = false;
    loop {
        if spool.try_lock().context(Sysexit::IoErr)? {
            return Ok(true);
        }
        if Instant::now() >= deadline {
            return Ok(false);
        }
        if !waiting {
            reporter.info("waiting for the spool lock held by another docmail run");
            waiting = true;
        }
        std::thread::sleep(Duration::from_secs(1));
    }
}

struct Run<'a> {
    config: &'a Config,
    spool: Spool,
    transport: Box<dyn Transport>,
    composer: Composer,
    reporter: Reporter,
    /// Set when the next hop could not be reached: until `retry.first` has passed, jobs are deferred
    /// without trying again, so a dead relay costs one timeout per run instead of one per job.
    unavailable: Option<(Instant, String)>,
    /// The documents this run has claimed, and their jobs (see [`intake::examine`]).
    taken: HashMap<String, (String, SystemTime)>,
    /// Uploads found incomplete, as they looked then: unchanged, they are not read again.
    waiting: HashMap<OsString, WaitingUpload>,
    /// `limits.max_run_time` after the start: no job is claimed after it, so that a slow peer never
    /// holds a run for longer than that and one job.
    deadline: Instant,
    /// Set by SIGTERM or SIGINT.
    terminate: Arc<AtomicBool>,
}

/// A waiting upload: how it looked, when it fails, why it waits, the documents it names.
type WaitingUpload = (Fingerprint, SystemTime, String, Vec<String>);

/// A job in a job directory, ready to deliver.
struct Claimed {
    dir: PathBuf,
    manifest: Manifest,
    manifest_sha256: [u8; 32],
    documents: Vec<Vec<u8>>,
    state: State,
}

impl Run<'_> {
    fn deliver_all(&mut self, watcher: &Watcher) -> anyhow::Result<()> {
        let linger = self.config.intake.linger.0;
        self.resume_interrupted()?;
        let mut idle_since = Instant::now();
        loop {
            let (worked, waiting) = self.pass()?;
            self.spool.sync().context("fsync of the spool")?;
            if worked {
                idle_since = Instant::now();
            }
            let waiting_until = waiting.iter().map(|(until, _)| *until).min();
            let note = if waiting.is_empty() {
                String::new()
            } else {
                format!("; waiting for {} incomplete upload(s)", waiting.len())
            };
            self.reporter.status(&note);
            if self.terminate.load(Ordering::Relaxed) {
                self.reporter
                    .info("stopping on request; what is left is delivered by the next run");
                break;
            }
            if self.out_of_time() {
                self.reporter.warn(&format!(
                    "stopping after limits.max_run_time ({}); what is left is delivered by the next run",
                    humantime::format_duration(self.config.limits.max_run_time.0)
                ));
                break;
            }
            let linger_left = linger.saturating_sub(idle_since.elapsed());
            let timeout = match waiting_until {
                Some(until) => until
                    .duration_since(SystemTime::now())
                    .unwrap_or_default()
                    .max(Duration::from_millis(50)),
                None if linger_left.is_zero() => break,
                None => linger_left,
            };
            // Wake at least every few seconds: to feed the watchdog, and in case an event was missed.
            watcher.wait(timeout.min(Duration::from_secs(5)));
        }
        self.expire_sent();
        self.move_orphans();
        self.spool.sync().context("fsync of the spool")?;
        Ok(())
    }

    /// One look at the drop and at the deferred jobs. Returns whether any job moved, and the uploads
    /// that are still incomplete with the time they fail at.
    fn pass(&mut self) -> anyhow::Result<(bool, Vec<(SystemTime, String)>)> {
        let incoming = self.spool.dir(Place::Incoming);
        let mut manifests: Vec<(SystemTime, OsString)> = Vec::new();
        for entry in std::fs::read_dir(&incoming)
            .with_context(|| format!("reading {}", incoming.display()))?
        {
            let entry = entry?;
            let name = entry.file_name();
            if spool::is_manifest_name(&name) {
                let mtime = entry
                    .metadata()
                    .and_then(|m| m.modified())
                    .unwrap_or(SystemTime::UNIX_EPOCH);
                manifests.push((mtime, name));
            }
        }
        manifests.sort();
        let mut worked = false;
        let mut waiting = Vec::new();
        let mut still_waiting = HashMap::new();
        for (_, name) in manifests {
            if self.out_of_time() {
                break;
            }
            if let Some((fingerprint, until, why, files)) = self.waiting.remove(&name) {
                if SystemTime::now() < until
                    && fingerprint == Fingerprint::of(&incoming, &name, &files)
                {
                    waiting.push((until, why.clone()));
                    still_waiting.insert(name, (fingerprint, until, why, files));
                    continue;
                }
            }
            match intake::examine(
                &incoming,
                &name,
                self.config,
                SystemTime::now(),
                &self.taken,
            ) {
                Verdict::Ready(upload) => {
                    worked = true;
                    self.take(*upload)?;
                }
                Verdict::Fail {
                    name: job,
                    documents,
                    reason,
                } => {
                    worked = true;
                    let docs: Vec<&str> = documents.iter().map(String::as_str).collect();
                    self.fail_upload(&name, &docs, &job, &reason)?;
                }
                Verdict::Wait { until, why, files } => {
                    waiting.push((until, why.clone()));
                    let fingerprint = Fingerprint::of(&incoming, &name, &files);
                    still_waiting.insert(name, (fingerprint, until, why, files));
                }
                Verdict::Gone => {}
            }
            self.reporter.ping();
        }
        self.waiting = still_waiting;
        worked |= self.retry_due()?;
        Ok((worked, waiting))
    }

    /// Claims a complete upload into `active/` and delivers it.
    fn take(&mut self, upload: Upload) -> anyhow::Result<()> {
        let Upload {
            manifest_file,
            manifest,
            manifest_sha256,
            documents,
        } = upload;
        let files: Vec<&str> = manifest
            .attachments
            .iter()
            .map(|a| a.file.as_str())
            .collect();
        let to = recipients(&manifest);
        if let Some(reason) = self.already_sent(&manifest.id) {
            return self.fail_upload(&manifest_file, &files, &manifest.id, &reason);
        }
        let dir = self
            .spool
            .adopt(
                Some(&manifest_file),
                &files,
                Place::Active,
                &manifest.id,
                None,
            )
            .context("claiming a job")?;
        for file in &files {
            self.taken
                .insert(file.to_string(), (manifest.id.clone(), SystemTime::now()));
        }
        // The bytes were checked in the drop; make sure the files that moved are the ones that were read,
        // and (only settled now that they are out of the uploader's reach) that they have no other link.
        for (file, doc) in files.iter().zip(&documents) {
            let moved = dir.join(spool::DOCUMENTS).join(file);
            if let Err(p) = intake::verify_claimed(&moved, doc.ino) {
                let why = match p {
                    intake::Problem::Bad(why) | intake::Problem::Incomplete(why) => why,
                    intake::Problem::Missing => "vanished while the job was being claimed".into(),
                };
                let reason = format!("document {file} {why}");
                return self.finish_failed(&dir, &manifest.id, &to, &reason);
            }
        }
        let documents = documents.into_iter().map(|d| d.bytes).collect();
        self.deliver(Claimed {
            dir,
            manifest,
            manifest_sha256,
            documents,
            state: State::default(),
        })
    }

    /// The reason to refuse a job whose id has already been sent.
    fn already_sent(&self, id: &str) -> Option<String> {
        let sent = self.spool.find(Place::Sent, id)?;
        let state = State::read(&sent);
        let when = state
            .sent_at
            .map(spool::rfc3339)
            .unwrap_or_else(|| "an earlier run".into());
        Some(format!(
            "duplicate: job {id} was already sent at {when} (Message-ID {}); to send it again: docmail retry --force {}",
            state.message_id.unwrap_or_default(),
            self.spool.free_name(Place::Failed, id)
        ))
    }

    /// Delivers a claimed job and moves it to where the outcome says.
    fn deliver(&mut self, mut job: Claimed) -> anyhow::Result<()> {
        let id = job.manifest.id.clone();
        let to = recipients(&job.manifest);
        if let Some(reason) = self.unavailable_reason() {
            return self.defer(job.dir, &id, &to, job.state, &reason);
        }
        let composed = match self.composer.compose(
            &job.manifest,
            &job.manifest_sha256,
            std::mem::take(&mut job.documents),
        ) {
            Ok(c) => c,
            Err(e) => return self.finish_failed(&job.dir, &id, &to, &e.to_string()),
        };
        let now = SystemTime::now();
        job.state.attempts += 1;
        job.state.first_attempt.get_or_insert(now);
        match self.transport.send(&composed.envelope, &composed.bytes) {
            Ok(reply) => {
                // Recorded before the move: a run killed in between finds it sent and does not resend.
                job.state.message_id = Some(composed.message_id.clone());
                job.state.sent_at = Some(SystemTime::now());
                job.state.reply = Some(reply.clone());
                let recorded = self.spool.write_state(&job.dir, &job.state);
                // Receipted while the job is still in active/: a run killed before the move finds
                // it there, sent, and moves and receipts it; once it is in sent/ nobody looks at it
                // again, so a receipt due after the move would be lost to a kill.
                let outcome = Outcome::Sent {
                    message_id: &composed.message_id,
                    reply: &reply,
                };
                self.reporter
                    .receipt_first(&spool::job_name(&job.dir), &outcome);
                // Even when the state cannot be written (a full disk), the job was sent: the rename
                // to sent/ needs no space and keeps the next run from sending it again.
                let dir = self
                    .spool
                    .move_job(&job.dir, Place::Sent)
                    .context("moving a sent job")?;
                self.reporter.logged(&spool::job_name(&dir), &to, outcome);
                // Then stop: whatever comes next cannot be recorded either.
                recorded.with_context(|| {
                    format!(
                        "job={id} was sent and moved to sent/, but its state could not be written"
                    )
                })
            }
            Err(e) => match e.failure {
                Failure::Permanent => self.finish_failed(
                    &job.dir,
                    &id,
                    &to,
                    &format!("the mail server refused the message: {}", e.message),
                ),
                Failure::Temporary => self.defer(job.dir, &id, &to, job.state, &e.message),
                Failure::Unavailable => {
                    self.unavailable = Some((Instant::now(), e.message.clone()));
                    self.defer(job.dir, &id, &to, job.state, &e.message)
                }
            },
        }
    }

    fn unavailable_reason(&mut self) -> Option<String> {
        match &self.unavailable {
            Some((since, reason)) if since.elapsed() < self.config.retry.first.0 => Some(format!(
                "not tried: the transport was unavailable moments ago ({reason})"
            )),
            _ => {
                self.unavailable = None;
                None
            }
        }
    }

    /// Moves a job to `deferred/` with its next attempt, or to `failed/` once `retry.give_up_after` has passed.
    fn defer(
        &mut self,
        dir: PathBuf,
        id: &str,
        to: &str,
        mut state: State,
        reason: &str,
    ) -> anyhow::Result<()> {
        let now = SystemTime::now();
        let first = *state.first_attempt.get_or_insert(now);
        let give_up = self.config.retry.give_up_after.0;
        if now.duration_since(first).unwrap_or_default() >= give_up {
            let reason = format!(
                "gave up after {} attempt(s) over {} (retry.give_up_after); last error: {reason}",
                state.attempts,
                humantime::format_duration(give_up)
            );
            return self.finish_failed(&dir, id, to, &reason);
        }
        let next = now + backoff(self.config, state.attempts.max(1));
        state.next_attempt = Some(next);
        state.last_error = Some(reason.to_string());
        let text = format!(
            "Delivery of job {id} was deferred at {}: {reason}\nAttempt {} failed; the next attempt is due at {}. It is retried with growing pauses \
             until {} after the first attempt, then fails.\nTo try now: docmail retry {id}\n",
            spool::rfc3339(now),
            state.attempts,
            spool::rfc3339(next),
            humantime::format_duration(give_up)
        );
        self.spool.write_reason(&dir, &text)?;
        self.spool.write_state(&dir, &state)?;
        let dir = if dir.parent() == Some(self.spool.dir(Place::Deferred).as_path()) {
            dir
        } else {
            self.spool
                .move_job(&dir, Place::Deferred)
                .context("deferring a job")?
        };
        self.reporter.job(
            &spool::job_name(&dir),
            to,
            Outcome::Deferred {
                attempt: state.attempts,
                next_attempt: next,
                reason,
            },
        );
        Ok(())
    }

    /// Moves a job directory to `failed/` with its reason.
    fn finish_failed(
        &mut self,
        dir: &Path,
        id: &str,
        to: &str,
        reason: &str,
    ) -> anyhow::Result<()> {
        let name = self.spool.free_name(Place::Failed, &spool::job_name(dir));
        self.spool.write_reason(dir, &failure_text(&name, reason))?;
        // Marked before the move, so that a run killed in between does not deliver it after all.
        let mut state = State::read(dir);
        state.failed = true;
        self.spool.write_state(dir, &state)?;
        let outcome = Outcome::Failed { reason };
        self.reporter.receipt_first(id, &outcome);
        let dir = self
            .spool
            .move_job(dir, Place::Failed)
            .context("failing a job")?;
        self.reporter.logged(&spool::job_name(&dir), to, outcome);
        Ok(())
    }

    /// Moves an upload that cannot be delivered from the drop straight to `failed/`.
    fn fail_upload(
        &mut self,
        manifest_file: &std::ffi::OsStr,
        documents: &[&str],
        name: &str,
        reason: &str,
    ) -> anyhow::Result<()> {
        let text = failure_text(&self.spool.free_name(Place::Failed, name), reason);
        let outcome = Outcome::Failed { reason };
        self.reporter.receipt_first(name, &outcome);
        let dir = self
            .spool
            .adopt(
                Some(manifest_file),
                documents,
                Place::Failed,
                name,
                Some(&text),
            )
            .context("moving a failed upload out of the drop")?;
        self.reporter.logged(&spool::job_name(&dir), "-", outcome);
        Ok(())
    }

    /// Delivers the deferred jobs whose next attempt is due. Returns whether there were any.
    fn retry_due(&mut self) -> anyhow::Result<bool> {
        let now = SystemTime::now();
        let mut any = false;
        for dir in self.spool.jobs(Place::Deferred)? {
            if self.out_of_time() {
                break;
            }
            let state = State::read(&dir);
            if state.next_attempt.is_some_and(|t| t > now) {
                continue;
            }
            any = true;
            if let Some(reason) = self.unavailable_reason() {
                // Not worth a rename to active/ and back: count the attempt where the job is.
                let id = spool::job_name(&dir);
                let mut state = state;
                state.attempts += 1;
                self.defer(dir, &id, "-", state, &reason)?;
                continue;
            }
            let dir = self
                .spool
                .move_job(&dir, Place::Active)
                .context("taking a deferred job")?;
            self.resume(dir, state)?;
            self.reporter.ping();
        }
        Ok(any)
    }

    /// Jobs a killed run left in `active/`: those it had sent are recorded as sent, the others delivered.
    fn resume_interrupted(&mut self) -> anyhow::Result<()> {
        for dir in self.spool.jobs(Place::Active)? {
            let state = State::read(&dir);
            if state.sent_at.is_some() {
                let id = spool::job_name(&dir);
                let message_id = state.message_id.unwrap_or_default();
                let reply = state.reply.unwrap_or_default();
                self.reporter.info(&format!(
                    "job={id} was sent by an interrupted run; recorded now"
                ));
                // The receipt before the move, as in deliver().
                let outcome = Outcome::Sent {
                    message_id: &message_id,
                    reply: &reply,
                };
                self.reporter.receipt_first(&id, &outcome);
                let dir = self.spool.move_job(&dir, Place::Sent)?;
                self.reporter.logged(&spool::job_name(&dir), "-", outcome);
            } else if state.failed {
                let id = spool::job_name(&dir);
                let reason = std::fs::read_to_string(dir.join(spool::REASON)).unwrap_or_default();
                let reason = reason
                    .lines()
                    .nth(1)
                    .unwrap_or("failed by an interrupted run")
                    .to_string();
                let outcome = Outcome::Failed { reason: &reason };
                self.reporter.receipt_first(&id, &outcome);
                let dir = self.spool.move_job(&dir, Place::Failed)?;
                self.reporter.logged(&spool::job_name(&dir), "-", outcome);
            } else if !self.out_of_time() {
                self.resume(dir, state)?;
            }
        }
        Ok(())
    }

    /// Whether to stop taking new work: `limits.max_run_time` has passed, or a stop was requested.
    fn out_of_time(&self) -> bool {
        Instant::now() >= self.deadline || self.terminate.load(Ordering::Relaxed)
    }

    /// Loads a job directory in `active/` again (for a retry) and delivers it.
    fn resume(&mut self, dir: PathBuf, state: State) -> anyhow::Result<()> {
        let loaded = intake::load(
            &dir.join(spool::MANIFEST),
            &dir.join(spool::DOCUMENTS),
            self.config,
        );
        match loaded {
            Ok(intake::Loaded {
                manifest,
                manifest_sha256,
                documents,
            }) => {
                if !state.force {
                    if let Some(reason) = self.already_sent(&manifest.id) {
                        return self.finish_failed(
                            &dir,
                            &manifest.id,
                            &recipients(&manifest),
                            &reason,
                        );
                    }
                }
                self.deliver(Claimed {
                    dir,
                    manifest,
                    manifest_sha256,
                    documents,
                    state,
                })
            }
            Err(reason) => {
                let id = spool::job_name(&dir);
                self.finish_failed(&dir, &id, "-", &reason)
            }
        }
    }

    /// Removes sent jobs older than `archive.keep_sent`.
    fn expire_sent(&mut self) {
        let keep = self.config.archive.keep_sent.0;
        let Ok(jobs) = self.spool.jobs(Place::Sent) else {
            return;
        };
        for dir in jobs {
            let sent_at = State::read(&dir)
                .sent_at
                .or_else(|| dir.metadata().and_then(|m| m.modified()).ok());
            if sent_at.is_some_and(|t| t + keep <= SystemTime::now()) {
                if let Err(e) = self.spool.remove_job(&dir) {
                    self.reporter
                        .warn(&format!("cannot remove expired {}: {e}", dir.display()));
                }
            }
        }
    }

    /// Documents nobody named for `intake.orphan_after` go to `failed/`, so the drop never fills up silently.
    fn move_orphans(&mut self) {
        let incoming = self.spool.dir(Place::Incoming);
        let Ok(orphans) = intake::orphans(
            &incoming,
            self.config.intake.orphan_after.0,
            SystemTime::now(),
        ) else {
            return;
        };
        for file in orphans {
            // The job is named after the file, made safe; the file keeps its own name in documents/.
            let job = format!("orphan-{}", spool::name_from_file(&file));
            self.orphan(&file, &job);
        }
    }

    fn orphan(&mut self, file: &std::ffi::OsStr, job: &str) {
        let reason = format!(
            "document {} stayed in the drop for {} (intake.orphan_after) without a manifest naming it",
            file.to_string_lossy(),
            humantime::format_duration(self.config.intake.orphan_after.0)
        );
        let outcome = Outcome::Failed { reason: &reason };
        self.reporter.receipt_first(job, &outcome);
        match self.spool.adopt(
            None,
            &[file],
            Place::Failed,
            job,
            Some(&failure_text(
                &self.spool.free_name(Place::Failed, job),
                &reason,
            )),
        ) {
            Ok(dir) => self.reporter.logged(&spool::job_name(&dir), "-", outcome),
            Err(e) => self.reporter.warn(&format!(
                "cannot move orphan {}: {e}",
                file.to_string_lossy()
            )),
        }
    }
}

fn recipients(m: &Manifest) -> String {
    m.to.iter()
        .chain(&m.cc)
        .map(|mb| mb.email.to_string())
        .collect::<Vec<_>>()
        .join(",")
}

/// The next pause: `retry.first` doubled per failed attempt, at most `retry.max`.
pub fn backoff(config: &Config, attempts: u32) -> Duration {
    let first = config.retry.first.0;
    let factor = 1u32
        .checked_shl(attempts.saturating_sub(1))
        .unwrap_or(u32::MAX);
    first
        .checked_mul(factor)
        .unwrap_or(Duration::MAX)
        .min(config.retry.max.0)
}

fn failure_text(job: &str, reason: &str) -> String {
    format!(
        "Job {job} failed at {}:\n{reason}\n\nIt will not be delivered as it is. Fix the cause, then either upload the job again or \
         run `docmail retry {job}`; `docmail remove {job}` discards it.\n",
        spool::rfc3339(SystemTime::now())
    )
}

/// Watches the drop for files that are closed after writing or renamed into it.
struct Watcher {
    fd: OwnedFd,
}

impl Watcher {
    fn new(dir: &Path) -> anyhow::Result<Watcher> {
        let fd = inotify::init(inotify::CreateFlags::CLOEXEC | inotify::CreateFlags::NONBLOCK)
            .context("inotify_init")?;
        inotify::add_watch(
            &fd,
            dir,
            inotify::WatchFlags::CLOSE_WRITE | inotify::WatchFlags::MOVED_TO,
        )
        .with_context(|| format!("watching {}", dir.display()))?;
        Ok(Watcher { fd })
    }

    /// Waits until something arrives or `timeout` passes, then drains the queued events.
    fn wait(&self, timeout: Duration) {
        use rustix::event::{PollFd, PollFlags, Timespec};
        let mut fds = [PollFd::new(&self.fd, PollFlags::IN)];
        let ts = Timespec {
            tv_sec: timeout.as_secs() as i64,
            tv_nsec: timeout.subsec_nanos() as i64,
        };
        let _ = rustix::event::poll(&mut fds, Some(&ts));
        let mut buf = [std::mem::MaybeUninit::<u8>::uninit(); 4096];
        let mut reader = inotify::Reader::new(&self.fd, &mut buf);
        while reader.next().is_ok() {}
    }
}
