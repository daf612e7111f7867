//! Idempotency and the operator's commands: a job whose id was already sent is not mailed again but
//! quarantined in `failed/` as a duplicate whose reason says when it went out; `docmail retry` alone
//! does not change that, `docmail retry --force ID` sends it (with the same Message-ID); `queue`,
//! `queue --json`, `retry` and `remove` behave as the contract says, against a real SMTP server.

mod support_faults;

use std::time::Duration;

use support_faults::*;

const LIMIT: Duration = Duration::from_secs(60);

fn queue_json(site: &Site) -> Vec<serde_json::Value> {
    let out = site.docmail(&["queue", "--json"], LIMIT);
    assert_eq!(out.code, 0, "queue --json: {}", out.stderr);
    serde_json::from_str::<serde_json::Value>(&out.stdout)
        .unwrap_or_else(|e| panic!("queue --json printed no JSON ({e}): {}", out.stdout))
        .as_array()
        .expect("queue --json prints an array")
        .clone()
}

fn entry<'a>(entries: &'a [serde_json::Value], job: &str) -> &'a serde_json::Value {
    entries
        .iter()
        .find(|e| e["job"] == job)
        .unwrap_or_else(|| panic!("job {job} not in queue --json: {entries:?}"))
}

#[test]
fn a_job_sent_before_is_a_duplicate_until_retry_force() {
    let tmp = tempfile::tempdir().unwrap();
    let peer = Peer::fault(&tmp.path().join("peer"), "ok");
    let site = Site::smtp(peer.port, "10s");

    site.upload("IDEM-1", 900);
    let first = site.run();
    assert_eq!(first.code, 0, "{}", first.stderr);
    assert_eq!(site.jobs("sent"), ["IDEM-1"], "{}", first.stderr);
    assert_eq!(peer.messages().len(), 1);
    let sent_at = site.state_value("sent", "IDEM-1", "sent_at").unwrap();
    let message_id = site.state_value("sent", "IDEM-1", "message_id").unwrap();
    assert_eq!(message_id_of(&peer.messages()[0]), message_id);

    // The back office uploads the same job again (a retried cron run, say).
    site.upload("IDEM-1", 900);
    let second = site.run();
    assert_eq!(
        second.code, 0,
        "a duplicate is a job failure, not a run failure"
    );
    assert_eq!(peer.messages().len(), 1, "a duplicate must not be mailed");
    assert_eq!(site.jobs("failed"), ["IDEM-1"], "{}", site.describe());
    assert!(site.jobs("incoming").is_empty());
    let reason = site.read("failed", "IDEM-1", "reason");
    assert!(
        reason.contains("duplicate") && reason.contains(&sent_at),
        "the reason must say it is a duplicate and when the job went out ({sent_at}): {reason}"
    );
    assert!(
        reason.contains("retry --force IDEM-1"),
        "the reason should say how to send it anyway: {reason}"
    );
    let line = second.job_lines("IDEM-1").join("\n");
    assert!(
        line.contains("status=failed") && line.contains("duplicate"),
        "log line: {line}"
    );

    // queue shows it, with the reason; --json too.
    let text = site.docmail(&["queue"], LIMIT);
    assert_eq!(text.code, 0);
    let row = text
        .stdout
        .lines()
        .find(|l| l.starts_with("IDEM-1 "))
        .unwrap_or_else(|| panic!("queue does not list IDEM-1:\n{}", text.stdout));
    assert!(
        row.contains("failed") && row.contains("duplicate"),
        "row: {row}"
    );
    let q = queue_json(&site);
    let e = entry(&q, "IDEM-1");
    assert_eq!(e["state"], "failed");
    assert!(e["reason"].as_str().unwrap_or("").contains("duplicate"));
    assert!(e["age_seconds"].is_u64());

    // A plain retry makes it due again, but it is still a duplicate: not mailed.
    let retry = site.docmail(&["retry", "IDEM-1"], LIMIT);
    assert_eq!(retry.code, 0, "{}", retry.stderr);
    assert_eq!(site.jobs("deferred"), ["IDEM-1"]);
    let q = queue_json(&site);
    let e = entry(&q, "IDEM-1");
    assert_eq!(e["state"], "deferred");
    assert!(
        e["next_attempt"]
            .as_str()
            .is_some_and(|t| parse_time(t).is_some()),
        "a due job shows its next attempt: {e}"
    );
    let third = site.run();
    assert_eq!(third.code, 0);
    assert_eq!(
        peer.messages().len(),
        1,
        "retry without --force must not resend"
    );
    assert_eq!(site.jobs("failed"), ["IDEM-1"], "{}", third.stderr);
    assert!(
        site.read("failed", "IDEM-1", "reason")
            .contains("duplicate")
    );

    // retry --force sends it, with the Message-ID of the same upload.
    let force = site.docmail(&["retry", "--force", "IDEM-1"], LIMIT);
    assert_eq!(force.code, 0, "{}", force.stderr);
    let fourth = site.run();
    assert_eq!(fourth.code, 0, "{}", fourth.stderr);
    let msgs = peer.messages();
    assert_eq!(msgs.len(), 2, "retry --force must send: {}", fourth.stderr);
    assert_eq!(message_id_of(&msgs[1]), message_id);
    assert!(site.jobs("failed").is_empty(), "{}", site.describe());
    assert_eq!(
        site.jobs("sent").len(),
        2,
        "both deliveries are archived: {}",
        site.describe()
    );
    // The second delivery is archived (and logged, and receipted) under the job directory's name.
    assert!(
        fourth.stderr.lines().any(|l| l.starts_with("job=IDEM-1")
            && l.contains("status=sent")
            && l.contains(&message_id)),
        "{}",
        fourth.stderr
    );
    // Nothing else was lost or made up along the way.
    let c = site.census();
    assert_eq!((c.manifests, c.documents), (2, 2), "{c:?}");
}

