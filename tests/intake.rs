//! Intake: in-place uploads (half-written manifests and documents), settle, jobs that never complete,
//! names that are never touched, duplicates and the run lock.

mod common;

use common::*;
use std::fs::{self, OpenOptions};
use std::io::Write;
use std::thread;
use std::time::Duration;

fn smtp_site(settle: &str) -> (Site, SmtpPeer) {
    let mut site = Site::new();
    let peer = SmtpPeer::start(&site.root.join("peer"), &PeerOpts::default());
    site.cfg.transport = Transport::smtp(peer.url());
    site.cfg.settle = settle.into();
    site.write_config();
    (site, peer)
}

fn append(path: &std::path::Path, data: &[u8]) {
    let mut f = OpenOptions::new().append(true).open(path).unwrap();
    f.write_all(data).unwrap();
    f.sync_all().unwrap();
}

#[test]
fn manifest_written_in_two_halves_is_delivered_once_complete() {
    let (site, peer) = smtp_site("10s");
    let id = "HALF-1";
    let job = Job::invoice(id);
    job.write_documents(&site.incoming());
    let xml = job.xml().into_bytes();
    let (first, second) = xml.split_at(xml.len() / 2);
    let mpath = site.incoming().join(job.manifest_name());
    fs::write(&mpath, first).unwrap();

    let run = site.spawn_run();
    thread::sleep(Duration::from_secs(1));
    assert_eq!(
        peer.message_count(),
        0,
        "nothing can be sent from half a manifest"
    );
    assert!(
        site.entries("failed").is_empty(),
        "a half-written manifest within settle must wait, not fail: {}",
        site.describe()
    );
    let t_complete = now_unix();
    append(&mpath, second);
    let out = run.wait();
    assert_eq!(out.code, 0, "exit code; stderr:\n{}", out.stderr);

    let msgs = peer.messages();
    assert_eq!(
        msgs.len(),
        1,
        "delivered exactly once; stderr:\n{}",
        out.stderr
    );
    assert!(
        msgs[0].time - t_complete < 5.0,
        "delivered promptly once complete ({:.1} s after the second half), not after settle",
        msgs[0].time - t_complete
    );
    assert_sent(&site, id);
    assert!(site.entries("failed").is_empty(), "nothing failed");
    assert!(
        out.elapsed < Duration::from_secs(9),
        "the run must not sit out the whole settle time once the job is complete ({:?})",
        out.elapsed
    );
}

#[test]
fn document_written_in_two_halves_is_delivered_once_complete() {
    let (site, peer) = smtp_site("10s");
    let id = "DOCHALF-1";
    let job = Job::invoice(id);
    let content = job.attachments[0].content.clone();
    let dpath = site.incoming().join(format!("{id}.pdf"));
    let (first, second) = content.split_at(content.len() / 2);
    fs::write(&dpath, first).unwrap();
    job.write_manifest(&site.incoming());

    let run = site.spawn_run();
    thread::sleep(Duration::from_secs(1));
    assert_eq!(peer.message_count(), 0, "a short document must not be sent");
    assert!(
        site.entries("failed").is_empty(),
        "a short document within settle must wait, not fail: {}",
        site.describe()
    );
    append(&dpath, second);
    let out = run.wait();
    assert_eq!(out.code, 0, "exit code; stderr:\n{}", out.stderr);
    let msgs = peer.messages();
    assert_eq!(msgs.len(), 1, "delivered once; stderr:\n{}", out.stderr);
    let p = msgs[0].parsed();
    assert!(
        p.attachments().next().map(|a| a.contents()) == Some(content.as_slice()),
        "the attachment is the complete document"
    );
    assert_sent(&site, id);
}

#[test]
fn sha256_never_matching_fails_after_settle_without_delaying_a_complete_job() {
    let (site, peer) = smtp_site("4s");
    // The bad job: the document never matches its sha256 (same size, different bytes).
    let mut bad = Job::invoice("SHA-BAD");
    let other = pdf_bytes(99, bad.attachments[0].content.len());
    bad.attachments[0].sha256 = Some(sha256_hex(&other));
    bad.drop_into(&site);
    let good = Job::invoice("SHA-GOOD");
    good.drop_into(&site);

    let t_start = now_unix();
    let out = site.run_ok();

    // The bad one: failed, after settle, with a reason naming sha256.
    assert!(
        site.dir("failed").join("SHA-BAD").is_dir(),
        "job in failed/; spool: {}\nstderr:\n{}",
        site.describe(),
        out.stderr
    );
    let reason = site.failed_reason("SHA-BAD");
    assert!(
        reason.contains("sha256"),
        "reason must name sha256: {reason:?}"
    );
    let t_failed = out
        .line_time(&["job=SHA-BAD ", "status=failed"])
        .unwrap_or_else(|| panic!("no status=failed line for SHA-BAD:\n{}", out.stderr));
    assert!(
        t_failed >= Duration::from_millis(3000),
        "a sha256 mismatch is waited for up to settle (4 s from the upload), failed after {t_failed:?}"
    );
    assert!(
        out.elapsed < Duration::from_secs(10),
        "the run waits at most settle: {:?}",
        out.elapsed
    );

    // The good one: delivered without waiting for the bad one's settle.
    let msgs = peer.messages();
    assert_eq!(
        msgs.len(),
        1,
        "only the good job arrives; stderr:\n{}",
        out.stderr
    );
    assert!(
        msgs[0]
            .parsed()
            .message_id()
            .unwrap_or("")
            .contains("SHA-GOOD"),
        "the delivered message is the good job"
    );
    assert!(
        msgs[0].time - t_start < 2.0,
        "the complete job must arrive at once, not after settle: {:.2} s after the run started",
        msgs[0].time - t_start
    );
    let t_sent = out
        .line_time(&["job=SHA-GOOD ", "status=sent"])
        .unwrap_or_else(|| panic!("no status=sent line for SHA-GOOD:\n{}", out.stderr));
    assert!(
        t_sent < t_failed,
        "the complete job was logged sent ({t_sent:?}) before the waiting one failed ({t_failed:?})"
    );
    assert_sent(&site, "SHA-GOOD");
}

