//! docmail: mails documents that arrive in a drop directory, quickly, once, with nothing lost.
//!
//! `main` parses the command line and dispatches to one entry point per command; every error bubbles up
//! with its context and becomes one message on stderr and a sysexits.h exit code.

use std::io::Write;
use std::process::ExitCode;

use anyhow::Context;
use clap::{CommandFactory, Parser};

use docmail::cli::{Cli, Command};
use docmail::config::Config;
use docmail::error::{self, Sysexit};
use docmail::{check, queue, render, run, submit};

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

/// What docmail(1) says beyond the options: how a run works, the files, exit status, environment.
const MAN_SECTIONS: &str = r#".SH "HOW IT WORKS"
The back office uploads the documents of a job into the drop
.RI ( spool /incoming/),
then an XML manifest naming the recipients, template variables and documents.
.B docmail run
claims every complete job by renaming it into
.IR active/ ,
mails it, and moves it to
.IR sent/ ,
.I deferred/
(temporary failure, retried with growing pauses) or
.I failed/
(with a
.I reason
file).
Incomplete uploads wait up to
.B intake.settle
while complete ones go out.
A run lingers for
.B intake.linger
watching the drop, then exits; under systemd,
.I docmail.path
starts it when a manifest arrives.
.SH FILES
.TP
.I /etc/docmail/docmail.toml
The configuration; see
.BR docmail.toml (5).
.TP
.I /etc/docmail/templates/
NAME.subject, NAME.txt and optional NAME.html, in Jinja syntax.
.TP
.I /var/spool/docmail/
The spool: incoming/, active/, deferred/, failed/, sent/, receipts/.
.SH "EXIT STATUS"
0 done (also when single jobs failed: they are in failed/ and logged),
64 usage error, 65 bad input data, 74 I/O error, 75 temporary failure,
78 configuration error.
.SH ENVIRONMENT
.TP
.B DOCMAIL_CONFIG
The configuration file when
.B \-\-config
is not given.
.TP
.B CREDENTIALS_DIRECTORY
Where systemd puts the
.I smtp\-password
credential.
.SH "SEE ALSO"
.BR docmail.toml (5),
.BR systemd.path (5),
.BR sftp (1)
"#;

/// The COMMANDS section of docmail(1): each command's usage, purpose and options, on one page
/// (clap_mangen would point at a page per command instead).
fn commands_section(cmd: &clap::Command) -> String {
    let roff = |s: &str| s.replace('\\', "\\\\").replace('-', "\\-");
    let mut out = String::from(".SH COMMANDS\n");
    for sub in cmd
        .get_subcommands()
        .filter(|s| !s.is_hide_set() && s.get_name() != "help")
    {
        let usage = sub
            .clone()
            .bin_name(format!("docmail {}", sub.get_name()))
            .render_usage()
            .to_string();
        let usage = usage.trim_start_matches("Usage: ");
        out.push_str(&format!(".TP\n.B {}\n", roff(usage)));
        if let Some(about) = sub.get_about() {
            out.push_str(&format!("{}\n", roff(&about.to_string())));
        }
        for arg in sub
            .get_arguments()
            .filter(|a| !a.is_hide_set() && a.get_id() != "help")
        {
            let name = match (arg.get_short(), arg.get_long()) {
                (Some(s), Some(l)) => format!("\\-{s}, \\-\\-{l}"),
                (None, Some(l)) => format!("\\-\\-{l}"),
                _ => arg
                    .get_value_names()
                    .map(|v| v.join(" "))
                    .unwrap_or_else(|| arg.get_id().to_string()),
            };
            let help = arg.get_help().map(|h| h.to_string()).unwrap_or_default();
            out.push_str(&format!(".RS\n.TP\n.B {name}\n{}\n.RE\n", roff(&help)));
        }
    }
    out
}

/// Man page and completions from the clap definitions, for the package build.
fn generate(what: &str) -> anyhow::Result<()> {
    let mut cmd = Cli::command();
    let mut out = std::io::stdout();
    match what {
        "man" => {
            let man = clap_mangen::Man::new(cmd);
            man.render_title(&mut out)?;
            man.render_name_section(&mut out)?;
            man.render_synopsis_section(&mut out)?;
            man.render_description_section(&mut out)?;
            man.render_options_section(&mut out)?;
            out.write_all(commands_section(&Cli::command()).as_bytes())?;
            out.write_all(MAN_SECTIONS.as_bytes())?;
            man.render_version_section(&mut out)?;
        }
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
