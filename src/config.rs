//! The configuration file, `docmail.toml`: every key, its default, and the checks that explain a bad
//! value with the file, the key and what would be valid. Nothing else reads the file.

use std::fmt;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::time::Duration;

use lettre::message::Mailbox;
use serde::Deserialize;

pub const DEFAULT_PATH: &str = "/etc/docmail/docmail.toml";

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Config {
    #[serde(default = "default_spool")]
    pub spool: PathBuf,
    pub from: Address,
    pub reply_to: Option<Address>,
    #[serde(default)]
    pub bcc: OneOrMany<Address>,
    #[serde(default)]
    pub transport: Transport,
    #[serde(default)]
    pub templates: Templates,
    #[serde(default)]
    pub limits: Limits,
    #[serde(default)]
    pub intake: Intake,
    #[serde(default)]
    pub retry: Retry,
    #[serde(default)]
    pub archive: Archive,
    /// Where the file was read from, for messages.
    #[serde(skip)]
    pub file: PathBuf,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub enum TransportKind {
    Smtp,
    Sendmail,
    Maildir,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Transport {
    pub kind: TransportKind,
    /// SMTP relay in lettre's URL syntax.
    pub url: Option<String>,
    pub user: Option<String>,
    pub password_file: Option<PathBuf>,
    /// Maildir directory, or the sendmail binary.
    pub path: Option<PathBuf>,
    #[serde(default = "default_timeout")]
    pub timeout: Span,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Templates {
    pub dir: PathBuf,
    pub default: String,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Limits {
    pub max_recipients: usize,
    pub max_attachments: usize,
    pub max_attachment_size: Size,
    pub max_manifest_size: Size,
    /// A run stops claiming new work after this long, so that a stalled peer never holds it forever.
    pub max_run_time: Span,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Intake {
    pub settle: Span,
    pub orphan_after: Span,
    pub linger: Span,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Retry {
    pub first: Span,
    pub max: Span,
    pub give_up_after: Span,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Archive {
    pub keep_sent: Span,
    pub receipts: bool,
}

fn default_spool() -> PathBuf {
    PathBuf::from("/var/spool/docmail")
}
fn default_timeout() -> Span {
    Span(Duration::from_secs(30))
}
fn secs(s: u64) -> Span {
    Span(Duration::from_secs(s))
}

impl Default for Transport {
    fn default() -> Self {
        Transport {
            kind: TransportKind::Maildir,
            url: None,
            user: None,
            password_file: None,
            path: Some(PathBuf::from("/var/lib/docmail/outbox")),
            timeout: default_timeout(),
        }
    }
}
impl Default for Templates {
    fn default() -> Self {
        Templates {
            dir: PathBuf::from("/etc/docmail/templates"),
            default: "invoice".into(),
        }
    }
}
impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_recipients: 50,
            max_attachments: 20,
            max_attachment_size: Size(20 << 20),
            max_manifest_size: Size(1 << 20),
            max_run_time: secs(3600),
        }
    }
}
impl Default for Intake {
    fn default() -> Self {
        Intake {
            settle: secs(30),
            orphan_after: secs(86400),
            linger: secs(2),
        }
    }
}
impl Default for Retry {
    fn default() -> Self {
        Retry {
            first: secs(60),
            max: secs(3600),
            give_up_after: secs(5 * 86400),
        }
    }
}
impl Default for Archive {
    fn default() -> Self {
        Archive {
            keep_sent: secs(30 * 86400),
            receipts: true,
        }
    }
}

/// A duration written like `30s`, `5m`, `1h`, `5d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Span(pub Duration);

impl<'de> Deserialize<'de> for Span {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        humantime::parse_duration(&text).map(Span).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid duration {text:?} ({e}); write a number and a unit, like \"30s\", \"5m\", \"1h\" or \"5d\""
            ))
        })
    }
}

/// A size written like `20MiB`, `512KiB` or a plain number of bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Size(pub u64);

impl FromStr for Size {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (digits, unit) = t.split_at(split);
        let n: u64 = digits
            .parse()
            .map_err(|_| format!("invalid size {text:?}"))?;
        let factor: u64 = match unit.trim() {
            "" | "B" => 1,
            "KiB" | "K" => 1 << 10,
            "MiB" | "M" => 1 << 20,
            "GiB" | "G" => 1 << 30,
            "kB" | "KB" => 1000,
            "MB" => 1_000_000,
            "GB" => 1_000_000_000,
            _ => return Err(format!("invalid size {text:?}: unknown unit {unit:?}")),
        };
        n.checked_mul(factor)
            .map(Size)
            .ok_or_else(|| format!("size {text:?} is too large"))
    }
}

