//! STARTTLS + AUTH against a real server with a self-signed certificate the test trusts
//! (SSL_CERT_FILE for the docmail process). A wrong password fails the job at once, with one
//! connection attempt and no deferral.

mod common;

use common::*;
use std::fs;

const USER: &str = "shop-billing";
const PASSWORD: &str = "s3cret pass wörd";

struct TlsSite {
    site: Site,
    peer: SmtpPeer,
}

/// A peer that requires STARTTLS and AUTH; a site configured for `smtp://localhost:PORT?tls=required`
/// with `user` and, if given, a `password_file` holding `password`.
fn tls_site(password: Option<&str>) -> TlsSite {
    let mut site = Site::new();
    let (cert, key) = make_cert(&site.root);
    let peer = SmtpPeer::start(
        &site.root.join("peer"),
        &PeerOpts {
            tls: Some((cert.clone(), key)),
            require_starttls: true,
            auth: Some((USER.into(), PASSWORD.into())),
            also_ipv6: true,
            ..PeerOpts::default()
        },
    );
    let password_file = password.map(|pw| {
        let p = site.root.join("smtp-password");
        // A trailing newline, as `echo pw > file` writes it: it is not part of the password.
        fs::write(&p, format!("{pw}\n")).unwrap();
        p
    });
    site.cfg.transport = Transport::Smtp {
        url: format!("smtp://localhost:{}?tls=required", peer.port),
        user: Some(USER.into()),
        password_file,
        timeout: "5s".into(),
    };
    site.write_config();
    site.env
        .push(("SSL_CERT_FILE".into(), cert.into_os_string()));
    TlsSite { site, peer }
}

#[test]
fn starttls_and_auth_deliver() {
    let TlsSite { site, peer } = tls_site(Some(PASSWORD));
    let job = Job::invoice("TLS-1");
    let upload = job.attachments[0].content.clone();
    job.drop_into(&site);
    let out = site.run_ok();

    let msgs = peer.messages();
    assert_eq!(
        msgs.len(),
        1,
        "one message over STARTTLS+AUTH; stderr:\n{}\npeer events:\n{}",
        out.stderr,
        peer.events()
    );
    assert!(msgs[0].tls, "the message must have travelled inside TLS");
    assert_eq!(
        msgs[0].auth_user, USER,
        "the session must have been authenticated as {USER}"
    );
    let p = msgs[0].parsed();
    let att = p.attachments().next().expect("attachment");
    assert!(
        att.contents() == upload.as_slice(),
        "attachment byte-identical"
    );
    assert_sent(&site, "TLS-1");
}

#[test]
fn password_from_systemd_credential() {
    // No password_file: the password comes from $CREDENTIALS_DIRECTORY/smtp-password.
    let TlsSite { mut site, peer } = tls_site(None);
    let creds = site.root.join("credentials");
    fs::create_dir(&creds).unwrap();
    fs::write(creds.join("smtp-password"), PASSWORD).unwrap();
    site.env
        .push(("CREDENTIALS_DIRECTORY".into(), creds.into_os_string()));

    Job::invoice("CRED-1").drop_into(&site);
    let out = site.run_ok();
    let msgs = peer.messages();
    assert_eq!(
        msgs.len(),
        1,
        "delivered with the credential's password; stderr:\n{}\npeer events:\n{}",
        out.stderr,
        peer.events()
    );
    assert_eq!(msgs[0].auth_user, USER);
    assert_sent(&site, "CRED-1");
}

#[test]
fn wrong_password_fails_the_job_at_once() {
    let TlsSite { site, peer } = tls_site(Some("not the password"));
    Job::invoice("BADPW-1").drop_into(&site);
    let out = site.run_ok();

    assert_eq!(peer.message_count(), 0, "nothing may be delivered");
    assert!(
        site.dir("failed").join("BADPW-1").is_dir(),
        "a rejected login is permanent: the job belongs in failed/; spool: {}\nstderr:\n{}",
        site.describe(),
        out.stderr
    );
    assert!(
        !site.dir("deferred").join("BADPW-1").exists(),
        "no defer loop for a wrong password: the job must not be in deferred/"
    );
    let reason = site.failed_reason("BADPW-1");
    assert!(
        reason.to_ascii_lowercase().contains("auth"),
        "the reason must say that authentication failed: {reason:?}"
    );
    assert_eq!(
        peer.connections(),
        1,
        "exactly one connection attempt; peer events:\n{}",
        peer.events()
    );
    assert!(
        out.job_lines("BADPW-1")
            .iter()
            .any(|l| l.contains("status=failed")),
        "log line status=failed; stderr:\n{}",
        out.stderr
    );
    // The password must not leak into the reason or the log.
    assert!(
        !reason.contains("not the password") && !out.stderr.contains("not the password"),
        "the password must not appear in the reason or the log"
    );
}

#[test]
fn untrusted_certificate_is_not_delivered() {
    // Same server, but the docmail process does not trust the self-signed certificate.
    let TlsSite { mut site, peer } = tls_site(Some(PASSWORD));
    site.env.retain(|(k, _)| k != "SSL_CERT_FILE");
    Job::invoice("UNTRUSTED-1").drop_into(&site);
    let out = site.run_ok();
    assert_eq!(
        peer.message_count(),
        0,
        "TLS must be verified: nothing may reach a server with an untrusted certificate"
    );
    assert!(
        !site.dir("sent").join("UNTRUSTED-1").exists(),
        "job must not be in sent/; stderr:\n{}",
        out.stderr
    );
    let fd = site.dir("failed").join("UNTRUSTED-1").exists()
        || site.dir("deferred").join("UNTRUSTED-1").exists();
    assert!(
        fd,
        "job must be failed or deferred, not lost; spool: {}",
        site.describe()
    );
}

#[test]
fn check_smtp_logs_in() {
    let TlsSite { site, peer } = tls_site(Some(PASSWORD));
    let cfg = site.config_path.to_str().unwrap().to_owned();
    let out = site.docmail(&["check", "--config", &cfg, "--smtp"]);
    assert_eq!(
        out.code,
        0,
        "check --smtp with the right password exits 0; output:\n{}",
        out.all_output()
    );
    assert!(
        peer.events().contains("ok=True"),
        "check --smtp really logged in; peer events:\n{}",
        peer.events()
    );
    assert_eq!(peer.message_count(), 0, "check sends no mail");
}

#[test]
fn check_smtp_reports_a_wrong_password() {
    let TlsSite { site, peer } = tls_site(Some("not the password"));
    let cfg = site.config_path.to_str().unwrap().to_owned();
    let out = site.docmail(&["check", "--config", &cfg, "--smtp"]);
    let text = out.all_output();
    assert_eq!(
        out.code, 78,
        "check --smtp with a wrong password is a configuration error (78); output:\n{text}"
    );
    assert!(
        text.to_lowercase().contains("auth"),
        "the output says authentication failed: {text}"
    );
    assert!(
        peer.events().contains("ok=False"),
        "the login was tried: {}",
        peer.events()
    );
}
