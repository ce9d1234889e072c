//! Calendar windows and peak hours: when a budget resets, and when the burst tier is open.
//!
//! A budget counts tokens in a [`Window`]: the current minute, hour, day, week or month of a
//! wall clock that runs at a fixed offset from UTC. [`Window::start`] and [`Window::end`]
//! give the exact Unix seconds of the calendar boundaries around an instant, so a 429's
//! `retry-after` ([`Window::retry_after_secs`]) and an `x-ratelimit-reset-*` header
//! ([`go_duration`] of [`Window::ms_until_end`]) say exactly when the budget frees up.
//! [`PeakHours`] says whether an instant falls in the configured peak hours of that clock,
//! the only time the burst tier may be used.
//!
//! Invariants:
//! - Windows are calendar-aligned in local time: a day starts at local midnight, an hour at
//!   local `HH:00`, a minute at local `HH:MM:00`; they are never rolling intervals.
//! - The offset is fixed: there is no daylight saving time and no time-zone database. A
//!   region that changes its offset twice a year is configured with one of its two offsets.
//!   Offsets lie within -14:00..=+14:00 and are whole minutes (so minute windows coincide
//!   with UTC minutes, while hours and days follow the local clock, e.g. +05:30).
//! - Weeks start on Monday 00:00 local time (ISO 8601).
//! - Months have their real lengths, leap years included (proleptic Gregorian calendar:
//!   every fourth year, except centuries not divisible by 400; 2000 leaps, 2100 does not).
//! - For every instant `t` in the supported range, `start(t) <= t < end(t)` and
//!   `start(end(t)) == end(t)`: the next window begins exactly at the reset.
//! - Instants are `i64` Unix seconds (milliseconds where stated). Instants before 1970 work;
//!   instants at the far ends of `i64` are not meaningful but never panic (arithmetic
//!   saturates).
//!
//! Civil-date conversion uses Howard Hinnant's algorithms
//! (<https://howardhinnant.github.io/date_algorithms.html>): pure integer arithmetic, no
//! tables, exact over the whole proleptic Gregorian calendar.

use serde::Deserialize;

const SECS_PER_MINUTE: i64 = 60;
const SECS_PER_HOUR: i64 = 3_600;
const SECS_PER_DAY: i64 = 86_400;
const DAYS_PER_WEEK: i64 = 7;
const MINUTES_PER_DAY: u16 = 1_440;

/// The largest offset from UTC in use anywhere (UTC+14:00, Line Islands; UTC-12:00 is the
/// most negative in use, -14:00 is accepted for symmetry).
pub const MAX_OFFSET_SECS: i32 = 14 * 3_600;

/// The calendar unit a [`Window`] spans.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WindowKind {
    Minute,
    Hour,
    Day,
    Week,
    Month,
}

impl WindowKind {
    /// The configuration spelling (`"minute"`, …, `"month"`), e.g. for stats labels.
    pub fn as_str(self) -> &'static str {
        match self {
            WindowKind::Minute => "minute",
            WindowKind::Hour => "hour",
            WindowKind::Day => "day",
            WindowKind::Week => "week",
            WindowKind::Month => "month",
        }
    }
}

/// A calendar window in a fixed UTC offset.
///
/// Build it with [`Window::new`], which checks the offset. The fields are public for
/// matching and display; a `Window` built by hand with an out-of-range offset still never
/// panics, its boundaries are merely those of that (unusual) clock.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub kind: WindowKind,
    /// Local time minus UTC, in seconds (+05:30 is `19_800`, -08:00 is `-28_800`).
    pub offset_secs: i32,
}

impl Window {
    /// A window of `kind` on a clock `offset_secs` ahead of UTC.
    ///
    /// The offset must be within -14h..=+14h and a whole number of minutes; otherwise the
    /// error says which rule it breaks.
    pub fn new(kind: WindowKind, offset_secs: i32) -> Result<Window, String> {
        check_offset(offset_secs)?;
        Ok(Window { kind, offset_secs })
    }

    /// Unix seconds at which the window containing `now` began: the local calendar boundary
    /// (local midnight, local Monday 00:00, local first of the month, …) expressed in UTC.
    pub fn start(&self, now: i64) -> i64 {
        let local = to_local(now, self.offset_secs);
        from_local(self.local_start(local), self.offset_secs)
    }

    /// Unix seconds at which the next window begins, which is when the budget resets.
    pub fn end(&self, now: i64) -> i64 {
        let local = to_local(now, self.offset_secs);
        let start = self.local_start(local);
        let end = match self.kind {
            WindowKind::Minute => start.saturating_add(SECS_PER_MINUTE),
            WindowKind::Hour => start.saturating_add(SECS_PER_HOUR),
            WindowKind::Day => start.saturating_add(SECS_PER_DAY),
            WindowKind::Week => start.saturating_add(DAYS_PER_WEEK * SECS_PER_DAY),
            WindowKind::Month => {
                let (y, m, _) = civil_from_days(local.div_euclid(SECS_PER_DAY));
                let (ny, nm) = if m == 12 {
                    (y.saturating_add(1), 1)
                } else {
                    (y, m.saturating_add(1))
                };
                days_from_civil(ny, nm, 1).saturating_mul(SECS_PER_DAY)
            }
        };
        from_local(end, self.offset_secs)
    }

    /// Milliseconds from `now_ms` (Unix milliseconds) until the reset; 0 only at the far end
    /// of the `i64` range.
    pub fn ms_until_end(&self, now_ms: i64) -> u64 {
        let end_ms = self.end(now_ms.div_euclid(1_000)).saturating_mul(1_000);
        u64::try_from(end_ms.saturating_sub(now_ms)).unwrap_or(0)
    }

    /// Whole seconds until the reset, rounded up and at least 1, for `Retry-After`.
    ///
    /// `now_ms` is Unix milliseconds. One millisecond before a boundary gives 1; exactly at
    /// a boundary gives the full length of the window that has just begun.
    pub fn retry_after_secs(&self, now_ms: i64) -> u64 {
        self.ms_until_end(now_ms).div_ceil(1_000).max(1)
    }