impl<'de> Deserialize<'de> for Size {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u64),
            Text(String),
        }
        match Raw::deserialize(d)? {
            Raw::Int(n) => Ok(Size(n)),
            Raw::Text(t) => t.parse().map_err(|e: String| {
                serde::de::Error::custom(format!(
                    "{e}; write a number of bytes or a size like \"20MiB\" or \"512KiB\""
                ))
            }),
        }
    }
}

/// A mail address with an optional display name, as in `Shop Billing <billing@shop.example>`.
#[derive(Debug, Clone)]
pub struct Address(pub Mailbox);

impl<'de> Deserialize<'de> for Address {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        text.parse::<Mailbox>().map(Address).map_err(|e| {
            serde::de::Error::custom(format!(
                "invalid address {text:?} ({e}); write \"user@example.net\" or \"Name <user@example.net>\""
            ))
        })
    }
}

/// A key that takes one value or a list of them (`bcc = "a@b"` or `bcc = ["a@b", "c@d"]`).
#[derive(Debug, Clone)]
pub struct OneOrMany<T>(pub Vec<T>);

impl<T> Default for OneOrMany<T> {
    fn default() -> Self {
        OneOrMany(Vec::new())
    }
}

impl<'de, T: Deserialize<'de>> Deserialize<'de> for OneOrMany<T> {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw<T> {
            One(T),
            Many(Vec<T>),
        }
        Ok(OneOrMany(match Raw::deserialize(d)? {
            Raw::One(t) => vec![t],
            Raw::Many(v) => v,
        }))
    }
}

/// One problem in the configuration, with the key it concerns.
#[derive(Debug)]
pub struct Problem {
    pub key: String,
    pub message: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "key `{}`: {}", self.key, self.message)
    }
}

/// The file could not be used at all, or has problems; each one is listed.
#[derive(Debug, thiserror::Error)]
pub struct ConfigError {
    pub file: PathBuf,
    pub problems: Vec<String>,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, p) in self.problems.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{}: {}", self.file.display(), p)?;
        }
        Ok(())
    }
}

impl Config {
    /// Reads and validates the file. Every problem found is reported, not only the first.
    pub fn load(file: &Path) -> Result<Config, ConfigError> {
        let fail = |problems| ConfigError {
            file: file.to_path_buf(),
            problems,
        };
        let text = std::fs::read_to_string(file)
            .map_err(|e| fail(vec![format!("cannot read the file: {e}")]))?;
        let mut config: Config =
            toml::from_str(&text).map_err(|e| fail(vec![describe_toml_error(&e, &text)]))?;
        config.file = file.to_path_buf();
        // Relative paths are taken relative to the file, so a configuration travels with its templates.
        let base = file.parent().unwrap_or(Path::new("."));
        for p in [&mut config.spool, &mut config.templates.dir] {
            if p.is_relative() {
                *p = joined(base, p);
            }
        }
        for p in [
            &mut config.transport.path,
            &mut config.transport.password_file,
        ]
        .into_iter()
        .flatten()
        {
            if p.is_relative() {
                *p = joined(base, p);
            }
        }
        let problems: Vec<String> = config.problems().iter().map(Problem::to_string).collect();
        if problems.is_empty() {
            Ok(config)
        } else {
            Err(fail(problems))
        }
    }

    /// Checks what serde cannot: combinations of keys and values that depend on each other.
    fn problems(&self) -> Vec<Problem> {
        let mut out = Vec::new();
        let mut problem = |key: &str, message: String| {
            out.push(Problem {
                key: key.into(),
                message,
            })
        };
        let t = &self.transport;
        match t.kind {
            TransportKind::Smtp => match &t.url {
                None => problem("transport.url", "required for kind = \"smtp\", e.g. \"smtp://relay.example.net:587?tls=required\" or \"smtps://relay.example.net\"".into()),
                Some(url) => {
                    if let Err(e) = lettre::SmtpTransport::from_url(url) {
                        problem("transport.url", format!("{url:?} is not a valid SMTP URL ({e}); valid: smtp://HOST[:PORT][?tls=required|opportunistic] or smtps://HOST[:PORT]"));
                    }
                }
            },
            TransportKind::Maildir | TransportKind::Sendmail => {
                for (key, set) in [("url", t.url.is_some()), ("user", t.user.is_some()), ("password_file", t.password_file.is_some())] {
                    if set {
                        problem(&format!("transport.{key}"), "only valid with kind = \"smtp\"".into());
                    }
                }
                if t.kind == TransportKind::Maildir && t.path.is_none() {
                    problem("transport.path", "required for kind = \"maildir\": the Maildir directory".into());
                }
            }
        }
        if t.timeout.0.is_zero() {
            problem(
                "transport.timeout",
                "must be more than 0s, e.g. \"30s\"".into(),
            );
        }
        if !valid_template_name(&self.templates.default) {
            problem(
                "templates.default",
                format!(
                    "{:?} is not a template name; use letters, digits, '-' and '_'",
                    self.templates.default
                ),
            );
        }
        if self.limits.max_recipients == 0 {
            problem("limits.max_recipients", "must be at least 1".into());
        }
        if self.limits.max_attachments == 0 {
            problem("limits.max_attachments", "must be at least 1".into());
        }
        if self.retry.first.0.is_zero() || self.retry.max.0 < self.retry.first.0 {
            problem(
                "retry.first",
                "must be more than 0s and not more than retry.max".into(),
            );
        }
        if self.spool.as_os_str().is_empty() {
            problem(
                "spool",
                "must be a directory, e.g. \"/var/spool/docmail\"".into(),
            );
        }
        out
    }

