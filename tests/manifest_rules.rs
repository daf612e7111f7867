//! Every rule of the manifest schema (and of the documents it names), one test each: a manifest that
//! breaks the rule lands in failed/ with a reason naming the rule, and a valid job dropped beside it in
//! the same run is delivered and untouched.
//!
//! The bad job's manifest is always `BAD-1.xml` (so its failed/ directory is `BAD-1` whether or not its id
//! is usable); the good job is `GOOD-1`. Delivery goes to the Maildir transport: these tests are about
//! intake, not SMTP.

mod common;

use common::*;
use std::fs;
use std::os::unix::fs::symlink;

const BAD: &str = "BAD-1";
const GOOD: &str = "GOOD-1";

/// `needle` found in `hay`, case-insensitively; `a|b` means either.
fn mentions(hay: &str, needle: &str) -> bool {
    let hay = hay.to_lowercase();
    needle
        .split('|')
        .any(|alt| hay.contains(&alt.to_lowercase()))
}

struct Case {
    /// What the manifest breaks, for assertion messages.
    rule: &'static str,
    /// Substrings (each `a|b` alternatives) the reason must contain.
    needles: &'static [&'static str],
    /// The reason must name the manifest file (schema rules; document checks name the document).
    names_manifest: bool,
}

/// Runs one case: `prepare` may change the site's config and the bad job (and write extra files).
fn check_rule(case: Case, prepare: impl FnOnce(&mut Site, &mut Job)) {
    let mut site = Site::new();
    let mut bad = Job::invoice(BAD);
    prepare(&mut site, &mut bad);
    site.write_config();
    bad.drop_into(&site);
    let good = Job::invoice(GOOD);
    let good_doc = good.attachments[0].content.clone();
    let good_xml = good.xml();
    good.drop_into(&site);

    let out = site.run();
    assert_eq!(
        out.code, 0,
        "[{}] a run whose jobs failed individually exits 0; stderr:\n{}",
        case.rule, out.stderr
    );

    // The bad job: in failed/, with a reason naming the rule.
    assert_eq!(
        site.entries("failed"),
        vec![BAD.to_string()],
        "[{}] the job must land in failed/{BAD}; spool: {}\nstderr:\n{}",
        case.rule,
        site.describe(),
        out.stderr
    );
    let reason = site.failed_reason(BAD);
    for n in case.needles {
        assert!(
            mentions(&reason, n),
            "[{}] the reason must mention {n:?}; reason: {reason:?}",
            case.rule
        );
    }
    // A reason a person can read: what failed (above), when, and what to do next.
    let now = now_unix() as i64;
    let stamped = reason
        .split(|c: char| c.is_whitespace() || c == '(' || c == ')' || c == ',' || c == ';')
        .map(|w| w.trim_end_matches([':', '.']))
        .filter_map(parse_rfc3339_utc)
        .any(|t| (t - now).abs() < 600);
    assert!(
        stamped,
        "[{}] the reason says when the job failed (RFC 3339 UTC); reason: {reason:?}",
        case.rule
    );
    assert!(
        mentions(&reason, "retry|upload|fix|remove"),
        "[{}] the reason says what to do next; reason: {reason:?}",
        case.rule
    );
    if case.names_manifest {
        assert!(
            reason.contains("BAD-1.xml"),
            "[{}] the reason must name the manifest BAD-1.xml; reason: {reason:?}",
            case.rule
        );
    }
    assert!(
        !site.incoming().join("BAD-1.xml").exists(),
        "[{}] the bad manifest must leave incoming/ (into failed/)",
        case.rule
    );
    assert!(
        site.dir("failed").join(BAD).join("manifest.xml").is_file(),
        "[{}] failed/{BAD}/manifest.xml keeps the manifest for the operator",
        case.rule
    );
    for d in ["sent", "deferred", "active"] {
        assert!(
            !site.dir(d).join(BAD).exists(),
            "[{}] the bad job must not be in {d}/",
            case.rule
        );
    }
    assert!(
        out.stderr
            .lines()
            .any(|l| l.contains("status=failed") && !l.contains(&format!("job={GOOD} "))),
        "[{}] one log line status=failed for the bad job; stderr:\n{}",
        case.rule,
        out.stderr
    );

    // The good job: delivered, untouched.
    let msgs = site.outbox_messages();
    assert_eq!(
        msgs.len(),
        1,
        "[{}] exactly the good job is delivered; stderr:\n{}",
        case.rule,
        out.stderr
    );
    let p = MessageParser::default()
        .parse(msgs[0].as_slice())
        .expect("parse");
    assert!(
        p.message_id().unwrap_or("").contains(GOOD),
        "[{}] the delivered message is {GOOD}: {:?}",
        case.rule,
        p.message_id()
    );
    assert_eq!(p.subject(), Some("Your invoice GOOD-1"), "[{}]", case.rule);
    let att = p.attachments().next().expect("attachment");
    assert!(
        att.contents() == good_doc.as_slice(),
        "[{}] the good job's attachment is byte-identical",
        case.rule
    );
    assert_eq!(
        site.entries("sent"),
        vec![GOOD.to_string()],
        "[{}] sent/ holds the good job",
        case.rule
    );
    assert_eq!(
        site.read_in("sent", GOOD, "manifest.xml"),
        Some(good_xml.into_bytes()),
        "[{}] sent/{GOOD}/manifest.xml is the uploaded manifest",
        case.rule
    );
    assert_eq!(
        fs::read(
            site.dir("sent")
                .join(GOOD)
                .join("documents")
                .join("GOOD-1.pdf")
        )
        .ok(),
        Some(good_doc),
        "[{}] sent/{GOOD}/documents/GOOD-1.pdf is the uploaded document",
        case.rule
    );
    assert!(
        out.stderr
            .lines()
            .any(|l| l.contains(&format!("job={GOOD} ")) && l.contains("status=sent")),
        "[{}] log line job={GOOD} status=sent; stderr:\n{}",
        case.rule,
        out.stderr
    );
    assert!(
        site.entries("active").is_empty(),
        "[{}] active/ empty: {:?}",
        case.rule,
        site.entries("active")
    );
}

