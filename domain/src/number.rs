//! Exact JSON numbers. serde_json's `arbitrary_precision` keeps every number as the text it was
//! written in, so no payload or result number is rounded through an `f64`. This module gives such
//! a number the one form every store keeps: PostgreSQL's `jsonb` stores numbers as `numeric` and
//! prints them in plain decimal notation, so the in-memory store (through [`Job::new`] and
//! [`Job::apply`]) and the payload fingerprint use that same form, and both stores agree on what a
//! payload reads back as and on which requests are the same.
//!
//! The form: no exponent, the scale (digits after the point) of the written number adjusted by
//! its exponent (`1.50e1` is `15.0`, `1e2` is `100`, `1.5e-3` is `0.0015`), no sign on zero
//! (`-0.0` is `0.0`). `1` and `1.0` stay different numbers, as in `numeric`'s text.
//!
//! [`Job::new`]: crate::Job::new
//! [`Job::apply`]: crate::Job::apply

use serde_json::{Number, Value};

/// Most digits before the point a stored number may have (PostgreSQL `numeric`'s limit).
pub const MAX_INTEGER_DIGITS: i128 = 131_072;
/// Most digits after the point a stored number may have (PostgreSQL `numeric`'s limit).
pub const MAX_FRACTION_DIGITS: i128 = 16_383;
/// Largest exponent magnitude accepted as written (PostgreSQL refuses about 2^30 and beyond).
pub const MAX_EXPONENT: i128 = 1_000_000_000;

/// A number's parts as written: `-? int (. frac)? (e exp)?`.
struct Parts<'a> {
    negative: bool,
    digits: String,
    /// The value is `digits * 10^shift`.
    shift: i128,
    text: &'a str,
}

/// Splits a JSON number's text; `None` for text that is not a finite JSON number within
/// [`MAX_EXPONENT`].
fn parts(text: &str) -> Option<Parts<'_>> {
    let (negative, unsigned) = match text.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, text),
    };
    let (mantissa, exponent) = match unsigned.find(['e', 'E']) {
        Some(at) => (&unsigned[..at], unsigned[at + 1..].parse::<i128>().ok()?),
        None => (unsigned, 0),
    };
    if exponent.abs() > MAX_EXPONENT {
        return None;
    }
    let (int, frac) = mantissa.split_once('.').unwrap_or((mantissa, ""));
    let all_digits = |s: &str| s.bytes().all(|b| b.is_ascii_digit());
    if int.is_empty() || !all_digits(int) || !all_digits(frac) {
        return None;
    }
    Some(Parts {
        negative,
        digits: format!("{int}{frac}"),
        shift: exponent - frac.len() as i128,
        text,
    })
}

/// Why a number cannot be stored exactly.
fn out_of_range(parts: &Parts<'_>) -> Option<String> {
    let significant = parts.digits.trim_start_matches('0').len() as i128;
    let scale = (-parts.shift).max(0);
    if scale > MAX_FRACTION_DIGITS {
        return Some(format!(
            "has more than {MAX_FRACTION_DIGITS} digits after the decimal point"
        ));
    }
    if significant > 0 && significant + parts.shift > MAX_INTEGER_DIGITS {
        return Some(format!(
            "has more than {MAX_INTEGER_DIGITS} digits before the decimal point"
        ));
    }
    None
}

/// Checks that `number` can be stored exactly; the error says why not, in words.
pub fn check_number(number: &Number) -> Result<(), String> {
    let text = number.to_string();
    let parts = parts(&text).ok_or_else(|| format!("has an exponent beyond ±{MAX_EXPONENT}"))?;
    match out_of_range(&parts) {
        Some(why) => Err(why),
        None => Ok(()),
    }
}

/// `number` in the stored form (see the module documentation). A number that
/// [`check_number`] refuses is returned unchanged.
pub fn canonical_number(number: &Number) -> Number {
    let text = number.to_string();
    match parts(&text) {
        Some(parts) if out_of_range(&parts).is_none() => {
            let canonical = decimal(&parts);
            if canonical == parts.text {
                number.clone()
            } else {
                canonical.parse().unwrap_or_else(|_| number.clone())
            }
        }
        _ => number.clone(),
    }
}