    /// The SMTP password: `password_file`, else the systemd credential `smtp-password`.
    pub fn smtp_password(&self) -> anyhow::Result<Option<String>> {
        use anyhow::Context;
        let from_credential = std::env::var_os("CREDENTIALS_DIRECTORY")
            .map(|d| PathBuf::from(d).join("smtp-password"));
        let file = match (&self.transport.password_file, from_credential) {
            (Some(f), _) => f.clone(),
            (None, Some(c)) if c.exists() => c,
            _ => return Ok(None),
        };
        let text = std::fs::read_to_string(&file).with_context(|| {
            format!(
                "{}: key `transport.password_file`: cannot read {}",
                self.file.display(),
                file.display()
            )
        })?;
        Ok(Some(text.trim_end_matches(['\n', '\r']).to_string()))
    }
}

/// `base/path` with `.` and `name/..` taken out, so that logs and reasons show `target/demo/spool`
/// rather than `examples/../target/demo/spool`. (Lexical: a symlink in `base` followed by `..` would
/// be resolved differently by the kernel; configuration directories are not expected to be such.)
fn joined(base: &Path, path: &Path) -> PathBuf {
    use std::path::Component;
    let mut out = PathBuf::new();
    for c in base.join(path).components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir
                if matches!(out.components().next_back(), Some(Component::Normal(_))) =>
            {
                out.pop();
            }
            c => out.push(c),
        }
    }
    if out.as_os_str().is_empty() {
        PathBuf::from(".")
    } else {
        out
    }
}

pub fn valid_template_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

/// toml's message already names the line, the key and the problem; we keep it on one line per fact.
fn describe_toml_error(e: &toml::de::Error, text: &str) -> String {
    // The line number plus the line itself name the key, also inside tables.
    let line = e.span().map(|s| {
        let start = s.start.min(text.len());
        let number = text[..start].matches('\n').count() + 1;
        let line_text = text.lines().nth(number - 1).unwrap_or("").trim();
        format!("{number} (`{line_text}`)")
    });
    let msg = e.message().trim().replace('\n', "; ");
    let msg = if msg.starts_with("unknown field") {
        format!("{msg} (unknown keys are errors, see docmail.toml(5))")
    } else {
        msg
    };
    match line {
        Some(l) => format!("line {l}: {msg}"),
        None => msg,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sizes_and_durations() {
        assert_eq!("20MiB".parse::<Size>().unwrap(), Size(20 << 20));
        assert_eq!("512".parse::<Size>().unwrap(), Size(512));
        assert!("12 parsecs".parse::<Size>().is_err());
        let c: Config =
            toml::from_str("from = \"a@b.example\"\n[intake]\nsettle = \"5m\"\n").unwrap();
        assert_eq!(c.intake.settle, Span(Duration::from_secs(300)));
    }

    #[test]
    fn relative_paths_are_joined_to_the_files_directory() {
        assert_eq!(
            joined(Path::new("examples"), Path::new("../target/spool")),
            PathBuf::from("target/spool")
        );
        assert_eq!(
            joined(Path::new("/etc/docmail"), Path::new("./templates")),
            PathBuf::from("/etc/docmail/templates")
        );
        assert_eq!(
            joined(Path::new(""), Path::new("../x")),
            PathBuf::from("../x")
        );
        assert_eq!(joined(Path::new("a"), Path::new("..")), PathBuf::from("."));
    }

    #[test]
    fn unknown_keys_are_errors() {
        let e = toml::from_str::<Config>("from = \"a@b.example\"\nfrm = 1\n").unwrap_err();
        assert!(e.message().contains("unknown field `frm`"), "{e}");
    }
}
