//! UTC dates for `finished`: `YYYY-MM-DD`, optionally followed by `T` or a space and
//! `HH:MM`, `HH:MM:SS` or `HH:MM:SS.fff`, optionally ending in `Z`. Always UTC.

/// Unix milliseconds of a UTC date or date-time, or `None` if `s` is not one.
pub(super) fn parse_utc_ms(s: &str) -> Option<i64> {
    let s = s.strip_suffix('Z').unwrap_or(s);
    let (date, time) = match s.split_once(['T', ' ']) {
        Some((d, t)) => (d, Some(t)),
        None => (s, None),
    };
    let mut d = date.split('-');
    let year: i64 = num(d.next()?, 4)?;
    let month: i64 = num(d.next()?, 2)?;
    let day: i64 = num(d.next()?, 2)?;
    if d.next().is_some() || !(1..=12).contains(&month) || day < 1 || day > days_in(year, month) {
        return None;
    }
    let mut ms = days_from_civil(year, month, day) * 86_400_000;
    if let Some(t) = time {
        let (hms, frac) = match t.split_once('.') {
            Some((a, b)) => (a, Some(b)),
            None => (t, None),
        };
        let mut p = hms.split(':');
        let h: i64 = num(p.next()?, 2)?;
        let m: i64 = num(p.next()?, 2)?;
        let sec: i64 = match p.next() {
            Some(x) => num(x, 2)?,
            None => 0,
        };
        if p.next().is_some() || h > 23 || m > 59 || sec > 59 {
            return None;
        }
        ms += ((h * 60 + m) * 60 + sec) * 1000;
        if let Some(f) = frac {
            if f.is_empty() || f.len() > 3 || !f.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            let v: i64 = f.parse().ok()?;
            ms += v * 10_i64.pow(3 - f.len() as u32);
        }
    }
    Some(ms)
}

/// Exactly `width` ASCII digits.
fn num(s: &str, width: usize) -> Option<i64> {
    if s.len() != width || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse().ok()
}

fn days_in(year: i64, month: i64) -> i64 {
    match month {
        2 if (year % 4 == 0 && year % 100 != 0) || year % 400 == 0 => 29,
        2 => 28,
        4 | 6 | 9 | 11 => 30,
        _ => 31,
    }
}

/// Days since 1970-01-01 (Howard Hinnant's `days_from_civil`,
/// <https://howardhinnant.github.io/date_algorithms.html#days_from_civil>).
fn days_from_civil(y: i64, m: i64, d: i64) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

#[cfg(test)]
mod tests {
    use super::parse_utc_ms;

    #[test]
    fn dates_and_times() {
        assert_eq!(parse_utc_ms("1970-01-01"), Some(0));
        assert_eq!(
            parse_utc_ms("2023-11-14T22:13:20Z"),
            Some(1_700_000_000_000)
        );
        assert_eq!(
            parse_utc_ms("2023-11-14 22:13:20.5"),
            Some(1_700_000_000_500)
        );
        assert_eq!(parse_utc_ms("2024-02-29"), Some(1_709_164_800_000));
        assert_eq!(parse_utc_ms("2023-02-29"), None);
        assert_eq!(parse_utc_ms("2023-1-01"), None);
        assert_eq!(parse_utc_ms("yesterday"), None);
        assert_eq!(parse_utc_ms("2023-11-14T25:00"), None);
    }
}