    /// Start of the window containing local instant `local`, in local seconds.
    fn local_start(&self, local: i64) -> i64 {
        match self.kind {
            WindowKind::Minute => floor_to(local, SECS_PER_MINUTE),
            WindowKind::Hour => floor_to(local, SECS_PER_HOUR),
            WindowKind::Day => floor_to(local, SECS_PER_DAY),
            WindowKind::Week => {
                let days = local.div_euclid(SECS_PER_DAY);
                let monday = days.saturating_sub(i64::from(iso_weekday(days).saturating_sub(1)));
                monday.saturating_mul(SECS_PER_DAY)
            }
            WindowKind::Month => {
                let (y, m, _) = civil_from_days(local.div_euclid(SECS_PER_DAY));
                days_from_civil(y, m, 1).saturating_mul(SECS_PER_DAY)
            }
        }
    }
}

/// Peak hours: `[from, to)` in local minutes of the day, on the chosen ISO weekdays, on a
/// clock at a fixed UTC offset.
///
/// - `from < to`: the range lies within one day (09:00–17:00).
/// - `from > to`: the range wraps midnight (22:00–06:00 is 22:00–24:00 plus 00:00–06:00 of
///   the next day). **The weekday that counts is the day the range started**: with Friday
///   selected, 22:00 Fri–06:00 Sat is peak; 22:00 Thu–06:00 Fri is not (unless Thursday is
///   selected too), even though its morning part falls on a Friday.
/// - `from == to`: all day, on the selected weekdays.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PeakHours {
    /// Local minute of the day at which peak hours begin, `0..1440`.
    pub from_min: u16,
    /// Local minute of the day at which peak hours end (exclusive), `0..1440`.
    pub to_min: u16,
    /// Selected weekdays, index 0 = Monday … 6 = Sunday.
    pub weekdays: [bool; 7],
    /// Local time minus UTC, in seconds.
    pub offset_secs: i32,
}

impl PeakHours {
    /// Parses `"HH:MM"` times for `from` and `to` (two digits each, 00:00–23:59; `to` may
    /// also be `"24:00"`, the same as `"00:00"`), weekday names `"mon"` … `"sun"`
    /// (case-insensitive; an empty list means every day; repeats are harmless) and an
    /// offset as for [`Window::new`]. The error names the offending value.
    pub fn parse(
        from: &str,
        to: &str,
        weekdays: &[String],
        offset_secs: i32,
    ) -> Result<PeakHours, String> {
        let from_min = parse_hh_mm(from, false).map_err(|e| format!("peak hours from: {e}"))?;
        let to_min = parse_hh_mm(to, true).map_err(|e| format!("peak hours to: {e}"))?;
        let mut days = [weekdays.is_empty(); 7];
        for name in weekdays {
            let index = WEEKDAY_NAMES
                .iter()
                .position(|n| n.eq_ignore_ascii_case(name))
                .ok_or_else(|| {
                    format!(
                        "peak hours weekdays: an unknown weekday (expected one of {})",
                        WEEKDAY_NAMES.join(", ")
                    )
                })?;
            if let Some(day) = days.get_mut(index) {
                *day = true;
            }
        }
        check_offset(offset_secs).map_err(|e| format!("peak hours {e}"))?;
        Ok(PeakHours {
            from_min,
            to_min,
            weekdays: days,
            offset_secs,
        })
    }

    /// Whether Unix second `now` falls in peak hours.
    pub fn contains(&self, now: i64) -> bool {
        let local = to_local(now, self.offset_secs);
        let days = local.div_euclid(SECS_PER_DAY);
        let minute = local.rem_euclid(SECS_PER_DAY) / SECS_PER_MINUTE;
        let (from, to) = (i64::from(self.from_min), i64::from(self.to_min));
        let selected = |days: i64| {
            let index = usize::try_from(iso_weekday(days).saturating_sub(1)).unwrap_or(0);
            self.weekdays.get(index).copied().unwrap_or(false)
        };
        if from == to {
            selected(days)
        } else if from < to {
            from <= minute && minute < to && selected(days)
        } else if minute >= from {
            selected(days)
        } else if minute < to {
            // The early-morning part of a range that started yesterday evening.
            selected(days.saturating_sub(1))
        } else {
            false
        }
    }
}

/// Lower-case three-letter weekday names, index 0 = Monday.
const WEEKDAY_NAMES: [&str; 7] = ["mon", "tue", "wed", "thu", "fri", "sat", "sun"];

/// ISO weekday (1 = Monday … 7 = Sunday) of a day counted from 1970-01-01 (a Thursday).
pub fn iso_weekday(days: i64) -> u32 {
    // 1970-01-01 is a Thursday: (0 + 3) mod 7 = 3 → Thursday with Monday = 0.
    let from_monday = days.saturating_add(3).rem_euclid(DAYS_PER_WEEK); // 0..=6
    from_monday.saturating_add(1) as u32
}

/// Days since 1970-01-01 of the proleptic Gregorian date `y`-`m`-`d` (Hinnant's
/// `days_from_civil`). `m` is 1..=12 and `d` 1..=31; other values give unspecified results
/// (but never panic).
// Every intermediate but `era` lies in the range noted on its line (from `rem_euclid(400)`
// and from `m` and `d`, which even at `u32::MAX` keep each product far inside `i64`), so
// plain arithmetic cannot overflow there; `era`, unbounded, is combined saturating.
#[allow(clippy::arithmetic_side_effects)]
pub fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let (m, d) = (i64::from(m), i64::from(d));
    // Years run March to February, so the leap day is the last day of the year.
    let y = if m <= 2 { y.saturating_sub(1) } else { y };
    let era = y.div_euclid(400);
    let yoe = y.rem_euclid(400); // [0, 399]
    let mp = if m > 2 { m - 3 } else { m + 9 }; // March = 0
    let doy = (153 * mp + 2) / 5 + d - 1; // [0, 365]
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy; // [0, 146096]
    era.saturating_mul(146_097)
        .saturating_add(doe)
        .saturating_sub(719_468)
}

