//! The operator's view of the spool: `docmail queue` lists the jobs that are not done, `retry` makes
//! failed or deferred jobs due now, `remove` discards them. Changes are renames under the run lock, like
//! everything else that touches the spool.

use std::path::PathBuf;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{Context, bail};
use serde::Serialize;

use crate::config::Config;
use crate::error::Sysexit;
use crate::spool::{self, Place, Spool, State};

#[derive(Serialize)]
struct Entry {
    job: String,
    state: &'static str,
    age_seconds: u64,
    attempts: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    next_attempt: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<String>,
}

/// `docmail queue [--json]`.
pub fn queue(config: &Config, json: bool) -> anyhow::Result<()> {
    let spool = Spool::open(&config.spool).context(Sysexit::Config)?;
    let now = SystemTime::now();
    let mut entries = Vec::new();
    for place in [Place::Active, Place::Deferred, Place::Failed] {
        for dir in spool.jobs(place).context(Sysexit::IoErr)? {
            let state = State::read(&dir);
            let since = dir.metadata().and_then(|m| m.modified()).unwrap_or(now);
            // A deferred job's reason starts with when and which attempt; its cause (the server's
            // reply) is the last error, which is what the operator needs to see.
            let reason = match (&state.last_error, place) {
                (Some(error), Place::Deferred) => Some(crate::manifest::shorten(error)),
                _ => std::fs::read_to_string(dir.join(spool::REASON))
                    .ok()
                    .map(|r| summary(&r)),
            };
            entries.push(Entry {
                job: spool::job_name(&dir),
                state: place.dir_name(),
                age_seconds: now
                    .duration_since(state.first_attempt.unwrap_or(since))
                    .unwrap_or_default()
                    .as_secs(),
                attempts: state.attempts,
                next_attempt: state
                    .next_attempt
                    .filter(|_| place == Place::Deferred)
                    .map(spool::rfc3339),
                reason,
            });
        }
    }
    if json {
        println!("{}", serde_json::to_string_pretty(&entries)?);
        return Ok(());
    }
    if entries.is_empty() {
        println!("no jobs in active/, deferred/ or failed/");
        return Ok(());
    }
    println!(
        "{:<32} {:<9} {:>8} {:>8}  NEXT ATTEMPT / REASON",
        "JOB", "STATE", "AGE", "ATTEMPTS"
    );
    for e in entries {
        let age = humantime::format_duration(Duration::from_secs(e.age_seconds)).to_string();
        let age = age.split(' ').take(2).collect::<Vec<_>>().join(" ");
        let detail = match (&e.next_attempt, &e.reason) {
            (Some(next), Some(r)) => format!("{next}: {r}"),
            (None, Some(r)) => r.clone(),
            (Some(next), None) => next.clone(),
            (None, None) => String::new(),
        };
        println!(
            "{:<32} {:<9} {:>8} {:>8}  {}",
            e.job, e.state, age, e.attempts, detail
        );
    }
    Ok(())
}

/// The line of a reason file that says what failed.
fn summary(reason: &str) -> String {
    let mut lines = reason.lines().filter(|l| !l.trim().is_empty());
    let first = lines.next().unwrap_or("");
    // "Job X failed at T:" is followed by the cause itself.
    let line = if first.ends_with(':') {
        lines.next().unwrap_or(first)
    } else {
        first
    };
    crate::manifest::shorten(line)
}

/// `docmail retry ID... | --all-failed [--force]`: makes the jobs due now in `deferred/`.
pub fn retry(config: &Config, ids: &[String], all_failed: bool, force: bool) -> anyhow::Result<()> {
    let spool = locked(config)?;
    let mut jobs: Vec<PathBuf> = Vec::new();
    if all_failed {
        jobs.extend(spool.jobs(Place::Failed).context(Sysexit::IoErr)?);
    }
    for id in ids {
        match spool
            .find(Place::Failed, id)
            .or_else(|| spool.find(Place::Deferred, id))
        {
            Some(dir) => jobs.push(dir),
            None => bail!(
                anyhow::anyhow!("no job {id:?} in failed/ or deferred/ (see docmail queue)")
                    .context(Sysexit::DataErr)
            ),
        }
    }
    for dir in jobs {
        let mut state = State::read(&dir);
        // A retry starts the retry clock anew: the operator has fixed something.
        state.first_attempt = None;
        state.next_attempt = Some(SystemTime::now());
        state.force |= force;
        state.failed = false;
        spool.write_state(&dir, &state).context(Sysexit::IoErr)?;
        let _ = std::fs::remove_file(dir.join(spool::REASON));
        let name = spool::job_name(&dir);
        let dir = if dir.parent() == Some(spool.dir(Place::Deferred).as_path()) {
            dir
        } else {
            spool
                .move_job(&dir, Place::Deferred)
                .context(Sysexit::IoErr)?
        };
        println!(
            "{name}: due now as deferred/{}; the next run delivers it",
            spool::job_name(&dir)
        );
    }
    spool.sync().context(Sysexit::IoErr)?;
    Ok(())
}

/// `docmail remove ID...`: discards failed or deferred jobs for good.
pub fn remove(config: &Config, ids: &[String]) -> anyhow::Result<()> {
    let spool = locked(config)?;
    for id in ids {
        let Some(dir) = spool
            .find(Place::Failed, id)
            .or_else(|| spool.find(Place::Deferred, id))
        else {
            bail!(
                anyhow::anyhow!("no job {id:?} in failed/ or deferred/ (see docmail queue)")
                    .context(Sysexit::DataErr)
            );
        };
        spool
            .remove_job(&dir)
            .with_context(|| format!("removing {}", dir.display()))
            .context(Sysexit::IoErr)?;
        println!("{id}: removed");
    }
    spool.sync().context(Sysexit::IoErr)?;
    Ok(())
}

/// The spool with the run lock held; waits a little for a run to finish.
fn locked(config: &Config) -> anyhow::Result<Spool> {
    let mut spool = Spool::open(&config.spool).context(Sysexit::Config)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !spool.try_lock().context(Sysexit::IoErr)? {
        if Instant::now() >= deadline {
            bail!(
                anyhow::anyhow!(
                    "a docmail run holds the spool lock; try again when it has finished"
                )
                .context(Sysexit::TempFail)
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    Ok(spool)
}