macro_rules! rule {
    ($name:ident, $rule:expr, [$($n:expr),*], manifest: $m:expr, |$site:ident, $job:ident| $body:block) => {
        #[test]
        fn $name() {
            check_rule(
                Case { rule: $rule, needles: &[$($n),*], names_manifest: $m },
                #[allow(unused_variables)]
                |$site: &mut Site, $job: &mut Job| $body,
            );
        }
    };
}

// --- the job's id -----------------------------------------------------------------------------------

rule!(missing_id, "id is required", ["attribute id|id attribute", "required|missing"], manifest: true, |site, job| {
    job.id = None;
});

rule!(id_with_bad_characters, "id: A-Za-z0-9._- only", ["id", "INV 1/2"], manifest: true, |site, job| {
    job.id = Some("INV 1/2".into());
});

rule!(id_starting_with_dot, "id must not start with '.'", ["id", ".hidden-1"], manifest: true, |site, job| {
    job.id = Some(".hidden-1".into());
});

rule!(id_longer_than_128, "id: at most 128 characters", ["id", "128"], manifest: true, |site, job| {
    job.id = Some("A".repeat(129));
});

// --- recipients -------------------------------------------------------------------------------------

rule!(no_to, "at least one <to>", ["<to>|'to'|\"to\"", "required|missing|at least"], manifest: true, |site, job| {
    job.to.clear();
});

rule!(invalid_address, "addresses are validated", ["<to>", "jane.doe(at)example.net", "valid"], manifest: true, |site, job| {
    job.to = vec![(Some("Jane".into()), "jane.doe(at)example.net".into())];
});

rule!(invalid_cc_address, "addresses are validated (cc)", ["<cc>", "accounts@", "valid"], manifest: true, |site, job| {
    job.cc = vec!["accounts@".into()];
});

rule!(too_many_recipients, "more than limits.max_recipients", ["max_recipients"], manifest: true, |site, job| {
    site.cfg.max_recipients = Some(3);
    job.to.push((None, "second@example.net".into()));
    job.cc = vec!["third@example.net".into()];
    job.bcc = vec!["fourth@example.net".into()];
});

// --- XML shape --------------------------------------------------------------------------------------

rule!(unknown_element, "unknown elements are errors", ["unknown element|unexpected element", "priority"], manifest: true, |site, job| {
    job.extra_children = "  <priority>high</priority>\n".into();
});

rule!(unknown_attribute, "unknown attributes are errors", ["unknown attribute|unexpected attribute", "colour"], manifest: true, |site, job| {
    job.attachments[0].extra_attrs = " colour=\"red\"".into();
});

rule!(unknown_attribute_on_job, "unknown attributes are errors (job)", ["unknown attribute|unexpected attribute", "priority"], manifest: true, |site, job| {
    job.root_extra_attrs = " priority=\"high\"".into();
});

rule!(doctype, "a DOCTYPE is an error", ["DOCTYPE"], manifest: true, |site, job| {
    job.doctype = Some("<!DOCTYPE job [<!ENTITY who \"Jane Doe\">]>".into());
});

rule!(wrong_namespace, "the namespace is urn:docmail:job:1", ["namespace", "urn:docmail:job:2"], manifest: true, |site, job| {
    job.xmlns = "urn:docmail:job:2".into();
});

