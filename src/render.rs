//! `docmail render`: builds the message for a manifest exactly as `run` would (documents looked up
//! beside the manifest and checked the same way) and writes it out instead of sending it.

use std::io::Write;
use std::path::Path;

use crate::compose::Composer;
use crate::config::Config;
use crate::error::Sysexit;
use crate::intake;
use anyhow::Context;

pub fn render(config: &Config, manifest_path: &Path, output: Option<&Path>) -> anyhow::Result<()> {
    let documents = manifest_path.parent().unwrap_or(Path::new("."));
    let job = intake::load(manifest_path, documents, config)
        .map_err(anyhow::Error::msg)
        .context(Sysexit::DataErr)?;
    let composed = Composer::new(config)
        .compose(&job.manifest, &job.manifest_sha256, job.documents)
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
