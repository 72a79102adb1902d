//! The one duration grammar of meshauth, for the agent's flags, environment
//! and config file as much as for spire-dev's flags and control requests.
//!
//! It is Go's `time.ParseDuration` — what SPIRE reads its HCL config and
//! flags with, so a value copied from a SPIRE setup means the same here —
//! plus the unit `d` (24 h):
//!
//! ```text
//! duration := "0" | ["+"] part+
//! part     := number unit          (no spaces between parts: 1h30m)
//! number   := digits ["." digits] | "." digits
//! unit     := ns | us | µs | μs | ms | s | m | h | d
//! ```
//!
//! Every input Go accepts and that is not negative gives the same value here
//! (fractions such as `1.5h` included; digits of a fraction below a
//! nanosecond are dropped). Surrounding whitespace is ignored.
//!
//! [`format_duration`] prints the shortest exact form without `d` (`1h30m`,
//! `720h`, `1s500ms`, `0s`), so a printed value parses back to the same
//! duration both here and in Go.
//!
//! Own code rather than `humantime`: humantime reads `1h 30m`, months and
//! years, does not read `1.5h` or `0`, and prints `1h 30m` or `2months`,
//! which Go (and so SPIRE) refuses.

use std::time::Duration;

const NANOS_PER_SEC: u128 = 1_000_000_000;

/// Errors of [`parse_duration`]; each names the whole input.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DurationError {
    /// `parse_duration` got an empty string.
    #[error("parse_duration(\"\"): empty; write a duration such as 500ms, 90s or 1h30m")]
    Empty,
    /// `parse_duration` got a negative duration in `value`.
    #[error("parse_duration({value:?}): negative; a duration here is 0 or more")]
    Negative {
        /// The whole input.
        value: String,
    },
    /// `parse_duration` expected a number at `rest` of `value`.
    #[error(
        "parse_duration({value:?}): expected a number at {rest:?}; write a duration such as 500ms, 90s or 1h30m"
    )]
    Number {
        /// The whole input.
        value: String,
        /// The part of the input where a number was expected.
        rest: String,
    },
    /// `parse_duration` found the number `number` in `value` without a unit after it.
    #[error(
        "parse_duration({value:?}): {number:?} has no unit; use ns, us, ms, s, m, h or d (5s, 1h30m)"
    )]
    MissingUnit {
        /// The whole input.
        value: String,
        /// The number without a unit.
        number: String,
    },
    /// `parse_duration` found the unknown unit `unit` in `value`.
    #[error(
        "parse_duration({value:?}): unknown unit {unit:?}; use ns, us, ms, s, m, h or d, parts written together (1h30m)"
    )]
    Unit {
        /// The whole input.
        value: String,
        /// The unknown unit.
        unit: String,
    },
    /// `parse_duration` computed from `value` a duration too large to represent.
    #[error("parse_duration({value:?}): too large")]
    Overflow {
        /// The whole input.
        value: String,
    },
}

/// Parses a duration in meshauth's grammar (see the [crate] documentation):
/// `500ms`, `90s`, `1h30m`, `1.5h`, `2d`.
pub fn parse_duration(value: &str) -> Result<Duration, DurationError> {
    let s = value.trim();
    if s.is_empty() {
        return Err(DurationError::Empty);
    }
    if s.starts_with('-') {
        return Err(DurationError::Negative {
            value: value.to_owned(),
        });
    }
    let s = s.strip_prefix('+').unwrap_or(s);
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    let overflow = || DurationError::Overflow {
        value: value.to_owned(),
    };
    let mut total: u128 = 0;
    let mut rest = s;
    loop {
        let digits = |t: &str| t.bytes().take_while(u8::is_ascii_digit).count();
        let (int, after) = rest.split_at(digits(rest));
        let (frac, after) = match after.strip_prefix('.') {
            Some(a) => a.split_at(digits(a)),
            None => ("", after),
        };
        if int.is_empty() && frac.is_empty() {
            return Err(DurationError::Number {
                value: value.to_owned(),
                rest: rest.to_owned(),
            });
        }
        let number = &rest[..rest.len() - after.len()];
        let unit_len = after
            .find(|c: char| c.is_ascii_digit() || c == '.')
            .unwrap_or(after.len());
        let (unit, next) = after.split_at(unit_len);
        let unit_nanos: u128 = match unit {
            "ns" => 1,
            "us" | "\u{b5}s" | "\u{3bc}s" => 1_000,
            "ms" => 1_000_000,
            "s" => NANOS_PER_SEC,
            "m" => 60 * NANOS_PER_SEC,
            "h" => 3_600 * NANOS_PER_SEC,
            "d" => 86_400 * NANOS_PER_SEC,
            "" => {
                return Err(DurationError::MissingUnit {
                    value: value.to_owned(),
                    number: number.to_owned(),
                });
            }
            _ => {
                return Err(DurationError::Unit {
                    value: value.to_owned(),
                    unit: unit.to_owned(),
                });
            }
        };
        let int: u128 = if int.is_empty() {
            0
        } else {
            int.parse().map_err(|_| overflow())?
        };
        let mut part = int.checked_mul(unit_nanos).ok_or_else(overflow)?;
        // 18 digits are finer than a nanosecond of the longest unit; the
        // rest is dropped, as Go drops what a nanosecond cannot hold.
        let frac = &frac[..frac.len().min(18)];
        if !frac.is_empty() {
            let f: u128 = frac.parse().map_err(|_| overflow())?;
            part += f * unit_nanos / 10u128.pow(frac.len() as u32);
        }
        total = total.checked_add(part).ok_or_else(overflow)?;
        rest = next;
        if rest.is_empty() {
            break;
        }
    }
    let secs = u64::try_from(total / NANOS_PER_SEC).map_err(|_| overflow())?;
    Ok(Duration::new(secs, (total % NANOS_PER_SEC) as u32))
}

