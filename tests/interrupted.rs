//! Runs that end early: killed between deciding a job's fate and moving it (the next run keeps the
//! decision), and stopped with SIGTERM (the job in hand is finished, nothing is left half-done).

use std::fs;
use std::path::Path;
use std::process::Command;

fn config(dir: &Path) -> std::path::PathBuf {
    config_with(dir, "linger = \"0s\"")
}

fn config_with(dir: &Path, intake: &str) -> std::path::PathBuf {
    let templates = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/templates");
    let path = dir.join("docmail.toml");
    fs::write(
        &path,
        format!(
            "spool = \"{0}/spool\"\nfrom = \"billing@shop.example\"\n[transport]\nkind = \"maildir\"\npath = \"{0}/outbox\"\n\
             [templates]\ndir = \"{1}\"\n[intake]\n{2}\n",
            dir.display(),
            templates.display(),
            intake
        ),
    )
    .unwrap();
    path
}

/// An uploaded job, claimed into active/ by hand, as a killed run leaves it.
fn claimed_job(spool: &Path, id: &str, state: &str, reason: Option<&str>) {
    let job = spool.join("active").join(id);
    fs::create_dir_all(job.join("documents")).unwrap();
    let pdf =
        fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/jobs/INV-2026-000123.pdf"))
            .unwrap();
    fs::write(job.join("documents/doc.pdf"), &pdf).unwrap();
    fs::write(
        job.join("manifest.xml"),
        format!(
            "<job xmlns=\"urn:docmail:job:1\" id=\"{id}\"><to>jane@example.net</to>\
             <var name=\"customer_name\">Jane</var><var name=\"invoice_number\">{id}</var>\
             <attachment file=\"doc.pdf\"/></job>"
        ),
    )
    .unwrap();
    fs::write(job.join("state"), state).unwrap();
    if let Some(r) = reason {
        fs::write(job.join("reason"), r).unwrap();
    }
}

#[test]
fn a_job_the_killed_run_had_failed_is_failed_not_sent() {
    let dir = tempfile::tempdir().unwrap();
    let config = config(dir.path());
    let spool = dir.path().join("spool");
    for d in [
        "incoming", "active", "deferred", "failed", "sent", "receipts",
    ] {
        fs::create_dir_all(spool.join(d)).unwrap();
    }
    claimed_job(
        &spool,
        "FAILED-1",
        "attempts=0\nfailed=1\n",
        Some("Job FAILED-1 failed at now:\ndocument doc.pdf was replaced\n"),
    );
    claimed_job(&spool, "PENDING-1", "attempts=0\n", None);

    let out = Command::new(env!("CARGO_BIN_EXE_docmail"))
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");

    assert!(
        spool.join("failed/FAILED-1/reason").exists(),
        "the failed job stays failed: {stderr}"
    );
    assert!(
        spool.join("sent/PENDING-1").exists(),
        "the claimed job is delivered: {stderr}"
    );
    assert!(
        fs::read_dir(spool.join("active")).unwrap().next().is_none(),
        "active/ is empty"
    );
    let delivered = fs::read_dir(dir.path().join("outbox/new")).unwrap().count();
    assert_eq!(delivered, 1, "only the pending job is mailed");
    assert!(
        stderr.contains("job=FAILED-1 status=failed") && stderr.contains("was replaced"),
        "{stderr}"
    );
}

fn spool_dirs(spool: &Path) {
    for d in [
        "incoming", "active", "deferred", "failed", "sent", "receipts",
    ] {
        fs::create_dir_all(spool.join(d)).unwrap();
    }
}

fn count(dir: &Path, suffix: &str) -> usize {
    fs::read_dir(dir)
        .unwrap()
        .filter(|e| {
            e.as_ref()
                .unwrap()
                .file_name()
                .to_string_lossy()
                .ends_with(suffix)
        })
        .count()
}

#[test]
fn sigterm_finishes_the_job_in_hand_and_leaves_the_rest_in_the_drop() {
    use std::io::{BufRead, BufReader};
    use std::process::Stdio;

    let dir = tempfile::tempdir().unwrap();
    // A long linger: without SIGTERM handling the run would neither stop early nor exit 0.
    let config = config_with(dir.path(), "linger = \"60s\"");
    let spool = dir.path().join("spool");
    spool_dirs(&spool);
    let pdf =
        fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/jobs/INV-2026-000123.pdf"))
            .unwrap();
    let jobs = 400;
    for i in 0..jobs {
        fs::write(spool.join(format!("incoming/T{i}.pdf")), &pdf).unwrap();
        fs::write(
            spool.join(format!("incoming/T{i}.xml")),
            format!(
                "<job xmlns=\"urn:docmail:job:1\" id=\"T{i}\"><to>jane@example.net</to>\
                 <var name=\"customer_name\">Jane</var><var name=\"invoice_number\">T{i}</var>\
                 <attachment file=\"T{i}.pdf\"/></job>"
            ),
        )
        .unwrap();
    }
    let mut child = Command::new(env!("CARGO_BIN_EXE_docmail"))
        .args(["run", "--config"])
        .arg(&config)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Stop it as soon as the first job has gone out.
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut log = String::new();
    while !log.contains("status=sent") {
        assert!(
            stderr.read_line(&mut log).unwrap() > 0,
            "the run ended before sending: {log}"
        );
    }
    rustix::process::kill_process(
        rustix::process::Pid::from_child(&child),
        rustix::process::Signal::TERM,
    )
    .unwrap();
    let started = std::time::Instant::now();
    let status = child.wait().unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    log.push_str(&rest);
    assert!(
        status.success(),
        "SIGTERM ends the run with exit 0, not by the signal: {status:?}\n{log}"
    );
    assert!(
        started.elapsed().as_secs() < 30,
        "the run stopped promptly, not after its linger"
    );
    assert!(log.contains("stopping on request"), "{log}");

    // Nothing half-done: every job is either delivered or still whole in the drop.
    assert_eq!(
        fs::read_dir(spool.join("active")).unwrap().count(),
        0,
        "active/ is empty:\n{log}"
    );
    let sent = fs::read_dir(spool.join("sent")).unwrap().count();
    let waiting = count(&spool.join("incoming"), ".xml");
    assert_eq!(
        sent + waiting,
        jobs,
        "every job is in sent/ or still in the drop"
    );
    assert_eq!(
        count(&spool.join("incoming"), ".pdf"),
        waiting,
        "each waiting job still has its document"
    );
    assert_eq!(
        fs::read_dir(dir.path().join("outbox/new")).unwrap().count(),
        sent,
        "one message per sent job"
    );
    assert!(
        waiting > 0,
        "the run stopped before the end of the backlog ({sent} sent)"
    );
}
