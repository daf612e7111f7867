//! The whole path from an uploader's values to the bytes of the message: a manifest whose subject,
//! display names, variables, attachment names and types are arbitrary strings (written into the XML as
//! character references, so CR, LF and every other character reach the parser) is parsed by
//! `manifest::parse` and, when accepted, rendered by `compose::Composer` with the example templates
//! (the subject template uses a variable). Whatever the values, the message must never carry a header
//! the templates and docmail did not put there: every header line of the message and of each MIME part
//! is ASCII, ends in CRLF and is a known header or a folded continuation.
#![no_main]

use docmail::{compose, config, manifest};

use std::fmt::Write as _;
use std::sync::OnceLock;

use libfuzzer_sys::fuzz_target;

const RULES: manifest::Rules = manifest::Rules {
    max_recipients: 50,
    max_attachments: 20,
};

struct Setup {
    _dir: tempfile::TempDir,
    composer: compose::Composer,
}

fn setup() -> &'static Setup {
    static SETUP: OnceLock<Setup> = OnceLock::new();
    SETUP.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let examples = concat!(env!("CARGO_MANIFEST_DIR"), "/../examples/templates");
        for t in ["invoice.txt", "invoice.html"] {
            std::fs::copy(format!("{examples}/{t}"), dir.path().join(t)).unwrap();
        }
        std::fs::write(
            dir.path().join("invoice.subject"),
            "Invoice {{ invoice_number }} for {{ customer_name }}",
        )
        .unwrap();
        let toml = format!(
            "from = \"Shop Billing <billing@shop.example>\"\nbcc = \"archive@shop.example\"\n\
             [templates]\ndir = {:?}\ndefault = \"invoice\"\n",
            dir.path().to_str().unwrap()
        );
        let config: config::Config = toml::from_str(&toml).unwrap();
        let composer = compose::Composer::new(&config);
        Setup {
            _dir: dir,
            composer,
        }
    })
}

/// `s` as XML text or attribute content, every character that is not plainly safe as a reference.
fn esc(s: &str) -> String {
    let mut out = String::new();
    for c in s.chars() {
        if c.is_ascii_alphanumeric() || " .-_@".contains(c) {
            out.push(c);
        } else {
            let _ = write!(out, "&#{};", c as u32);
        }
    }
    out
}

const TOP: &[&str] = &[
    "from",
    "reply-to",
    "to",
    "cc",
    "bcc",
    "subject",
    "message-id",
    "date",
    "mime-version",
    "content-type",
    "content-transfer-encoding",
];
const PART: &[&str] = &[
    "content-type",
    "content-transfer-encoding",
    "content-disposition",
];

/// Checks one header block: ASCII, CRLF lines, known names (each once), continuations.
fn check_block(block: &[u8], allowed: &[&str], whole: &[u8]) {
    let shown = || String::from_utf8_lossy(whole).into_owned();
    assert!(block.is_ascii(), "non-ASCII header block in\n{}", shown());
    let text = std::str::from_utf8(block).unwrap();
    let mut seen = std::collections::HashSet::new();
    for line in text.split("\r\n") {
        assert!(
            !line.contains(['\r', '\n']),
            "bare CR or LF in a header:\n{}",
            shown()
        );
        if line.starts_with([' ', '\t']) {
            continue;
        }
        let name = line.split_once(':').map(|(n, _)| n.to_ascii_lowercase());
        let Some(name) = name else {
            panic!("header line {line:?} is no header in\n{}", shown());
        };
        assert!(
            allowed.contains(&name.as_str()),
            "unexpected header {line:?} in\n{}",
            shown()
        );
        assert!(
            seen.insert(name.clone()),
            "header {name} twice in\n{}",
            shown()
        );
    }
}

fn check_message(msg: &[u8]) {
    let end = msg
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .expect("a header block");
    check_block(&msg[..end], TOP, msg);
    // Every MIME part's own headers, found by the boundaries the message declares.
    let text = String::from_utf8_lossy(msg);
    let boundaries: Vec<String> = text
        .match_indices("boundary=\"")
        .filter_map(|(i, m)| {
            let rest = &text[i + m.len()..];
            rest.split_once('"').map(|(b, _)| b.to_string())
        })
        .collect();
    for b in boundaries {
        let marker = format!("\r\n--{b}\r\n");
        for (i, _) in text.match_indices(&marker) {
            let start = i + marker.len();
            let rel = text[start..].find("\r\n\r\n").expect("part headers end");
            check_block(&msg[start..start + rel], PART, msg);
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let mut f = text.split('\0');
    let mut next = || f.next();
    let flags = next().unwrap_or("").bytes().next().unwrap_or(0);
    let subject = next().unwrap_or("");
    let to_name = next().unwrap_or("");
    let customer = next().unwrap_or("");
    let number = next().unwrap_or("");
    let att_name = next().unwrap_or("");
    let to_addr = next()
        .filter(|_| flags & 4 != 0)
        .unwrap_or("jane@example.net");
    let att_type = next().filter(|_| flags & 8 != 0);
    let mut xml = String::from("<job xmlns=\"urn:docmail:job:1\" id=\"INV-1\">");
    let _ = write!(xml, "<to name=\"{}\">{}</to>", esc(to_name), esc(to_addr));
    if flags & 1 != 0 {
        let _ = write!(xml, "<subject>{}</subject>", esc(subject));
    }
    let _ = write!(xml, "<var name=\"customer_name\">{}</var>", esc(customer));
    if flags & 2 != 0 {
        let _ = write!(xml, "<var name=\"invoice_number\">{}</var>", esc(number));
    }
    let _ = write!(xml, "<attachment file=\"a.pdf\" name=\"{}\"", esc(att_name));
    if let Some(t) = att_type {
        let _ = write!(xml, " type=\"{}\"", esc(t));
    }
    xml.push_str("/>");
    xml.push_str("</job>");
    let Ok(m) = manifest::parse(xml.as_bytes(), RULES) else {
        return;
    };
    let sha = [7u8; 32];
    let docs = vec![b"%PDF-1.4 fuzz".to_vec(); m.attachments.len()];
    if let Ok(c) = setup().composer.compose(&m, &sha, docs) {
        check_message(&c.bytes);
    }
});
