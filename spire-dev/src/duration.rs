//! Human durations for flags and control requests: `90s`, `1h`, `1h30m`,
//! `500ms`, `2d`.

use std::time::Duration;

/// Errors of [`parse_duration`].
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum DurationError {
    /// `parse_duration` got an empty string.
    #[error("parse_duration(\"\"): empty duration; write e.g. 30s, 5m, 1h or 1h30m")]
    Empty,
    /// `parse_duration` found a number without a unit, or an unknown unit, in `value`.
    #[error("parse_duration({value:?}): bad unit {unit:?}; use ms, s, m, h or d (e.g. 1h30m)")]
    Unit {
        /// The whole input.
        value: String,
        /// The offending unit (empty when missing).
        unit: String,
    },
    /// `parse_duration` found a unit without a number before it in `value`.
    #[error("parse_duration({value:?}): expected a number before {rest:?}")]
    Number {
        /// The whole input.
        value: String,
        /// The part of the input where a number was expected.
        rest: String,
    },
    /// `parse_duration` computed a duration too large to represent from `value`.
    #[error("parse_duration({value:?}): duration overflows")]
    Overflow {
        /// The whole input.
        value: String,
    },
}

/// Parses a duration written as a sequence of `<integer><unit>` parts with the
/// units `ms`, `s`, `m`, `h` and `d` (`1h30m`, `90s`, `250ms`).
pub fn parse_duration(value: &str) -> Result<Duration, DurationError> {
    let s = value.trim();
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(DurationError::Number {
                value: value.to_owned(),
                rest: rest.to_owned(),
            });
        }
        let overflow = || DurationError::Overflow {
            value: value.to_owned(),
        };
        let n: u64 = rest[..digits].parse().map_err(|_| overflow())?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let part = match unit {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.checked_mul(60).ok_or_else(overflow)?),
            "h" => Duration::from_secs(n.checked_mul(3600).ok_or_else(overflow)?),
            "d" => Duration::from_secs(n.checked_mul(86_400).ok_or_else(overflow)?),
            _ => {
                return Err(DurationError::Unit {
                    value: value.to_owned(),
                    unit: unit.to_owned(),
                });
            }
        };
        total = total.checked_add(part).ok_or_else(overflow)?;
    }
    Ok(total)
}

/// Formats a duration the way [`parse_duration`] reads it (`1h30m`, `2s`, `250ms`).
pub fn format_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".to_owned();
    }
    let mut out = String::new();
    let mut secs = d.as_secs();
    for (unit, len) in [("d", 86_400), ("h", 3600), ("m", 60), ("s", 1)] {
        if secs >= len {
            out.push_str(&format!("{}{unit}", secs / len));
            secs %= len;
        }
    }
    let ms = d.subsec_millis();
    if ms > 0 {
        out.push_str(&format!("{ms}ms"));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units_and_sequences() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse_duration("250ms"), Ok(Duration::from_millis(250)));
        assert_eq!(parse_duration("1d"), Ok(Duration::from_secs(86_400)));
    }

    #[test]
    fn rejects_bad_input() {
        assert_eq!(parse_duration(""), Err(DurationError::Empty));
        assert!(matches!(
            parse_duration("10"),
            Err(DurationError::Unit { unit, .. }) if unit.is_empty()
        ));
        assert!(matches!(
            parse_duration("5y"),
            Err(DurationError::Unit { unit, .. }) if unit == "y"
        ));
        assert!(matches!(
            parse_duration("h"),
            Err(DurationError::Number { .. })
        ));
        assert!(matches!(
            parse_duration("99999999999999999999999s"),
            Err(DurationError::Overflow { .. })
        ));
    }

    #[test]
    fn formats_round_trip() {
        for s in ["1h30m", "2s", "250ms", "1d2h", "1m1s500ms"] {
            let d = parse_duration(s).expect(s);
            assert_eq!(format_duration(d), s);
        }
    }
}
