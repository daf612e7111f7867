//! Template rendering as compose.rs sets it up (minijinja, `UndefinedBehavior::Strict`), with an
//! arbitrary template and arbitrary variable values: never a panic or a stack overflow, whatever the
//! template and the uploader's values are.
//!
//! Templates are the operator's (trusted), the values are the uploader's (hostile). An arbitrary
//! template can loop for as long as it likes (`range` nested in `range`), which is not a bug in
//! docmail but would stop the fuzzer with a timeout, so this target alone sets minijinja's fuel.
#![no_main]

use libfuzzer_sys::fuzz_target;
use minijinja::{Environment, UndefinedBehavior, Value};
use std::collections::BTreeMap;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    // First line: the template; the rest: one variable value per line (customer_name, invoice_number, amount).
    let (source, values) = text.split_once('\n').unwrap_or((text, ""));
    let mut vals = values.split('\n');
    let mut env = Environment::new();
    env.set_undefined_behavior(UndefinedBehavior::Strict);
    env.set_fuel(Some(20_000));
    if env.add_template("t.txt", source).is_err() {
        return;
    }
    let mut ctx: BTreeMap<&str, Value> = BTreeMap::new();
    for key in ["customer_name", "invoice_number", "amount"] {
        if let Some(v) = vals.next() {
            ctx.insert(key, Value::from(v));
        }
    }
    ctx.insert("id", Value::from("INV-1"));
    ctx.insert(
        "to",
        Value::from(minijinja::value::Serde(vec![BTreeMap::from([
            ("name", "Jane"),
            ("email", "jane@example.net"),
        ])])),
    );
    ctx.insert(
        "attachments",
        Value::from(minijinja::value::Serde(vec![BTreeMap::from([
            ("name", "a.pdf"),
            ("type", "application/pdf"),
        ])])),
    );
    if let Ok(t) = env.get_template("t.txt") {
        let _ = t.render(Value::from(ctx));
    }
});
