//! End to end over SMTP: a job dropped in incoming/ arrives at a real SMTP server process (aiosmtpd on
//! loopback) with the right envelope, headers, text and attachment, and ends in sent/.

mod common;

use common::*;
use std::fs;

fn start_peer(site: &Site, opts: &PeerOpts) -> SmtpPeer {
    SmtpPeer::start(&site.root.join("peer"), opts)
}

#[test]
fn job_arrives_with_headers_text_attachment_and_ends_in_sent() {
    let mut site = Site::new();
    let peer = start_peer(&site, &PeerOpts::default());
    site.cfg.transport = Transport::smtp(peer.url());
    site.write_config();

    let id = "INV-2026-000123";
    let mut job = Job::invoice(id);
    job.to.push((
        Some("Max Mustermann".into()),
        "max.mustermann@example.org".into(),
    ));
    job.cc = vec!["accounts@example.net".into()];
    job.bcc = vec!["archive@shop.example".into()];
    job.reply_to = vec!["billing-replies@shop.example".into()];
    let upload = pdf_bytes(4711, 48213);
    let fname = "Rechnung Müller – März €.pdf";
    {
        let a = &mut job.attachments[0];
        a.content = upload.clone();
        a.size = Some(upload.len().to_string());
        a.sha256 = Some(sha256_hex(&upload));
        a.name = Some(fname.into());
    }
    job.drop_into(&site);

    let before = now_unix();
    let out = site.run_ok();
    let after = now_unix();

    // Exactly one message at the server.
    let msgs = peer.messages();
    assert_eq!(
        msgs.len(),
        1,
        "expected exactly 1 message at the SMTP server; stderr:\n{}",
        out.stderr
    );
    let m = &msgs[0];

    // Envelope: sender is the configured From address; recipients are To + Cc + Bcc.
    assert_eq!(m.mail_from, FROM_ADDR, "envelope sender (MAIL FROM)");
    let mut rcpt: Vec<String> = m.rcpt_to.iter().map(|s| s.to_ascii_lowercase()).collect();
    rcpt.sort();
    assert_eq!(
        rcpt,
        vec![
            "accounts@example.net",
            "archive@shop.example",
            "jane.doe@example.net",
            "max.mustermann@example.org"
        ],
        "envelope recipients (RCPT TO) must be To + Cc + Bcc"
    );

    // Headers.
    let p = m.parsed();
    let from = p.from().and_then(|a| a.first()).expect("From header");
    assert_eq!(from.address(), Some(FROM_ADDR), "From address");
    assert_eq!(from.name(), Some("Shop Billing"), "From display name");
    let to = p.to().expect("To header");
    let to_list: Vec<(Option<&str>, Option<&str>)> =
        to.iter().map(|a| (a.name(), a.address())).collect();
    assert_eq!(
        to_list,
        vec![
            (Some("Jane Doe"), Some("jane.doe@example.net")),
            (Some("Max Mustermann"), Some("max.mustermann@example.org"))
        ],
        "To header: both recipients with their names, in manifest order"
    );
    assert_eq!(addrs(p.cc()), vec!["accounts@example.net"], "Cc header");
    assert_eq!(
        addrs(p.reply_to()),
        vec!["billing-replies@shop.example"],
        "Reply-To header from the manifest"
    );
    assert_eq!(
        p.subject(),
        Some("Your invoice INV-2026-000123"),
        "Subject from the template"
    );
    let mid = p.message_id().expect("Message-ID header");
    assert!(
        mid.contains(id),
        "Message-ID {mid:?} must be derived from the job id {id}"
    );
    let date = p.date().expect("Date header").to_timestamp() as f64;
    assert!(
        date >= before - 120.0 && date <= after + 120.0,
        "Date header {date} must be the time of sending ({before}..{after})"
    );
    for h in [
        "From",
        "To",
        "Cc",
        "Reply-To",
        "Subject",
        "Date",
        "Message-ID",
    ] {
        assert_eq!(
            header_count(&m.raw, h),
            1,
            "exactly one {h} header expected"
        );
    }
    assert_eq!(header_count(&m.raw, "Bcc"), 0, "Bcc must not be a header");
    let headers_text: String = raw_headers(&m.raw)
        .iter()
        .map(|(k, v)| format!("{k}: {v}\n"))
        .collect();
    assert!(
        !headers_text.contains("archive@shop.example"),
        "the Bcc address must not appear in any header:\n{headers_text}"
    );

    // Personalised text.
    let body = p.body_text(0).expect("a text/plain body");
    assert!(
        body.contains("Dear Jane Doe,"),
        "body must greet the customer: {body:?}"
    );
    assert!(
        body.contains("your invoice INV-2026-000123."),
        "body must carry the invoice number: {body:?}"
    );
    assert!(
        !body.contains("{{"),
        "template syntax left in the body: {body:?}"
    );

    // Attachment: byte-identical, right type, non-ASCII name intact (RFC 2231).
    let atts: Vec<_> = p.attachments().collect();
    assert_eq!(atts.len(), 1, "exactly one attachment");
    let att = atts[0];
    assert_eq!(
        att.attachment_name(),
        Some(fname),
        "attachment file name must survive"
    );
    assert!(
        att.contents() == upload.as_slice(),
        "attachment must be byte-identical to the upload ({} bytes received, {} uploaded)",
        att.contents().len(),
        upload.len()
    );
    let ct = att.content_type().expect("attachment Content-Type");
    assert_eq!(
        (ct.ctype(), ct.subtype()),
        ("application", Some("pdf")),
        "attachment Content-Type"
    );
    let raw_text = String::from_utf8_lossy(&m.raw);
    assert!(
        raw_text.contains("filename*"),
        "non-ASCII file name must be encoded as an RFC 2231 parameter (filename*=...)"
    );

    // Spool: sent/ID holds the manifest and the document; nothing left behind.
    assert_sent(&site, id);
    let sent = site.dir("sent").join(id);
    assert!(
        sent.join("manifest.xml").is_file(),
        "sent/{id}/manifest.xml"
    );
    assert_eq!(
        fs::read(sent.join("documents").join(format!("{id}.pdf"))).ok(),
        Some(upload.clone()),
        "sent/{id}/documents/{id}.pdf must be the uploaded document"
    );
    {
        use std::os::unix::fs::PermissionsExt;
        for p in [sent.clone(), sent.join("documents"), sent.join("state")] {
            if let Ok(m) = fs::metadata(&p) {
                assert_eq!(
                    m.permissions().mode() & 0o007,
                    0,
                    "nothing in the spool is world-accessible: {} has mode {:o}",
                    p.display(),
                    m.permissions().mode() & 0o7777
                );
            }
        }
    }
    assert!(
        site.entries("incoming").is_empty(),
        "incoming/ must be empty: {:?}",
        site.entries("incoming")
    );
    assert!(
        site.entries("active").is_empty(),
        "active/ must be empty: {:?}",
        site.entries("active")
    );
    assert!(site.entries("failed").is_empty(), "failed/ must be empty");
    assert!(
        site.entries("deferred").is_empty(),
        "deferred/ must be empty"
    );

    // One log line for the outcome.
    let lines = out.job_lines(id);
    assert_eq!(
        lines.len(),
        1,
        "one log line per job outcome; stderr:\n{}",
        out.stderr
    );
    assert!(lines[0].contains("status=sent"), "log line: {:?}", lines[0]);
    assert!(
        lines[0].contains(mid.trim_matches(|c| c == '<' || c == '>')),
        "log line must carry the Message-ID {mid}: {:?}",
        lines[0]
    );
}

