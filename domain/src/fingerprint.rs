//! The canonical fingerprint of a job request, used to tell an idempotent replay (same key, same
//! request) from a conflict (same key, different request).

use serde_json::Value;
use sha2::{Digest, Sha256};

/// SHA-256 over the queue, the kind and the payload in canonical JSON: object keys sorted, no
/// insignificant whitespace, numbers exact in their stored form (see [`crate::canonical_number`]:
/// `1e2` is `100`). Two payloads that differ only in key order, formatting or a number's notation
/// have the same fingerprint; any other difference (including `1` versus `1.0`, or two integers
/// beyond 2^53 that round to the same `f64`) changes it.
pub fn payload_fingerprint(queue: &str, kind: &str, payload: &Value) -> Vec<u8> {
    let mut canonical = String::new();
    write_canonical(payload, &mut canonical);
    let mut hasher = Sha256::new();
    // Length prefixes keep ("ab","c") and ("a","bc") apart.
    for part in [queue, kind] {
        hasher.update((part.len() as u64).to_be_bytes());
        hasher.update(part.as_bytes());
    }
    hasher.update(canonical.as_bytes());
    hasher.finalize().to_vec()
}

fn write_canonical(value: &Value, out: &mut String) {
    match value {
        Value::Object(map) => {
            let mut entries: Vec<(&String, &Value)> = map.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            out.push('{');
            for (i, (key, value)) in entries.into_iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                out.push_str(&Value::String(key.clone()).to_string());
                out.push(':');
                write_canonical(value, out);
            }
            out.push('}');
        }
        Value::Array(items) => {
            out.push('[');
            for (i, item) in items.iter().enumerate() {
                if i > 0 {
                    out.push(',');
                }
                write_canonical(item, out);
            }
            out.push(']');
        }
        Value::Number(number) => out.push_str(&crate::canonical_number(number).to_string()),
        scalar => out.push_str(&scalar.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn key_order_and_whitespace_do_not_matter() {
        let a: Value = serde_json::from_str(r#"{"b": [1, {"y": 2, "x": 1}], "a": "s"}"#).unwrap();
        let b: Value = serde_json::from_str(r#"{"a":"s","b":[1,{"x":1,"y":2}]}"#).unwrap();
        assert_eq!(
            payload_fingerprint("q", "k", &a),
            payload_fingerprint("q", "k", &b)
        );
    }

    #[test]
    fn numbers_count_exactly_and_by_value_not_notation() {
        let of = |text: &str| payload_fingerprint("q", "k", &serde_json::from_str(text).unwrap());
        // The same f64, different numbers.
        assert_ne!(of("18446744073709551617"), of("18446744073709551616"));
        assert_ne!(of("0.10000000000000000555"), of("0.1"));
        // One number, two notations.
        assert_eq!(of("1e2"), of("100"));
        assert_eq!(of("[1.50e1, -0]"), of("[15.0, 0]"));
        assert_ne!(of("1e2"), of("100.0"));
    }

    #[test]
    fn any_real_difference_changes_the_fingerprint() {
        let base = payload_fingerprint("q", "k", &json!({"n": 1}));
        assert_ne!(base, payload_fingerprint("q", "k", &json!({"n": 2})));
        assert_ne!(base, payload_fingerprint("q", "k", &json!({"n": 1.0})));
        assert_ne!(base, payload_fingerprint("q", "k2", &json!({"n": 1})));
        assert_ne!(base, payload_fingerprint("q2", "k", &json!({"n": 1})));
        assert_ne!(
            payload_fingerprint("ab", "c", &json!(null)),
            payload_fingerprint("a", "bc", &json!(null))
        );
        assert_ne!(
            payload_fingerprint("q", "k", &json!([1, 2])),
            payload_fingerprint("q", "k", &json!([2, 1]))
        );
    }
}
