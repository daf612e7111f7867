//! SMTP faults from a real server that misbehaves on purpose (`tests/peers/fault_smtpd.py`, aiosmtpd):
//! 421, 451, 452 and 554 at MAIL, RCPT, the DATA command and the end of the message; the connection
//! dropped in the middle of DATA; a server that stalls at the greeting, at MAIL or after the message.
//! Each job lands where the contract says: 4xx (and no answer at all) in `deferred/` with a
//! `next_attempt`, 5xx in `failed/`, the server's reply in the reason. A stalled or slow server never
//! holds a run beyond a bound computed from `transport.timeout` and `limits.max_run_time`.

mod support_faults;

use std::time::{Duration, SystemTime, UNIX_EPOCH};

use support_faults::*;

#[derive(Debug, Clone, Copy, PartialEq)]
enum Lands {
    Deferred,
    Failed,
}

/// One job against a server in `mode`; checks where it lands and that the reason carries `reply`.
fn fault_case(mode: &str, lands: Lands, reply: &[&str]) {
    let tmp = tempfile::tempdir().unwrap();
    let peer = Peer::fault(&tmp.path().join("peer"), mode);
    let mut site = Site::smtp(peer.port, "5s");
    site.extra = "[retry]\nfirst = \"1m\"\n".into();
    site.write_config();
    let id = format!("F-{mode}");
    site.upload(&id, 4000);
    let before = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let out = site.run();
    assert_eq!(
        out.code, 0,
        "{mode}: a job's failure is not the run's: {}",
        out.stderr
    );
    assert!(peer.messages().is_empty(), "{mode}: nothing may be stored");
    let line = out.job_lines(&id).join("\n");
    match lands {
        Lands::Deferred => {
            assert_eq!(
                site.jobs("deferred"),
                vec![id.clone()],
                "{mode}: {}\n{}",
                site.describe(),
                out.stderr
            );
            assert!(
                line.contains("status=deferred") && line.contains("next_attempt="),
                "{mode}: {line}"
            );
            let next = site
                .state_value("deferred", &id, "next_attempt")
                .and_then(|t| parse_time(&t))
                .unwrap_or_else(|| {
                    panic!(
                        "{mode}: no next_attempt in state: {:?}",
                        site.state("deferred", &id)
                    )
                });
            // retry.first is 1 minute.
            assert!(
                (before + 55..=before + 65 + out.elapsed.as_secs() as i64).contains(&next),
                "{mode}: next_attempt {next} is not about retry.first after {before}"
            );
            assert_eq!(
                site.state_value("deferred", &id, "attempts").as_deref(),
                Some("1")
            );
        }
        Lands::Failed => {
            assert_eq!(
                site.jobs("failed"),
                vec![id.clone()],
                "{mode}: {}\n{}",
                site.describe(),
                out.stderr
            );
            assert!(line.contains("status=failed"), "{mode}: {line}");
        }
    }
    let place = if lands == Lands::Deferred {
        "deferred"
    } else {
        "failed"
    };
    let reason = site.read(place, &id, "reason");
    for needle in reply {
        assert!(
            reason.contains(needle),
            "{mode}: the reason must carry {needle:?}:\n{reason}"
        );
        assert!(
            line.contains(needle),
            "{mode}: the log line must carry {needle:?}: {line}"
        );
    }
    let c = site.census();
    assert_eq!((c.manifests, c.documents), (1, 1), "{mode}: {c:?}");
}

macro_rules! faults {
    ($($name:ident: $mode:literal => $lands:ident [$($needle:literal),*];)*) => {
        $(
            #[test]
            fn $name() {
                fault_case($mode, Lands::$lands, &[$($needle),*]);
            }
        )*
    };
}

