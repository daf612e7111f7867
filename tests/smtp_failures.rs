//! Temporary and permanent SMTP failures: nothing listening defers the job with a next-attempt time, a
//! later run with the server up and the attempt due sends it; 550 on RCPT fails the job with the server's
//! reply; 451 defers it.

mod common;

use common::*;
use std::fs;
use std::thread;
use std::time::Duration;

fn state_value(state: &[(String, String)], key: &str) -> Option<String> {
    state.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone())
}

/// Rewrite `next_attempt=` in deferred/ID/state to a time in the past.
fn make_due(site: &Site, id: &str) {
    let p = site.dir("deferred").join(id).join("state");
    let text = fs::read_to_string(&p).unwrap();
    let past = format_rfc3339_utc(now_unix() as i64 - 60);
    let mut found = false;
    let new: String = text
        .lines()
        .map(|l| {
            if l.trim_start().starts_with("next_attempt=") {
                found = true;
                format!("next_attempt={past}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    assert!(found, "state has no next_attempt= line:\n{text}");
    fs::write(&p, new).unwrap();
}

#[test]
fn server_down_defers_then_sends_when_due() {
    let port = free_port();
    let site = Site::smtp(&format!("smtp://127.0.0.1:{port}"));
    let id = "DOWN-1";
    let job = Job::invoice(id);
    let upload = job.attachments[0].content.clone();
    job.drop_into(&site);

    // 1. Nothing listens: deferred with attempts=1 and next_attempt about retry.first (1 min) ahead.
    let t0 = now_unix() as i64;
    let out = site.run_ok();
    assert!(
        site.dir("deferred").join(id).is_dir(),
        "connection refused is temporary: job must be in deferred/; spool: {}\nstderr:\n{}",
        site.describe(),
        out.stderr
    );
    for d in ["sent", "failed", "active"] {
        assert!(
            !site.dir(d).join(id).exists(),
            "job must not be in {d}/ as well"
        );
    }
    assert!(
        site.entries("incoming").is_empty(),
        "the deferred job left incoming/: {:?}",
        site.entries("incoming")
    );
    let state = site.deferred_state(id);
    assert_eq!(
        state_value(&state, "attempts").as_deref(),
        Some("1"),
        "state: {state:?}"
    );
    let next = state_value(&state, "next_attempt").expect("next_attempt= in state");
    let next_t = parse_rfc3339_utc(&next)
        .unwrap_or_else(|| panic!("next_attempt {next:?} is not RFC 3339 UTC"));
    assert!(
        next_t >= t0 + 50 && next_t <= t0 + 120,
        "next_attempt {next} must be retry.first (1m) after the attempt (now {})",
        format_rfc3339_utc(t0)
    );
    assert!(
        site.dir("deferred").join(id).join("reason").is_file(),
        "deferred/{id}/reason must say why"
    );
    let lines = out.job_lines(id);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("status=deferred") && l.contains("next_attempt=")),
        "log line status=deferred with next_attempt; stderr:\n{}",
        out.stderr
    );

    // 2. Server up, but the attempt is not due: the run leaves the job alone.
    let peer = SmtpPeer::start(
        &site.root.join("peer"),
        &PeerOpts {
            port,
            ..PeerOpts::default()
        },
    );
    let out = site.run_ok();
    assert_eq!(
        peer.message_count(),
        0,
        "a deferred job must wait for next_attempt; stderr:\n{}",
        out.stderr
    );
    assert!(
        site.dir("deferred").join(id).is_dir(),
        "still deferred before next_attempt"
    );

    // 3. Attempt due: sent.
    make_due(&site, id);
    let out = site.run_ok();
    let msgs = peer.messages();
    assert_eq!(
        msgs.len(),
        1,
        "the due retry must be delivered; stderr:\n{}",
        out.stderr
    );
    let p = msgs[0].parsed();
    assert!(
        p.attachments().next().map(|a| a.contents()) == Some(upload.as_slice()),
        "attachment byte-identical after the retry"
    );
    assert_sent(&site, id);
    assert!(
        site.entries("deferred").is_empty(),
        "deferred/ empty: {:?}",
        site.entries("deferred")
    );
}

#[test]
fn backoff_doubles_up_to_max_and_a_due_retry_is_sent() {
    let port = free_port();
    let mut site = Site::smtp(&format!("smtp://127.0.0.1:{port}"));
    site.cfg.retry_first = "10s".into();
    site.cfg.retry_max = "30s".into();
    site.write_config();
    let id = "BACKOFF-1";
    Job::invoice(id).drop_into(&site);

    // Attempts 1, 2, 3 with the server down; each made due by rewriting next_attempt.
    // Expected pauses: 10 s, 20 s (doubled), 30 s (40 s capped by retry.max).
    for (attempt, pause) in [(1, 10), (2, 20), (3, 30)] {
        if attempt > 1 {
            make_due(&site, id);
        }
        let t = now_unix();
        let out = site.run_ok();
        let state = site.deferred_state(id);
        assert_eq!(
            state_value(&state, "attempts"),
            Some(attempt.to_string()),
            "attempt {attempt} while the server is down; stderr:\n{}",
            out.stderr
        );
        let next = state_value(&state, "next_attempt").expect("next_attempt");
        let next_t = parse_rfc3339_utc(&next).expect("next_attempt RFC 3339") as f64;
        let delay = next_t - t;
        assert!(
            delay > pause as f64 - 2.0 && delay < pause as f64 + 2.0,
            "after attempt {attempt} the pause must be {pause} s (doubling from retry.first = 10s, \
             capped at retry.max = 30s); next_attempt {next} is {delay:.1} s after the attempt"
        );
    }

    let peer = SmtpPeer::start(
        &site.root.join("peer"),
        &PeerOpts {
            port,
            ..PeerOpts::default()
        },
    );
    make_due(&site, id);
    let out = site.run_ok();
    assert_eq!(
        peer.message_count(),
        1,
        "server up and attempt due: sent; stderr:\n{}",
        out.stderr
    );
    assert_sent(&site, id);
}

#[test]
fn retry_first_elapses_by_itself() {
    // No rewriting: retry.first = 1s, wait it out, and the next run delivers.
    let port = free_port();
    let mut site = Site::smtp(&format!("smtp://127.0.0.1:{port}"));
    site.cfg.retry_first = "1s".into();
    site.write_config();
    let id = "WAIT-1";
    Job::invoice(id).drop_into(&site);
    site.run_ok();
    let next = parse_rfc3339_utc(
        &state_value(&site.deferred_state(id), "next_attempt").expect("next_attempt"),
    )
    .expect("RFC 3339");
    let peer = SmtpPeer::start(
        &site.root.join("peer"),
        &PeerOpts {
            port,
            ..PeerOpts::default()
        },
    );
    while (now_unix() as i64) <= next {
        thread::sleep(Duration::from_millis(100));
    }
    let out = site.run_ok();
    assert_eq!(
        peer.message_count(),
        1,
        "the retry is due after retry.first: sent; stderr:\n{}",
        out.stderr
    );
    assert_sent(&site, id);
}

#[test]
fn rcpt_550_fails_with_the_server_reply_and_others_go_out() {
    let mut site = Site::new();
    let peer = SmtpPeer::start(
        &site.root.join("peer"),
        &PeerOpts {
            reject_rcpt: Some("^nobody@".into()),
            ..PeerOpts::default()
        },
    );
    site.cfg.transport = Transport::smtp(peer.url());
    site.write_config();

    let mut bad = Job::invoice("REJ-1");
    bad.to = vec![(Some("No Body".into()), "nobody@example.net".into())];
    bad.drop_into(&site);
    let good = Job::invoice("OK-1");
    good.drop_into(&site);

    let out = site.run_ok();
    assert!(
        site.dir("failed").join("REJ-1").is_dir(),
        "550 is permanent: job in failed/; spool: {}\nstderr:\n{}",
        site.describe(),
        out.stderr
    );
    assert!(
        !site.dir("deferred").join("REJ-1").exists(),
        "a 550 must not be deferred"
    );
    let reason = site.failed_reason("REJ-1");
    assert!(
        reason.contains("Recipient address rejected: no such mailbox at test peer"),
        "the reason must carry the server's reply text: {reason:?}"
    );
    assert!(
        reason.contains("550"),
        "the reason should carry the reply code 550: {reason:?}"
    );

    let msgs = peer.messages();
    assert_eq!(
        msgs.len(),
        1,
        "the other job is delivered; stderr:\n{}",
        out.stderr
    );
    assert_eq!(msgs[0].rcpt_to, vec!["jane.doe@example.net".to_string()]);
    assert_sent(&site, "OK-1");
}

#[test]
fn rcpt_451_defers() {
    let mut site = Site::new();
    let peer = SmtpPeer::start(
        &site.root.join("peer"),
        &PeerOpts {
            tempfail_rcpt: Some("^busy@".into()),
            ..PeerOpts::default()
        },
    );
    site.cfg.transport = Transport::smtp(peer.url());
    site.write_config();

    let mut job = Job::invoice("BUSY-1");
    job.to = vec![(None, "busy@example.net".into())];
    job.drop_into(&site);
    let out = site.run_ok();
    assert!(
        site.dir("deferred").join("BUSY-1").is_dir(),
        "a 4xx reply is temporary: job in deferred/; spool: {}\nstderr:\n{}",
        site.describe(),
        out.stderr
    );
    let state = site.deferred_state("BUSY-1");
    assert_eq!(state_value(&state, "attempts").as_deref(), Some("1"));
    assert!(
        state_value(&state, "next_attempt").is_some(),
        "next_attempt= in state"
    );
    assert_eq!(peer.message_count(), 0);
}

#[test]
fn a_job_deferred_longer_than_give_up_after_fails() {
    // Default retry.give_up_after (5 days): the job's first attempt is made to lie 6 days back.
    let port = free_port();
    let site = Site::smtp(&format!("smtp://127.0.0.1:{port}"));
    let id = "GIVEUP-1";
    Job::invoice(id).drop_into(&site);
    site.run_ok();
    assert!(
        site.dir("deferred").join(id).is_dir(),
        "first: deferred; spool: {}",
        site.describe()
    );
    let p = site.dir("deferred").join(id).join("state");
    let text = fs::read_to_string(&p).unwrap();
    assert!(
        text.lines().any(|l| l.starts_with("first_attempt=")),
        "state records first_attempt=:\n{text}"
    );
    let six_days_ago = format_rfc3339_utc(now_unix() as i64 - 6 * 86400);
    let text: String = text
        .lines()
        .map(|l| {
            if l.starts_with("first_attempt=") {
                format!("first_attempt={six_days_ago}\n")
            } else {
                format!("{l}\n")
            }
        })
        .collect();
    fs::write(&p, text).unwrap();
    make_due(&site, id);

    let out = site.run_ok();
    assert!(
        site.dir("failed").join(id).is_dir(),
        "still failing after retry.give_up_after (5d): the job fails; spool: {}\nstderr:\n{}",
        site.describe(),
        out.stderr
    );
    assert!(
        !site.dir("deferred").join(id).exists(),
        "and is no longer deferred"
    );
    let reason = site.failed_reason(id);
    assert!(
        reason.to_lowercase().contains("connection refused")
            || reason.to_lowercase().contains("refused"),
        "the reason keeps the last error: {reason:?}"
    );
}
