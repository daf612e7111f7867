//! `docmail check` (exit 78 with file, key and what would be valid; 0 for a good file) and
//! `docmail render` (the exact message `run` sends).

mod common;

use common::*;
use std::fs;

fn assert_config_error(site: &Site, what: &str, keys: &[&str], valid: &[&str]) {
    let out = site.check();
    let text = out.all_output();
    assert_eq!(
        out.code, 78,
        "[{what}] docmail check must exit 78 (EX_CONFIG); output:\n{text}"
    );
    let file = site.config_path.to_str().unwrap();
    assert!(
        text.contains(file),
        "[{what}] the message must name the file {file}; output:\n{text}"
    );
    for k in keys {
        assert!(
            text.contains(k),
            "[{what}] the message must name the key {k:?}; output:\n{text}"
        );
    }
    if !valid.is_empty() {
        assert!(
            valid.iter().any(|v| text.contains(v)),
            "[{what}] the message must say what would be valid (one of {valid:?}); output:\n{text}"
        );
    }
    // `run` refuses the same file with the same code.
    let run = site.run();
    assert_eq!(
        run.code, 78,
        "[{what}] docmail run with a broken config exits 78; stderr:\n{}",
        run.stderr
    );
}

#[test]
fn check_accepts_a_good_config() {
    let site = Site::new();
    let out = site.check();
    assert_eq!(
        out.code,
        0,
        "docmail check on a good config exits 0; output:\n{}",
        out.all_output()
    );
}

#[test]
fn check_accepts_a_good_smtp_config() {
    let site = Site::smtp("smtp://relay.invalid:587?tls=required");
    let out = site.check();
    assert_eq!(
        out.code,
        0,
        "without --smtp, check does not connect; a good SMTP config exits 0; output:\n{}",
        out.all_output()
    );
}

#[test]
fn check_unknown_top_level_key() {
    let mut site = Site::new();
    site.cfg.extra_top = "colour = \"blue\"\n".into();
    site.write_config();
    assert_config_error(&site, "unknown key", &["colour"], &[]);
}

#[test]
fn check_unknown_key_in_a_table() {
    let site = Site::new();
    let text = site.config_text().replace("settle = ", "setle = ");
    fs::write(&site.config_path, text).unwrap();
    assert_config_error(&site, "unknown key in [intake]", &["setle"], &["settle"]);
}

#[test]
fn check_bad_duration() {
    let mut site = Site::new();
    site.cfg.settle = "soon".into();
    site.write_config();
    assert_config_error(
        &site,
        "bad duration",
        &["settle", "soon"],
        &["30s", "5m", "1h", "5d"],
    );
}

#[test]
fn check_bad_from_address() {
    let mut site = Site::new();
    site.cfg.from = "Shop Billing, no address".into();
    site.write_config();
    assert_config_error(&site, "bad from", &["from"], &["@"]);
}

#[test]
fn check_unknown_transport_kind() {
    let site = Site::new();
    let text = site
        .config_text()
        .replace("kind = \"maildir\"", "kind = \"pigeon\"");
    fs::write(&site.config_path, text).unwrap();
    assert_config_error(&site, "unknown transport kind", &["kind", "pigeon"], &[]);
    let text = site.check().all_output();
    for k in ["smtp", "sendmail", "maildir"] {
        assert!(
            text.contains(k),
            "the valid kinds must be listed ({k} missing); output:\n{text}"
        );
    }
}

#[test]
fn check_reports_every_problem() {
    let mut site = Site::new();
    site.cfg.transport = Transport::Smtp {
        url: "smtp://".into(),
        user: None,
        password_file: None,
        timeout: "5s".into(),
    };
    site.cfg.template_default = "no/such".into();
    site.write_config();
    let out = site.check();
    let text = out.all_output();
    assert_eq!(out.code, 78, "exit 78; output:\n{text}");
    for key in ["transport.url", "templates.default"] {
        assert!(
            text.contains(key),
            "each problem is reported: {key} missing; output:\n{text}"
        );
    }
}

/// The message without its Date header (and the header's continuation lines).
fn without_date(raw: &[u8]) -> Vec<u8> {
    let text = String::from_utf8_lossy(raw);
    let (head, body) = match text.find("\r\n\r\n") {
        Some(i) => (&text[..i + 2], &text[i + 2..]),
        None => (&text[..], ""),
    };
    let mut out = String::new();
    let mut skipping = false;
    for line in head.split_inclusive("\r\n") {
        if line.starts_with(' ') || line.starts_with('\t') {
            if !skipping {
                out.push_str(line);
            }
            continue;
        }
        skipping = line.to_ascii_lowercase().starts_with("date:");
        if !skipping {
            out.push_str(line);
        }
    }
    out.push_str(body);
    out.into_bytes()
}

/// The first differing line of two messages, or None when they are equal.
fn first_diff(a: &[u8], b: &[u8]) -> Option<String> {
    if a == b {
        return None;
    }
    let (a, b) = (String::from_utf8_lossy(a), String::from_utf8_lossy(b));
    let d = a
        .split("\r\n")
        .zip(b.split("\r\n"))
        .enumerate()
        .find(|(_, (x, y))| x != y)
        .map(|(i, (x, y))| format!("line {}: {x:?} / {y:?}", i + 1))
        .unwrap_or_else(|| format!("lengths {} / {}", a.len(), b.len()));
    Some(d)
}