faults! {
    mail_421_defers: "mail421" => Deferred ["421", "fault-peer: service shutting down (MAIL)"];
    mail_451_defers: "mail451" => Deferred ["451", "fault-peer: local error in processing (MAIL)"];
    mail_554_fails: "mail554" => Failed ["554", "fault-peer: transaction failed, message refused (MAIL)"];
    rcpt_451_defers: "rcpt451" => Deferred ["451", "fault-peer: local error in processing (RCPT)"];
    rcpt_452_defers: "rcpt452" => Deferred ["452", "fault-peer: insufficient system storage (RCPT)"];
    rcpt_554_fails: "rcpt554" => Failed ["554", "fault-peer: transaction failed, message refused (RCPT)"];
    data_command_451_defers: "datacmd451" => Deferred ["451", "(DATA command)"];
    data_command_554_fails: "datacmd554" => Failed ["554", "(DATA command)"];
    end_of_data_421_defers: "data421" => Deferred ["421", "(end of DATA)"];
    end_of_data_451_defers: "data451" => Deferred ["451", "(end of DATA)"];
    end_of_data_452_defers: "data452" => Deferred ["452", "(end of DATA)"];
    end_of_data_554_fails: "data554" => Failed ["554", "(end of DATA)"];
    connection_dropped_in_the_middle_of_data_defers: "drop-data" => Deferred [];
}

/// Several jobs against a server that stalls in `mode`: the run ends within a bound computed from
/// the configured timeouts, all jobs wait in `deferred/`, nothing is stored or lost.
fn stall_case(mode: &str) {
    let tmp = tempfile::tempdir().unwrap();
    let peer = Peer::fault(&tmp.path().join("peer"), mode);
    let timeout = 2;
    let mut site = Site::smtp(peer.port, &format!("{timeout}s"));
    site.extra = "[retry]\nfirst = \"1m\"\n\n[limits]\nmax_run_time = \"20s\"\n".into();
    site.write_config();
    let ids: Vec<String> = (1..=4).map(|n| format!("S-{n}")).collect();
    for id in &ids {
        site.upload(id, 3000);
    }
    let out = site.docmail(&["run"], Duration::from_secs(60));
    // Liveness, not a benchmark: one stalled command costs one timeout; after that the relay counts as
    // unavailable and the other jobs are deferred untried. Allow a few timeouts and start-up slack.
    let bound = Duration::from_secs(4 * timeout + 10);
    println!(
        "smtp_faults: {mode}: run took {:.2}s (bound {bound:?})",
        out.elapsed.as_secs_f64()
    );
    assert!(
        out.elapsed < bound,
        "{mode}: run took {:?} (bound {bound:?}):\n{}",
        out.elapsed,
        out.stderr
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        site.jobs("deferred"),
        ids,
        "{mode}: {}\n{}",
        site.describe(),
        out.stderr
    );
    assert!(peer.messages().is_empty());
    let first = site.read("deferred", "S-1", "reason");
    assert!(
        first.contains("did not answer within 2s (transport.timeout)"),
        "{mode}: the reason should say the server did not answer in time:\n{first}"
    );
    let c = site.census();
    assert_eq!((c.manifests, c.documents), (4, 4), "{c:?}");
}

#[test]
fn server_that_never_greets_does_not_block_the_run() {
    stall_case("stall-banner");
}

#[test]
fn server_that_never_answers_mail_does_not_block_the_run() {
    stall_case("stall-mail");
}

#[test]
fn server_that_never_answers_the_final_dot_does_not_block_the_run() {
    stall_case("stall-data");
}