/// The proleptic Gregorian date `(year, month 1..=12, day 1..=31)` of day `z` counted from
/// 1970-01-01 (Hinnant's `civil_from_days`).
// Every intermediate lies in the range noted on its line (from `rem_euclid(146_097)`),
// except `era`, which is at most `i64::MAX / 146_097`: `era * 400` stays inside `i64`, and
// so does the year (at most about `i64::MAX / 365`).
#[allow(clippy::arithmetic_side_effects)]
pub fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z.saturating_add(719_468); // days since 0000-03-01
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097); // [0, 146096]
    let yoe = (doe - doe / 1_460 + doe / 36_524 - doe / 146_096) / 365; // [0, 399]
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100); // [0, 365]
    let mp = (5 * doy + 2) / 153; // [0, 11], March = 0
    let d = doy - (153 * mp + 2) / 5 + 1; // [1, 31]
    let m = if mp < 10 { mp + 3 } else { mp - 9 }; // [1, 12]
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m as u32, d as u32)
}

/// Formats a duration of `ms` milliseconds as Go's `time.Duration.String()` does, which is
/// the form of OpenAI's `x-ratelimit-reset-*` headers: `"0s"`, `"20ms"`, `"1s"`, `"6m0s"`,
/// `"1h2m3s"`, `"25h0m0s"` (hours are never folded into days).
///
/// Below one second the milliseconds are exact (`"999ms"`). From one second up the value
/// is **rounded up** to whole seconds (`1001` → `"2s"`, where Go would say `"1.001s"`):
/// a reset time must never be announced earlier than it is, and whole seconds are what
/// clients parse most reliably.
pub fn go_duration(ms: u64) -> String {
    if ms == 0 {
        return "0s".to_string();
    }
    if ms < 1_000 {
        return format!("{ms}ms");
    }
    let secs = ms.div_ceil(1_000);
    let (h, m, s) = (secs / 3_600, secs / 60 % 60, secs % 60);
    if h > 0 {
        format!("{h}h{m}m{s}s")
    } else if m > 0 {
        format!("{m}m{s}s")
    } else {
        format!("{s}s")
    }
}

/// `unix_secs` as an RFC 3339 UTC time, `2027-01-15T08:00:00Z` (Anthropic's
/// `anthropic-ratelimit-*-reset` headers).
pub fn rfc3339(unix_secs: i64) -> String {
    let days = unix_secs.div_euclid(86_400);
    let secs = unix_secs.rem_euclid(86_400);
    let (y, m, d) = civil_from_days(days);
    let (hh, mm, ss) = (secs / 3_600, secs / 60 % 60, secs % 60);
    format!("{y:04}-{m:02}-{d:02}T{hh:02}:{mm:02}:{ss:02}Z")
}

/// Formats an offset as `+HH:MM` / `-HH:MM` (with `:SS` if it is not whole minutes).
pub fn format_offset(offset_secs: i32) -> String {
    let sign = if offset_secs < 0 { '-' } else { '+' };
    let abs = offset_secs.unsigned_abs();
    let (h, m, s) = (abs / 3_600, abs / 60 % 60, abs % 60);
    if s == 0 {
        format!("{sign}{h:02}:{m:02}")
    } else {
        format!("{sign}{h:02}:{m:02}:{s:02}")
    }
}

/// Checks that an offset is within -14h..=+14h and a whole number of minutes.
fn check_offset(offset_secs: i32) -> Result<(), String> {
    if offset_secs.unsigned_abs() > MAX_OFFSET_SECS.unsigned_abs() {
        return Err(format!(
            "offset {} ({offset_secs} s) is outside -14:00..=+14:00",
            format_offset(offset_secs)
        ));
    }
    if offset_secs % 60 != 0 {
        return Err(format!(
            "offset {} ({offset_secs} s) is not a whole number of minutes",
            format_offset(offset_secs)
        ));
    }
    Ok(())
}

/// Parses `"HH:MM"` into minutes of the day; `"24:00"` (only if `allow_24`) is 0.
fn parse_hh_mm(s: &str, allow_24: bool) -> Result<u16, String> {
    let digits = |part: &str| -> Option<u16> {
        if part.len() == 2 && part.bytes().all(|b| b.is_ascii_digit()) {
            part.parse().ok()
        } else {
            None
        }
    };
    let (h, m) = s
        .split_once(':')
        .and_then(|(h, m)| Some((digits(h)?, digits(m)?)))
        .ok_or_else(|| "not a time of day as HH:MM (e.g. \"09:00\")".to_string())?;
    if allow_24 && h == 24 && m == 0 {
        return Ok(0);
    }
    if h > 23 {
        return Err("the hour is not within 00..=23".to_string());
    }
    if m > 59 {
        return Err("the minute is not within 00..=59".to_string());
    }
    // At most 23 * 60 + 59 (both checked just above).
    let minutes = h.saturating_mul(60).saturating_add(m);
    debug_assert!(minutes < MINUTES_PER_DAY);
    Ok(minutes)
}

/// UTC Unix seconds to local seconds (the Unix-like count of the local wall clock).
fn to_local(now: i64, offset_secs: i32) -> i64 {
    now.saturating_add(i64::from(offset_secs))
}

/// Local seconds back to UTC Unix seconds.
fn from_local(local: i64, offset_secs: i32) -> i64 {
    local.saturating_sub(i64::from(offset_secs))
}

/// The largest multiple of `unit` at or below `t` (saturating at the `i64` ends).
fn floor_to(t: i64, unit: i64) -> i64 {
    t.div_euclid(unit).saturating_mul(unit)
}

#[cfg(test)]
mod tests {
    use super::*;

    const IST: i32 = 5 * 3_600 + 30 * 60; // India, +05:30
    const PST: i32 = -8 * 3_600; // -08:00
    const LINT: i32 = 14 * 3_600; // Line Islands, +14:00
    const MART: i32 = -(9 * 3_600 + 30 * 60); // Marquesas, -09:30
    const NPT: i32 = 5 * 3_600 + 45 * 60; // Nepal, +05:45

    /// Unix seconds of a UTC date-time.
    fn utc(y: i64, mo: u32, d: u32, h: i64, mi: i64, s: i64) -> i64 {
        days_from_civil(y, mo, d) * SECS_PER_DAY + h * 3_600 + mi * 60 + s
    }

