//! `docmail render`: builds the message for a manifest exactly as `run` would (documents looked up
//! beside the manifest and checked the same way) and writes it out instead of sending it.

use std::io::Write;
use std::path::Path;

use anyhow::Context;
use sha2::Digest;

use crate::compose::Composer;
use crate::config::Config;
use crate::error::Sysexit;
use crate::intake::{self, Limit, Problem};
use crate::manifest::{self, Rules};

pub fn render(config: &Config, manifest_path: &Path, output: Option<&Path>) -> anyhow::Result<()> {
    let shown = manifest_path.display();
    let describe = |what: String, p: Problem| match p {
        Problem::Bad(why) | Problem::Incomplete(why) => anyhow::anyhow!("{what} {why}"),
        Problem::Missing => anyhow::anyhow!("{what} does not exist"),
    };
    let (bytes, _) = intake::read_upload(manifest_path, Limit::manifest(config))
        .map_err(|p| describe(format!("manifest {shown}"), p))
        .context(Sysexit::DataErr)?;
    let rules = Rules {
        max_recipients: config.limits.max_recipients,
        max_attachments: config.limits.max_attachments,
    };
    let manifest = manifest::parse(&bytes, rules)
        .map_err(|e| anyhow::anyhow!("manifest {shown}: {e}"))
        .context(Sysexit::DataErr)?;
    let dir = manifest_path.parent().unwrap_or(Path::new("."));
    let mut documents = Vec::new();
    for spec in &manifest.attachments {
        let what = format!("document {}", dir.join(&spec.file).display());
        let (doc, _) = intake::read_upload(&dir.join(&spec.file), Limit::attachment(config))
            .map_err(|p| describe(what.clone(), p))
            .context(Sysexit::DataErr)?;
        intake::verify(&doc, spec)
            .map_err(|p| describe(what, p))
            .context(Sysexit::DataErr)?;
        documents.push(doc);
    }
    let sha: [u8; 32] = sha2::Sha256::digest(&bytes).into();
    let composed = Composer::new(config)
        .compose(&manifest, &sha, documents)
        .context(Sysexit::DataErr)?;
    match output {
        Some(path) => std::fs::write(path, &composed.bytes)
            .with_context(|| format!("writing {}", path.display()))
            .context(Sysexit::IoErr)?,
        None => std::io::stdout()
            .write_all(&composed.bytes)
            .context(Sysexit::IoErr)?,
    }
    Ok(())
}
