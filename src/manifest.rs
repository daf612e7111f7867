//! The manifest: the native XML schema of a job (`urn:docmail:job:1`) and every rule the spec gives for
//! it. This module only reads bytes it is given; opening files and checking documents is `intake`'s work.

use std::collections::BTreeMap;
use std::fmt;

use lettre::Address;
use lettre::message::header::ContentType;
use lettre::message::{Mailbox, Mailboxes};

pub const NAMESPACE: &str = "urn:docmail:job:1";

/// A parsed, valid manifest.
#[derive(Debug, Clone)]
pub struct Manifest {
    pub id: String,
    pub to: Vec<Mailbox>,
    pub cc: Vec<Mailbox>,
    pub bcc: Vec<Mailbox>,
    pub reply_to: Option<Mailbox>,
    pub template: Option<String>,
    pub subject: Option<String>,
    pub vars: BTreeMap<String, String>,
    pub attachments: Vec<AttachmentSpec>,
}

/// One `<attachment>`: a document in the drop and how the recipient sees it.
#[derive(Debug, Clone)]
pub struct AttachmentSpec {
    /// The file name in the drop.
    pub file: String,
    /// The file name the recipient sees.
    pub name: String,
    pub content_type: ContentType,
    /// `content_type` as text, for templates.
    pub type_name: String,
    pub size: Option<u64>,
    pub sha256: Option<[u8; 32]>,
}

/// Limits that come from the configuration.
#[derive(Debug, Clone, Copy)]
pub struct Rules {
    pub max_recipients: usize,
    pub max_attachments: usize,
}

impl Rules {
    pub fn of(config: &crate::config::Config) -> Rules {
        Rules {
            max_recipients: config.limits.max_recipients,
            max_attachments: config.limits.max_attachments,
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ManifestError {
    /// Not well-formed XML. A manifest still being written in place looks like this too, so intake waits
    /// for it to settle before failing the job.
    Malformed(String),
    /// Well-formed, but breaks a rule of the schema: the job fails at once.
    Invalid(String),
}

impl fmt::Display for ManifestError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ManifestError::Malformed(m) => write!(f, "not well-formed XML: {m}"),
            ManifestError::Invalid(m) => f.write_str(m),
        }
    }
}

impl std::error::Error for ManifestError {}

fn invalid<T>(msg: impl Into<String>) -> Result<T, ManifestError> {
    Err(ManifestError::Invalid(msg.into()))
}

/// Whether `id` may name a job: 1–128 of `A-Za-z0-9._-`, not starting with `.`.
pub fn valid_id(id: &str) -> bool {
    (1..=128).contains(&id.len())
        && !id.starts_with('.')
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}

/// Why `file` is not a plain document name in the drop, if it is not.
pub fn bad_file_name(file: &str) -> Option<&'static str> {
    if file.is_empty() {
        Some("is empty")
    } else if file.contains('/') || file.contains('\\') {
        Some("must be a plain file name in the drop, without '/'")
    } else if file.starts_with('.') {
        Some("must not start with '.' (such names are never touched)")
    } else if file.ends_with(".part") || file.ends_with(".tmp") {
        Some("must not end in .part or .tmp (such names are never touched)")
    } else if file.ends_with(".xml") {
        Some("must not end in .xml: files named *.xml in the drop are manifests")
    } else if file.len() > 255 {
        Some("is longer than 255 bytes")
    } else if file.chars().any(char::is_control) {
        Some("must not contain control characters")
    } else {
        None
    }
}

