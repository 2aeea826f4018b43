//! Times as people and scripts write them: RFC 3339 (`2026-11-30T10:00:00Z`,
//! `2026-11-30T11:00:00.250+01:00`) or milliseconds since the Unix epoch. Hand-written (60
//! lines) rather than a date crate: only this one format is read, and only here.

/// Milliseconds since the epoch from RFC 3339 or from a number of milliseconds.
pub fn parse_time(text: &str) -> Result<i64, String> {
    let text = text.trim();
    let digits = text.strip_prefix('-').unwrap_or(text);
    if !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit()) {
        return text
            .parse()
            .map_err(|_| format!("'{text}' is out of range for milliseconds since the epoch"));
    }
    parse_rfc3339(text).map_err(|e| format!("{e}, or milliseconds since the epoch"))
}

/// Milliseconds since the epoch of an RFC 3339 date-time (fractions past the millisecond
/// are dropped).
pub fn parse_rfc3339(text: &str) -> Result<i64, String> {
    let bad = |why: &str| {
        format!(
            "'{text}' is not a time: {why}. Use RFC 3339, e.g. 2026-11-30T10:00:00Z or 2026-11-30T11:00:00+01:00"
        )
    };
    let b = text.as_bytes();
    let num = |from: usize, len: usize| -> Option<i64> {
        let part = b.get(from..from + len)?;
        part.iter()
            .all(u8::is_ascii_digit)
            .then(|| part.iter().fold(0, |n, d| n * 10 + i64::from(d - b'0')))
    };
    let sep = |at: usize, allowed: &[u8]| b.get(at).is_some_and(|c| allowed.contains(c));
    let (Some(year), Some(month), Some(day)) = (num(0, 4), num(5, 2), num(8, 2)) else {
        return Err(bad("the date must be YYYY-MM-DD"));
    };
    if !sep(4, b"-") || !sep(7, b"-") {
        return Err(bad("the date must be YYYY-MM-DD"));
    }
    if b.len() == 10 {
        return Err(bad(
            "a time of day and a zone are missing (add T00:00:00Z for midnight UTC)",
        ));
    }
    if !sep(10, b"Tt ") {
        return Err(bad("a T must separate the date and the time"));
    }
    let (Some(hour), Some(minute), Some(second)) = (num(11, 2), num(14, 2), num(17, 2)) else {
        return Err(bad("the time must be HH:MM:SS"));
    };
    if !sep(13, b":") || !sep(16, b":") {
        return Err(bad("the time must be HH:MM:SS"));
    }
    let mut at = 19;
    let mut millis = 0;
    if sep(at, b".") {
        at += 1;
        let start = at;
        while b.get(at).is_some_and(u8::is_ascii_digit) {
            if at - start < 3 {
                millis = millis * 10 + i64::from(b[at] - b'0');
            }
            at += 1;
        }
        if at == start {
            return Err(bad("a fraction of a second needs digits after the dot"));
        }
        for _ in (at - start)..3 {
            millis *= 10;
        }
    }
    let offset_minutes = match b.get(at) {
        Some(b'Z' | b'z') if b.len() == at + 1 => 0,
        Some(sign @ (b'+' | b'-')) if b.len() == at + 6 && sep(at + 3, b":") => {
            let (Some(h), Some(m)) = (num(at + 1, 2), num(at + 4, 2)) else {
                return Err(bad("a zone offset must be +HH:MM or -HH:MM"));
            };
            if h > 23 || m > 59 {
                return Err(bad("a zone offset must be +HH:MM or -HH:MM"));
            }
            if *sign == b'+' {
                h * 60 + m
            } else {
                -(h * 60 + m)
            }
        }
        None => {
            return Err(bad(
                "the zone is missing (add Z for UTC, or an offset such as +02:00)",
            ));
        }
        Some(_) => {
            return Err(bad(
                "the zone must be Z or +HH:MM or -HH:MM, and end the time",
            ));
        }
    };
    let leap = year % 4 == 0 && (year % 100 != 0 || year % 400 == 0);
    let days_in_month = match month {
        1 | 3 | 5 | 7 | 8 | 10 | 12 => 31,
        4 | 6 | 9 | 11 => 30,
        2 if leap => 29,
        2 => 28,
        _ => return Err(bad("the month must be 01 to 12")),
    };
    if !(1..=days_in_month).contains(&day) {
        return Err(bad(&format!("that month has days 01 to {days_in_month}")));
    }
    // 60: a leap second, counted as the next second (the epoch has none).
    if hour > 23 || minute > 59 || second > 60 {
        return Err(bad("hours are 00 to 23, minutes and seconds 00 to 59"));
    }
    let seconds = days_from_civil(year, month, day) * 86_400 + hour * 3_600 + minute * 60 + second
        - offset_minutes * 60;
    Ok(seconds * 1_000 + millis)
}