#[test]
fn manifest_that_never_parses_fails_after_settle() {
    let site = Site::new();
    let job = Job::invoice("TRUNC-1");
    job.write_documents(&site.incoming());
    let xml = job.xml();
    fs::write(
        site.incoming().join("TRUNC-1.xml"),
        &xml[..xml.len() * 2 / 3],
    )
    .unwrap();
    let good = Job::invoice("TRUNC-OK");
    good.drop_into(&site);

    let out = site.run_ok();
    let failed = site.entries("failed");
    assert_eq!(
        failed,
        vec!["TRUNC-1".to_string()],
        "the unparseable manifest fails after settle (failed/ named by its file stem); stderr:\n{}",
        out.stderr
    );
    let reason = site.failed_reason("TRUNC-1");
    assert!(
        reason.contains("TRUNC-1.xml") || reason.to_ascii_lowercase().contains("xml"),
        "reason must say the manifest is not valid XML: {reason:?}"
    );
    assert_eq!(site.outbox_messages().len(), 1, "the good job is delivered");
    assert_sent(&site, "TRUNC-OK");
}

#[test]
fn missing_document_fails_after_settle_naming_the_file() {
    let site = Site::new();
    let mut job = Job::invoice("NODOC-1");
    job.attachments[0].write = false;
    job.drop_into(&site);
    Job::invoice("NODOC-OK").drop_into(&site);

    let out = site.run_ok();
    assert!(
        site.dir("failed").join("NODOC-1").is_dir(),
        "a document that never arrives fails the job after settle; spool: {}\nstderr:\n{}",
        site.describe(),
        out.stderr
    );
    let reason = site.failed_reason("NODOC-1");
    assert!(
        reason.contains("NODOC-1.pdf"),
        "reason must name the missing file: {reason:?}"
    );
    assert_eq!(site.outbox_messages().len(), 1, "the good job is delivered");
    assert_sent(&site, "NODOC-OK");
}

#[test]
fn hidden_part_tmp_names_and_orphans_are_left_alone() {
    let site = Site::new();
    let inc = site.incoming();
    // Complete jobs under names docmail must never touch.
    let mut untouched = Vec::new();
    for (i, name) in [".upload.xml", "SKIP-2.xml.part", "SKIP-3.xml.tmp"]
        .iter()
        .enumerate()
    {
        let job = Job::invoice(&format!("SKIP-{}", i + 1));
        job.write_documents(&inc);
        fs::write(inc.join(name), job.xml()).unwrap();
        untouched.push(name.to_string());
        untouched.push(format!("SKIP-{}.pdf", i + 1));
    }
    // A document that no manifest names: left for orphan_after (1 day by default).
    fs::write(inc.join("orphan.pdf"), pdf_bytes(1, 500)).unwrap();
    untouched.push("orphan.pdf".into());
    let good = Job::invoice("SEEN-1");
    good.drop_into(&site);

    let out = site.run_ok();
    let mut expected = untouched.clone();
    expected.sort();
    assert_eq!(
        site.entries("incoming"),
        expected,
        "only the complete job may leave incoming/; stderr:\n{}",
        out.stderr
    );
    let msgs = site.outbox_messages();
    assert_eq!(msgs.len(), 1, "only SEEN-1 is delivered");
    assert_sent(&site, "SEEN-1");
    assert!(
        site.entries("failed").is_empty(),
        "nothing failed: {:?}",
        site.entries("failed")
    );
}

#[test]
fn an_id_already_sent_is_not_mailed_again() {
    let site = Site::new();
    Job::invoice("DUP-1").drop_into(&site);
    site.run_ok();
    assert_eq!(site.outbox_messages().len(), 1, "first upload delivered");
    assert_sent(&site, "DUP-1");

    Job::invoice("DUP-1").drop_into(&site);
    let out = site.run_ok();
    assert_eq!(
        site.outbox_messages().len(),
        1,
        "a second job with a sent id must not be mailed; stderr:\n{}",
        out.stderr
    );
    let failed = site.entries("failed");
    assert_eq!(
        failed.len(),
        1,
        "the duplicate goes to failed/: {}",
        site.describe()
    );
    let reason = site.failed_reason(&failed[0]);
    assert!(
        reason.to_ascii_lowercase().contains("duplicate")
            || reason.to_ascii_lowercase().contains("already"),
        "reason must say it is a duplicate: {reason:?}"
    );
    assert!(
        site.dir("sent").join("DUP-1").is_dir(),
        "the original stays in sent/"
    );
}