/// Parses and checks a manifest. `bytes` may be anything an uploader wrote.
pub fn parse(bytes: &[u8], rules: Rules) -> Result<Manifest, ManifestError> {
    let text = std::str::from_utf8(bytes)
        .map_err(|e| ManifestError::Malformed(format!("not UTF-8 ({e})")))?;
    let options = roxmltree::ParsingOptions {
        allow_dtd: false,
        nodes_limit: 100_000,
        ..Default::default()
    };
    let doc = roxmltree::Document::parse_with_options(text, options).map_err(|e| match e {
        roxmltree::Error::DtdDetected => ManifestError::Invalid(
            "a DOCTYPE is not allowed in a manifest (entities are a known attack)".into(),
        ),
        roxmltree::Error::NodesLimitReached => {
            ManifestError::Invalid("too many XML nodes (limit 100000)".into())
        }
        e => ManifestError::Malformed(e.to_string()),
    })?;
    let root = doc.root_element();
    if root.tag_name().name() != "job" || root.tag_name().namespace() != Some(NAMESPACE) {
        return invalid(format!(
            "the root element must be <job xmlns=\"{NAMESPACE}\">, found <{}> in namespace {:?}",
            root.tag_name().name(),
            root.tag_name().namespace().unwrap_or("(none)")
        ));
    }
    only_attributes(&root, "job", &["id"])?;
    let id = match root.attribute("id") {
        None => return invalid("<job> attribute id is required"),
        Some(id) if !valid_id(id) => {
            return invalid(format!(
                "<job> attribute id {:?}: must be 1 to 128 characters of A-Z a-z 0-9 . _ - and not start with '.'",
                shorten(id)
            ));
        }
        Some(id) => id.to_string(),
    };

    let mut m = Manifest {
        id,
        to: vec![],
        cc: vec![],
        bcc: vec![],
        reply_to: None,
        template: None,
        subject: None,
        vars: BTreeMap::new(),
        attachments: vec![],
    };
    for node in root.children() {
        if node.is_text() {
            if !node.text().unwrap_or("").trim().is_empty() {
                return invalid("<job> must not contain text outside its elements");
            }
            continue;
        }
        if !node.is_element() {
            continue; // comments and processing instructions
        }
        let tag = node.tag_name();
        if tag.namespace() != Some(NAMESPACE) {
            return invalid(format!(
                "unknown element <{}> in namespace {:?}; allowed in <job>: to, cc, bcc, reply-to, template, subject, var, attachment",
                tag.name(),
                tag.namespace().unwrap_or("(none)")
            ));
        }
        let name = tag.name();
        match name {
            "to" | "cc" | "bcc" | "reply-to" => {
                only_attributes(&node, name, &["name"])?;
                let mailbox = mailbox(&node, name)?;
                match name {
                    "to" => m.to.push(mailbox),
                    "cc" => m.cc.push(mailbox),
                    "bcc" => m.bcc.push(mailbox),
                    _ if m.reply_to.is_some() => {
                        return invalid("<reply-to> may appear at most once");
                    }
                    _ => m.reply_to = Some(mailbox),
                }
            }
            "template" => {
                only_attributes(&node, name, &[])?;
                let t = leaf_text(&node, name)?;
                if m.template.is_some() {
                    return invalid("<template> may appear at most once");
                }
                if !crate::config::valid_template_name(t.trim()) {
                    return invalid(format!(
                        "<template> {:?}: a template name is letters, digits, '-' and '_'",
                        shorten(&t)
                    ));
                }
                m.template = Some(t.trim().to_string());
            }
            "subject" => {
                only_attributes(&node, name, &[])?;
                let s = leaf_text(&node, name)?;
                if m.subject.is_some() {
                    return invalid("<subject> may appear at most once");
                }
                if s.chars().any(char::is_control) {
                    return invalid(
                        "<subject> must be one line without control characters (CR/LF would inject headers)",
                    );
                }
                m.subject = Some(s.trim().to_string());
            }
            "var" => {
                only_attributes(&node, name, &["name"])?;
                let key = node.attribute("name").ok_or(ManifestError::Invalid(
                    "<var> attribute name is required".into(),
                ))?;
                let identifier = key
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphabetic() || c == '_')
                    && key.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
                    && key.len() <= 64;
                if !identifier {
                    return invalid(format!(
                        "<var> attribute name {:?}: must be a letter or '_' followed by letters, digits or '_'",
                        shorten(key)
                    ));
                }
                if matches!(key, "id" | "to" | "attachments") {
                    return invalid(format!(
                        "<var name=\"{key}\">: the name is reserved for the template variable docmail sets"
                    ));
                }
                let value = leaf_text(&node, name)?;
                if m.vars.insert(key.to_string(), value).is_some() {
                    return invalid(format!("<var name=\"{key}\"> appears twice"));
                }
            }
            "attachment" => m.attachments.push(attachment(&node)?),
            other => {
                return invalid(format!(
                    "unknown element <{other}>; allowed in <job>: to, cc, bcc, reply-to, template, subject, var, attachment"
                ));
            }
        }
    }
    if m.to.is_empty() {
        return invalid("<to> is required: at least one recipient");
    }
    let recipients = m.to.len() + m.cc.len() + m.bcc.len();
    if recipients > rules.max_recipients {
        return invalid(format!(
            "{recipients} recipients in <to>, <cc> and <bcc>; limits.max_recipients allows {}",
            rules.max_recipients
        ));
    }
    if m.attachments.is_empty() {
        return invalid("<attachment> is required: at least one document");
    }
    if m.attachments.len() > rules.max_attachments {
        return invalid(format!(
            "{} <attachment> elements; limits.max_attachments allows {}",
            m.attachments.len(),
            rules.max_attachments
        ));
    }
    let mut seen = std::collections::HashSet::new();
    for a in &m.attachments {
        if !seen.insert(a.file.as_str()) {
            return invalid(format!(
                "<attachment> attribute file {:?} appears twice",
                a.file
            ));
        }
    }
    Ok(m)
}

