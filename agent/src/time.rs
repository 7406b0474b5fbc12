//! Wall-clock time as the agent writes and reads it: nanoseconds since the Unix epoch, and
//! RFC 3339 text (eStargz TOC modtimes, detection records). One proleptic Gregorian calendar
//! (Howard Hinnant's day-count algorithms) serves both directions.

use std::time::SystemTime;

/// A timestamp that is not RFC 3339 (`YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0:?} is not an RFC 3339 time")]
pub struct Rfc3339Error(String);

/// Wall time as nanoseconds since the Unix epoch (0 before it).
pub fn unix_ns(t: SystemTime) -> u64 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64)
}

/// `YYYY-MM-DDTHH:MM:SS.mmmZ` for a wall-clock time (the epoch for times before it).
pub fn rfc3339_millis(time: SystemTime) -> String {
    let since = time
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default();
    let secs = since.as_secs() as i64;
    format!("{}.{:03}Z", date_time(secs), since.subsec_millis())
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`, the form Go's eStargz writer uses.
pub fn format_rfc3339(secs: i64) -> String {
    format!("{}Z", date_time(secs))
}

/// `YYYY-MM-DDTHH:MM:SS` of seconds since the epoch.
fn date_time(secs: i64) -> String {
    let rem = secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(secs.div_euclid(86_400));
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

/// `YYYY-MM-DDTHH:MM:SS[.frac](Z|±HH:MM)` to seconds and nanoseconds since the epoch.
/// Untrusted text: anything else, non-ASCII included, is an error quoting (at most 200
/// characters of) the input.
pub fn parse_rfc3339(s: &str) -> Result<(i64, u32), Rfc3339Error> {
    let bad = || Rfc3339Error(s.chars().take(200).collect());
    // ASCII only, so every byte index below is a character boundary.
    if !s.is_ascii() {
        return Err(bad());
    }
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't')
        || b[13] != b':'
        || b[16] != b':'
    {
        return Err(bad());
    }
    let num = |r: std::ops::Range<usize>| -> Result<i64, Rfc3339Error> {
        let text = &s[r];
        if !text.bytes().all(|c| c.is_ascii_digit()) {
            return Err(bad());
        }
        text.parse::<i64>().map_err(|_| bad())
    };
    let (y, mo, d, h, mi, se) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return Err(bad());
    }
    let mut rest = &s[19..];
    let mut nanos = 0u32;
    if let Some(frac) = rest.strip_prefix('.') {
        let digits = frac.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return Err(bad());
        }
        // Nanosecond precision: further digits are dropped.
        for (i, c) in frac.bytes().take(digits.min(9)).enumerate() {
            nanos += u32::from(c - b'0') * 10u32.pow(8 - i as u32);
        }
        rest = &frac[digits..];
    }
    let offset = match rest.as_bytes() {
        b"Z" | b"z" => 0,
        [sign @ (b'+' | b'-'), _, _, b':', _, _] => {
            let hh = num(s.len() - 5..s.len() - 3)?;
            let mm = num(s.len() - 2..s.len())?;
            if hh > 23 || mm > 59 {
                return Err(bad());
            }
            let sign = if *sign == b'-' { -1 } else { 1 };
            sign * (hh * 3600 + mm * 60)
        }
        _ => return Err(bad()),
    };
    let days = days_from_civil(y, mo as u32, d as u32);
    Ok((days * 86_400 + h * 3600 + mi * 60 + se - offset, nanos))
}

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (i64::from(m) + 9) % 12;
    let doy = (153 * mp + 2) / 5 + i64::from(d) - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The proleptic Gregorian date of a day count since 1970-01-01.
fn civil_from_days(days: i64) -> (i64, u32, u32) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[test]
    fn formats_known_instants() {
        let at = |s: u64, ms: u64| SystemTime::UNIX_EPOCH + Duration::from_millis(s * 1000 + ms);
        assert_eq!(rfc3339_millis(at(0, 0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339_millis(at(951_782_400, 5)),
            "2000-02-29T00:00:00.005Z"
        );
        assert_eq!(
            rfc3339_millis(at(1_796_083_199, 999)),
            "2026-11-30T23:59:59.999Z"
        );
        assert_eq!(format_rfc3339(1_566_297_043), "2019-08-20T10:30:43Z");
        assert_eq!(format_rfc3339(-86_400), "1969-12-31T00:00:00Z");
    }

    #[test]
    fn parses_what_it_formats_and_offsets() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z").unwrap(), (0, 0));
        assert_eq!(
            parse_rfc3339("2019-08-20T10:30:43Z").unwrap().0,
            1_566_297_043
        );
        assert_eq!(
            parse_rfc3339("2019-08-20T12:30:43.5+02:00").unwrap(),
            (1_566_297_043, 500_000_000)
        );
        assert_eq!(
            parse_rfc3339("2019-08-20T10:30:43.1234567891Z").unwrap(),
            (1_566_297_043, 123_456_789)
        );
        for secs in [-86_400 * 365 * 3, 0, 951_782_400, 1_796_083_199] {
            assert_eq!(parse_rfc3339(&format_rfc3339(secs)).unwrap(), (secs, 0));
        }
    }

    #[test]
    fn refuses_malformed_and_non_ascii_text_without_panicking() {
        for bad in [
            "",
            "2019-13-01T00:00:00Z",
            "2019-08-20 10:30:43Z",
            "2019-08-20T10:30:43",
            "2019-08-20T10:30:43.Z",
            "+019-08-20T10:30:43Z",
            "2019-08-20T10:30:43+2:000",
            "2019-08-20T10:30:43+24:00",
            "2019-08-20T10:30:4é3Z",
            "2019-08-20T10:30:43é",
            "ééééééééééééééééééééé",
            "2019-08-20T10:30:43.é",
        ] {
            assert!(parse_rfc3339(bad).is_err(), "{bad}");
        }
    }
}
