//! An upload that waits for intake.settle is read once, not on every pass: a trickle of other uploads
//! wakes the run many times, and re-reading a large waiting document each time would slow the
//! complete jobs down.

mod common;

use std::fs;
use std::time::Duration;

use common::*;

#[test]
fn an_unchanged_waiting_upload_is_not_read_again_on_every_pass() {
    let mut site = Site::new();
    site.cfg.settle = "6s".into();
    site.cfg.linger = "1s".into();
    site.write_config();
    // A 4 MiB document that never matches its manifest's sha256: it waits for settle, then fails.
    let mut waiting = Job::invoice("WAIT-1");
    waiting.attachments[0] = Attachment::new("WAIT-1.pdf", vec![b'%'; 4 << 20]);
    waiting.attachments[0].sha256 = Some("0".repeat(64));
    waiting.attachments[0].size = None;
    waiting.drop_into(&site);

    let run = site.spawn_run();
    // A trickle of complete jobs while WAIT-1 waits: each wakes the run for another pass.
    for i in 0..8 {
        std::thread::sleep(Duration::from_millis(300));
        Job::invoice(&format!("GOOD-{i}")).drop_into(&site);
    }
    // What the run has read so far (it is still waiting for WAIT-1 to settle).
    std::thread::sleep(Duration::from_millis(500));
    let io = fs::read_to_string(format!("/proc/{}/io", run.pid())).unwrap();
    let read: u64 = io
        .lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    let out = run.wait();
    assert_eq!(out.code, 0, "{}", out.stderr);
    assert_eq!(
        site.entries("sent").len(),
        8,
        "every complete job of the trickle went out:\n{}",
        out.stderr
    );
    assert!(
        site.failed_reason("WAIT-1").contains("sha256"),
        "WAIT-1 failed after settle:\n{}",
        out.stderr
    );
    // Read once, not once per pass (there were at least 9: one per upload of the trickle).
    assert!(
        read < 8 << 20,
        "the run read {read} bytes: the 4 MiB waiting document more than once:\n{}",
        out.stderr
    );
}
