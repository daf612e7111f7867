//! The local transports: a Maildir (write to tmp/, rename into new/) and the sendmail command
//! (a real process: a small script that records its arguments and its standard input).

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::PermissionsExt;

#[test]
fn maildir_transport_delivers_into_new() {
    let site = Site::new(); // maildir transport into site.outbox
    let mut job = Job::invoice("MD-1");
    job.cc = vec!["accounts@example.net".into()];
    let upload = job.attachments[0].content.clone();
    job.drop_into(&site);
    let out = site.run_ok();

    let new = list(&site.outbox.join("new"));
    assert_eq!(new.len(), 1, "one message in new/; stderr:\n{}", out.stderr);
    assert!(
        list(&site.outbox.join("tmp")).is_empty(),
        "nothing left in the Maildir's tmp/"
    );
    assert!(
        !new[0].starts_with('.'),
        "a Maildir file name does not start with '.'"
    );
    let raw = fs::read(site.outbox.join("new").join(&new[0])).unwrap();
    let p = MessageParser::default().parse(&raw).expect("parse");
    assert_eq!(addrs(p.to()), vec!["jane.doe@example.net"]);
    assert_eq!(addrs(p.cc()), vec!["accounts@example.net"]);
    assert_eq!(p.subject(), Some("Your invoice MD-1"));
    assert!(
        p.body_text(0)
            .unwrap_or_default()
            .contains("Dear Jane Doe,")
    );
    assert!(
        p.attachments().next().map(|a| a.contents()) == Some(upload.as_slice()),
        "attachment byte-identical"
    );
    assert_sent(&site, "MD-1");
}

#[test]
fn maildir_transport_creates_a_missing_maildir() {
    let mut site = Site::new();
    let path = site.root.join("fresh-maildir");
    site.cfg.transport = Transport::Maildir(path.clone());
    site.write_config();
    Job::invoice("MD-NEW").drop_into(&site);
    let out = site.run_ok();
    assert_eq!(
        read_maildir(&path).len(),
        1,
        "a configured Maildir that does not exist yet is created and delivered to; stderr:\n{}",
        out.stderr
    );
    assert_sent(&site, "MD-NEW");
}

/// A sendmail stand-in that is a real program: records argv (one per line) and stdin.
fn sendmail_script(dir: &std::path::Path, exit: i32) -> std::path::PathBuf {
    let out = dir.join("sendmail-out");
    fs::create_dir_all(&out).unwrap();
    let script = dir.join("sendmail");
    fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             n=$(date +%s%N)-$$\n\
             for a in \"$@\"; do printf '%s\\n' \"$a\"; done > '{out}/'$n.args\n\
             cat > '{out}/'$n.msg\n\
             exit {exit}\n",
            out = out.display()
        ),
    )
    .unwrap();
    fs::set_permissions(&script, fs::Permissions::from_mode(0o755)).unwrap();
    script
}

#[test]
fn sendmail_transport_runs_the_command_with_envelope_and_message() {
    let mut site = Site::new();
    let script = sendmail_script(&site.root, 0);
    site.cfg.transport = Transport::Sendmail(script);
    site.write_config();

    let mut job = Job::invoice("SM-1");
    job.bcc = vec!["archive@shop.example".into()];
    let upload = job.attachments[0].content.clone();
    job.drop_into(&site);
    let out = site.run_ok();

    let dir = site.root.join("sendmail-out");
    let files = list(&dir);
    let args: Vec<_> = files.iter().filter(|f| f.ends_with(".args")).collect();
    assert_eq!(
        args.len(),
        1,
        "sendmail called once; stderr:\n{}",
        out.stderr
    );
    let argv: Vec<String> = fs::read_to_string(dir.join(args[0]))
        .unwrap()
        .lines()
        .map(str::to_owned)
        .collect();
    // The sendmail command line: -i -f FROM -- RCPT...
    let f = argv.iter().position(|a| a == "-f").expect("-f FROM");
    assert_eq!(argv[f + 1], FROM_ADDR, "envelope sender after -f: {argv:?}");
    let dd = argv
        .iter()
        .position(|a| a == "--")
        .expect("-- before recipients");
    let mut rcpts: Vec<String> = argv[dd + 1..].to_vec();
    rcpts.sort();
    assert_eq!(
        rcpts,
        vec!["archive@shop.example", "jane.doe@example.net"],
        "recipients (To + Bcc) after --: {argv:?}"
    );
    assert!(
        argv.contains(&"-i".to_string()),
        "-i (a lone dot is not the end): {argv:?}"
    );

    let msg = fs::read(dir.join(args[0].replace(".args", ".msg"))).unwrap();
    let p = MessageParser::default().parse(&msg).expect("parse");
    assert_eq!(p.subject(), Some("Your invoice SM-1"));
    assert_eq!(header_count(&msg, "Bcc"), 0, "no Bcc header");
    assert!(
        p.attachments().next().map(|a| a.contents()) == Some(upload.as_slice()),
        "attachment byte-identical through sendmail"
    );
    assert_sent(&site, "SM-1");
}

#[test]
fn sendmail_failure_does_not_lose_the_job() {
    let mut site = Site::new();
    let script = sendmail_script(&site.root, 75); // EX_TEMPFAIL
    site.cfg.transport = Transport::Sendmail(script);
    site.write_config();
    Job::invoice("SM-FAIL").drop_into(&site);
    let out = site.run_ok();
    assert!(
        !site.dir("sent").join("SM-FAIL").exists(),
        "a failing sendmail must not count as sent; stderr:\n{}",
        out.stderr
    );
    assert!(
        site.dir("deferred").join("SM-FAIL").exists()
            || site.dir("failed").join("SM-FAIL").exists(),
        "the job is deferred or failed, not lost: {}",
        site.describe()
    );
}
