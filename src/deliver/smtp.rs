//! SMTP to a relay with lettre: the URL syntax, STARTTLS or implicit TLS verified against the system's
//! roots, AUTH, and one pooled connection reused for a whole backlog.

use std::time::Duration;

use lettre::Transport as _;
use lettre::address::Envelope;
use lettre::transport::smtp::authentication::Credentials;
use lettre::transport::smtp::{Error, PoolConfig, SmtpTransport};

use super::{DeliveryError, Failure, Transport};
use crate::config::Config;

pub struct Smtp {
    transport: SmtpTransport,
    timeout: Duration,
}

impl Smtp {
    pub fn new(config: &Config) -> anyhow::Result<Smtp> {
        let t = &config.transport;
        let url = t.url.as_deref().unwrap_or_default();
        let mut builder = SmtpTransport::from_url(url)?
            .timeout(Some(t.timeout.0))
            // One connection, kept while the backlog lasts: jobs are sent one after the other.
            .pool_config(
                PoolConfig::new()
                    .max_size(1)
                    .idle_timeout(Duration::from_secs(30)),
            );
        // Log in only when a user is configured: the unit always supplies a credential (blank when
        // /etc/docmail/smtp-password does not exist), and a relay without AUTH must not be asked for it.
        let password = config.smtp_password()?.filter(|p| !p.is_empty());
        if let (Some(user), Some(password)) = (t.user.clone(), password) {
            builder = builder.credentials(Credentials::new(user, password));
        }
        Ok(Smtp {
            transport: builder.build(),
            timeout: t.timeout.0,
        })
    }
}

impl Transport for Smtp {
    fn send(&mut self, envelope: &Envelope, message: &[u8]) -> Result<String, DeliveryError> {
        // lettre ends DATA with CRLF.CRLF, which supplies the message's last line break itself.
        let message = message.strip_suffix(b"\r\n").unwrap_or(message);
        disable_nagle();
        let response = self
            .transport
            .send_raw(envelope, message)
            .map_err(|e| classify(e, self.timeout))?;
        let text: Vec<&str> = response.message().collect();
        Ok(format!("{} {}", response.code(), text.join(" ")))
    }

    fn probe(&mut self) -> Result<String, DeliveryError> {
        match self.transport.test_connection() {
            Ok(true) => Ok("connected, TLS and login (if configured) accepted".into()),
            Ok(false) => Err(DeliveryError {
                failure: Failure::Unavailable,
                message: "the server did not answer NOOP".into(),
            }),
            Err(e) => Err(classify(e, self.timeout)),
        }
    }
}

/// Sorts lettre's error: a reply code decides by its class; no reply means the server was not reached.
fn classify(e: Error, timeout: Duration) -> DeliveryError {
    let failure = if e.is_permanent() {
        Failure::Permanent
    } else if e.is_transient() {
        Failure::Temporary
    } else {
        Failure::Unavailable
    };
    let mut message = crate::spool::one_line(&error_chain(&e));
    if timed_out(&e) {
        // A read timeout surfaces as EAGAIN ("resource temporarily unavailable"), which does not
        // tell an operator that the server simply did not answer.
        message = format!(
            "the server did not answer within {} (transport.timeout): {message}",
            humantime::format_duration(timeout)
        );
    }
    if e.status().is_some_and(|c| c.to_string().starts_with("535")) {
        message =
            format!("authentication failed, check transport.user and the password: {message}");
    }
    DeliveryError { failure, message }
}

/// Whether a socket timeout (SO_RCVTIMEO/SO_SNDTIMEO: EAGAIN, or ETIMEDOUT) is behind the error.
fn timed_out(e: &Error) -> bool {
    let mut source: Option<&(dyn std::error::Error + 'static)> = Some(e);
    while let Some(err) = source {
        if let Some(io) = err.downcast_ref::<std::io::Error>() {
            return matches!(
                io.kind(),
                std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
            );
        }
        source = err.source();
    }
    false
}

fn error_chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(inner) = source {
        s.push_str(": ");
        s.push_str(&inner.to_string());
        source = inner.source();
    }
    s
}

/// Sets TCP_NODELAY on this process's sockets. lettre writes a message and then the 5-byte end of
/// DATA as separate writes and does not set TCP_NODELAY; Nagle's algorithm then holds the small write
/// until the server's delayed ACK (40 ms on Linux) arrives, which capped a backlog at about 20 messages
/// a second. lettre offers no hook to the socket, so the open descriptors are looked up instead: a
/// handful of syscalls per message, against 40 ms. Sockets that are not TCP refuse the option; that
/// is ignored.
fn disable_nagle() {
    let Ok(fds) = std::fs::read_dir("/proc/self/fd") else {
        return;
    };
    for entry in fds.flatten() {
        let Some(fd) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<i32>().ok())
        else {
            continue;
        };
        // SAFETY: the descriptor is only borrowed for the two calls below, while it is open in this
        // single-threaded process (the read_dir descriptor itself fails fstat's socket test).
        let fd = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
        if rustix::fs::fstat(fd)
            .is_ok_and(|st| rustix::fs::FileType::from_raw_mode(st.st_mode).is_socket())
        {
            let _ = rustix::net::sockopt::set_tcp_nodelay(fd, true);
        }
    }
}