    /// Unix seconds of a local date-time on a clock `off` seconds ahead of UTC.
    fn local(y: i64, mo: u32, d: u32, h: i64, mi: i64, s: i64, off: i32) -> i64 {
        utc(y, mo, d, h, mi, s) - i64::from(off)
    }

    fn win(kind: WindowKind, off: i32) -> Window {
        Window::new(kind, off).unwrap()
    }

    fn peak(from: &str, to: &str, days: &[&str], off: i32) -> PeakHours {
        let days: Vec<String> = days.iter().map(|d| d.to_string()).collect();
        PeakHours::parse(from, to, &days, off).unwrap()
    }

    const KINDS: [WindowKind; 5] = [
        WindowKind::Minute,
        WindowKind::Hour,
        WindowKind::Day,
        WindowKind::Week,
        WindowKind::Month,
    ];

    // ---- civil dates ----

    #[test]
    fn civil_helpers_match_known_unix_times() {
        // Values from `date -u -d … +%s`.
        assert_eq!(utc(1970, 1, 1, 0, 0, 0), 0);
        assert_eq!(utc(1969, 12, 31, 23, 59, 59), -1);
        assert_eq!(utc(2026, 3, 10, 20, 0, 0), 1_773_172_800);
        assert_eq!(utc(2024, 2, 29, 0, 0, 0), 1_709_164_800);
        assert_eq!(utc(2000, 3, 1, 0, 0, 0), 951_868_800);
        assert_eq!(utc(2100, 3, 1, 0, 0, 0), 4_107_542_400);
        assert_eq!(utc(1600, 1, 1, 0, 0, 0), -11_676_096_000);
        assert_eq!(civil_from_days(0), (1970, 1, 1));
        assert_eq!(civil_from_days(-1), (1969, 12, 31));
        assert_eq!(civil_from_days(19_782), (2024, 2, 29));
        assert_eq!(civil_from_days(11_017), (2000, 3, 1));
    }