fn xml_escaped(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
}

fn message_id_of(raw: &[u8]) -> String {
    message_id(raw).expect("a Message-ID header")
}

#[test]
fn the_receipt_of_a_sent_job_survives_a_duplicate_upload() {
    // The back office may fetch receipts only on its next cron run; by then a duplicate upload must
    // not have hidden the fact that the job was sent.
    let tmp = tempfile::tempdir().unwrap();
    let peer = Peer::fault(&tmp.path().join("peer"), "ok");
    let site = Site::smtp(peer.port, "10s");
    site.upload("IDEM-R", 700);
    assert_eq!(site.run().code, 0);
    let receipt = site.dir("receipts").join("IDEM-R.xml");
    let sent = std::fs::read_to_string(&receipt).unwrap();
    assert!(sent.contains("status=\"sent\""), "{sent}");
    site.upload("IDEM-R", 700);
    assert_eq!(site.run().code, 0);
    assert_eq!(peer.messages().len(), 1);
    // The first receipt still says sent; the duplicate's receipt stands beside it and says that (and
    // when, and with which Message-ID) the job went out.
    let after = std::fs::read_to_string(&receipt).unwrap();
    assert_eq!(
        after, sent,
        "receipts/IDEM-R.xml was replaced by the duplicate's receipt"
    );
    let message_id = site.state_value("sent", "IDEM-R", "message_id").unwrap();
    let sent_at = site.state_value("sent", "IDEM-R", "sent_at").unwrap();
    let duplicate =
        std::fs::read_to_string(site.dir("receipts").join("IDEM-R.duplicate.xml")).unwrap();
    assert!(
        duplicate.contains("status=\"failed\"")
            && duplicate.contains("already sent")
            && duplicate.contains(&xml_escaped(&message_id))
            && duplicate.contains(&sent_at),
        "receipts/IDEM-R.duplicate.xml does not say the job was sent ({message_id} at {sent_at}):\n{duplicate}"
    );
}

