//! Composition: from a job to the exact bytes of a MIME message. Owns the templates (minijinja, from
//! `templates.dir`), the headers (lettre's builder, which also encodes non-ASCII names and RFC 2231 file
//! names) and the Message-ID, which is derived from the job so that a resent copy carries the same one.

use std::collections::BTreeMap;

use lettre::Message;
use lettre::address::Envelope;
use lettre::message::{Attachment, Mailbox, Mailboxes, MultiPart, SinglePart, header};
use minijinja::{Environment, UndefinedBehavior, Value};
use serde::Serialize;

use crate::config::Config;
use crate::manifest::{self, Manifest};

/// A message ready for a transport.
pub struct Composed {
    pub envelope: Envelope,
    pub bytes: Vec<u8>,
    pub message_id: String,
}

/// Why a job's message could not be built: a template error or bad data. Permanent for the job.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ComposeError(String);

pub struct Composer {
    templates: Environment<'static>,
    default_template: String,
    from: Mailbox,
    reply_to: Option<Mailbox>,
    bcc: Vec<Mailbox>,
}

#[derive(Serialize)]
struct Recipient<'a> {
    name: &'a str,
    email: String,
}

#[derive(Serialize)]
struct AttachmentInfo<'a> {
    name: &'a str,
    file: &'a str,
    #[serde(rename = "type")]
    content_type: String,
    size: usize,
}

impl Composer {
    pub fn new(config: &Config) -> Composer {
        let mut templates = Environment::new();
        templates.set_loader(minijinja::path_loader(config.templates.dir.clone()));
        // An undefined variable is an error, not an empty string: better no invoice mail than a wrong one.
        templates.set_undefined_behavior(UndefinedBehavior::Strict);
        Composer {
            templates,
            default_template: config.templates.default.clone(),
            from: config.from.0.clone(),
            reply_to: config.reply_to.as_ref().map(|a| a.0.clone()),
            bcc: config.bcc.0.iter().map(|a| a.0.clone()).collect(),
        }
    }

    /// The Message-ID of a job: its id and a digest of its manifest, at the sender's domain. The same
    /// upload always gets the same one; a new upload reusing an id gets a new one.
    pub fn message_id(&self, manifest: &Manifest, manifest_sha256: &[u8; 32]) -> String {
        format!(
            "<{}.{}@{}>",
            manifest.id,
            &manifest::hex(manifest_sha256)[..16],
            self.from.email.domain()
        )
    }

