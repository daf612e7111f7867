//! A run killed between deciding a job's fate and moving it: the next run keeps the decision.

use std::fs;
use std::path::Path;
use std::process::Command;

fn config(dir: &Path) -> std::path::PathBuf {
    let templates = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/templates");
    let path = dir.join("docmail.toml");
    fs::write(
        &path,
        format!(
            "spool = \"{0}/spool\"\nfrom = \"billing@shop.example\"\n[transport]\nkind = \"maildir\"\npath = \"{0}/outbox\"\n\
             [templates]\ndir = \"{1}\"\n[intake]\nlinger = \"0s\"\n",
            dir.display(),
            templates.display()
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