#[test]
fn queue_retry_and_remove_as_the_spec_says() {
    let tmp = tempfile::tempdir().unwrap();
    // RCPT answers 451: the job is deferred with the server's reply.
    let peer = Peer::fault(&tmp.path().join("peer"), "rcpt451");
    let site = Site::smtp(peer.port, "10s");

    let empty = site.docmail(&["queue"], LIMIT);
    assert_eq!(empty.code, 0);
    assert!(
        empty.stdout.contains("no jobs"),
        "empty queue: {}",
        empty.stdout
    );
    assert_eq!(queue_json(&site), Vec::<serde_json::Value>::new());

    site.upload("Q-DEFER", 600);
    // A manifest that names an unknown element fails at once.
    put(&site.incoming(), "Q-BAD.xml", b"<job xmlns=\"urn:docmail:job:1\" id=\"Q-BAD\"><to>a@example.net</to><color>red</color><attachment file=\"x.pdf\"/></job>");
    let run = site.run();
    assert_eq!(run.code, 0, "{}", run.stderr);
    assert_eq!(site.jobs("deferred"), ["Q-DEFER"], "{}", run.stderr);
    assert_eq!(site.jobs("failed"), ["Q-BAD"], "{}", run.stderr);

    let q = queue_json(&site);
    assert_eq!(q.len(), 2, "{q:?}");
    let d = entry(&q, "Q-DEFER");
    assert_eq!(d["state"], "deferred");
    assert_eq!(d["attempts"], 1);
    assert!(d["next_attempt"].as_str().is_some(), "{d}");
    assert!(
        site.read("deferred", "Q-DEFER", "reason")
            .contains("fault-peer"),
        "the reason carries the server's reply: {}",
        site.read("deferred", "Q-DEFER", "reason")
    );
    // What the operator sees in the queue is the cause, not boilerplate cut off before it.
    assert!(
        d["reason"].as_str().unwrap_or("").contains("451"),
        "queue shows the server's reply for a deferred job: {d}"
    );
    let f = entry(&q, "Q-BAD");
    assert_eq!(f["state"], "failed");
    assert!(
        f["reason"].as_str().unwrap_or("").contains("color"),
        "the reason names the problem: {f}"
    );
    let text = site.docmail(&["queue"], LIMIT);
    for job in ["Q-DEFER", "Q-BAD"] {
        assert!(text.stdout.contains(job), "{}", text.stdout);
    }

    // Unknown ids: bad input data (65), nothing changes.
    for args in [&["retry", "NOPE"][..], &["remove", "NOPE"][..]] {
        let out = site.docmail(args, LIMIT);
        assert_eq!(out.code, 65, "{args:?}: {}", out.stderr);
        assert!(
            out.stderr.contains("NOPE"),
            "{args:?} names the id: {}",
            out.stderr
        );
    }
    // Usage errors: 64.
    assert_eq!(site.docmail(&["retry"], LIMIT).code, 64);
    assert_eq!(site.docmail(&["remove"], LIMIT).code, 64);

    // retry --all-failed makes every failed job due now in deferred/.
    let all = site.docmail(&["retry", "--all-failed"], LIMIT);
    assert_eq!(all.code, 0, "{}", all.stderr);
    assert!(site.jobs("failed").is_empty());
    assert_eq!(site.jobs("deferred"), ["Q-BAD", "Q-DEFER"]);
    let q = queue_json(&site);
    assert_eq!(entry(&q, "Q-BAD")["state"], "deferred");

    // The next run tries it again: still invalid, back to failed/ with the reason.
    let run = site.run();
    assert_eq!(run.code, 0);
    assert_eq!(site.jobs("failed"), ["Q-BAD"], "{}", run.stderr);
    assert!(site.read("failed", "Q-BAD", "reason").contains("color"));

    // remove discards failed and deferred jobs for good.
    let rm = site.docmail(&["remove", "Q-BAD", "Q-DEFER"], LIMIT);
    assert_eq!(rm.code, 0, "{}", rm.stderr);
    assert!(site.jobs("failed").is_empty() && site.jobs("deferred").is_empty());
    assert!(queue_json(&site).is_empty());
    assert!(peer.messages().is_empty());
}

#[test]
fn a_second_duplicate_is_told_the_name_it_has_in_failed() {
    let tmp = tempfile::tempdir().unwrap();
    let peer = Peer::fault(&tmp.path().join("peer"), "ok");
    let site = Site::smtp(peer.port, "10s");
    for _ in 0..3 {
        site.upload("IDEM-N", 900);
        let run = site.run();
        assert_eq!(run.code, 0, "{}", run.stderr);
    }
    assert_eq!(peer.messages().len(), 1, "duplicates are not mailed");
    assert_eq!(
        site.jobs("failed"),
        ["IDEM-N", "IDEM-N.2"],
        "{}",
        site.describe()
    );
    // The commands in the reason name the job directory, which is not the id for the second one.
    let reason = site.read("failed", "IDEM-N.2", "reason");
    assert!(
        reason.contains("retry --force IDEM-N.2") && reason.contains("docmail remove IDEM-N.2"),
        "{reason}"
    );
}