#[test]
fn template_sees_id_recipients_and_attachments() {
    let mut site = Site::new();
    let peer = start_peer(&site, &PeerOpts::default());
    site.cfg.transport = Transport::smtp(peer.url());
    site.write_config();

    let id = "TPL-1";
    let mut job = Job::invoice(id);
    job.template = vec!["full".into()];
    let size = job.attachments[0].content.len();
    // More documents, in this order: `name` defaults to `file`, `type` from the extension.
    let terms = "Allgemeine Geschäftsbedingungen\n.\nEnde\n"
        .as_bytes()
        .to_vec();
    let data: Vec<u8> = (0..=255u8).rev().collect();
    job.attachments
        .push(Attachment::new("AGB.txt", terms.clone()));
    job.attachments
        .push(Attachment::new("export.bin", data.clone()));
    job.drop_into(&site);
    let out = site.run_ok();

    let msgs = peer.messages();
    assert_eq!(msgs.len(), 1, "one message; stderr:\n{}", out.stderr);
    let p = msgs[0].parsed();
    assert_eq!(
        p.subject(),
        Some("Documents for job TPL-1"),
        "subject of template 'full' with {{{{ id }}}}"
    );
    let body = p.body_text(0).expect("text body").replace("\r\n", "\n");
    assert!(
        body.contains("job TPL-1 for Jane Doe <jane.doe@example.net>."),
        "`id` and `to` ({{name, email}}) in the template: {body:?}"
    );
    assert!(
        body.contains(&format!(
            "* Invoice TPL-1.pdf [TPL-1.pdf] application/pdf {size} bytes"
        )),
        "`attachments` ({{name, file, type, size}}) in the template: {body:?}"
    );
    assert!(
        body.contains("* AGB.txt [AGB.txt] text/plain")
            && body.contains(&format!("{} bytes", terms.len())),
        "second attachment in `attachments`: {body:?}"
    );
    assert!(
        body.contains("\n.\n.leading dot\n..two dots\nend"),
        "lines starting with dots survive SMTP transparency: {body:?}"
    );

    let atts: Vec<_> = p.attachments().collect();
    assert_eq!(atts.len(), 3, "three attachments");
    let names: Vec<Option<&str>> = atts.iter().map(|a| a.attachment_name()).collect();
    assert_eq!(
        names,
        vec![
            Some("Invoice TPL-1.pdf"),
            Some("AGB.txt"),
            Some("export.bin")
        ],
        "attachments in manifest order; name defaults to file"
    );
    let types: Vec<String> = atts
        .iter()
        .map(|a| {
            let ct = a.content_type().expect("Content-Type");
            format!("{}/{}", ct.ctype(), ct.subtype().unwrap_or(""))
        })
        .collect();
    assert_eq!(
        types,
        vec!["application/pdf", "text/plain", "application/octet-stream"],
        "type defaults from the extension (octet-stream when unknown)"
    );
    assert!(
        atts[1].contents() == terms.as_slice(),
        "text attachment byte-identical"
    );
    assert!(
        atts[2].contents() == data.as_slice(),
        "binary attachment byte-identical"
    );
    assert_sent(&site, id);
}