fn only_attributes(
    node: &roxmltree::Node,
    element: &str,
    allowed: &[&str],
) -> Result<(), ManifestError> {
    for attr in node.attributes() {
        if attr.namespace().is_some() || !allowed.contains(&attr.name()) {
            let valid = if allowed.is_empty() {
                "none".to_string()
            } else {
                allowed.join(", ")
            };
            return invalid(format!(
                "<{element}> has unknown attribute {:?}; allowed: {valid}",
                attr.name()
            ));
        }
    }
    Ok(())
}

/// The text of an element that must not contain elements.
fn leaf_text(node: &roxmltree::Node, element: &str) -> Result<String, ManifestError> {
    if node.children().any(|c| c.is_element()) {
        return invalid(format!("<{element}> must contain only text, not elements"));
    }
    Ok(node.children().filter_map(|c| c.text()).collect())
}

fn mailbox(node: &roxmltree::Node, element: &str) -> Result<Mailbox, ManifestError> {
    let text = leaf_text(node, element)?;
    let text = text.trim();
    let email: Address = text.parse().map_err(|e| {
        ManifestError::Invalid(format!(
            "<{element}> {:?} is not a valid mail address ({e}); write user@example.net",
            shorten(text)
        ))
    })?;
    if !email.user().is_ascii() {
        return invalid(format!(
            "<{element}> {:?}: a non-ASCII local part needs SMTPUTF8, which docmail does not send; use an ASCII address",
            shorten(text)
        ));
    }
    // An internationalised domain goes out in its ASCII form (IDNA, xn--…): docmail does not send
    // SMTPUTF8, so the envelope and the headers must stay ASCII.
    let email = if email.domain().is_ascii() {
        email
    } else {
        idna::domain_to_ascii(email.domain())
            .ok()
            .and_then(|domain| Address::new(email.user(), domain).ok())
            .ok_or_else(|| {
                ManifestError::Invalid(format!(
                    "<{element}> {:?}: the domain has no valid ASCII (IDNA) form",
                    shorten(text)
                ))
            })?
    };
    let name = node
        .attribute("name")
        .map(str::trim)
        .filter(|n| !n.is_empty());
    if let Some(n) = name {
        if n.chars().any(char::is_control) {
            return invalid(format!(
                "<{element}> attribute name must not contain control characters (CR/LF would inject headers)"
            ));
        }
        if n.len() > 256 {
            return invalid(format!(
                "<{element}> attribute name is longer than 256 bytes"
            ));
        }
    }
    let mailbox = Mailbox::new(name.map(str::to_string), email);
    // lettre derives the envelope from the headers it writes: a mailbox whose header text does not parse
    // back as itself would silently drop out of the recipients (quoted local parts such as
    // "a b"@example.net, address literals such as a@[192.0.2.1]).
    let one = Mailboxes::from(mailbox.clone());
    if one.to_string().parse::<Mailboxes>().ok() != Some(one) {
        return invalid(format!(
            "<{element}> {:?}: docmail cannot send to this form of address (quoted local parts and [address literals] are not supported); use a plain address like user@example.net",
            shorten(text)
        ));
    }
    Ok(mailbox)
}