#[test]
fn render_equals_what_arrives_at_the_server() {
    let mut site = Site::new();
    let peer = SmtpPeer::start(&site.root.join("peer"), &PeerOpts::default());
    site.cfg.transport = Transport::smtp(peer.url());
    site.write_config();

    let id = "RENDER-1";
    let mut job = Job::invoice(id);
    job.cc = vec!["accounts@example.net".into()];
    job.attachments[0].name = Some("Übersicht März.pdf".into());
    job.drop_into(&site);

    let manifest = site.incoming().join(job.manifest_name());
    let eml = site.root.join("rendered.eml");
    let cfg = site.config_path.to_str().unwrap().to_owned();
    let out = site.docmail(&[
        "render",
        manifest.to_str().unwrap(),
        "-o",
        eml.to_str().unwrap(),
        "--config",
        &cfg,
    ]);
    assert_eq!(out.code, 0, "render -o exits 0; stderr:\n{}", out.stderr);
    let rendered = fs::read(&eml).expect("render -o writes the file");

    let out = site.docmail(&["render", manifest.to_str().unwrap(), "--config", &cfg]);
    assert_eq!(out.code, 0, "render exits 0; stderr:\n{}", out.stderr);
    if let Some(d) = first_diff(&without_date(&out.stdout), &without_date(&rendered)) {
        panic!("render to stdout and render -o must give the same message (Date aside): {d}");
    }

    // render leaves the job where it is.
    assert!(manifest.exists(), "render must not move the manifest");
    assert!(
        site.incoming().join(format!("{id}.pdf")).exists(),
        "render must not move the document"
    );
    assert!(
        site.entries("sent").is_empty() && peer.message_count() == 0,
        "render sends nothing"
    );

    site.run_ok();
    let msgs = peer.messages();
    assert_eq!(msgs.len(), 1, "the job is delivered");
    if let Some(d) = first_diff(&without_date(&msgs[0].raw), &without_date(&rendered)) {
        panic!(
            "render output must equal the delivered message (Date aside); first difference, received / rendered: {d}"
        );
    }
    let p = MessageParser::default().parse(&rendered).expect("parse");
    assert!(p.date().is_some(), "the rendered message has a Date header");
}

#[test]
fn usage_errors_exit_64() {
    let site = Site::new();
    for args in [
        vec!["frobnicate"],
        vec!["run", "--no-such-option"],
        vec!["render"],
    ] {
        let out = site.docmail(&args);
        assert_eq!(
            out.code,
            64,
            "`docmail {}` is a usage error: exit 64 (EX_USAGE); stderr:\n{}",
            args.join(" "),
            out.stderr
        );
    }
}

#[test]
fn render_of_an_invalid_manifest_exits_65_and_names_the_problem() {
    let site = Site::new();
    let mut job = Job::invoice("RBAD-1");
    job.extra_children = "  <priority>high</priority>\n".into();
    job.drop_into(&site);
    let manifest = site.incoming().join("RBAD-1.xml");
    let cfg = site.config_path.to_str().unwrap().to_owned();
    let out = site.docmail(&["render", manifest.to_str().unwrap(), "--config", &cfg]);
    assert_eq!(
        out.code, 65,
        "render of an invalid manifest: exit 65 (EX_DATAERR); stderr:\n{}",
        out.stderr
    );
    assert!(
        out.stderr.contains("RBAD-1.xml") && out.stderr.contains("priority"),
        "the message names the manifest and the unknown element: {}",
        out.stderr
    );
    assert!(out.stdout.is_empty(), "no message on stdout");
    assert!(manifest.exists(), "render leaves the manifest in place");
}

#[test]
fn log_lines_carry_the_syslog_priority_under_journald() {
    // When JOURNAL_STREAM is set each outcome line starts with <6> sent, <4> deferred, <3> failed.
    let mut site = Site::new();
    site.env.push(("JOURNAL_STREAM".into(), "8:424242".into()));
    Job::invoice("PRIO-OK").drop_into(&site);
    let mut bad = Job::invoice("PRIO-BAD");
    bad.extra_children = "  <priority>high</priority>\n".into();
    bad.drop_into(&site);
    let out = site.run_ok();
    let sent = out.job_lines("PRIO-OK");
    assert!(
        sent.len() == 1 && sent[0].starts_with("<6>") && sent[0].contains("status=sent"),
        "sent line with <6>: {sent:?}"
    );
    let failed: Vec<&str> = out
        .stderr
        .lines()
        .filter(|l| l.contains("status=failed"))
        .collect();
    assert!(
        failed.len() == 1 && failed[0].starts_with("<3>"),
        "failed line with <3>: {failed:?}"
    );

    let mut down = Site::smtp(&format!("smtp://127.0.0.1:{}", free_port()));
    down.env.push(("JOURNAL_STREAM".into(), "8:424242".into()));
    Job::invoice("PRIO-DEF").drop_into(&down);
    let out = down.run_ok();
    let deferred = out.job_lines("PRIO-DEF");
    assert!(
        deferred.len() == 1
            && deferred[0].starts_with("<4>")
            && deferred[0].contains("status=deferred"),
        "deferred line with <4>: {deferred:?}"
    );

    // Without JOURNAL_STREAM: no prefix.
    let plain = Site::new();
    Job::invoice("PLAIN-1").drop_into(&plain);
    let out = plain.run_ok();
    let l = out.job_lines("PLAIN-1");
    assert!(
        l.len() == 1 && l[0].starts_with("job=PLAIN-1 "),
        "without journald the line starts with job=: {l:?}"
    );
}

#[test]
fn check_missing_default_template_exits_78() {
    // A problem check finds beyond the file's syntax: templates.default has no NAME.txt in templates.dir.
    let mut site = Site::new();
    site.cfg.template_default = "receipt".into();
    site.write_config();
    let out = site.check();
    let text = out.all_output();
    assert!(
        text.contains("templates.default") && text.contains("receipt"),
        "the problem names the key and the template: {text}"
    );
    assert_eq!(
        out.code, 78,
        "every problem check reports is a configuration error: exit 78; output:\n{text}"
    );
}
