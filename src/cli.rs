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
    /// List jobs in active/, deferred/ and failed/ with age and reason.
    Queue {
        /// Print JSON instead of a table.
        #[arg(long)]
        json: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Make failed or deferred jobs due now; the next run delivers them.
    Retry {
        /// Job names as `docmail queue` shows them.
        #[arg(required_unless_present = "all_failed")]
        ids: Vec<String>,
        /// Retry every job in failed/.
        #[arg(long)]
        all_failed: bool,
        /// Deliver even if a job with the same id was sent before.
        #[arg(long)]
        force: bool,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Discard failed or deferred jobs.
    Remove {
        #[arg(required = true)]
        ids: Vec<String>,
        #[command(flatten)]
        config: ConfigArg,
    },
    /// Enqueue documents as a job, atomically (documents first, manifest last).
    Submit {
        /// A recipient; repeat for more.
        #[arg(long, required = true, value_name = "ADDR")]
        to: Vec<String>,
        /// A template variable; repeat for more.
        #[arg(long = "var", value_name = "K=V")]
        vars: Vec<String>,
        /// The template (default: templates.default).
        #[arg(long, value_name = "T")]
        template: Option<String>,
        /// The job id (default: generated).
        #[arg(long, value_name = "ID")]
        id: Option<String>,
        /// The documents to attach.
        #[arg(required = true, value_name = "FILE")]
        files: Vec<PathBuf>,
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
