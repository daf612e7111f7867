//! Delivery: hands a composed message to the next hop. Each transport lives in its own module with its
//! own error type and implements [`Transport`]; the run holds a `Box<dyn Transport>` and only ever sees
//! how a failure is to be treated ([`Failure`]), never which transport it talks to.

mod maildir;
mod sendmail;
mod smtp;

use std::fmt;

use lettre::address::Envelope;

use crate::config::{Config, TransportKind};

/// How the run must treat a failed delivery.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Failure {
    /// This message cannot be delivered (5xx, rejected recipient, failed login): fail the job.
    Permanent,
    /// This message could not be delivered now (4xx): defer the job.
    Temporary,
    /// The next hop cannot be reached at all (refused, timed out, TLS): defer this job and, without
    /// trying, the rest of the run's jobs.
    Unavailable,
}

#[derive(Debug)]
pub struct DeliveryError {
    pub failure: Failure,
    /// What went wrong, with the server's reply where there is one.
    pub message: String,
}

impl fmt::Display for DeliveryError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.message)
    }
}

impl std::error::Error for DeliveryError {}

pub trait Transport {
    /// Delivers one message; returns the next hop's acceptance (e.g. "250 2.0.0 Ok: queued as …").
    fn send(&mut self, envelope: &Envelope, message: &[u8]) -> Result<String, DeliveryError>;

    /// Checks that the next hop can be reached (and, for SMTP, that the login works), for `docmail check --smtp`.
    fn probe(&mut self) -> Result<String, DeliveryError>;
}

/// The transport the configuration names.
pub fn open(config: &Config) -> anyhow::Result<Box<dyn Transport>> {
    Ok(match config.transport.kind {
        TransportKind::Smtp => Box::new(smtp::Smtp::new(config)?),
        TransportKind::Sendmail => Box::new(sendmail::Sendmail::new(config)),
        TransportKind::Maildir => Box::new(maildir::Maildir::new(config)),
    })
}
