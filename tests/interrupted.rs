//! Runs that end early: killed between deciding a job's fate and moving it (the next run keeps the
//! decision), and stopped with SIGTERM (the job in hand is finished, nothing is left half-done).

mod common;

use std::fs;
use std::time::Duration;

use common::*;

/// A job claimed into active/ by hand, as a killed run leaves it.
fn claimed(site: &Site, id: &str, state: &str, reason: Option<&str>) {
    let job = Job::invoice(id);
    let dir = site.dir("active").join(id);
    fs::create_dir_all(dir.join("documents")).unwrap();
    job.write_documents(&dir.join("documents"));
    fs::write(dir.join("manifest.xml"), job.xml()).unwrap();
    fs::write(dir.join("state"), state).unwrap();
    if let Some(r) = reason {
        fs::write(dir.join("reason"), r).unwrap();
    }
}

#[test]
fn a_job_the_killed_run_had_failed_is_failed_not_sent() {
    let site = Site::new();
    claimed(
        &site,
        "FAILED-1",
        "attempts=0\nfailed=1\n",
        Some("Job FAILED-1 failed at now:\ndocument FAILED-1.pdf was replaced\n"),
    );
    claimed(&site, "PENDING-1", "attempts=0\n", None);

    let out = site.run_ok();
    assert!(
        site.dir("failed/FAILED-1/reason").exists(),
        "the failed job stays failed: {}",
        out.stderr
    );
    assert!(
        site.dir("sent/PENDING-1").exists(),
        "the claimed job is delivered: {}",
        out.stderr
    );
    assert!(site.entries("active").is_empty(), "active/ is empty");
    assert_eq!(
        site.outbox_messages().len(),
        1,
        "only the pending job is mailed"
    );
    let line = out.job_lines("FAILED-1").join("\n");
    assert!(
        line.contains("status=failed") && line.contains("was replaced"),
        "{}",
        out.stderr
    );
}

#[test]
fn sigterm_finishes_the_job_in_hand_and_leaves_the_rest_in_the_drop() {
    let mut site = Site::new();
    // A long linger: without SIGTERM handling the run would neither stop early nor exit 0.
    site.cfg.linger = "60s".into();
    site.write_config();
    let jobs = 400;
    for i in 0..jobs {
        Job::invoice(&format!("T{i}")).drop_into(&site);
    }
    let run = site.spawn_run();
    // Stop it as soon as the first job has gone out.
    assert!(
        wait_until(Duration::from_secs(30), || !site.entries("sent").is_empty()),
        "nothing was sent"
    );
    let pid = rustix::process::Pid::from_raw(run.pid() as i32).unwrap();
    rustix::process::kill_process(pid, rustix::process::Signal::TERM).unwrap();
    let out = run.wait();
    assert_eq!(
        out.code, 0,
        "SIGTERM ends the run with exit 0, not by the signal:\n{}",
        out.stderr
    );
    assert!(
        out.elapsed < Duration::from_secs(30),
        "the run stopped promptly, not after its linger"
    );
    assert!(out.stderr.contains("stopping on request"), "{}", out.stderr);

    // Nothing half-done: every job is either delivered or still whole in the drop.
    assert!(
        site.entries("active").is_empty(),
        "active/ is empty:\n{}",
        out.stderr
    );
    let sent = site.entries("sent").len();
    let incoming = site.entries("incoming");
    let waiting = incoming.iter().filter(|n| n.ends_with(".xml")).count();
    assert_eq!(
        sent + waiting,
        jobs,
        "every job is in sent/ or still in the drop"
    );
    assert_eq!(
        incoming.len(),
        2 * waiting,
        "each waiting job still has its document"
    );
    assert_eq!(
        site.outbox_messages().len(),
        sent,
        "one message per sent job"
    );
    assert!(
        waiting > 0,
        "the run stopped before the end of the backlog ({sent} sent)"
    );
}
