//! Human durations on the command line and in configuration: `30s`, `24h`,
//! `90d`, `10y`.

use std::time::Duration;

/// Parses a human duration. A year is 365 days and a month 30 days, so
/// certificate lifetimes are predictable rather than calendar-dependent.
pub fn parse(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s.is_empty() {
        return Err("empty duration".into());
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest
            .find(|c: char| !c.is_ascii_digit())
            .unwrap_or(rest.len());
        if digits == 0 {
            return Err(format!(
                "invalid duration {s:?}: expected a number, e.g. 24h, 90d, 10y"
            ));
        }
        let n: u64 = rest[..digits]
            .parse()
            .map_err(|_| format!("invalid duration {s:?}: number too large"))?;
        rest = &rest[digits..];
        let unit_len = rest
            .find(|c: char| c.is_ascii_digit())
            .unwrap_or(rest.len());
        let unit = &rest[..unit_len];
        rest = &rest[unit_len..];
        let secs: u64 = match unit {
            "ms" => {
                total = total
                    .checked_add(Duration::from_millis(n))
                    .ok_or_else(|| format!("invalid duration {s:?}: too large"))?;
                continue;
            }
            "s" => 1,
            "m" => 60,
            "h" => 3600,
            "d" => 86_400,
            "w" => 7 * 86_400,
            "y" => 365 * 86_400,
            "" => {
                return Err(format!(
                    "invalid duration {s:?}: missing unit (ms, s, m, h, d, w, y)"
                ))
            }
            other => {
                return Err(format!(
                    "invalid duration {s:?}: unknown unit {other:?} (use ms, s, m, h, d, w, y)"
                ))
            }
        };
        let add = n
            .checked_mul(secs)
            .ok_or_else(|| format!("invalid duration {s:?}: too large"))?;
        total = total
            .checked_add(Duration::from_secs(add))
            .ok_or_else(|| format!("invalid duration {s:?}: too large"))?;
    }
    Ok(total)
}

/// Formats a duration compactly (`1d2h`, `45s`).
pub fn format(d: Duration) -> String {
    let mut secs = d.as_secs();
    if secs == 0 {
        return format!("{}ms", d.as_millis());
    }
    let mut out = String::new();
    for (unit, len) in [
        ("y", 365 * 86_400),
        ("d", 86_400),
        ("h", 3600),
        ("m", 60),
        ("s", 1),
    ] {
        if secs >= len {
            out.push_str(&format!("{}{unit}", secs / len));
            secs %= len;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_units() {
        assert_eq!(parse("24h"), Ok(Duration::from_secs(86_400)));
        assert_eq!(parse("90d"), Ok(Duration::from_secs(90 * 86_400)));
        assert_eq!(parse("10y"), Ok(Duration::from_secs(3650 * 86_400)));
        assert_eq!(parse("1h30m"), Ok(Duration::from_secs(5400)));
        assert_eq!(parse("250ms"), Ok(Duration::from_millis(250)));
        assert!(parse("10").unwrap_err().contains("missing unit"));
        assert!(parse("h").is_err());
        assert!(parse("5x").unwrap_err().contains("unknown unit"));
        assert!(parse("99999999999999999999y").is_err());
        // Every unit is added with a check: a sum past the largest duration
        // is an error, never a panic.
        assert!(parse("18446744073709551615s1000ms")
            .unwrap_err()
            .contains("too large"));
        assert!(parse("18446744073709551615ms18446744073709551615s").is_err());
        assert_eq!(
            parse("18446744073709551615ms"),
            Ok(Duration::from_millis(u64::MAX))
        );
        assert_eq!(format(Duration::from_secs(93_600)), "1d2h");
    }
}