fn attachment(node: &roxmltree::Node) -> Result<AttachmentSpec, ManifestError> {
    only_attributes(
        node,
        "attachment",
        &["file", "name", "type", "size", "sha256"],
    )?;
    if node
        .children()
        .any(|c| c.is_element() || c.text().is_some_and(|t| !t.trim().is_empty()))
    {
        return invalid("<attachment> must be empty; describe the document with its attributes");
    }
    let file = node.attribute("file").ok_or(ManifestError::Invalid(
        "<attachment> attribute file is required".into(),
    ))?;
    if let Some(why) = bad_file_name(file) {
        return invalid(format!(
            "<attachment> attribute file {:?} {why}",
            shorten(file)
        ));
    }
    let name = node.attribute("name").unwrap_or(file).trim();
    if name.is_empty()
        || name.chars().any(char::is_control)
        || name.contains('/')
        || name.contains('\\')
        || name.len() > 255
    {
        return invalid(format!(
            "<attachment file={file:?}> attribute name {:?}: must be a file name of at most 255 bytes without '/', '\\' or control characters",
            shorten(name)
        ));
    }
    let type_name = node
        .attribute("type")
        .map(str::trim)
        .unwrap_or_else(|| type_for(file));
    let content_type = ContentType::parse(type_name).map_err(|_| {
        ManifestError::Invalid(format!(
            "<attachment file={file:?}> attribute type {:?} is not a MIME type like application/pdf",
            shorten(type_name)
        ))
    })?;
    let size = match node.attribute("size") {
        Some(s) => Some(s.trim().parse::<u64>().map_err(|_| {
            ManifestError::Invalid(format!(
                "<attachment file={file:?}> attribute size {:?} must be a number of bytes",
                shorten(s)
            ))
        })?),
        None => None,
    };
    let sha256 = match node.attribute("sha256") {
        Some(h) => Some(parse_sha256(h.trim()).ok_or_else(|| {
            ManifestError::Invalid(format!(
                "<attachment file={file:?}> attribute sha256 {:?} must be 64 hexadecimal digits",
                shorten(h)
            ))
        })?),
        None => None,
    };
    Ok(AttachmentSpec {
        file: file.to_string(),
        name: name.to_string(),
        content_type,
        type_name: type_name.to_string(),
        size,
        sha256,
    })
}

fn parse_sha256(hex: &str) -> Option<[u8; 32]> {
    if hex.len() != 64 || !hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, byte) in out.iter_mut().enumerate() {
        *byte = u8::from_str_radix(&hex[2 * i..2 * i + 2], 16).ok()?;
    }
    Some(out)
}

/// The MIME type for a file name's extension; `application/octet-stream` when unknown.
pub fn type_for(file: &str) -> &'static str {
    let ext = file
        .rsplit_once('.')
        .map(|(_, e)| e.to_ascii_lowercase())
        .unwrap_or_default();
    match ext.as_str() {
        "pdf" => "application/pdf",
        "txt" => "text/plain; charset=utf-8",
        "csv" => "text/csv; charset=utf-8",
        "html" | "htm" => "text/html; charset=utf-8",
        "png" => "image/png",
        "jpg" | "jpeg" => "image/jpeg",
        "gif" => "image/gif",
        "tif" | "tiff" => "image/tiff",
        "zip" => "application/zip",
        "json" => "application/json",
        "odt" => "application/vnd.oasis.opendocument.text",
        "ods" => "application/vnd.oasis.opendocument.spreadsheet",
        "docx" => "application/vnd.openxmlformats-officedocument.wordprocessingml.document",
        "xlsx" => "application/vnd.openxmlformats-officedocument.spreadsheetml.sheet",
        _ => "application/octet-stream",
    }
}