    #[test]
    fn civil_helpers_agree_with_a_naive_day_by_day_calendar_from_1600_to_2500() {
        let leap = |y: i64| (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
        let month_len = |y: i64, m: u32| match m {
            2 if leap(y) => 29,
            2 => 28,
            4 | 6 | 9 | 11 => 30,
            _ => 31,
        };
        let (mut y, mut m, mut d) = (1600_i64, 1_u32, 1_u32);
        let mut z = days_from_civil(1600, 1, 1);
        while y < 2500 {
            assert_eq!(days_from_civil(y, m, d), z, "{y}-{m}-{d}");
            assert_eq!(civil_from_days(z), (y, m, d), "day {z}");
            z += 1;
            d += 1;
            if d > month_len(y, m) {
                d = 1;
                m += 1;
                if m > 12 {
                    m = 1;
                    y += 1;
                }
            }
        }
    }

    #[test]
    fn iso_weekday_counts_from_a_thursday_epoch() {
        assert_eq!(iso_weekday(0), 4); // 1970-01-01 Thursday
        assert_eq!(iso_weekday(-1), 3); // 1969-12-31 Wednesday
        assert_eq!(iso_weekday(days_from_civil(2026, 3, 9)), 1); // Monday
        assert_eq!(iso_weekday(days_from_civil(2026, 3, 10)), 2); // Tuesday
        assert_eq!(iso_weekday(days_from_civil(2026, 3, 15)), 7); // Sunday
    }

    // ---- offsets ----

    #[test]
    fn offsets_within_fourteen_hours_in_whole_minutes_are_accepted() {
        for off in [0, IST, PST, LINT, -LINT, MART, NPT, 60, -60] {
            assert_eq!(win(WindowKind::Day, off).offset_secs, off);
        }
    }

    #[test]
    fn offsets_beyond_fourteen_hours_or_with_seconds_are_rejected() {
        let e = Window::new(WindowKind::Day, LINT + 60).unwrap_err();
        assert!(e.contains("+14:01") && e.contains("outside"), "{e}");
        let e = Window::new(WindowKind::Day, -LINT - 60).unwrap_err();
        assert!(e.contains("-14:01") && e.contains("outside"), "{e}");
        let e = Window::new(WindowKind::Day, i32::MIN).unwrap_err();
        assert!(e.contains("outside"), "{e}");
        let e = Window::new(WindowKind::Hour, IST + 30).unwrap_err();
        assert!(e.contains("whole number of minutes"), "{e}");
        assert!(e.contains("+05:30:30"), "{e}");
    }

    #[test]
    fn window_kinds_deserialize_from_snake_case_names() {
        let kinds: Vec<WindowKind> =
            serde_json::from_str(r#"["minute","hour","day","week","month"]"#).unwrap();
        assert_eq!(kinds, KINDS);
        for k in KINDS {
            assert_eq!(
                serde_json::from_str::<WindowKind>(&format!("\"{}\"", k.as_str())).unwrap(),
                k
            );
        }
        assert!(serde_json::from_str::<WindowKind>(r#""Day""#).is_err());
        assert!(serde_json::from_str::<WindowKind>(r#""year""#).is_err());
    }

    // ---- minute, hour, day ----

    #[test]
    fn minute_windows_start_at_the_whole_minute_in_utc_and_with_offsets() {
        let now = utc(2026, 3, 10, 20, 17, 42);
        for off in [0, IST, PST, LINT, MART] {
            let w = win(WindowKind::Minute, off);
            assert_eq!(w.start(now), utc(2026, 3, 10, 20, 17, 0), "offset {off}");
            assert_eq!(w.end(now), utc(2026, 3, 10, 20, 18, 0), "offset {off}");
        }
    }

    #[test]
    fn hour_windows_start_at_the_local_hour() {
        let now = utc(2026, 3, 10, 20, 17, 42);
        let w = win(WindowKind::Hour, 0);
        assert_eq!(w.start(now), utc(2026, 3, 10, 20, 0, 0));
        assert_eq!(w.end(now), utc(2026, 3, 10, 21, 0, 0));
        // Whole-hour offsets keep UTC hours.
        for off in [PST, LINT] {
            assert_eq!(
                win(WindowKind::Hour, off).start(now),
                utc(2026, 3, 10, 20, 0, 0)
            );
        }
        // +05:30: local 01:47:42 → local hour 01:00 = 19:30Z.
        let w = win(WindowKind::Hour, IST);
        assert_eq!(w.start(now), utc(2026, 3, 10, 19, 30, 0));
        assert_eq!(w.end(now), utc(2026, 3, 10, 20, 30, 0));
        // -09:30: local 10:47:42 → local hour 10:00 = 19:30Z.
        let w = win(WindowKind::Hour, MART);
        assert_eq!(w.start(now), utc(2026, 3, 10, 19, 30, 0));
        assert_eq!(w.end(now), utc(2026, 3, 10, 20, 30, 0));
    }

    #[test]
    fn day_windows_start_at_utc_midnight_without_offset() {
        let w = win(WindowKind::Day, 0);
        let now = utc(2026, 3, 10, 20, 0, 0);
        assert_eq!(w.start(now), utc(2026, 3, 10, 0, 0, 0));
        assert_eq!(w.end(now), utc(2026, 3, 11, 0, 0, 0));
        assert_eq!(
            w.start(utc(2026, 3, 11, 0, 0, 0)),
            utc(2026, 3, 11, 0, 0, 0)
        );
    }

    #[test]
    fn day_window_in_india_starts_at_local_midnight_the_evening_before_in_utc() {
        // 2026-03-10T20:00Z is 01:30 on 2026-03-11 in India.
        let w = win(WindowKind::Day, IST);
        let now = utc(2026, 3, 10, 20, 0, 0);
        assert_eq!(w.start(now), utc(2026, 3, 10, 18, 30, 0));
        assert_eq!(w.start(now), 1_773_167_400);
        assert_eq!(w.end(now), utc(2026, 3, 11, 18, 30, 0));
        // One second before local midnight is still the previous local day.
        let before = utc(2026, 3, 10, 18, 29, 59);
        assert_eq!(w.start(before), utc(2026, 3, 9, 18, 30, 0));
    }

    #[test]
    fn day_windows_with_negative_and_extreme_offsets() {
        let now = utc(2026, 3, 10, 5, 0, 0);
        // -08:00: 2026-03-09 21:00 local → day began 2026-03-09 08:00Z.
        let w = win(WindowKind::Day, PST);
        assert_eq!(w.start(now), utc(2026, 3, 9, 8, 0, 0));
        assert_eq!(w.end(now), utc(2026, 3, 10, 8, 0, 0));
        // +14:00: 2026-03-10 19:00 local → day began 2026-03-09 10:00Z.
        let w = win(WindowKind::Day, LINT);
        assert_eq!(w.start(now), utc(2026, 3, 9, 10, 0, 0));
        assert_eq!(w.end(now), utc(2026, 3, 10, 10, 0, 0));
        // -09:30: 2026-03-09 19:30 local → day began 2026-03-09 09:30Z.
        let w = win(WindowKind::Day, MART);
        assert_eq!(w.start(now), utc(2026, 3, 9, 9, 30, 0));
        assert_eq!(w.end(now), utc(2026, 3, 10, 9, 30, 0));
    }

    // ---- week ----

    #[test]
    fn week_windows_start_on_monday_midnight_local() {
        // 2026-03-10 is a Tuesday; the week began Monday 2026-03-09.
        let w = win(WindowKind::Week, 0);
        let now = utc(2026, 3, 10, 12, 0, 0);
        assert_eq!(w.start(now), utc(2026, 3, 9, 0, 0, 0));
        assert_eq!(w.end(now), utc(2026, 3, 16, 0, 0, 0));
        // Monday 00:00 itself opens a new week.
        let monday = utc(2026, 3, 16, 0, 0, 0);
        assert_eq!(w.start(monday), monday);
        assert_eq!(w.start(monday - 1), utc(2026, 3, 9, 0, 0, 0));
    }

    #[test]
    fn sunday_late_evening_local_belongs_to_the_week_that_began_six_days_earlier() {
        for off in [0, IST, PST, LINT, MART] {
            let w = win(WindowKind::Week, off);
            let sunday = local(2026, 3, 15, 23, 59, 0, off);
            assert_eq!(
                w.start(sunday),
                local(2026, 3, 9, 0, 0, 0, off),
                "offset {off}"
            );
            assert_eq!(
                w.end(sunday),
                local(2026, 3, 16, 0, 0, 0, off),
                "offset {off}"
            );
        }
        // In India, Sunday 23:59 local is 18:29Z on Sunday; the week began Sunday 18:30Z
        // the week before (Monday 00:00 local).
        let w = win(WindowKind::Week, IST);
        assert_eq!(
            w.start(utc(2026, 3, 15, 18, 29, 0)),
            utc(2026, 3, 8, 18, 30, 0)
        );
        // One minute later it is Monday locally: a new week.
        assert_eq!(
            w.start(utc(2026, 3, 15, 18, 30, 0)),
            utc(2026, 3, 15, 18, 30, 0)
        );
    }

    #[test]
    fn week_windows_span_month_and_year_ends() {
        let w = win(WindowKind::Week, 0);
        // 2025-12-29 is a Monday; its week holds 2026-01-01.
        let now = utc(2026, 1, 1, 9, 0, 0);
        assert_eq!(w.start(now), utc(2025, 12, 29, 0, 0, 0));
        assert_eq!(w.end(now), utc(2026, 1, 5, 0, 0, 0));
    }

    // ---- month ----

    #[test]
    fn month_window_on_january_31st_ends_on_february_1st() {
        let w = win(WindowKind::Month, 0);
        let now = utc(2026, 1, 31, 23, 59, 59);
        assert_eq!(w.start(now), utc(2026, 1, 1, 0, 0, 0));
        assert_eq!(w.end(now), utc(2026, 2, 1, 0, 0, 0));
        assert_eq!(w.start(now + 1), utc(2026, 2, 1, 0, 0, 0));
        assert_eq!(w.end(now + 1), utc(2026, 3, 1, 0, 0, 0));
    }

    #[test]
    fn leap_day_2024_is_in_february_which_ends_on_march_1st() {
        let w = win(WindowKind::Month, 0);
        let now = utc(2024, 2, 29, 12, 0, 0);
        assert_eq!(w.start(now), utc(2024, 2, 1, 0, 0, 0));
        assert_eq!(w.end(now), utc(2024, 3, 1, 0, 0, 0));
        assert_eq!(w.end(now), 1_709_251_200);
        assert_eq!(w.end(now) - w.start(now), 29 * SECS_PER_DAY);
    }

    #[test]
    fn february_2023_has_28_days_and_ends_on_march_1st() {
        let w = win(WindowKind::Month, 0);
        let now = utc(2023, 2, 28, 23, 0, 0);
        assert_eq!(w.start(now), utc(2023, 2, 1, 0, 0, 0));
        assert_eq!(w.end(now), utc(2023, 3, 1, 0, 0, 0));
        assert_eq!(w.end(now) - w.start(now), 28 * SECS_PER_DAY);
    }

    #[test]
    fn year_2000_is_a_leap_year_and_2100_is_not() {
        let w = win(WindowKind::Month, 0);
        let feb_2000 = utc(2000, 2, 15, 0, 0, 0);
        assert_eq!(w.end(feb_2000) - w.start(feb_2000), 29 * SECS_PER_DAY);
        assert_eq!(w.end(feb_2000), 951_868_800); // 2000-03-01
        let feb_2100 = utc(2100, 2, 15, 0, 0, 0);
        assert_eq!(w.end(feb_2100) - w.start(feb_2100), 28 * SECS_PER_DAY);
        assert_eq!(w.end(feb_2100), 4_107_542_400); // 2100-03-01
        assert_eq!(
            civil_from_days(days_from_civil(2100, 2, 28) + 1),
            (2100, 3, 1)
        );
        assert_eq!(
            civil_from_days(days_from_civil(2000, 2, 28) + 1),
            (2000, 2, 29)
        );
    }

    #[test]
    fn december_month_window_rolls_over_into_january_of_the_next_year() {
        for off in [0, IST, PST] {
            let w = win(WindowKind::Month, off);
            let now = local(2025, 12, 31, 23, 59, 59, off);
            assert_eq!(
                w.start(now),
                local(2025, 12, 1, 0, 0, 0, off),
                "offset {off}"
            );
            assert_eq!(w.end(now), local(2026, 1, 1, 0, 0, 0, off), "offset {off}");
            assert_eq!(
                w.end(now + 1),
                local(2026, 2, 1, 0, 0, 0, off),
                "offset {off}"
            );
        }
    }

    #[test]
    fn month_window_with_negative_offset_is_still_february_after_the_utc_month_boundary() {
        // 2026-03-01T03:00Z is 2026-02-28 19:00 at -08:00.
        let w = win(WindowKind::Month, PST);
        let now = utc(2026, 3, 1, 3, 0, 0);
        assert_eq!(now, 1_772_334_000);
        assert_eq!(w.start(now), utc(2026, 2, 1, 8, 0, 0));
        assert_eq!(w.end(now), utc(2026, 3, 1, 8, 0, 0));
        // And with a positive offset, the local month has already turned before UTC's.
        let w = win(WindowKind::Month, IST);
        let now = utc(2026, 2, 28, 20, 0, 0); // 2026-03-01 01:30 local
        assert_eq!(w.start(now), utc(2026, 2, 28, 18, 30, 0));
        assert_eq!(w.end(now), utc(2026, 3, 31, 18, 30, 0));
    }

    // ---- invariants over a sweep ----

    #[test]
    fn every_instant_lies_in_its_window_and_the_next_window_starts_at_the_reset() {
        let first = utc(2023, 1, 1, 0, 0, 0);
        let last = utc(2026, 1, 1, 0, 0, 0);
        for off in [0, IST, PST, LINT, -LINT, MART, NPT] {
            for kind in KINDS {
                let w = win(kind, off);
                let mut now = first;
                while now < last {
                    let (start, end) = (w.start(now), w.end(now));
                    assert!(start <= now && now < end, "{kind:?} {off} {now}");
                    assert_eq!(w.start(end), end, "{kind:?} {off} {now}");
                    assert_eq!(w.start(end - 1), start, "{kind:?} {off} {now}");
                    assert_eq!(w.start(start), start, "{kind:?} {off} {now}");
                    assert_eq!(w.end(start), end, "{kind:?} {off} {now}");
                    // The start is a local calendar boundary of the right kind.
                    let local_start = start + i64::from(off);
                    let days = local_start.div_euclid(SECS_PER_DAY);
                    let len = end - start;
                    match kind {
                        WindowKind::Minute => {
                            assert_eq!(local_start % 60, 0);
                            assert_eq!(len, 60);
                        }
                        WindowKind::Hour => {
                            assert_eq!(local_start % 3_600, 0);
                            assert_eq!(len, 3_600);
                        }
                        WindowKind::Day => {
                            assert_eq!(local_start % SECS_PER_DAY, 0);
                            assert_eq!(len, SECS_PER_DAY);
                        }
                        WindowKind::Week => {
                            assert_eq!(local_start % SECS_PER_DAY, 0);
                            assert_eq!(iso_weekday(days), 1);
                            assert_eq!(len, 7 * SECS_PER_DAY);
                        }
                        WindowKind::Month => {
                            assert_eq!(local_start % SECS_PER_DAY, 0);
                            assert_eq!(civil_from_days(days).2, 1);
                            assert!((28..=31).contains(&(len / SECS_PER_DAY)));
                            assert_eq!(len % SECS_PER_DAY, 0);
                        }
                    }
                    now += 7_919;
                }
            }
        }
    }

    #[test]
    fn instants_before_1970_work_and_extreme_instants_do_not_panic() {
        let w = win(WindowKind::Day, IST);
        let now = utc(1969, 12, 31, 20, 0, 0); // 01:30 local on 1970-01-01
        assert_eq!(w.start(now), utc(1969, 12, 31, 18, 30, 0));
        let w = win(WindowKind::Month, PST);
        let now = utc(1900, 3, 1, 3, 0, 0);
        assert_eq!(w.start(now), utc(1900, 2, 1, 8, 0, 0));
        assert_eq!(w.end(now), utc(1900, 3, 1, 8, 0, 0)); // 1900 is not a leap year
        for off in [0, LINT, -LINT, i32::MAX, i32::MIN] {
            for kind in KINDS {
                let w = Window {
                    kind,
                    offset_secs: off,
                };
                for t in [i64::MIN, i64::MIN + 1, -1, 0, i64::MAX - 1, i64::MAX] {
                    let _ = (w.start(t), w.end(t), w.retry_after_secs(t));
                    assert!(w.retry_after_secs(t) >= 1);
                }
            }
        }
        let p = peak("22:00", "06:00", &["fri"], 0);
        for t in [i64::MIN, -1, 0, i64::MAX] {
            let _ = p.contains(t);
        }
        let _ = civil_from_days(i64::MIN);
        let _ = civil_from_days(i64::MAX);
        let _ = days_from_civil(i64::MIN, 1, 1);
        let _ = days_from_civil(i64::MAX, u32::MAX, u32::MAX);
    }

    // ---- retry-after ----

    #[test]
    fn retry_after_rounds_up_to_whole_seconds() {
        let w = win(WindowKind::Minute, 0);
        let boundary = utc(2026, 3, 10, 20, 1, 0) * 1_000;
        assert_eq!(w.retry_after_secs(boundary - 1), 1);
        assert_eq!(w.retry_after_secs(boundary - 999), 1);
        assert_eq!(w.retry_after_secs(boundary - 1_000), 1);
        assert_eq!(w.retry_after_secs(boundary - 1_001), 2);
        assert_eq!(w.retry_after_secs(boundary - 59_999), 60);
        assert_eq!(w.ms_until_end(boundary - 1), 1);
    }

    #[test]
    fn retry_after_exactly_at_a_boundary_is_the_full_window_length() {
        let boundary = utc(2026, 3, 10, 0, 0, 0);
        assert_eq!(
            win(WindowKind::Minute, 0).retry_after_secs(boundary * 1_000),
            60
        );
        assert_eq!(
            win(WindowKind::Hour, 0).retry_after_secs(boundary * 1_000),
            3_600
        );
        assert_eq!(
            win(WindowKind::Day, 0).retry_after_secs(boundary * 1_000),
            86_400
        );
        let feb = utc(2024, 2, 1, 0, 0, 0) * 1_000;
        assert_eq!(win(WindowKind::Month, 0).retry_after_secs(feb), 29 * 86_400);
        assert_eq!(win(WindowKind::Month, 0).ms_until_end(feb), 29 * 86_400_000);
    }

    #[test]
    fn retry_after_before_1970_rounds_up_too() {
        let w = win(WindowKind::Minute, 0);
        assert_eq!(w.retry_after_secs(-1), 1); // 1969-12-31T23:59:59.999Z
        assert_eq!(w.retry_after_secs(-60_000), 60);
        assert_eq!(w.retry_after_secs(-59_999), 60);
    }

    // ---- peak hours ----

    #[test]
    fn peak_hours_within_a_day_include_from_and_exclude_to() {
        let p = peak("09:00", "17:30", &[], 0);
        assert_eq!((p.from_min, p.to_min), (540, 1_050));
        assert_eq!(p.weekdays, [true; 7]);
        assert!(!p.contains(utc(2026, 3, 10, 8, 59, 59)));
        assert!(p.contains(utc(2026, 3, 10, 9, 0, 0)));
        assert!(p.contains(utc(2026, 3, 10, 17, 29, 59)));
        assert!(!p.contains(utc(2026, 3, 10, 17, 30, 0)));
        assert!(!p.contains(utc(2026, 3, 10, 23, 0, 0)));
    }

    #[test]
    fn peak_hours_follow_the_local_clock() {
        let p = peak("09:00", "17:00", &[], IST);
        // 03:30Z is 09:00 in India.
        assert!(!p.contains(utc(2026, 3, 10, 3, 29, 59)));
        assert!(p.contains(utc(2026, 3, 10, 3, 30, 0)));
        assert!(p.contains(utc(2026, 3, 10, 11, 29, 59)));
        assert!(!p.contains(utc(2026, 3, 10, 11, 30, 0)));
        let p = peak("09:00", "17:00", &[], PST);
        assert!(p.contains(utc(2026, 3, 10, 17, 0, 0))); // 09:00 local
        assert!(!p.contains(utc(2026, 3, 11, 1, 0, 0))); // 17:00 local
    }

    #[test]
    fn peak_hours_wrap_around_midnight() {
        let p = peak("22:00", "06:00", &[], 0);
        assert!(!p.contains(utc(2026, 3, 10, 21, 59, 59)));
        assert!(p.contains(utc(2026, 3, 10, 22, 0, 0)));
        assert!(p.contains(utc(2026, 3, 10, 23, 59, 59)));
        assert!(p.contains(utc(2026, 3, 11, 0, 0, 0)));
        assert!(p.contains(utc(2026, 3, 11, 5, 59, 59)));
        assert!(!p.contains(utc(2026, 3, 11, 6, 0, 0)));
        assert!(!p.contains(utc(2026, 3, 11, 12, 0, 0)));
    }

    #[test]
    fn peak_hours_apply_only_on_the_selected_weekdays() {
        // 2026-03-09 is a Monday … 2026-03-15 a Sunday.
        let p = peak("09:00", "17:00", &["Mon", "WED", "sun"], 0);
        assert_eq!(p.weekdays, [true, false, true, false, false, false, true]);
        assert!(p.contains(utc(2026, 3, 9, 10, 0, 0))); // Monday
        assert!(!p.contains(utc(2026, 3, 10, 10, 0, 0))); // Tuesday
        assert!(p.contains(utc(2026, 3, 11, 10, 0, 0))); // Wednesday
        assert!(!p.contains(utc(2026, 3, 14, 10, 0, 0))); // Saturday
        assert!(p.contains(utc(2026, 3, 15, 10, 0, 0))); // Sunday
                                                         // The weekday is the local one: Monday 01:00 in India is Sunday 19:30Z.
        let p = peak("00:00", "02:00", &["mon"], IST);
        assert!(p.contains(utc(2026, 3, 8, 19, 30, 0)));
        assert!(!p.contains(utc(2026, 3, 9, 19, 30, 0))); // Tuesday 01:00 local
    }

    #[test]
    fn wrapped_peak_hours_belong_to_the_weekday_they_started_on() {
        // Friday 2026-03-13, Saturday 2026-03-14.
        let p = peak("22:00", "06:00", &["fri"], 0);
        assert!(p.contains(utc(2026, 3, 13, 22, 0, 0))); // Fri 22:00
        assert!(p.contains(utc(2026, 3, 14, 5, 59, 59))); // Sat 05:59, started Friday
        assert!(!p.contains(utc(2026, 3, 14, 22, 0, 0))); // Sat 22:00
        assert!(!p.contains(utc(2026, 3, 13, 5, 0, 0))); // Fri 05:00, started Thursday
        assert!(!p.contains(utc(2026, 3, 15, 1, 0, 0))); // Sun 01:00, started Saturday
                                                         // Sunday night into Monday belongs to Sunday, across the ISO week boundary.
        let p = peak("22:00", "06:00", &["sun"], 0);
        assert!(p.contains(utc(2026, 3, 16, 3, 0, 0))); // Mon 03:00, started Sunday
        assert!(!p.contains(utc(2026, 3, 10, 3, 0, 0))); // Tue 03:00, started Monday
    }

    #[test]
    fn peak_hours_with_equal_from_and_to_last_all_day() {
        let p = peak("00:00", "00:00", &[], 0);
        for h in 0..24 {
            assert!(p.contains(utc(2026, 3, 10, h, 0, 0)));
        }
        let p = peak("08:00", "08:00", &["sat", "sun"], MART);
        assert!(p.contains(local(2026, 3, 14, 0, 0, 0, MART)));
        assert!(p.contains(local(2026, 3, 15, 23, 59, 59, MART)));
        assert!(!p.contains(local(2026, 3, 13, 23, 59, 59, MART)));
        assert!(!p.contains(local(2026, 3, 16, 0, 0, 0, MART)));
        // "24:00" as the end is midnight: 00:00–24:00 is all day too.
        let p = peak("00:00", "24:00", &[], 0);
        assert_eq!((p.from_min, p.to_min), (0, 0));
        let p = peak("18:00", "24:00", &[], 0);
        assert!(p.contains(utc(2026, 3, 10, 23, 59, 59)));
        assert!(!p.contains(utc(2026, 3, 11, 0, 0, 0)));
        assert!(!p.contains(utc(2026, 3, 10, 17, 59, 59)));
    }

    #[test]
    fn malformed_peak_hours_are_errors_naming_the_field_not_the_value() {
        let parse = |from: &str, to: &str, days: &[&str]| {
            let days: Vec<String> = days.iter().map(|d| d.to_string()).collect();
            PeakHours::parse(from, to, &days, 0).unwrap_err()
        };
        let e = parse("25:00", "06:00", &[]);
        assert!(
            e.contains("from") && !e.contains("25:00") && e.contains("hour"),
            "{e}"
        );
        let e = parse("09:00", "9am", &[]);
        assert!(
            e.contains("to") && !e.contains("9am") && e.contains("HH:MM"),
            "{e}"
        );
        let e = parse("12:60", "13:00", &[]);
        assert!(
            e.contains("from") && !e.contains("12:60") && e.contains("minute"),
            "{e}"
        );
        let e = parse("09:00", "17:00", &["mon", "funday"]);
        // Messages name the field, never echo the value (configuration contract).
        assert!(e.contains("weekday") && !e.contains("funday"), "{e}");
        for bad in [
            "",
            "9:00",
            "09:0",
            "0900",
            "09:00:00",
            " 09:00",
            "+9:00",
            "-1:00",
            "24:00",
            "24:01",
            "０９:００",
        ] {
            let e = parse(bad, "17:00", &[]);
            assert!(e.starts_with("peak hours from"), "{bad:?}: {e}");
        }
        let e = parse("09:00", "24:30", &[]);
        assert!(
            e.starts_with("peak hours to") && !e.contains("24:30"),
            "{e}"
        );
        for bad_day in ["monday", "", "mo", "m"] {
            let e = parse("09:00", "17:00", &[bad_day]);
            assert!(e.contains("unknown weekday"), "{bad_day:?}: {e}");
        }
        let days = vec!["mon".to_string()];
        let e = PeakHours::parse("09:00", "17:00", &days, 15 * 3_600).unwrap_err();
        assert!(e.contains("offset"), "{e}");
    }

    // ---- go_duration ----

    #[test]
    fn go_duration_formats_like_go_with_whole_seconds_rounded_up() {
        assert_eq!(go_duration(0), "0s");
        assert_eq!(go_duration(1), "1ms");
        assert_eq!(go_duration(20), "20ms");
        assert_eq!(go_duration(999), "999ms");
        assert_eq!(go_duration(1_000), "1s");
        assert_eq!(go_duration(1_001), "2s");
        assert_eq!(go_duration(59_000), "59s");
        assert_eq!(go_duration(59_001), "1m0s");
        assert_eq!(go_duration(60_000), "1m0s");
        assert_eq!(go_duration(360_000), "6m0s");
        assert_eq!(go_duration(3_600_000), "1h0m0s");
        assert_eq!(go_duration(3_723_000), "1h2m3s");
        assert_eq!(go_duration(5_400_000), "1h30m0s");
        assert_eq!(go_duration(90_000_000), "25h0m0s");
        assert!(go_duration(u64::MAX).ends_with('s'));
    }

    #[test]
    fn offsets_format_as_signed_hours_and_minutes() {
        assert_eq!(format_offset(0), "+00:00");
        assert_eq!(format_offset(IST), "+05:30");
        assert_eq!(format_offset(PST), "-08:00");
        assert_eq!(format_offset(MART), "-09:30");
        assert_eq!(format_offset(-1), "-00:00:01");
    }
}