#[test]
fn second_run_while_one_is_active_exits_0_and_takes_nothing() {
    let mut site = Site::new();
    site.cfg.settle = "6s".into();
    site.write_config();
    // Keep the first run busy: a manifest that is half written.
    let job = Job::invoice("LOCK-1");
    job.write_documents(&site.incoming());
    let xml = job.xml();
    let mpath = site.incoming().join(job.manifest_name());
    fs::write(&mpath, &xml[..xml.len() / 2]).unwrap();
    let first = site.spawn_run();
    thread::sleep(Duration::from_millis(700));

    Job::invoice("LOCK-2").drop_into(&site);
    let second = site.run();
    assert_eq!(
        second.code, 0,
        "a second run finds the lock, says so and exits 0; stderr:\n{}",
        second.stderr
    );
    assert!(
        second.elapsed < Duration::from_secs(3),
        "the second run must not wait for the first: {:?}",
        second.elapsed
    );
    assert!(
        second.job_lines("LOCK-2").is_empty(),
        "the second run must not deliver (the first one will): {}",
        second.stderr
    );
    append(&mpath, &xml.as_bytes()[xml.len() / 2..]);
    let out = first.wait();
    assert_eq!(out.code, 0, "first run; stderr:\n{}", out.stderr);
    // The path unit would start another run if anything is left; do the same.
    let again = site.run_ok();
    assert_eq!(
        site.outbox_messages().len(),
        2,
        "both jobs delivered, each once; stderr:\n{}{}",
        out.stderr,
        again.stderr
    );
    assert_sent(&site, "LOCK-1");
    assert_sent(&site, "LOCK-2");
}

#[test]
fn empty_drop_with_linger_0_exits_at_once() {
    let site = Site::new();
    let out = site.run_ok();
    assert!(
        out.elapsed < Duration::from_millis(1500),
        "an empty drop with linger = 0s: the run exits at once ({:?})",
        out.elapsed
    );
}

#[test]
fn linger_delivers_a_job_that_arrives_after_the_drop_was_empty() {
    let mut site = Site::new();
    site.cfg.linger = "3s".into();
    site.write_config();
    let run = site.spawn_run();
    thread::sleep(Duration::from_millis(800));
    Job::invoice("LATE-1").drop_into(&site);
    let out = run.wait();
    assert_eq!(out.code, 0, "exit 0; stderr:\n{}", out.stderr);
    assert_eq!(
        site.outbox_messages().len(),
        1,
        "a job arriving while the run lingers is delivered by it; stderr:\n{}",
        out.stderr
    );
    assert_sent(&site, "LATE-1");
    assert!(
        out.elapsed < Duration::from_secs(9),
        "the run exits about linger after the drop went quiet: {:?}",
        out.elapsed
    );
}

#[test]
fn orphan_documents_go_to_failed_after_orphan_after() {
    let mut site = Site::new();
    site.cfg.orphan_after = Some("1s".into());
    site.write_config();
    fs::write(site.incoming().join("stray.pdf"), pdf_bytes(3, 700)).unwrap();
    thread::sleep(Duration::from_millis(1300));
    let out = site.run_ok();
    assert!(
        !site.incoming().join("stray.pdf").exists(),
        "a document no manifest names is moved out after orphan_after; stderr:\n{}",
        out.stderr
    );
    let failed = site.entries("failed");
    assert_eq!(
        failed.len(),
        1,
        "the orphan lands in failed/: {}",
        site.describe()
    );
    let reason = site.failed_reason(&failed[0]);
    assert!(
        reason.contains("stray.pdf"),
        "the reason names the file: {reason:?}"
    );
}

#[test]
fn a_symlinked_manifest_is_not_followed() {
    let site = Site::new();
    let job = Job::invoice("LINKED-1");
    job.write_documents(&site.incoming());
    let outside = site.root.join("outside.xml");
    fs::write(&outside, job.xml()).unwrap();
    std::os::unix::fs::symlink(&outside, site.incoming().join("LINKED-1.xml")).unwrap();
    Job::invoice("PLAIN-OK").drop_into(&site);
    let out = site.run_ok();
    assert_eq!(
        site.outbox_messages().len(),
        1,
        "only the plain job is delivered; stderr:\n{}",
        out.stderr
    );
    assert!(
        site.dir("failed").join("LINKED-1").is_dir(),
        "the symlinked manifest fails: {}",
        site.describe()
    );
    let reason = site.failed_reason("LINKED-1");
    assert!(
        reason.contains("symbolic link") || reason.contains("symlink"),
        "reason: {reason:?}"
    );
    assert!(outside.exists(), "the file outside the drop is left alone");
}