/// Keeps hostile values from flooding a reason or a log line.
pub fn shorten(s: &str) -> String {
    const MAX: usize = 80;
    if s.chars().count() <= MAX {
        s.to_string()
    } else {
        format!("{}…", s.chars().take(MAX).collect::<String>())
    }
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    const RULES: Rules = Rules {
        max_recipients: 3,
        max_attachments: 5,
    };

    fn job(body: &str) -> String {
        format!("<job xmlns=\"{NAMESPACE}\" id=\"J-1\">{body}<attachment file=\"a.pdf\"/></job>")
    }

    #[test]
    fn minimal_job_parses_with_defaults() {
        let m = parse(
            job("<to name=\"Jane\">jane@example.net</to>").as_bytes(),
            RULES,
        )
        .unwrap();
        assert_eq!(m.id, "J-1");
        assert_eq!(m.to[0].name.as_deref(), Some("Jane"));
        assert_eq!(m.attachments[0].name, "a.pdf");
        assert_eq!(
            m.attachments[0].content_type,
            ContentType::parse("application/pdf").unwrap()
        );
    }

    #[test]
    fn truncated_xml_is_malformed_not_invalid() {
        let full = job("<to>jane@example.net</to>");
        let half = &full[..full.len() / 2];
        assert!(matches!(
            parse(half.as_bytes(), RULES),
            Err(ManifestError::Malformed(_))
        ));
        assert!(matches!(
            parse(b"", RULES),
            Err(ManifestError::Malformed(_))
        ));
    }

    #[test]
    fn rules() {
        let cases = [
            ("<to>jane@example.net</to><foo/>", "unknown element <foo>"),
            (
                "<to x=\"1\">jane@example.net</to>",
                "unknown attribute \"x\"",
            ),
            ("<to>not an address</to>", "not a valid mail address"),
            (
                "<to>a@example.net</to><to>b@example.net</to><cc>c@example.net</cc><bcc>d@example.net</bcc>",
                "limits.max_recipients",
            ),
            (
                "<to>a@example.net</to><subject>x\ny</subject>",
                "<subject> must be one line",
            ),
            ("<to>a@example.net</to><var name=\"id\">x</var>", "reserved"),
        ];
        for (body, want) in cases {
            let err = parse(job(body).as_bytes(), RULES).unwrap_err().to_string();
            assert!(err.contains(want), "{body}: {err}");
        }
    }

    #[test]
    fn addresses() {
        let to = |addr: &str| parse(job(&format!("<to>{addr}</to>")).as_bytes(), RULES);
        // IDN domains go out in their ASCII form.
        let m = to("info@bücher.example").unwrap();
        assert_eq!(m.to[0].email.to_string(), "info@xn--bcher-kva.example");
        // Forms whose header text does not read back as the same address are refused, not dropped.
        for addr in ["\"a b\"@example.net", "a@[127.0.0.1]"] {
            let err = to(addr).unwrap_err().to_string();
            assert!(
                err.contains("cannot send to this form of address"),
                "{addr}: {err}"
            );
        }
        let err = to("jörg@example.net").unwrap_err().to_string();
        assert!(err.contains("SMTPUTF8"), "{err}");
        // A display name full of syntax stays a name.
        let m = parse(
            job("<to name=\"Jane &lt;evil@example.org&gt;, &quot;Bob\">jane@example.net</to>")
                .as_bytes(),
            RULES,
        )
        .unwrap();
        assert_eq!(m.to.len(), 1);
        assert_eq!(m.to[0].email.to_string(), "jane@example.net");
    }

    #[test]
    fn doctype_is_rejected() {
        let xml =
            format!("<!DOCTYPE job [<!ENTITY a \"aaaa\">]><job xmlns=\"{NAMESPACE}\" id=\"x\"/>");
        assert!(
            parse(xml.as_bytes(), RULES)
                .unwrap_err()
                .to_string()
                .contains("DOCTYPE")
        );
    }

    #[test]
    fn file_names() {
        assert!(bad_file_name("../etc/passwd").is_some());
        assert!(bad_file_name("/etc/passwd").is_some());
        assert!(bad_file_name(".hidden").is_some());
        assert!(bad_file_name("other.xml").is_some());
        assert!(bad_file_name("Rechnung ä.pdf").is_none());
    }
}