    /// Builds the message for a job whose documents are `documents` (in the manifest's order). They are
    /// taken by value: the message is the only copy that is kept.
    pub fn compose(
        &self,
        manifest: &Manifest,
        manifest_sha256: &[u8; 32],
        documents: Vec<Vec<u8>>,
    ) -> Result<Composed, ComposeError> {
        let template = manifest
            .template
            .as_deref()
            .unwrap_or(&self.default_template);
        let sizes: Vec<usize> = documents.iter().map(Vec::len).collect();
        let context = self.context(manifest, &sizes);
        let render = |suffix: &str, required: bool| -> Result<Option<String>, ComposeError> {
            let name = format!("{template}.{suffix}");
            match self.templates.get_template(&name) {
                Ok(t) => t
                    .render(&context)
                    .map(Some)
                    .map_err(|e| ComposeError(format!("template {name}: {}", describe(&e)))),
                Err(e) if e.kind() == minijinja::ErrorKind::TemplateNotFound && !required => {
                    Ok(None)
                }
                Err(e) if e.kind() == minijinja::ErrorKind::TemplateNotFound => Err(ComposeError(
                    format!("unknown template {template:?}: templates.dir has no {name}"),
                )),
                Err(e) => Err(ComposeError(format!("template {name}: {}", describe(&e)))),
            }
        };
        let subject = match &manifest.subject {
            Some(s) => s.clone(),
            None => render("subject", true)?
                .unwrap_or_default()
                .trim()
                .to_string(),
        };
        if subject.chars().any(char::is_control) {
            return Err(ComposeError(format!(
                "template {template}.subject rendered a subject with a line break or control character ({:?}); a subject is one line",
                manifest::shorten(&subject)
            )));
        }
        let text = render("txt", true)?.unwrap_or_default();
        let html = render("html", false)?;

        let message_id = self.message_id(manifest, manifest_sha256);
        let mut builder = Message::builder()
            .from(self.from.clone())
            .subject(subject)
            .message_id(Some(message_id.clone()))
            .date_now();
        // Each address header is set once, whole: the builder's to()/cc()/bcc() parse the header again
        // for every address they add, which takes minutes for a few thousand recipients.
        let list = |m: &[&Mailbox]| m.iter().copied().cloned().collect::<Mailboxes>();
        let to: Vec<&Mailbox> = manifest.to.iter().collect();
        let cc: Vec<&Mailbox> = manifest.cc.iter().collect();
        let bcc: Vec<&Mailbox> = manifest.bcc.iter().chain(&self.bcc).collect();
        builder = builder.header(header::To::from(list(&to)));
        if !cc.is_empty() {
            builder = builder.header(header::Cc::from(list(&cc)));
        }
        if !bcc.is_empty() {
            builder = builder.header(header::Bcc::from(list(&bcc)));
        }
        if let Some(r) = manifest.reply_to.as_ref().or(self.reply_to.as_ref()) {
            builder = builder.reply_to(r.clone());
        }
        // Boundaries derived from the job (and starting with "=_", which neither base64 nor
        // quoted-printable can produce) make the message reproducible: `render` shows exactly what `run` sends.
        let boundary =
            |part: &str| format!("=_docmail_{}_{part}", &manifest::hex(manifest_sha256)[..24]);
        let mixed = MultiPart::mixed().boundary(boundary("mixed"));
        let mut mixed = match html {
            Some(html) => mixed.multipart(
                MultiPart::alternative()
                    .boundary(boundary("alt"))
                    .singlepart(SinglePart::plain(text))
                    .singlepart(SinglePart::html(html)),
            ),
            None => mixed.singlepart(SinglePart::plain(text)),
        };
        for (spec, bytes) in manifest.attachments.iter().zip(documents) {
            mixed = mixed.singlepart(
                Attachment::new(spec.name.clone()).body(bytes, spec.content_type.clone()),
            );
        }
        let message = builder
            .multipart(mixed)
            .map_err(|e| ComposeError(format!("cannot build the message: {e}")))?;
        let mut bytes = message.formatted();
        // A message ends with a line break; SMTP would add it, a Maildir file or sendmail's stdin would not.
        if !bytes.ends_with(b"\r\n") {
            bytes.extend_from_slice(b"\r\n");
        }
        Ok(Composed {
            envelope: message.envelope().clone(),
            bytes,
            message_id,
        })
    }

    fn context(&self, manifest: &Manifest, sizes: &[usize]) -> Value {
        let mut ctx: BTreeMap<&str, Value> = manifest
            .vars
            .iter()
            .map(|(k, v)| (k.as_str(), Value::from(v.as_str())))
            .collect();
        ctx.insert("id", Value::from(manifest.id.as_str()));
        let to: Vec<Recipient> = manifest
            .to
            .iter()
            .map(|m| Recipient {
                name: m.name.as_deref().unwrap_or(""),
                email: m.email.to_string(),
            })
            .collect();
        ctx.insert("to", Value::from(minijinja::value::Serde(&to)));
        let attachments: Vec<AttachmentInfo> = manifest
            .attachments
            .iter()
            .zip(sizes)
            .map(|(a, &size)| AttachmentInfo {
                name: &a.name,
                file: &a.file,
                content_type: a.type_name.clone(),
                size,
            })
            .collect();
        ctx.insert(
            "attachments",
            Value::from(minijinja::value::Serde(&attachments)),
        );
        Value::from(ctx)
    }

    /// Compiles every template of `name` (for `docmail check`).
    pub fn check_template(&self, name: &str) -> Result<(), String> {
        for (suffix, required) in [("subject", true), ("txt", true), ("html", false)] {
            let file = format!("{name}.{suffix}");
            match self.templates.get_template(&file) {
                Ok(_) => {}
                Err(e) if e.kind() == minijinja::ErrorKind::TemplateNotFound && !required => {}
                Err(e) => return Err(format!("{file}: {}", describe(&e))),
            }
        }
        Ok(())
    }
}

/// minijinja's error (which names the template and line) on one line.
fn describe(e: &minijinja::Error) -> String {
    crate::spool::one_line(&e.to_string())
}
