//! The hours a worker may render ("22:00-08:00", a window that may cross midnight), separate
//! windows for weekdays and weekends, and the clock they are read on (local time; tests inject
//! their own).

use std::fmt;
use std::str::FromStr;

use chrono::{Datelike, NaiveDateTime, NaiveTime, Timelike, Weekday};

use super::YieldSource;

/// A daily window of allowed hours, `HH:MM-HH:MM`; the end is excluded, and a window whose end
/// is not after its start crosses midnight ("22:00-08:00" is 22:00 to 08:00 the next morning).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    start: u32,
    end: u32,
}

/// Why a window does not parse.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("{0:?}: not an hours window (HH:MM-HH:MM, e.g. 22:00-08:00)")]
pub struct BadWindow(String);

fn minutes(s: &str) -> Option<u32> {
    let (h, m) = s.trim().split_once(':')?;
    let (h, m): (u32, u32) = (h.parse().ok()?, m.parse().ok()?);
    // 24:00 is the end of the day.
    ((h < 24 && m < 60) || (h == 24 && m == 0)).then_some(h * 60 + m)
}

impl FromStr for Window {
    type Err = BadWindow;

    fn from_str(s: &str) -> Result<Self, BadWindow> {
        let bad = || BadWindow(s.to_owned());
        // A hyphen, or the en dash people paste from docs.
        let (a, b) = s
            .split_once('-')
            .or_else(|| s.split_once('–'))
            .ok_or_else(bad)?;
        let (start, end) = (minutes(a).ok_or_else(bad)?, minutes(b).ok_or_else(bad)?);
        if start == end && start != 0 {
            return Err(bad());
        }
        Ok(Window { start, end })
    }
}

impl fmt::Display for Window {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let hm = |m: u32| format!("{:02}:{:02}", m / 60, m % 60);
        write!(f, "{}-{}", hm(self.start), hm(self.end))
    }
}

impl Window {
    /// Whether `time` of day falls inside.
    pub fn contains(&self, time: NaiveTime) -> bool {
        let t = time.hour() * 60 + time.minute();
        if self.start < self.end {
            (self.start..self.end).contains(&t)
        } else if self.start == 0 && self.end == 0 {
            // 00:00-00:00: the whole day.
            true
        } else {
            t >= self.start || t < self.end
        }
    }
}

/// The allowed hours: one window on weekdays, another (or the same) on Saturday and Sunday.
/// A night window belongs to the day it starts on: Friday's 22:00-08:00 runs into Saturday
/// morning.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Hours {
    /// Monday to Friday.
    pub weekdays: Window,
    /// Saturday and Sunday; `None`: the weekday window.
    pub weekends: Option<Window>,
}

fn weekend(d: Weekday) -> bool {
    matches!(d, Weekday::Sat | Weekday::Sun)
}

impl Hours {
    /// The window that governs `now`: `None` when rendering is allowed, else the window it is
    /// outside of.
    pub fn outside(&self, now: NaiveDateTime) -> Option<Window> {
        let for_day = |d: Weekday| match (weekend(d), self.weekends) {
            (true, Some(w)) => w,
            _ => self.weekdays,
        };
        let today = for_day(now.weekday());
        let t = now.time();
        let minute = t.hour() * 60 + t.minute();
        // Before today's start, the morning part of yesterday's night window may still run.
        let yesterday = for_day(now.weekday().pred());
        let in_today = if today.start < today.end || (today.start == 0 && today.end == 0) {
            today.contains(t)
        } else {
            minute >= today.start
        };
        let in_yesterdays_night = yesterday.start > yesterday.end && minute < yesterday.end;
        if in_today || in_yesterdays_night {
            None
        } else {
            Some(today)
        }
    }
}

/// Local wall-clock time, the one thing hours are read on.
pub trait Clock: Send + Sync {
    /// Now, as the PC's owner reads it.
    fn now(&self) -> NaiveDateTime;
}

/// The PC's local time.
#[derive(Clone, Copy, Debug, Default)]
pub struct LocalClock;

impl Clock for LocalClock {
    fn now(&self) -> NaiveDateTime {
        chrono::Local::now().naive_local()
    }
}

