//! docmail: mails documents that arrive in a drop directory, quickly, once, with nothing lost.
//!
//! `main` parses the command line and dispatches to one entry point per command; every error bubbles up
//! with its context and becomes one message on stderr and a sysexits.h exit code.

mod check;
mod cli;
mod compose;
mod config;
mod deliver;
mod error;
mod intake;
mod manifest;
mod queue;
mod render;
mod report;
mod run;
mod spool;
mod submit;

use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser};

use crate::cli::{Cli, Command};
use crate::config::Config;
use crate::error::Sysexit;

fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let _ = e.print();
            return if e.use_stderr() {
                ExitCode::from(Sysexit::Usage as u8)
            } else {
                ExitCode::SUCCESS
            };
        }
    };
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("docmail: {err:#}");
            ExitCode::from(error::exit_code(&err))
        }
    }
}

fn dispatch(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Run { config } => run::run(&load(&config.config)?),
        Command::Check { config, smtp } => check::check(&config.config, smtp),
        Command::Render {
            manifest,
            output,
            config,
        } => render::render(&load(&config.config)?, &manifest, output.as_deref()),
        Command::Queue { json, config } => queue::queue(&load(&config.config)?, json),
        Command::Retry {
            ids,
            all_failed,
            force,
            config,
        } => queue::retry(&load(&config.config)?, &ids, all_failed, force),
        Command::Remove { ids, config } => queue::remove(&load(&config.config)?, &ids),
        Command::Submit {
            to,
            vars,
            template,
            id,
            files,
            config,
        } => {
            let submission = submit::Submission {
                to: &to,
                vars: &vars,
                template: template.as_deref(),
                id: id.as_deref(),
                files: &files,
            };
            submit::submit(&load(&config.config)?, &submission)
        }
        Command::Generate { what } => generate(&what),
    }
}

fn load(path: &std::path::Path) -> anyhow::Result<Config> {
    Config::load(path)
        .map_err(anyhow::Error::from)
        .context(Sysexit::Config)
}

/// Man page and completions from the clap definitions, for the package build.
fn generate(what: &str) -> anyhow::Result<()> {
    let mut cmd = Cli::command();
    let mut out = std::io::stdout();
    match what {
        "man" => clap_mangen::Man::new(cmd).render(&mut out)?,
        "complete-bash" => {
            clap_complete::generate(clap_complete::Shell::Bash, &mut cmd, "docmail", &mut out)
        }
        "complete-zsh" => {
            clap_complete::generate(clap_complete::Shell::Zsh, &mut cmd, "docmail", &mut out)
        }
        "complete-fish" => {
            clap_complete::generate(clap_complete::Shell::Fish, &mut cmd, "docmail", &mut out)
        }
        _ => unreachable!("clap checks the value"),
    }
    Ok(())
}
