//! Exit codes (sysexits.h). An error carries its code as anyhow context, added where the kind of
//! failure is known; `main` turns the outermost one into the process's exit status.

use std::fmt;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sysexit {
    /// EX_USAGE: the command line was wrong.
    Usage = 64,
    /// EX_DATAERR: the input (a manifest, a document) was wrong.
    DataErr = 65,
    /// EX_IOERR: reading or writing failed.
    IoErr = 74,
    /// EX_TEMPFAIL: try again later.
    TempFail = 75,
    /// EX_CONFIG: the configuration or the installation is wrong.
    Config = 78,
}

impl fmt::Display for Sysexit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Sysexit::Usage => "usage error",
            Sysexit::DataErr => "bad input",
            Sysexit::IoErr => "I/O error",
            Sysexit::TempFail => "temporary failure",
            Sysexit::Config => "configuration error",
        })
    }
}

impl std::error::Error for Sysexit {}

/// The exit code for an error: the first [`Sysexit`] in its chain, else what its cause suggests.
pub fn exit_code(err: &anyhow::Error) -> u8 {
    // A `Sysexit` is attached with `.context()`, and a context is not an item of `err.chain()` that
    // downcasts to its type; anyhow's own downcast looks through the layers of context.
    if let Some(code) = err.downcast_ref::<Sysexit>() {
        return *code as u8;
    }
    for cause in err.chain() {
        if let Some(code) = cause.downcast_ref::<Sysexit>() {
            return *code as u8;
        }
        if cause.downcast_ref::<crate::config::ConfigError>().is_some() {
            return Sysexit::Config as u8;
        }
    }
    Sysexit::IoErr as u8
}
