//! ISO 8601 dates and times in UTC, to and from Unix milliseconds: the parser
//! `claw collect` reads other tools' time fields with, and the formatter `claw
//! inspect` prints timestamps with (proleptic Gregorian calendar).
//!
//! By hand rather than with chrono: the parser takes the spellings chat logs
//! use (a space for the `T`, no seconds, `,` for the fraction, `+HHMM` zones,
//! no zone meaning UTC), and the formatter needs no time-zone database (arrow's
//! needs chrono-tz to read the zone name "UTC").

/// Unix milliseconds of an ISO 8601 date or date-time: `2023-11-14`,
/// `2023-11-14T22:13:20Z`, `2023-11-14 22:13:20.250+01:00`, `...T22:13`; without
/// a zone, UTC. `None` for anything else.
pub fn parse_iso_ms(s: &str) -> Option<i64> {
    let num = |t: &str| -> Option<i64> {
        (!t.is_empty() && t.bytes().all(|b| b.is_ascii_digit())).then(|| t.parse().ok())?
    };
    let (date, rest) = match s.find(['T', 't', ' ']) {
        Some(i) => (&s[..i], &s[i + 1..]),
        None => (s, ""),
    };
    let mut d = date.split('-');
    let (y, mo, da) = (num(d.next()?)?, num(d.next()?)?, num(d.next()?)?);
    if d.next().is_some() || !(1..=12).contains(&mo) || !(1..=31).contains(&da) {
        return None;
    }
    let mut ms = days_from_civil(y, mo, da) * 86_400_000;
    if rest.is_empty() {
        return Some(ms);
    }
    // Split off a zone: Z, +HH:MM, -HH:MM, +HHMM.
    let (clock, offset_min) = if let Some(c) = rest.strip_suffix(['Z', 'z']) {
        (c, 0)
    } else if let Some(i) = rest.rfind(['+', '-']) {
        let (c, z) = rest.split_at(i);
        let sign = if z.starts_with('-') { -1 } else { 1 };
        let z = z[1..].replace(':', "");
        if z.len() != 4 {
            return None;
        }
        (c, sign * (num(&z[..2])? * 60 + num(&z[2..])?))
    } else {
        (rest, 0)
    };
    let (hms, frac) = match clock.split_once(['.', ',']) {
        Some((a, b)) => (a, b),
        None => (clock, ""),
    };
    let mut t = hms.split(':');
    let h = num(t.next()?)?;
    let mi = num(t.next()?)?;
    let sec = match t.next() {
        Some(x) => num(x)?,
        None => 0,
    };
    if t.next().is_some() || h > 23 || mi > 59 || sec > 60 {
        return None;
    }
    let frac_ms = if frac.is_empty() {
        0
    } else {
        let digits: String = frac.chars().chain("000".chars()).take(3).collect();
        num(&digits)?
    };
    ms += ((h * 60 + mi) * 60 + sec) * 1000 + frac_ms;
    Some(ms - offset_min * 60_000)
}

/// `2023-11-14T22:13:20.000Z` for Unix milliseconds (UTC); [`parse_iso_ms`]
/// reads it back.
pub fn format_utc_ms(ms: i64) -> String {
    let days = ms.div_euclid(86_400_000);
    let rem = ms.rem_euclid(86_400_000);
    let (h, m, s, milli) = (
        rem / 3_600_000,
        rem / 60_000 % 60,
        rem / 1000 % 60,
        rem % 1000,
    );
    let (y, mo, d) = civil_from_days(days);
    format!("{y:04}-{mo:02}-{d:02}T{h:02}:{m:02}:{s:02}.{milli:03}Z")
}

/// Days since 1970-01-01 of a proleptic Gregorian date (Howard Hinnant's
/// `days_from_civil`).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// The (year, month, day) of a day count since 1970-01-01 (Howard Hinnant's
/// `civil_from_days`), the inverse of [`days_from_civil`].
fn civil_from_days(days: i64) -> (i64, i64, i64) {
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let mo = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(mo <= 2);
    (y, mo, d)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_the_common_spellings() {
        assert_eq!(
            parse_iso_ms("2023-11-14T22:13:20Z"),
            Some(1_700_000_000_000)
        );
        assert_eq!(parse_iso_ms("2023-11-14 22:13:20"), Some(1_700_000_000_000));
        assert_eq!(
            parse_iso_ms("2023-11-14t22:13:20z"),
            Some(1_700_000_000_000)
        );
        assert_eq!(
            parse_iso_ms("2023-11-14T23:13:20.250+01:00"),
            Some(1_700_000_000_250)
        );
        assert_eq!(
            parse_iso_ms("2023-11-14T21:13:20,25-0100"),
            Some(1_700_000_000_250)
        );
        assert_eq!(parse_iso_ms("2023-11-14T22:13"), Some(1_699_999_980_000));
        assert_eq!(parse_iso_ms("1970-01-01"), Some(0));
        assert_eq!(parse_iso_ms("2000-02-29T00:00:00Z"), Some(951_782_400_000));
        for bad in [
            "yesterday",
            "2023-13-01",
            "2023-11-32",
            "2023-11",
            "2023-11-14T24:00:00",
            "2023-11-14T22:13:20+1",
            "2023-11-14T22",
            "",
        ] {
            assert_eq!(parse_iso_ms(bad), None, "{bad}");
        }
    }

    #[test]
    fn formats_utc_milliseconds() {
        assert_eq!(format_utc_ms(0), "1970-01-01T00:00:00.000Z");
        assert_eq!(format_utc_ms(1_700_000_000_123), "2023-11-14T22:13:20.123Z");
        assert_eq!(format_utc_ms(-1), "1969-12-31T23:59:59.999Z");
        assert_eq!(format_utc_ms(951_782_400_000), "2000-02-29T00:00:00.000Z");
    }

    #[test]
    fn format_and_parse_round_trip() {
        for ms in [
            0,
            -1,
            1,
            951_782_400_000,
            1_700_000_000_123,
            -62_135_596_800_000, // 0001-01-01
            253_402_300_799_999, // 9999-12-31T23:59:59.999
            -2_208_988_800_001,  // 1899-12-31T23:59:59.999
        ] {
            let text = format_utc_ms(ms);
            assert_eq!(parse_iso_ms(&text), Some(ms), "{text}");
        }
        // every day of 1999-2001 (leap and century years) and a minute apart
        for day in 10_592..11_688 {
            let ms = day * 86_400_000 + day % 1440 * 60_000;
            assert_eq!(parse_iso_ms(&format_utc_ms(ms)), Some(ms));
            assert_eq!(days_from_civil_of(civil_from_days(day)), day);
        }
    }

    fn days_from_civil_of((y, m, d): (i64, i64, i64)) -> i64 {
        days_from_civil(y, m, d)
    }
}
