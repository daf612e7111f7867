//! The retry lifecycle, against a real SMTP server that answers every RCPT with 451: the pause before
//! the next attempt doubles from `retry.first` up to `retry.max` (read from each deferral's reason and
//! `state`), and after `retry.give_up_after` the job fails with a reason that says so and carries the
//! last server reply. Also: documents no manifest names move to `failed/` after
//! `intake.orphan_after`, and not before.

mod support_faults;

use std::fs;
use std::thread;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support_faults::*;

fn unix() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs_f64()
}

/// The two times in a deferral's reason: "deferred at T1: …" and "next attempt is due at T2".
fn reason_times(reason: &str) -> (i64, i64) {
    let after = |marker: &str| {
        let i = reason
            .find(marker)
            .unwrap_or_else(|| panic!("no {marker:?} in reason:\n{reason}"));
        let t = &reason[i + marker.len()..];
        parse_time(&t[..20]).unwrap_or_else(|| panic!("no time after {marker:?}:\n{reason}"))
    };
    (after("deferred at "), after("due at "))
}

#[test]
fn backoff_doubles_up_to_max_then_gives_up() {
    let tmp = tempfile::tempdir().unwrap();
    let peer = Peer::fault(&tmp.path().join("peer"), "rcpt451");
    let mut site = Site::smtp(peer.port, "5s");
    let (first, max, give_up) = (1, 4, 12);
    site.extra = format!(
        "[retry]\nfirst = \"{first}s\"\nmax = \"{max}s\"\ngive_up_after = \"{give_up}s\"\n"
    );
    site.write_config();
    site.upload("RETRY-1", 1200);

    let started = unix();
    let mut pauses = Vec::new();
    let mut runs = 0;
    let mut first_attempt = None;
    loop {
        runs += 1;
        assert!(
            runs <= 12,
            "still not given up after {runs} runs: {pauses:?}"
        );
        let out = site.run();
        assert_eq!(out.code, 0, "{}", out.stderr);
        if site.jobs("failed") == ["RETRY-1"] {
            let line = out.job_lines("RETRY-1").join("\n");
            assert!(line.contains("status=failed"), "{line}");
            break;
        }
        assert_eq!(
            site.jobs("deferred"),
            ["RETRY-1"],
            "{}\n{}",
            site.describe(),
            out.stderr
        );
        let attempts: u32 = site
            .state_value("deferred", "RETRY-1", "attempts")
            .unwrap()
            .parse()
            .unwrap();
        assert_eq!(attempts as usize, pauses.len() + 1, "one attempt per run");
        let line = out.job_lines("RETRY-1").join("\n");
        assert!(
            line.contains(&format!("attempt={attempts} ")) && line.contains("451"),
            "{line}"
        );
        let reason = site.read("deferred", "RETRY-1", "reason");
        assert!(
            reason.contains("fault-peer"),
            "server reply in the reason: {reason}"
        );
        let (at, due) = reason_times(&reason);
        let next = site
            .state_value("deferred", "RETRY-1", "next_attempt")
            .and_then(|t| parse_time(&t))
            .unwrap();
        assert_eq!(next, due, "state and reason agree on the next attempt");
        let fa = site
            .state_value("deferred", "RETRY-1", "first_attempt")
            .and_then(|t| parse_time(&t))
            .unwrap();
        assert_eq!(*first_attempt.get_or_insert(fa), fa, "first_attempt stays");
        pauses.push(due - at);
        // Wait until it is due (the stored time is whole seconds), then run again.
        let wait = next as f64 + 0.2 - unix();
        if wait > 0.0 {
            thread::sleep(Duration::from_secs_f64(wait));
        }
    }
    println!(
        "retry: pauses between attempts {pauses:?} s, gave up after {} attempts in {:.1}s",
        pauses.len() + 1,
        unix() - started
    );
    // 1, 2, 4, then capped at 4.
    let expected: Vec<i64> = (0..pauses.len()).map(|n| (first << n).min(max)).collect();
    assert_eq!(
        pauses, expected,
        "backoff doubles from retry.first up to retry.max"
    );
    assert!(pauses.len() >= 4, "saw the cap: {pauses:?}");
    let reason = site.read("failed", "RETRY-1", "reason");
    assert!(
        reason.contains("retry.give_up_after") && reason.contains("gave up"),
        "the reason says it gave up: {reason}"
    );
    assert!(
        reason.contains("451") && reason.contains("fault-peer"),
        "the reason carries the last error: {reason}"
    );
    let elapsed_at_give_up = unix() - first_attempt.unwrap() as f64;
    assert!(
        elapsed_at_give_up >= give_up as f64,
        "gave up after {elapsed_at_give_up:.1}s, before retry.give_up_after ({give_up}s)"
    );
    assert!(peer.messages().is_empty());
    let receipt = fs::read_to_string(site.dir("receipts").join("RETRY-1.xml")).unwrap();
    assert!(receipt.contains("status=\"failed\""), "{receipt}");
}

#[test]
fn orphaned_documents_move_to_failed_after_orphan_after() {
    let tmp = tempfile::tempdir().unwrap();
    let peer = Peer::fault(&tmp.path().join("peer"), "ok");
    let mut site = Site::smtp(peer.port, "5s");
    site.intake = "settle = \"30s\"\nlinger = \"0s\"\norphan_after = \"2s\"\n".into();
    site.write_config();
    let inc = site.incoming();
    fs::create_dir_all(&inc).unwrap();
    let old = SystemTime::now() - Duration::from_secs(3600);
    for name in [
        "stray.pdf",
        "in-flight.pdf.part",
        ".hidden.pdf",
        "upload.tmp",
    ] {
        fs::write(inc.join(name), b"%PDF-1.4 nobody names me").unwrap();
        // Looks old (sftp -p keeps the original mtime), but has only just arrived.
        fs::File::options()
            .write(true)
            .open(inc.join(name))
            .unwrap()
            .set_modified(old)
            .unwrap();
    }
    // A complete job beside them is delivered as usual.
    site.upload("ORPHAN-NEIGHBOUR", 800);

    let out = site.run();
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(site.jobs("sent"), ["ORPHAN-NEIGHBOUR"]);
    assert!(
        inc.join("stray.pdf").exists(),
        "a document that arrived just now is no orphan yet, whatever its mtime says: {}",
        site.describe()
    );
    assert!(site.jobs("failed").is_empty());

    thread::sleep(Duration::from_millis(2300));
    let out = site.run();
    assert_eq!(out.code, 0, "{}", out.stderr);
    let failed = site.jobs("failed");
    assert_eq!(
        failed,
        ["orphan-stray.pdf"],
        "{}\n{}",
        site.describe(),
        out.stderr
    );
    let job = site.dir("failed").join(&failed[0]);
    let kept: Vec<String> = list(&job.join("documents"));
    let has_doc = kept == ["stray.pdf"] || job.join("manifest.xml").exists();
    assert!(
        has_doc,
        "the orphan is kept in its job directory: {:?}",
        list(&job)
    );
    let reason = site.read("failed", &failed[0], "reason");
    assert!(
        reason.contains("stray.pdf") && reason.contains("intake.orphan_after"),
        "{reason}"
    );
    let line = out.job_lines(&failed[0]).join("\n");
    assert!(line.contains("status=failed"), "{}", out.stderr);
    // Names the uploader uses for files in flight are never touched.
    for name in ["in-flight.pdf.part", ".hidden.pdf", "upload.tmp"] {
        assert!(inc.join(name).exists(), "{name} was touched");
    }
    assert!(!inc.join("stray.pdf").exists());
}