/// A server that answers every command, but each just within the timeout: no single command times
/// out, so only `limits.max_run_time` can end the run. It must stop claiming jobs once that has
/// passed; what is left waits, untouched, for the next run.
#[test]
fn slow_server_is_bounded_by_max_run_time() {
    let tmp = tempfile::tempdir().unwrap();
    let peer = Peer::start(
        "fault_smtpd.py",
        &tmp.path().join("peer"),
        &["--mode", "slow", "--delay", "0.4"],
    );
    let mut site = Site::smtp(peer.port, "2s");
    let max_run_time = 3;
    site.extra = format!("[limits]\nmax_run_time = \"{max_run_time}s\"\n");
    site.write_config();
    let jobs = 12;
    for n in 1..=jobs {
        site.upload(&format!("SLOW-{n:02}"), 2000);
    }
    let out = site.docmail(&["run"], Duration::from_secs(120));
    // A job takes about 6 replies x 0.4 s; the one in flight when max_run_time passes is finished.
    // Bound: max_run_time + one job at the worst (6 commands x timeout) + start-up slack.
    let bound = Duration::from_secs(max_run_time + 6 * 2 + 5);
    let sent = site.jobs("sent").len();
    println!(
        "smtp_faults: slow server: run took {:.2}s (bound {bound:?}), sent {sent} of {jobs}",
        out.elapsed.as_secs_f64()
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(
        out.elapsed < bound,
        "a slow server held the run for {:?} (bound {bound:?}, max_run_time {max_run_time}s); sent {sent} of {jobs}",
        out.elapsed
    );
    assert!(
        out.stderr.contains("max_run_time"),
        "the run says why it stopped:\n{}",
        out.stderr
    );
    assert!(sent >= 1 && sent < jobs, "sent {sent} of {jobs}");
    let c = site.census();
    assert_eq!((c.manifests, c.documents), (jobs, jobs), "{c:?}");
}

#[test]
fn greeting_421_defers() {
    fault_case("banner421", Lands::Deferred, &["421", "(greeting)"]);
}

#[test]
fn greeting_554_fails() {
    fault_case("banner554", Lands::Failed, &["554", "(greeting)"]);
}

/// A connect that never completes (the server's accept queue is full, so the kernel drops the
/// SYNs) is bounded by transport.timeout too.
#[test]
fn connect_that_never_completes_does_not_block_the_run() {
    stall_case("no-accept");
}

/// A relay that answers 421 once and closes the connection (what Postfix does after too many errors)
/// costs that job one deferral; the run reconnects and delivers the rest of the backlog.
#[test]
fn after_a_421_and_a_closed_connection_the_run_reconnects_for_the_rest() {
    let tmp = tempfile::tempdir().unwrap();
    let peer = Peer::start(
        "fault_smtpd.py",
        &tmp.path().join("peer"),
        &["--mode", "mail421", "--faults", "1"],
    );
    let site = Site::smtp(peer.port, "5s");
    let ids: Vec<String> = (1..=5).map(|n| format!("RECONNECT-{n}")).collect();
    for id in &ids {
        site.upload(id, 1000);
    }
    let out = site.run();
    assert_eq!(out.code, 0, "{}", out.stderr);
    let deferred = site.jobs("deferred");
    assert_eq!(deferred.len(), 1, "{}\n{}", site.describe(), out.stderr);
    assert_eq!(
        site.jobs("sent").len(),
        4,
        "{}\n{}",
        site.describe(),
        out.stderr
    );
    assert_eq!(peer.messages().len(), 4);
    assert!(
        site.read("deferred", &deferred[0], "reason")
            .contains("421")
    );
    let connects = peer
        .events()
        .lines()
        .filter(|l| l.ends_with(" CONNECT"))
        .count();
    assert!(connects >= 2, "the run must reconnect:\n{}", peer.events());
}

/// A server that stops reading in the middle of the message: once the socket buffers are full the
/// client's writes block, and transport.timeout must bound them too.
#[test]
fn server_that_stops_reading_the_message_does_not_block_the_run() {
    let tmp = tempfile::tempdir().unwrap();
    let peer = Peer::fault(&tmp.path().join("peer"), "stall-reading");
    let timeout = 2;
    let site = Site::smtp(peer.port, &format!("{timeout}s"));
    // Larger than what loopback's socket buffers can hold (base64 makes it 4/3 bigger still).
    site.upload("BIG-1", 15 << 20);
    let out = site.docmail(&["run"], Duration::from_secs(90));
    let bound = Duration::from_secs(4 * timeout + 15);
    println!(
        "smtp_faults: stall-reading: run took {:.2}s (bound {bound:?})",
        out.elapsed.as_secs_f64()
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert!(out.elapsed < bound, "{:?}: {}", out.elapsed, out.stderr);
    assert_eq!(
        site.jobs("deferred"),
        ["BIG-1"],
        "{}\n{}",
        site.describe(),
        out.stderr
    );
    let reason = site.read("deferred", "BIG-1", "reason");
    assert!(
        reason.contains("did not answer within 2s (transport.timeout)"),
        "{reason}"
    );
}
