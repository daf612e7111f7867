//! The local `sendmail` binary (`sendmail -i -f FROM -- RCPT…`, message on stdin). Written here rather
//! than taken from lettre because lettre's drops the exit status, and sendmail's exit status is how it
//! tells a temporary failure (EX_TEMPFAIL, 75) from a permanent one.

use std::io::Write;
use std::path::PathBuf;
use std::process::{Command, Stdio};

use lettre::address::Envelope;

use super::{DeliveryError, Failure, Transport};
use crate::config::Config;

pub struct Sendmail {
    program: PathBuf,
}

#[derive(Debug, thiserror::Error)]
enum SendmailError {
    #[error("cannot run {0}: {1}")]
    Spawn(String, std::io::Error),
    #[error("{0} exited with status {1}: {2}")]
    Exit(String, i32, String),
    #[error("{0} was killed by a signal: {1}")]
    Killed(String, String),
}

impl Sendmail {
    pub fn new(config: &Config) -> Sendmail {
        Sendmail {
            program: config
                .transport
                .path
                .clone()
                .unwrap_or_else(|| PathBuf::from("/usr/sbin/sendmail")),
        }
    }

    fn run(&self, envelope: &Envelope, message: &[u8]) -> Result<(), SendmailError> {
        let name = self.program.display().to_string();
        let mut cmd = Command::new(&self.program);
        cmd.arg("-i");
        if let Some(from) = envelope.from() {
            cmd.arg("-f").arg(from);
        }
        cmd.arg("--")
            .args(envelope.to().iter().map(ToString::to_string));
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .map_err(|e| SendmailError::Spawn(name.clone(), e))?;
        let written = child.stdin.take().expect("piped stdin").write_all(message);
        let output = child
            .wait_with_output()
            .map_err(|e| SendmailError::Spawn(name.clone(), e))?;
        let stderr = crate::spool::one_line(&String::from_utf8_lossy(&output.stderr));
        match output.status.code() {
            Some(0) if written.is_ok() => Ok(()),
            Some(0) => Err(SendmailError::Exit(
                name,
                0,
                format!("it stopped reading the message: {}", written.unwrap_err()),
            )),
            Some(code) => Err(SendmailError::Exit(name, code, stderr)),
            None => Err(SendmailError::Killed(name, stderr)),
        }
    }
}

impl Transport for Sendmail {
    fn send(&mut self, envelope: &Envelope, message: &[u8]) -> Result<String, DeliveryError> {
        self.run(envelope, message)
            .map(|()| format!("accepted by {}", self.program.display()))
            .map_err(|e| {
                let failure = match &e {
                    SendmailError::Spawn(..) | SendmailError::Killed(..) => Failure::Unavailable,
                    // sysexits.h: EX_TEMPFAIL, EX_OSERR, EX_IOERR, EX_CANTCREAT and EX_UNAVAILABLE are worth a retry.
                    SendmailError::Exit(_, 75 | 71 | 74 | 73 | 69, _) => Failure::Temporary,
                    SendmailError::Exit(..) => Failure::Permanent,
                };
                DeliveryError {
                    failure,
                    message: e.to_string(),
                }
            })
    }

    fn probe(&mut self) -> Result<String, DeliveryError> {
        use std::os::unix::fs::PermissionsExt;
        match std::fs::metadata(&self.program) {
            Ok(m) if m.is_file() && m.permissions().mode() & 0o111 != 0 => {
                Ok(format!("{} is executable", self.program.display()))
            }
            Ok(_) => Err(DeliveryError {
                failure: Failure::Unavailable,
                message: format!("{} is not an executable file", self.program.display()),
            }),
            Err(e) => Err(DeliveryError {
                failure: Failure::Unavailable,
                message: format!("{}: {e}", self.program.display()),
            }),
        }
    }
}