/// Prints `d` the way [`parse_duration`] (and Go) read it back exactly: the
/// non-zero parts from hours down to nanoseconds, `d` never used (`1h30m`,
/// `720h`, `1s500ms`, `0s`).
pub fn format_duration(d: Duration) -> String {
    if d.is_zero() {
        return "0s".to_owned();
    }
    let mut out = String::new();
    let mut push = |n: u64, unit: &str| {
        if n > 0 {
            out.push_str(&n.to_string());
            out.push_str(unit);
        }
    };
    let secs = d.as_secs();
    push(secs / 3600, "h");
    push(secs % 3600 / 60, "m");
    push(secs % 60, "s");
    let nanos = u64::from(d.subsec_nanos());
    push(nanos / 1_000_000, "ms");
    push(nanos % 1_000_000 / 1_000, "us");
    push(nanos % 1_000, "ns");
    out
}

/// `#[serde(with = "meshauth_duration::serde")]`: a [`Duration`] as a string
/// of [`format_duration`], read with [`parse_duration`].
pub mod serde {
    use std::time::Duration;

    use ::serde::{Deserialize, Deserializer, Serializer};

    /// Writes [`crate::format_duration`]`(d)`.
    pub fn serialize<S: Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&crate::format_duration(*d))
    }

    /// Reads a string with [`crate::parse_duration`].
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        let s = String::deserialize(d)?;
        crate::parse_duration(&s).map_err(::serde::de::Error::custom)
    }

    /// `#[serde(with = "meshauth_duration::serde::option")]`: the same for
    /// an `Option<Duration>` (`None` is null).
    pub mod option {
        use std::time::Duration;

        use ::serde::{Deserialize, Deserializer, Serializer};

        /// Writes [`crate::format_duration`] of the value, or null.
        pub fn serialize<S: Serializer>(d: &Option<Duration>, s: S) -> Result<S::Ok, S::Error> {
            match d {
                Some(d) => s.serialize_some(&crate::format_duration(*d)),
                None => s.serialize_none(),
            }
        }

        /// Reads null, or a string with [`crate::parse_duration`].
        pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<Option<Duration>, D::Error> {
            Option::<String>::deserialize(d)?
                .map(|s| crate::parse_duration(&s).map_err(::serde::de::Error::custom))
                .transpose()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms(n: u64) -> Duration {
        Duration::from_millis(n)
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn reads_what_go_time_parse_duration_reads() {
        // Go's own examples and SPIRE's config values (default_x509_svid_ttl
        // = "1h", ca_ttl = "24h", agent timeouts "500ms", "90s").
        for (input, want) in [
            ("0", Duration::ZERO),
            ("+0", Duration::ZERO),
            ("0s", Duration::ZERO),
            ("500ms", ms(500)),
            ("5s", secs(5)),
            ("90s", secs(90)),
            ("2m", secs(120)),
            ("1h", secs(3600)),
            ("24h", secs(86_400)),
            ("1h30m", secs(5400)),
            ("1m1s500ms", ms(61_500)),
            ("2h45m", secs(2 * 3600 + 45 * 60)),
            ("1.5h", secs(5400)),
            ("1.h", secs(3600)),
            (".5s", ms(500)),
            ("300ms", ms(300)),
            ("1.000000001s", Duration::new(1, 1)),
            ("1.0000000001s", secs(1)),
            ("100ns", Duration::from_nanos(100)),
            ("10us", Duration::from_micros(10)),
            ("10\u{b5}s", Duration::from_micros(10)),
            ("10\u{3bc}s", Duration::from_micros(10)),
            ("+5s", secs(5)),
            (" 5s\n", secs(5)),
            (
                "3h3m3s3ms3us3ns",
                Duration::new(3 * 3600 + 3 * 60 + 3, 3_003_003),
            ),
        ] {
            assert_eq!(parse_duration(input), Ok(want), "{input:?}");
        }
    }

    #[test]
    fn days_are_24_hours() {
        assert_eq!(parse_duration("2d"), Ok(secs(2 * 86_400)));
        assert_eq!(parse_duration("1d12h"), Ok(secs(36 * 3600)));
        assert_eq!(parse_duration("30d"), parse_duration("720h"));
    }

    #[test]
    fn refuses_with_the_value_and_what_would_be_right() {
        let cases: [(&str, DurationError); 10] = [
            ("", DurationError::Empty),
            ("  ", DurationError::Empty),
            (
                "-5s",
                DurationError::Negative {
                    value: "-5s".into(),
                },
            ),
            (
                "10",
                DurationError::MissingUnit {
                    value: "10".into(),
                    number: "10".into(),
                },
            ),
            (
                "1h30",
                DurationError::MissingUnit {
                    value: "1h30".into(),
                    number: "30".into(),
                },
            ),
            (
                "5y",
                DurationError::Unit {
                    value: "5y".into(),
                    unit: "y".into(),
                },
            ),
            (
                "1h 30m",
                DurationError::Unit {
                    value: "1h 30m".into(),
                    unit: "h ".into(),
                },
            ),
            (
                "h",
                DurationError::Number {
                    value: "h".into(),
                    rest: "h".into(),
                },
            ),
            (
                ".s",
                DurationError::Number {
                    value: ".s".into(),
                    rest: ".s".into(),
                },
            ),
            (
                "99999999999999999999999h",
                DurationError::Overflow {
                    value: "99999999999999999999999h".into(),
                },
            ),
        ];
        for (input, want) in cases {
            let got = parse_duration(input).expect_err(input);
            assert_eq!(got, want, "{input:?}");
            if !input.trim().is_empty() {
                assert!(got.to_string().contains(&format!("{input:?}")), "{got}");
            }
        }
        assert!(
            parse_duration("forever")
                .unwrap_err()
                .to_string()
                .contains("such as 500ms, 90s or 1h30m")
        );
    }

    #[test]
    fn prints_what_go_reads_back() {
        for (d, want) in [
            (Duration::ZERO, "0s"),
            (ms(500), "500ms"),
            (secs(5), "5s"),
            (secs(5400), "1h30m"),
            (secs(720 * 3600), "720h"),
            (ms(1500), "1s500ms"),
            (secs(3601), "1h1s"),
            (Duration::new(0, 1_001), "1us1ns"),
        ] {
            assert_eq!(format_duration(d), want);
            assert_eq!(parse_duration(want), Ok(d), "{want}");
        }
    }

    #[test]
    fn every_printed_duration_parses_back_exactly() {
        // A fixed xorshift sequence over the whole range, small and large.
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        for i in 0..20_000 {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            let secs = if i % 2 == 0 { x % 100_000 } else { x };
            let d = Duration::new(secs, (x % 1_000_000_000) as u32);
            assert_eq!(parse_duration(&format_duration(d)), Ok(d), "{d:?}");
        }
        let max = Duration::MAX;
        assert_eq!(parse_duration(&format_duration(max)), Ok(max));
    }

    #[test]
    fn serde_as_strings() {
        #[derive(::serde::Serialize, ::serde::Deserialize, PartialEq, Debug)]
        struct T {
            #[serde(with = "crate::serde")]
            a: Duration,
            #[serde(with = "crate::serde::option")]
            b: Option<Duration>,
        }
        let t = T {
            a: secs(5400),
            b: None,
        };
        let json = serde_json::to_string(&t).unwrap();
        assert_eq!(json, r#"{"a":"1h30m","b":null}"#);
        assert_eq!(serde_json::from_str::<T>(&json).unwrap(), t);
        let e = serde_json::from_str::<T>(r#"{"a":"soon","b":"1s"}"#).unwrap_err();
        assert!(e.to_string().contains("\"soon\""), "{e}");
    }
}