/// A clock that reads its time from a file the test rewrites (`YYYY-MM-DDTHH:MM:SS`); the
/// local time while the file is missing or unreadable. Test builds only.
#[cfg(feature = "testing")]
#[derive(Clone, Debug)]
pub struct FileClock(pub std::path::PathBuf);

#[cfg(feature = "testing")]
impl Clock for FileClock {
    fn now(&self) -> NaiveDateTime {
        std::fs::read_to_string(&self.0)
            .ok()
            .and_then(|s| NaiveDateTime::parse_from_str(s.trim(), "%Y-%m-%dT%H:%M:%S").ok())
            .unwrap_or_else(|| LocalClock.now())
    }
}

/// The source "outside the allowed hours".
pub struct OutsideHours(pub Hours);

impl YieldSource for OutsideHours {
    fn check(&mut self, now: NaiveDateTime) -> Option<String> {
        self.0.outside(now).map(|w| format!("outside {w}"))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(s: &str) -> NaiveDateTime {
        NaiveDateTime::parse_from_str(s, "%Y-%m-%d %H:%M").unwrap()
    }

    #[test]
    fn windows_parse_and_cross_midnight() {
        let night: Window = "22:00-08:00".parse().unwrap();
        assert_eq!(night.to_string(), "22:00-08:00");
        assert_eq!("22:00–08:00".parse::<Window>().unwrap(), night);
        let t = |s: &str| NaiveTime::parse_from_str(s, "%H:%M").unwrap();
        assert!(night.contains(t("23:59")) && night.contains(t("00:00")));
        assert!(night.contains(t("07:59")) && night.contains(t("22:00")));
        assert!(!night.contains(t("08:00")) && !night.contains(t("21:59")));
        let day: Window = "09:30-17:00".parse().unwrap();
        assert!(day.contains(t("09:30")) && !day.contains(t("17:00")));
        assert!(!day.contains(t("09:29")));
        let all: Window = "00:00-24:00".parse().unwrap();
        assert!(all.contains(t("00:00")) && all.contains(t("23:59")));
        assert!(
            "00:00-00:00"
                .parse::<Window>()
                .unwrap()
                .contains(t("12:00"))
        );
        for bad in [
            "",
            "22:00",
            "25:00-08:00",
            "22:60-08:00",
            "8-9",
            "10:00-10:00",
            "a:b-c:d",
        ] {
            assert!(bad.parse::<Window>().is_err(), "{bad}");
        }
    }

    #[test]
    fn weekends_have_their_own_window_and_friday_night_runs_into_saturday() {
        // 2026-12-04 is a Friday.
        let hours = Hours {
            weekdays: "22:00-08:00".parse().unwrap(),
            weekends: Some("10:00-20:00".parse().unwrap()),
        };
        assert_eq!(hours.outside(at("2026-12-04 23:00")), None);
        // Saturday 07:00: Friday's night window still runs.
        assert_eq!(hours.outside(at("2026-12-05 07:00")), None);
        // Saturday 09:00: Friday's night is over, Saturday's window not begun.
        assert_eq!(
            hours.outside(at("2026-12-05 09:00")).unwrap().to_string(),
            "10:00-20:00"
        );
        assert_eq!(hours.outside(at("2026-12-05 12:00")), None);
        assert!(hours.outside(at("2026-12-05 21:00")).is_some());
        // Monday 07:00: Sunday's window is a day window, so no night runs into Monday.
        assert!(hours.outside(at("2026-12-07 07:00")).is_some());
        // Monday 12:00: outside the weekday window, which is named.
        let reason = OutsideHours(hours.clone()).check(at("2026-12-07 12:00"));
        assert_eq!(reason.as_deref(), Some("outside 22:00-08:00"));
        // Without a weekend window, every day has the weekday one.
        let every_day = Hours {
            weekdays: "22:00-08:00".parse().unwrap(),
            weekends: None,
        };
        assert_eq!(every_day.outside(at("2026-12-06 03:00")), None);
        assert!(every_day.outside(at("2026-12-06 12:00")).is_some());
    }
}