/// Plain decimal notation of a number within range.
fn decimal(parts: &Parts<'_>) -> String {
    let scale = usize::try_from((-parts.shift).max(0)).unwrap_or(0);
    let significant = parts.digits.trim_start_matches('0');
    if significant.is_empty() {
        return if scale == 0 {
            "0".to_owned()
        } else {
            format!("0.{}", "0".repeat(scale))
        };
    }
    let sign = if parts.negative { "-" } else { "" };
    if scale == 0 {
        let zeros = usize::try_from(parts.shift).unwrap_or(0);
        return format!("{sign}{significant}{}", "0".repeat(zeros));
    }
    if significant.len() > scale {
        let (int, frac) = significant.split_at(significant.len() - scale);
        format!("{sign}{int}.{frac}")
    } else {
        let pad = "0".repeat(scale - significant.len());
        format!("{sign}0.{pad}{significant}")
    }
}

/// `value` with every number in the stored form (see [`canonical_number`]).
pub fn canonical_json(value: &Value) -> Value {
    match value {
        Value::Number(number) => Value::Number(canonical_number(number)),
        Value::Array(items) => Value::Array(items.iter().map(canonical_json).collect()),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(key, value)| (key.clone(), canonical_json(value)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// The first number in `value` that cannot be stored exactly, with why.
pub(crate) fn first_unstorable(value: &Value) -> Option<String> {
    match value {
        Value::Number(number) => check_number(number)
            .err()
            .map(|why| format!("number {} {why}", abbreviated(&number.to_string()))),
        Value::Array(items) => items.iter().find_map(first_unstorable),
        Value::Object(map) => map.values().find_map(first_unstorable),
        _ => None,
    }
}

/// At most 40 characters of a number's text, for messages.
fn abbreviated(text: &str) -> String {
    if text.len() <= 40 {
        text.to_owned()
    } else {
        format!("{}…", &text[..40])
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn canonical(text: &str) -> String {
        let number: Number = text.parse().expect("a JSON number");
        canonical_number(&number).to_string()
    }

    #[test]
    fn numbers_take_postgres_numeric_text_form() {
        // Each pair as PostgreSQL 15 prints `'[<left>]'::jsonb`.
        let cases = [
            ("1e2", "100"),
            ("1E+2", "100"),
            ("1.50e1", "15.0"),
            ("-0", "0"),
            ("-0.000", "0.000"),
            ("1.0", "1.0"),
            ("18446744073709551617", "18446744073709551617"),
            (
                "0.1000000000000000055511151231257827",
                "0.1000000000000000055511151231257827",
            ),
            ("1.5e-3", "0.0015"),
            ("123.456e1", "1234.56"),
            ("0e5", "0"),
            ("0.0e-2", "0.000"),
            ("-12.5e-4", "-0.00125"),
            ("-7", "-7"),
            ("0.5", "0.5"),
        ];
        for (written, stored) in cases {
            assert_eq!(canonical(written), stored, "{written}");
        }
    }

    #[test]
    fn numbers_beyond_numeric_are_refused_and_left_alone() {
        let refused = [
            "1e-16384",
            "0e-16384",
            "1e131072",
            "1e1000000001",
            "1e99999999999999999999999999999999999999999",
        ];
        for text in refused {
            let number: Number = text.parse().unwrap();
            assert!(check_number(&number).is_err(), "{text}");
            assert_eq!(canonical_number(&number), number, "{text}");
        }
        for text in ["1e-16383", "0e-16383", "1e131071", "0e999999", "1.5e2000"] {
            assert_eq!(check_number(&text.parse().unwrap()), Ok(()), "{text}");
        }
    }

    #[test]
    fn canonical_json_rewrites_nested_numbers_only() {
        let value: Value =
            serde_json::from_str(r#"{"a":[1e2,"1e2",{"b":-0.0}],"c":true}"#).expect("JSON");
        assert_eq!(
            canonical_json(&value).to_string(),
            r#"{"a":[100,"1e2",{"b":0.0}],"c":true}"#
        );
    }
}