rule!(two_reply_to, "at most one <reply-to>", ["<reply-to>", "once|twice|more than one"], manifest: true, |site, job| {
    job.reply_to = vec!["a@shop.example".into(), "b@shop.example".into()];
});

rule!(two_subjects, "at most one <subject>", ["<subject>", "once|twice|more than one"], manifest: true, |site, job| {
    job.subject = vec!["One".into(), "Two".into()];
});

rule!(two_templates, "at most one <template>", ["<template>", "once|twice|more than one"], manifest: true, |site, job| {
    job.template = vec!["invoice".into(), "letter".into()];
});

rule!(subject_with_line_break, "a subject is one line (no header injection)", ["<subject>|subject"], manifest: true, |site, job| {
    job.subject = vec!["Hello\r\nBcc: victim@example.org".into()];
});

// --- attachments ------------------------------------------------------------------------------------

rule!(no_attachment, "at least one <attachment>", ["<attachment>|attachment", "required|missing|at least"], manifest: true, |site, job| {
    job.attachments.clear();
    // The document is still uploaded; without an <attachment> it is not part of the job.
});

rule!(attachment_without_file, "<attachment> needs file", ["attribute file|file attribute", "required|missing"], manifest: true, |site, job| {
    job.attachments[0].file = None;
});

rule!(file_with_slash, "file is a plain name: no '/'", ["attribute file|file", "sub/BAD-1.pdf", "/"], manifest: true, |site, job| {
    job.attachments[0].file = Some("sub/BAD-1.pdf".into());
    let sub = site.incoming().join("sub");
    fs::create_dir(&sub).unwrap();
    fs::write(sub.join("BAD-1.pdf"), &job.attachments[0].content).unwrap();
});

rule!(file_starting_with_dot, "file must not start with '.'", ["attribute file|file", ".BAD-1.pdf", "'.'|dot"], manifest: true, |site, job| {
    job.attachments[0].file = Some(".BAD-1.pdf".into());
});

rule!(sha256_not_64_hex, "sha256 is 64 hex digits", ["sha256", "64"], manifest: true, |site, job| {
    job.attachments[0].sha256 = Some("abc123".into());
});

rule!(size_not_a_number, "size is a number of bytes", ["size", "twelve"], manifest: true, |site, job| {
    job.attachments[0].size = Some("twelve".into());
});

// --- documents (checked after the manifest parsed; incomplete ones wait for settle = 2 s) -------------

rule!(size_mismatch, "the document's size must match", ["BAD-1.pdf", "size", "6000", "5990"], manifest: false, |site, job| {
    // The document has 6000 bytes; the manifest says 5990 (sha256 left out: only size is checked).
    job.attachments[0].size = Some("5990".into());
    job.attachments[0].sha256 = None;
});

rule!(sha256_mismatch, "the document's sha256 must match", ["BAD-1.pdf", "sha256"], manifest: false, |site, job| {
    job.attachments[0].sha256 = Some(sha256_hex(b"something else"));
});

rule!(document_over_max_attachment_size, "limits.max_attachment_size", ["BAD-1.pdf", "max_attachment_size|limit"], manifest: false, |site, job| {
    site.cfg.max_attachment_size = Some("8KiB".into());
    let big = pdf_bytes(5, 10_000);
    job.attachments[0].size = Some(big.len().to_string());
    job.attachments[0].sha256 = Some(sha256_hex(&big));
    job.attachments[0].content = big;
});

rule!(document_is_a_directory, "documents are regular files (directory)", ["BAD-1.pdf", "regular file", "directory"], manifest: false, |site, job| {
    job.attachments[0].write = false;
    job.attachments[0].size = None;
    job.attachments[0].sha256 = None;
    fs::create_dir(site.incoming().join("BAD-1.pdf")).unwrap();
});

rule!(document_is_a_symlink, "documents are regular files (symlink)", ["BAD-1.pdf", "symbolic link|symlink"], manifest: false, |site, job| {
    // The link points at a perfectly good file outside the drop: following it would leak that file.
    job.attachments[0].write = false;
    let outside = site.root.join("secret.pdf");
    fs::write(&outside, &job.attachments[0].content).unwrap();
    symlink(&outside, site.incoming().join("BAD-1.pdf")).unwrap();
});

// --- templates --------------------------------------------------------------------------------------

rule!(unknown_template, "the template must exist", ["template", "nosuch"], manifest: false, |site, job| {
    job.template = vec!["nosuch".into()];
});

rule!(undefined_template_variable, "an undefined template variable is an error", ["undefined", "invoice.subject|invoice.txt|invoice_number"], manifest: false, |site, job| {
    // The default template uses {{ invoice_number }}; the manifest does not give it.
    job.vars.retain(|(k, _)| k != "invoice_number");
});
