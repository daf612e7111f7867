//! A run killed (SIGKILL) at any moment loses nothing: every job is in exactly one place, the next run
//! finishes what was claimed, and every job arrives (a duplicate only for a message the server had
//! accepted just before the kill).

mod common;

use common::*;
use std::collections::BTreeMap;
use std::fs;
use std::time::Duration;

const JOBS: usize = 60;

/// Where every job is: id -> places. Counts manifests: incoming/*.xml and job directories (also
/// hidden claims in progress) that hold a manifest.xml.
fn census(site: &Site) -> BTreeMap<String, Vec<String>> {
    let mut m: BTreeMap<String, Vec<String>> = BTreeMap::new();
    for n in site.entries("incoming") {
        if let Some(stem) = n.strip_suffix(".xml") {
            m.entry(stem.to_owned())
                .or_default()
                .push(format!("incoming/{n}"));
        }
    }
    for d in ["active", "deferred", "failed", "sent"] {
        for n in site.entries(d) {
            let dir = site.dir(d).join(&n);
            if !dir.join("manifest.xml").exists() {
                continue;
            }
            // A claim in progress is a hidden directory named after the job.
            let id = n
                .trim_start_matches('.')
                .split_once('-')
                .filter(|_| n.starts_with('.'))
                .map(|(_, id)| id.to_owned())
                .unwrap_or(n.clone());
            m.entry(id).or_default().push(format!("{d}/{n}"));
        }
    }
    m
}

fn assert_each_job_once(site: &Site, ids: &[String], when: &str) {
    let c = census(site);
    let missing: Vec<&String> = ids.iter().filter(|i| !c.contains_key(*i)).collect();
    assert!(
        missing.is_empty(),
        "[{when}] jobs lost: {missing:?}; spool: {}",
        site.describe()
    );
    let doubled: Vec<(&String, &Vec<String>)> = c.iter().filter(|(_, v)| v.len() != 1).collect();
    assert!(
        doubled.is_empty(),
        "[{when}] jobs in more than one place: {doubled:?}"
    );
    assert_eq!(
        c.len(),
        ids.len(),
        "[{when}] job count across the spool must equal the number uploaded: {:?}",
        c.keys().collect::<Vec<_>>()
    );
}

#[test]
fn killed_runs_lose_nothing() {
    let mut site = Site::new();
    let peer = SmtpPeer::start(&site.root.join("peer"), &PeerOpts::default());
    site.cfg.transport = Transport::smtp(peer.url());
    site.write_config();
    let ids: Vec<String> = (0..JOBS).map(|i| format!("KILL-{i:03}")).collect();
    for id in &ids {
        let mut job = Job::invoice(id);
        let doc = pdf_bytes(id.len() as u64, 800);
        job.attachments[0].size = Some(doc.len().to_string());
        job.attachments[0].sha256 = Some(sha256_hex(&doc));
        job.attachments[0].content = doc;
        job.drop_into(&site);
    }

    // Three runs, each killed after a few more messages have arrived.
    let mut kills = 0;
    for round in 1..=3 {
        let target = round * 8;
        let run = site.spawn_run();
        let reached = wait_until(Duration::from_secs(30), || peer.message_count() >= target);
        let out = run.kill();
        assert!(
            reached || out.code == 0,
            "round {round}: neither {target} messages nor a finished run; stderr:\n{}",
            out.stderr
        );
        kills += 1;
        assert_each_job_once(&site, &ids, &format!("after kill {round}"));
    }

    // The next runs finish the work.
    let out = site.run_ok();
    assert!(
        site.entries("active").is_empty(),
        "a run finishes or undoes leftover claims: active/ {:?}; stderr:\n{}",
        site.entries("active"),
        out.stderr
    );
    assert_each_job_once(&site, &ids, "after the final run");
    assert_eq!(
        site.entries("sent").len(),
        JOBS,
        "every job in sent/; spool: {}",
        site.describe()
    );

    let mut received: BTreeMap<String, usize> = BTreeMap::new();
    for m in peer.messages() {
        let p = m.parsed();
        let mid = p.message_id().unwrap_or_default().to_owned();
        *received
            .entry(mid.split('.').next().unwrap().to_owned())
            .or_default() += 1;
    }
    let missing: Vec<&String> = ids.iter().filter(|i| !received.contains_key(*i)).collect();
    assert!(missing.is_empty(), "never arrived: {missing:?}");
    let dups: Vec<(&String, &usize)> = received.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        dups.len() <= kills && dups.iter().all(|(_, n)| **n == 2),
        "a duplicate is possible only for the message in flight at each kill ({kills} kills): {dups:?}"
    );
    // Documents survive the kills intact.
    for id in &ids {
        let doc = fs::read(
            site.dir("sent")
                .join(id)
                .join("documents")
                .join(format!("{id}.pdf")),
        )
        .unwrap_or_else(|e| panic!("sent/{id}/documents/{id}.pdf: {e}"));
        assert_eq!(doc.len(), 800, "document of {id} intact");
    }
}
