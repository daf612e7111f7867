//! The manifest parser (`manifest::parse`) on arbitrary bytes: it must never panic, overflow the stack
//! or take long, and whatever it accepts must obey the rules the rest of docmail relies on.
#![no_main]

use docmail::manifest;

use libfuzzer_sys::fuzz_target;

const RULES: manifest::Rules = manifest::Rules {
    max_recipients: 50,
    max_attachments: 20,
};

fuzz_target!(|data: &[u8]| {
    let Ok(m) = manifest::parse(data, RULES) else {
        return;
    };
    // The id names directories and the Message-ID.
    assert!(manifest::valid_id(&m.id), "accepted id {:?}", m.id);
    // Every file is a plain name in the drop: no path, no manifest, nothing docmail must not touch.
    for a in &m.attachments {
        assert!(
            manifest::bad_file_name(&a.file).is_none(),
            "accepted file {:?}",
            a.file
        );
        assert!(
            !a.name.is_empty() && !a.name.contains(['/', '\\']),
            "name {:?}",
            a.name
        );
        assert!(!a.name.chars().any(char::is_control), "name {:?}", a.name);
    }
    // Nothing that ends up in a header may carry a line break.
    if let Some(s) = &m.subject {
        assert!(!s.chars().any(char::is_control), "subject {s:?}");
    }
    let mailboxes = m.to.iter().chain(&m.cc).chain(&m.bcc).chain(&m.reply_to);
    for mb in mailboxes {
        let shown = mb.to_string();
        assert!(!shown.contains(['\r', '\n']), "mailbox {shown:?}");
        assert!(
            mb.email.user().is_ascii(),
            "local part {:?}",
            mb.email.user()
        );
    }
    assert!(!m.to.is_empty());
    assert!(m.to.len() + m.cc.len() + m.bcc.len() <= RULES.max_recipients);
    assert!(!m.attachments.is_empty() && m.attachments.len() <= RULES.max_attachments);
});