/// An HTTP date (RFC 9110's IMF-fixdate, `Sun, 06 Nov 1994 08:49:37 GMT`: what a
/// Retry-After may carry) in ms since the epoch.
pub fn parse_http_date(text: &str) -> Option<i64> {
    let parts: Vec<&str> = text.split_whitespace().collect();
    let [_, day, month, year, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    const MONTHS: [&str; 12] = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ];
    let month = MONTHS.iter().position(|m| m == month)? as i64 + 1;
    let (day, year): (i64, i64) = (day.parse().ok()?, year.parse().ok()?);
    let hms: Vec<i64> = time
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let [h, m, s] = hms.as_slice() else {
        return None;
    };
    if !(1..=31).contains(&day) || *h > 23 || *m > 59 || *s > 60 {
        return None;
    }
    Some((days_from_civil(year, month, day) * 86_400 + h * 3_600 + m * 60 + s) * 1_000)
}

/// Days from 1970-01-01 to a date of the proleptic Gregorian calendar (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(year: i64, month: i64, day: i64) -> i64 {
    let y = if month <= 2 { year - 1 } else { year };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn http_dates() {
        // 1994-11-06T08:49:37Z = 784111777 s.
        assert_eq!(
            parse_http_date("Sun, 06 Nov 1994 08:49:37 GMT"),
            Some(784_111_777_000)
        );
        assert_eq!(parse_http_date("Sun, 06 Nov 1994 08:49:37 UTC"), None);
        assert_eq!(parse_http_date("soon"), None);
    }

    #[test]
    fn rfc3339_and_milliseconds() {
        let ok = |t: &str| parse_time(t).unwrap_or_else(|e| panic!("{t}: {e}"));
        assert_eq!(ok("1970-01-01T00:00:00Z"), 0);
        assert_eq!(ok("2026-11-30T10:00:00Z"), 1_796_032_800_000);
        assert_eq!(ok("2026-11-30T11:00:00+01:00"), 1_796_032_800_000);
        assert_eq!(ok("2026-11-30t09:30:00.5-00:30"), 1_796_032_800_500);
        assert_eq!(ok("2026-11-30 10:00:00.123456789z"), 1_796_032_800_123);
        assert_eq!(ok("2024-02-29T00:00:00Z"), 1_709_164_800_000);
        assert_eq!(ok("2000-03-01T00:00:00Z"), 951_868_800_000);
        assert_eq!(ok("1969-12-31T23:59:59Z"), -1_000);
        assert_eq!(ok("1796032800000"), 1_796_032_800_000);
        assert_eq!(ok(" -5 "), -5);
        for bad in [
            "",
            "yesterday",
            "2026-11-30",
            "2026-11-30T10:00:00",
            "2026-11-30T10:00Z",
            "2026-13-01T00:00:00Z",
            "2025-02-29T00:00:00Z",
            "2026-11-31T00:00:00Z",
            "2026-11-30T24:00:00Z",
            "2026-11-30T10:00:00.Z",
            "2026-11-30T10:00:00+1:00",
            "2026-11-30T10:00:00+01:00x",
            "2026-11-30T10:00:00Zx",
            "99999999999999999999",
            "2026-11-30T10:00:00\u{e9}",
        ] {
            let err = parse_time(bad).expect_err(bad);
            assert!(!err.is_empty());
        }
        assert!(parse_time("2026-11-30").unwrap_err().contains("T00:00:00Z"));
        assert!(
            parse_time("2026-11-30T10:00:00")
                .unwrap_err()
                .contains("add Z for UTC")
        );
    }
}
