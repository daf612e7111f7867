//! The command line, declared with clap. Kept apart from `main` so that the man page and the shell
//! completions are generated from the same definitions (`docmail generate`).

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand};

/// Mail documents dropped into a spool directory: quickly, once, with nothing lost.
#[derive(Parser, Debug)]
#[command(name = "docmail", version, about, long_about = None)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Args, Debug, Clone)]
pub struct ConfigArg {
    /// The configuration file.
    #[arg(long, short = 'c', value_name = "PATH", env = "DOCMAIL_CONFIG", default_value = crate::config::DEFAULT_PATH)]
    pub config: PathBuf,
}

#[derive(Subcommand, Debug)]
pub enum Command {
    /// Deliver complete jobs from the drop and due retries, then exit.
    Run {
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Validate the configuration, templates, spool and permissions.
    Check {
        #[command(flatten)]
        config: ConfigArg,
        /// Also connect to the SMTP relay and log in.
        #[arg(long)]
        smtp: bool,
    },
    /// Build the message for a manifest without sending it.
    Render {
        /// The manifest; its documents are looked up beside it.
        manifest: PathBuf,
        /// Write the message to this file instead of standard output.
        #[arg(short = 'o', long = "output", value_name = "FILE.eml")]
        output: Option<PathBuf>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Print the man page or shell completions (for packaging).
    #[command(hide = true)]
    Generate {
        #[arg(value_parser = ["man", "complete-bash", "complete-zsh", "complete-fish"])]
        what: String,
    },
}
