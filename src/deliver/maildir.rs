//! A local Maildir: each message is written to `tmp/`, flushed, and renamed into `new/`, so a reader
//! never sees half a message. The embedded default, for trying docmail out and for tests.

use std::fs;
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::SystemTime;

use lettre::address::Envelope;

use super::{DeliveryError, Failure, Transport};
use crate::config::Config;

pub struct Maildir {
    root: PathBuf,
    host: String,
}

static COUNTER: AtomicU64 = AtomicU64::new(0);

impl Maildir {
    pub fn new(config: &Config) -> Maildir {
        let host = rustix::system::uname()
            .nodename()
            .to_string_lossy()
            .replace(['/', ':'], "_");
        Maildir {
            root: config.transport.path.clone().unwrap_or_default(),
            host,
        }
    }

    fn deliver(&self, message: &[u8]) -> io::Result<PathBuf> {
        for sub in ["tmp", "new", "cur"] {
            fs::create_dir_all(self.root.join(sub))?;
        }
        let now = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        let unique = format!(
            "{}.M{}P{}Q{}.{}",
            now.as_secs(),
            now.subsec_micros(),
            std::process::id(),
            COUNTER.fetch_add(1, Ordering::Relaxed),
            self.host
        );
        let tmp = self.root.join("tmp").join(&unique);
        let mut file = fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .mode(0o640)
            .open(&tmp)?;
        let written = file.write_all(message).and_then(|()| file.sync_data());
        if let Err(e) = written {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let new = self.root.join("new").join(&unique);
        fs::rename(&tmp, &new)?;
        Ok(new)
    }
}

impl Transport for Maildir {
    fn send(&mut self, _envelope: &Envelope, message: &[u8]) -> Result<String, DeliveryError> {
        self.deliver(message)
            .map(|p| format!("stored as {}", p.display()))
            .map_err(|e| DeliveryError {
                // A full disk or a permission problem in the Maildir can be fixed; the job waits.
                failure: Failure::Unavailable,
                message: format!("maildir {}: {e}", self.root.display()),
            })
    }

    fn probe(&mut self) -> Result<String, DeliveryError> {
        let dir = self.root.join("tmp");
        fs::create_dir_all(&dir)
            .and_then(|()| tempfile::tempfile_in(&dir).map(drop))
            .map(|()| format!("{} is writable", self.root.display()))
            .map_err(|e| DeliveryError {
                failure: Failure::Unavailable,
                message: format!("maildir {}: {e}", self.root.display()),
            })
    }
}
