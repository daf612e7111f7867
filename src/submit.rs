//! `docmail submit`: enqueues documents from the command line as a job, following the upload contract
//! itself: each file is written under a hidden name and renamed into the drop, the manifest last, so a
//! run never sees a partial job.

use std::io::Write;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use anyhow::{Context, bail};
use sha2::{Digest, Sha256};

use crate::config::Config;
use crate::error::Sysexit;
use crate::manifest::{self, Rules};
use crate::spool::{self, Place};

pub struct Submission<'a> {
    pub to: &'a [String],
    pub vars: &'a [String],
    pub template: Option<&'a str>,
    pub id: Option<&'a str>,
    pub files: &'a [PathBuf],
}

pub fn submit(config: &Config, s: &Submission) -> anyhow::Result<()> {
    let incoming = spool::Spool::open(&config.spool)
        .context(Sysexit::Config)?
        .dir(Place::Incoming);
    let id = match s.id {
        Some(id) => id.to_string(),
        None => {
            let now = std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .unwrap_or_default();
            format!(
                "submit-{}-{}-{}",
                now.as_secs(),
                now.subsec_micros(),
                std::process::id()
            )
        }
    };
    let mut xml = format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<job xmlns=\"{}\" id=\"{}\">\n",
        manifest::NAMESPACE,
        esc(&id)
    );
    for to in s.to {
        xml.push_str(&format!("  <to>{}</to>\n", esc(to)));
    }
    if let Some(t) = s.template {
        xml.push_str(&format!("  <template>{}</template>\n", esc(t)));
    }
    for kv in s.vars {
        let Some((k, v)) = kv.split_once('=') else {
            bail!(anyhow::anyhow!("--var {kv:?}: write NAME=VALUE").context(Sysexit::Usage));
        };
        xml.push_str(&format!("  <var name=\"{}\">{}</var>\n", esc(k), esc(v)));
    }
    let mut staged = Vec::new();
    for (n, file) in s.files.iter().enumerate() {
        let bytes = std::fs::read(file)
            .with_context(|| format!("reading {}", file.display()))
            .context(Sysexit::DataErr)?;
        let shown = file
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        // The name in the drop is derived from the job, so two submissions never collide.
        let ext = Path::new(&shown)
            .extension()
            .map(|e| format!(".{}", e.to_string_lossy()))
            .unwrap_or_default();
        let drop_name = format!("{id}-{}{ext}", n + 1);
        xml.push_str(&format!(
            "  <attachment file=\"{}\" name=\"{}\" size=\"{}\" sha256=\"{}\"/>\n",
            esc(&drop_name),
            esc(&shown),
            bytes.len(),
            manifest::hex(&Sha256::digest(&bytes))
        ));
        staged.push((drop_name, bytes));
    }
    xml.push_str("</job>\n");
    // Check the manifest before anything reaches the drop: a mistake here is the caller's to fix.
    let rules = Rules::of(config);
    manifest::parse(xml.as_bytes(), rules)
        .map_err(|e| anyhow::anyhow!("{e}"))
        .context(Sysexit::DataErr)?;
    for (name, bytes) in &staged {
        place(&incoming, name, bytes)?;
    }
    place(&incoming, &format!("{id}.xml"), xml.as_bytes())?;
    println!("{id}");
    Ok(())
}

/// Writes `name` into the drop under a hidden temporary name, then renames it into place.
fn place(incoming: &Path, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
    let tmp = incoming.join(format!(".{name}.part"));
    let target = incoming.join(name);
    let write = || -> std::io::Result<()> {
        let mut f = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(&tmp)?;
        f.write_all(bytes)?;
        f.sync_data()?;
        spool::rename_noreplace(&tmp, &target)
    };
    write()
        .map_err(|e| {
            let _ = std::fs::remove_file(&tmp);
            anyhow::anyhow!("writing {}: {e}", target.display())
        })
        .context(Sysexit::IoErr)
}

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}
