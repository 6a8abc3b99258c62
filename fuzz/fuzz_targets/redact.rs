//! Transcript redaction: never panics, never lets a Luhn-valid card run through, and keeps other text intact.
#![no_main]

use libfuzzer_sys::fuzz_target;
use recvault::retrieve::redact::{Kind, redact, redact_json};
use serde_json::Value;

/// An independent Luhn check, so the oracle does not share a bug with the code under test.
fn luhn_ok(digits: &[u8]) -> bool {
    let mut sum = 0;
    for (i, d) in digits.iter().rev().map(|b| u32::from(b - b'0')).enumerate() {
        sum += if i % 2 == 1 { [0, 2, 4, 6, 8, 1, 3, 5, 7, 9][d as usize] } else { d };
    }
    sum % 10 == 0
}

/// The first maximal run of 13–19 ASCII digits that passes Luhn: what a coach must never see.
fn card_run(text: &str) -> Option<&str> {
    text.split(|c: char| !c.is_ascii_digit()).find(|run| (13..=19).contains(&run.len()) && luhn_ok(run.as_bytes()))
}

fn check_text(text: &str) {
    let r = redact(text);
    if let Some(run) = card_run(&r.text) {
        panic!("card-like run {run:?} survived in {:?}", r.text);
    }
    // Spans are sorted, disjoint, on char boundaries, and the text between them is copied byte for byte.
    let mut rebuilt = String::with_capacity(r.text.len());
    let mut at = 0;
    for s in &r.spans {
        assert!(at <= s.start && s.start < s.end && s.end <= text.len(), "bad span {s:?} after {at}");
        assert!(text.is_char_boundary(s.start) && text.is_char_boundary(s.end), "span {s:?} splits a char");
        assert!(Kind::ALL.contains(&s.kind));
        rebuilt.push_str(&text[at..s.start]);
        rebuilt.push_str(s.kind.placeholder());
        at = s.end;
    }
    rebuilt.push_str(&text[at..]);
    assert_eq!(rebuilt, r.text, "text outside the spans changed");
}

/// Every string, key and number left in a redacted document is free of card runs.
fn check_value(v: &Value) {
    match v {
        Value::String(s) => assert_eq!(card_run(s), None, "card-like run survived in a JSON string"),
        Value::Number(n) => assert_eq!(card_run(&n.to_string()), None, "card-like run survived in a JSON number"),
        Value::Array(items) => items.iter().for_each(check_value),
        Value::Object(map) => {
            for (k, v) in map {
                assert_eq!(card_run(k), None, "card-like run survived in a JSON key");
                check_value(v);
            }
        }
        Value::Null | Value::Bool(_) => {}
    }
}

fuzz_target!(|data: &[u8]| {
    // Invalid UTF-8 is not thrown away: its lossy decoding is still text a transcript could hold.
    let text = String::from_utf8_lossy(data);
    check_text(&text);

    // The input as a JSON document when it parses; otherwise the text as a string, a key and a number-ish
    // value, so every input reaches redact_json.
    let mut doc = serde_json::from_slice::<Value>(data).unwrap_or_else(|_| {
        let mut map = serde_json::Map::new();
        map.insert(text.clone().into_owned(), Value::String(text.clone().into_owned()));
        let digits: String = text.chars().filter(char::is_ascii_digit).take(30).collect();
        if let Ok(n) = digits.parse::<serde_json::Number>() {
            map.insert("n".into(), Value::Number(n));
        }
        Value::Object(map)
    });
    redact_json(&mut doc);
    check_value(&doc);
});
