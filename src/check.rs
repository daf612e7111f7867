//! `docmail check`: validates the configuration, the templates, the spool and its permissions, and
//! with `--smtp` logs in to the relay. Reports every problem it finds, each with the file and key.

use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::compose::Composer;
use crate::config::{Config, TransportKind};
use crate::deliver::{self, Failure};
use crate::error::Sysexit;
use crate::spool::Place;

pub fn check(file: &Path, smtp: bool) -> anyhow::Result<()> {
    let config = match Config::load(file) {
        Ok(c) => c,
        Err(e) => {
            println!("{e}");
            anyhow::bail!(
                anyhow::Error::from(e)
                    .context(Sysexit::Config)
                    .context(format!("{} is not valid", file.display()))
            )
        }
    };
    let mut problems: Vec<String> = Vec::new();
    let mut problem =
        |key: &str, msg: String| problems.push(format!("{}: key `{key}`: {msg}", file.display()));

    // The spool: every state directory, writable by this user, nothing world-readable.
    match std::fs::metadata(&config.spool) {
        Err(e) => problem(
            "spool",
            format!(
                "{}: {e}; create it (the package's tmpfiles.d does) or fix the path",
                config.spool.display()
            ),
        ),
        Ok(m) if !m.is_dir() => problem(
            "spool",
            format!("{} is not a directory", config.spool.display()),
        ),
        Ok(_) => {
            for place in Place::ALL {
                let dir = config.spool.join(place.dir_name());
                match std::fs::metadata(&dir) {
                    Err(e) => problem("spool", format!("{}: {e}", dir.display())),
                    Ok(m) => {
                        if m.mode() & 0o007 != 0 {
                            problem(
                                "spool",
                                format!(
                                    "{} is accessible to all users (mode {:o}); nothing in the spool may be",
                                    dir.display(),
                                    m.mode() & 0o7777
                                ),
                            );
                        }
                        if rustix::fs::access(
                            &dir,
                            rustix::fs::Access::WRITE_OK | rustix::fs::Access::EXEC_OK,
                        )
                        .is_err()
                        {
                            problem(
                                "spool",
                                format!(
                                    "{} is not writable by this user (uid {})",
                                    dir.display(),
                                    rustix::process::getuid().as_raw()
                                ),
                            );
                        }
                    }
                }
            }
        }
    }

    // Templates: the default one must exist and compile.
    if !config.templates.dir.is_dir() {
        problem(
            "templates.dir",
            format!("{} is not a directory", config.templates.dir.display()),
        );
    } else if let Err(e) = Composer::new(&config).check_template(&config.templates.default) {
        problem("templates.default", e);
    }

    // Transport: what can be checked without sending.
    if config.transport.kind == TransportKind::Smtp {
        if let Err(e) = config.smtp_password() {
            problem("transport.password_file", format!("{e:#}"));
        }
    }
    let mut exit = Sysexit::Config;
    match deliver::open(&config) {
        Err(e) => problem("transport", format!("{e:#}")),
        Ok(mut transport) if smtp || config.transport.kind != TransportKind::Smtp => {
            match transport.probe() {
                Ok(what) => println!("transport: {what}"),
                Err(e) => {
                    if e.failure == Failure::Unavailable
                        && config.transport.kind == TransportKind::Smtp
                    {
                        exit = Sysexit::TempFail;
                    }
                    problem("transport", e.message);
                }
            }
        }
        Ok(_) => {}
    }

    if problems.is_empty() {
        println!(
            "{}: configuration, templates and spool are valid",
            file.display()
        );
        return Ok(());
    }
    for p in &problems {
        println!("{p}");
    }
    Err(anyhow::anyhow!("{} problem(s) in {}", problems.len(), file.display()).context(exit))
}