#[test]
fn html_template_gives_multipart_alternative() {
    let mut site = Site::new();
    let peer = start_peer(&site, &PeerOpts::default());
    site.cfg.transport = Transport::smtp(peer.url());
    site.write_config();

    let id = "HTML-1";
    let mut job = Job::invoice(id);
    job.template = vec!["letter".into()];
    // Markup in a variable is text: escaped in the HTML part, verbatim in the text part.
    job.vars[0].1 = "Jane & <i>Doe</i>".into();
    let upload = job.attachments[0].content.clone();
    job.drop_into(&site);
    let out = site.run_ok();

    let msgs = peer.messages();
    assert_eq!(msgs.len(), 1, "one message; stderr:\n{}", out.stderr);
    let raw = String::from_utf8_lossy(&msgs[0].raw).to_ascii_lowercase();
    assert!(
        raw.contains("multipart/alternative"),
        "a template with NAME.html must give multipart/alternative"
    );
    let p = msgs[0].parsed();
    assert_eq!(p.subject(), Some("A letter for Jane & <i>Doe</i>"));
    let text = p.body_text(0).expect("text part").into_owned();
    assert!(
        text.contains("Hello Jane & <i>Doe</i>, this is the plain text."),
        "text part, variable verbatim: {text:?}"
    );
    let html = p.body_html(0).expect("html part").into_owned();
    assert!(
        html.contains("<b>Jane &amp; &lt;i&gt;Doe&lt;")
            && !html.contains("<i>")
            && html.contains("HTML part"),
        "html part, variable HTML-escaped: {html:?}"
    );
    let atts: Vec<_> = p.attachments().collect();
    assert_eq!(atts.len(), 1, "the document is still attached");
    assert!(
        atts[0].contents() == upload.as_slice(),
        "attachment byte-identical"
    );
    assert_sent(&site, id);
}

#[test]
fn manifest_subject_overrides_template_and_config_bcc_is_envelope_only() {
    let mut site = Site::new();
    let peer = start_peer(&site, &PeerOpts::default());
    site.cfg.transport = Transport::smtp(peer.url());
    site.cfg.bcc = Some("audit@shop.example".into());
    site.cfg.reply_to = Some("Billing Desk <desk@shop.example>".into());
    site.write_config();

    let id = "SUBJ-1";
    let mut job = Job::invoice(id);
    let subject = "Ihre Rechnung für März – Jörg Müller";
    job.subject = vec![subject.into()];
    job.drop_into(&site);
    let out = site.run_ok();

    let msgs = peer.messages();
    assert_eq!(msgs.len(), 1, "one message; stderr:\n{}", out.stderr);
    let m = &msgs[0];
    let p = m.parsed();
    assert_eq!(
        p.subject(),
        Some(subject),
        "the manifest's <subject> wins over the template's, non-ASCII intact"
    );
    assert!(
        m.rcpt_to
            .iter()
            .any(|r| r.eq_ignore_ascii_case("audit@shop.example")),
        "config bcc must be an envelope recipient: {:?}",
        m.rcpt_to
    );
    assert_eq!(header_count(&m.raw, "Bcc"), 0, "no Bcc header");
    assert!(
        !String::from_utf8_lossy(&m.raw).contains("audit@shop.example"),
        "the config bcc address must not appear in the message"
    );
    assert_eq!(
        addrs(p.reply_to()),
        vec!["desk@shop.example"],
        "config reply_to applies when the manifest has none"
    );
    assert_sent(&site, id);
}
