//! An upload that waits for intake.settle is read once, not on every pass: a trickle of other uploads
//! wakes the run many times, and re-reading a large waiting document each time would slow the
//! complete jobs down.

use std::fs;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

fn job(incoming: &Path, id: &str, pdf: &[u8], sha256: &str) {
    fs::write(incoming.join(format!("{id}.pdf")), pdf).unwrap();
    fs::write(
        incoming.join(format!("{id}.xml")),
        format!(
            "<job xmlns=\"urn:docmail:job:1\" id=\"{id}\"><to>jane@example.net</to>\
             <var name=\"customer_name\">Jane</var><var name=\"invoice_number\">{id}</var>\
             <attachment file=\"{id}.pdf\" sha256=\"{sha256}\"/></job>"
        ),
    )
    .unwrap();
}

fn sha256_hex(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn an_unchanged_waiting_upload_is_not_read_again_on_every_pass() {
    let dir = tempfile::tempdir().unwrap();
    let templates = Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/templates");
    let config = dir.path().join("docmail.toml");
    fs::write(
        &config,
        format!(
            "spool = \"{0}/spool\"\nfrom = \"billing@shop.example\"\n[transport]\nkind = \"maildir\"\npath = \"{0}/outbox\"\n\
             [templates]\ndir = \"{1}\"\n[intake]\nsettle = \"6s\"\nlinger = \"1s\"\n",
            dir.path().display(),
            templates.display()
        ),
    )
    .unwrap();
    let incoming = dir.path().join("spool/incoming");
    fs::create_dir_all(&incoming).unwrap();
    let pdf =
        fs::read(Path::new(env!("CARGO_MANIFEST_DIR")).join("examples/jobs/INV-2026-000123.pdf"))
            .unwrap();
    // A 4 MiB document that never matches its manifest's sha256: it waits for settle, then fails.
    let big = vec![b'%'; 4 << 20];
    job(&incoming, "WAIT-1", &big, &"0".repeat(64));
    let run = Command::new(env!("CARGO_BIN_EXE_docmail"))
        .args(["run", "--config"])
        .arg(&config)
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A trickle of complete jobs while WAIT-1 waits: each wakes the run for another pass.
    let good = sha256_hex(&pdf);
    for i in 0..8 {
        std::thread::sleep(Duration::from_millis(300));
        job(&incoming, &format!("GOOD-{i}"), &pdf, &good);
    }
    // What the run has read so far (it is still waiting for WAIT-1 to settle).
    std::thread::sleep(Duration::from_millis(500));
    let io = fs::read_to_string(format!("/proc/{}/io", run.id())).unwrap();
    let read: u64 = io
        .lines()
        .find_map(|l| l.strip_prefix("rchar: "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap();
    let out = run.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{stderr}");
    let sent = stderr.matches("status=sent").count();
    assert_eq!(
        sent, 8,
        "every complete job of the trickle went out:\n{stderr}"
    );
    assert!(
        dir.path().join("spool/failed/WAIT-1/reason").exists(),
        "WAIT-1 failed after settle:\n{stderr}"
    );

    // Read once, not once per pass (there were at least 9: one per upload of the trickle).
    assert!(
        read < 8 << 20,
        "the run read {read} bytes: the 4 MiB waiting document more than once:\n{stderr}"
    );
}
