//! A backlog of 1,000 jobs goes out in one run over one SMTP connection, and every one arrives.

mod common;

use common::*;
use std::collections::BTreeSet;
use std::time::Duration;

const JOBS: usize = 1000;

#[test]
fn thousand_jobs_one_run_one_connection() {
    let mut site = Site::new();
    let peer = SmtpPeer::start(&site.root.join("peer"), &PeerOpts::default());
    site.cfg.transport = Transport::smtp(peer.url());
    site.write_config();

    let inc = site.incoming();
    for i in 0..JOBS {
        let id = format!("BULK-{i:05}");
        let mut job = Job::invoice(&id);
        let doc = pdf_bytes(i as u64, 1500);
        let a = &mut job.attachments[0];
        a.size = Some(doc.len().to_string());
        a.sha256 = Some(sha256_hex(&doc));
        a.content = doc;
        job.write_documents(&inc);
        job.write_manifest(&inc);
    }

    let out = site.run_ok();
    let msgs = peer.messages();
    assert_eq!(
        msgs.len(),
        JOBS,
        "all {JOBS} jobs must arrive at the server (run took {:?}); stderr tail:\n{}",
        out.elapsed,
        out.stderr
            .lines()
            .rev()
            .take(20)
            .collect::<Vec<_>>()
            .join("\n")
    );
    assert_eq!(
        peer.connections(),
        1,
        "the backlog must go over one reused SMTP connection"
    );
    assert_eq!(peer.sessions(), 1, "one SMTP session (one EHLO)");

    // Every job exactly once: distinct Message-IDs, one per id.
    let mut ids = BTreeSet::new();
    for m in &msgs {
        let p = m.parsed();
        let mid = p.message_id().expect("Message-ID").to_owned();
        let id = mid.split('.').next().unwrap().to_owned();
        assert!(ids.insert(id.clone()), "job {id} arrived twice");
    }
    let expected: BTreeSet<String> = (0..JOBS).map(|i| format!("BULK-{i:05}")).collect();
    assert_eq!(
        ids, expected,
        "every job arrived, identified by its Message-ID"
    );

    let sent = site.entries("sent");
    assert_eq!(sent.len(), JOBS, "all jobs in sent/");
    assert!(site.entries("incoming").is_empty(), "incoming/ empty");
    assert!(site.entries("active").is_empty(), "active/ empty");
    assert!(site.entries("failed").is_empty(), "failed/ empty");
    assert!(site.entries("deferred").is_empty(), "deferred/ empty");
    let sent_lines = out
        .stderr
        .lines()
        .filter(|l| l.contains("status=sent"))
        .count();
    assert_eq!(sent_lines, JOBS, "one status=sent log line per job");
    // A bound against pathological slowness only. With Nagle's algorithm on the client socket each
    // message waits for the server's delayed ACK (about 40 ms) before its final "\r\n.\r\n" leaves,
    // so 1,000 messages take about 50 s; with TCP_NODELAY a few seconds.
    assert!(
        out.elapsed < Duration::from_secs(90),
        "1,000 small jobs must not take minutes: {:?}",
        out.elapsed
    );
    eprintln!(
        "{JOBS} jobs delivered in {:?} ({:.1} ms per job)",
        out.elapsed,
        out.elapsed.as_secs_f64() * 1000.0 / JOBS as f64
    );
}
