//! Schedules (seed 004): ISO 8601 intervals, start times, and [`Scheduler`], the state machine
//! that decides when each flow runs by itself.
//!
//! Times are milliseconds since the Unix epoch (UTC) handed in by the caller: nothing here
//! reads a clock, sleeps, spawns a thread or does I/O, so tests run days of schedule in
//! microseconds. The scheduler's state lives in memory only: after a restart no run is in
//! progress, every flow schedules again from its start time as if it had run since then, and
//! the caller restores backoff from the run history it keeps
//! ([`Scheduler::restore_failures`]).

use std::collections::BTreeMap;
use std::fmt;
use std::str::FromStr;

use serde::de::Error as _;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::spec::from_value;

const SECOND_MS: i64 = 1_000;
const MINUTE_SECS: u64 = 60;
const HOUR_SECS: u64 = 60 * MINUTE_SECS;
const DAY_SECS: u64 = 24 * HOUR_SECS;
const DAY_MS: i64 = DAY_SECS as i64 * SECOND_MS;

/// How a duration is written, quoted in every parse error.
const SYNTAX_HINT: &str =
    "write an ISO 8601 duration P(nD)(T(nH)(nM)(nS)) such as PT15M, PT2H or P1DT12H";

/// A schedule interval: a positive whole number of seconds, at most 24 hours, written as an
/// ISO 8601 dayTimeDuration `P(nD)(T(nH)(nM)(nS))`.
///
/// The accepted text is deliberately narrower than ISO 8601 (and than what `jiff` parses):
/// - upper-case designators only (`PT15M`, not `pt15m`), no spaces, no sign;
/// - days, hours, minutes and seconds only: years (`P1Y`), months (`P1M` — minutes are `PT1M`)
///   and weeks (`P1W`) have no fixed length or exceed the maximum;
/// - whole numbers only, seconds included (`PT1.5H` → write `PT90M`): schedules are on a grid
///   of whole seconds;
/// - each unit at most once, in the order D, T, H, M, S; `T` must be followed by a time unit;
/// - values may overflow their unit (`PT90M`, `PT36H` is rejected only for exceeding 24 h);
/// - the total is more than zero and at most 24 hours (`P1D`).
///
/// The lower bound is a deployment setting (`min_schedule_interval`, by default
/// [`DEFAULT_MIN_SCHEDULE_INTERVAL`]) checked by [`Schedule::validate`], not by parsing.
/// `Display` writes the canonical form (`PT90M` → `PT1H30M`), which parses back to the same
/// value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Interval {
    secs: u32,
}

/// The default lower bound of schedule intervals (the seed's 5 minutes).
pub const DEFAULT_MIN_SCHEDULE_INTERVAL: Interval = Interval { secs: 5 * 60 };

impl Interval {
    /// The longest interval: 24 hours.
    pub const MAX: Interval = Interval {
        secs: DAY_SECS as u32,
    };

    /// An interval of `secs` seconds: 1 ..= 86 400.
    pub fn from_secs(secs: u64) -> Result<Interval, String> {
        if secs == 0 {
            return Err("an interval must be longer than zero".into());
        }
        if secs > DAY_SECS {
            return Err(format!(
                "{secs} seconds is longer than 24 hours, the longest interval"
            ));
        }
        Ok(Interval { secs: secs as u32 })
    }

    /// Parses an ISO 8601 dayTimeDuration; see the type's documentation for what is accepted.
    /// Errors quote the text and say what is wrong with it.
    pub fn parse(text: &str) -> Result<Interval, String> {
        if text.is_empty() {
            return Err(format!("the interval is empty; {SYNTAX_HINT}"));
        }
        let secs = parse_day_time(text)
            .map_err(|why| format!("`{text}` is not a valid interval: {why}"))?;
        if secs == 0 {
            return Err(format!(
                "`{text}` is not a valid interval: it is zero; an interval must be longer than zero"
            ));
        }
        if secs > DAY_SECS {
            return Err(format!(
                "`{text}` is not a valid interval: it is longer than 24 hours, the longest interval (P1D)"
            ));
        }
        Ok(Interval { secs: secs as u32 })
    }

    /// Whole seconds.
    pub fn as_secs(self) -> u32 {
        self.secs
    }

    /// Milliseconds, the scheduler's unit.
    pub fn as_millis(self) -> i64 {
        i64::from(self.secs) * SECOND_MS
    }

    /// As a standard duration.
    pub fn as_std(self) -> std::time::Duration {
        std::time::Duration::from_secs(u64::from(self.secs))
    }
}

/// Reads `P(nD)(T(nH)(nM)(nS))` into seconds (unbounded above except by `u64`); the caller
/// checks the range. The error says why, without quoting the text (the caller does).
fn parse_day_time(text: &str) -> Result<u64, String> {
    if text.is_empty() {
        return Err(format!("it is empty; {SYNTAX_HINT}"));
    }
    if text.chars().any(char::is_whitespace) {
        return Err(format!("it contains spaces; {SYNTAX_HINT}"));
    }
    if let Some(rest) = text.strip_prefix('-') {
        return Err(format!(
            "negative durations are not allowed; did you mean `{rest}`?"
        ));
    }
    if text.starts_with('+') {
        return Err(format!("a sign is not allowed; {SYNTAX_HINT}"));
    }
    if text.chars().any(|c| c.is_ascii_lowercase()) {
        let upper = text.to_ascii_uppercase();
        if parse_day_time(&upper).is_ok() {
            return Err(format!(
                "ISO 8601 designators are upper case; write `{upper}`"
            ));
        }
    }
    let Some(body) = text.strip_prefix('P') else {
        return Err(format!("it must start with `P`; {SYNTAX_HINT}"));
    };

    // Units in the order they may appear: (designator, in the time part, seconds, name).
    const UNITS: [(char, bool, u64, &str); 4] = [
        ('D', false, DAY_SECS, "days"),
        ('H', true, HOUR_SECS, "hours"),
        ('M', true, MINUTE_SECS, "minutes"),
        ('S', true, 1, "seconds"),
    ];
    let mut total: u64 = 0;
    let mut in_time = false;
    let mut time_units = 0;
    let mut date_units = 0;
    let mut next_unit = 0; // index into UNITS of the first unit still allowed
    let mut chars = body.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        if c == 'T' {
            if in_time {
                return Err("`T` appears twice".into());
            }
            in_time = true;
            continue;
        }
        if c == '.' || c == ',' {
            return Err(fraction_error());
        }
        if !c.is_ascii_digit() {
            return Err(if c.is_alphabetic() {
                format!("the designator `{c}` has no number before it; {SYNTAX_HINT}")
            } else {
                format!("unexpected character `{c}`; {SYNTAX_HINT}")
            });
        }
        let mut end = at + c.len_utf8();
        while let Some(&(i, d)) = chars.peek() {
            if !d.is_ascii_digit() {
                break;
            }
            end = i + d.len_utf8();
            chars.next();
        }
        let digits = &body[at..end];
        let Some((_, unit)) = chars.next() else {
            return Err(format!(
                "the number `{digits}` has no unit designator (D, H, M or S)"
            ));
        };
        if unit == '.' || unit == ',' {
            return Err(fraction_error());
        }
        let index = match (unit, in_time) {
            ('D', false) => 0,
            ('H', true) => 1,
            ('M', true) => 2,
            ('S', true) => 3,
            ('Y', _) => {
                return Err(
                    "years are not allowed (an interval has days, hours, minutes and seconds)"
                        .into(),
                );
            }
            ('W', _) => {
                return Err("weeks are not allowed (the longest interval is P1D)".into());
            }
            ('M', false) => {
                return Err(format!(
                    "`{digits}M` before `T` means months, which are not allowed; minutes are written after `T`: `PT{digits}M`"
                ));
            }
            ('D', true) => {
                return Err(format!(
                    "days come before `T`: `P{digits}D`, then `T` and the time units"
                ));
            }
            ('H' | 'S', false) => {
                return Err(format!(
                    "hours, minutes and seconds come after `T`: `PT{digits}{unit}`"
                ));
            }
            (other, _) => {
                return Err(format!(
                    "`{other}` is not a unit designator (D, H, M or S); {SYNTAX_HINT}"
                ));
            }
        };
        if index < next_unit {
            return Err(format!(
                "units must appear at most once each, in the order D, T, H, M, S (`{unit}` is out of place)"
            ));
        }
        next_unit = index + 1;
        if in_time {
            time_units += 1;
        } else {
            date_units += 1;
        }
        let (_, _, unit_secs, name) = UNITS[index];
        let value = digits
            .parse::<u64>()
            .ok()
            .and_then(|n| n.checked_mul(unit_secs))
            .ok_or_else(|| {
                format!("{digits} {name} is out of range (the longest interval is 24 hours, P1D)")
            })?;
        // Both terms are below u64::MAX / 2 only when small; saturate, the range check follows.
        total = total.saturating_add(value);
    }
    if in_time && time_units == 0 {
        return Err("`T` must be followed by hours, minutes or seconds (`PT15M`)".into());
    }
    if date_units == 0 && time_units == 0 {
        return Err(format!(
            "it has no days, hours, minutes or seconds; {SYNTAX_HINT}"
        ));
    }
    Ok(total)
}

fn fraction_error() -> String {
    "fractions are not allowed (whole numbers only, seconds included); use a smaller unit: `PT90M`, not `PT1.5H`"
        .into()
}

impl fmt::Display for Interval {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = u64::from(self.secs);
        let (d, h, m, sec) = (
            s / DAY_SECS,
            s % DAY_SECS / HOUR_SECS,
            s % HOUR_SECS / MINUTE_SECS,
            s % MINUTE_SECS,
        );
        f.write_str("P")?;
        if d > 0 {
            write!(f, "{d}D")?;
        }
        if h + m + sec > 0 {
            f.write_str("T")?;
            if h > 0 {
                write!(f, "{h}H")?;
            }
            if m > 0 {
                write!(f, "{m}M")?;
            }
            if sec > 0 {
                write!(f, "{sec}S")?;
            }
        }
        Ok(())
    }
}

impl FromStr for Interval {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Interval::parse(s)
    }
}

impl Serialize for Interval {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

impl<'de> Deserialize<'de> for Interval {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = Interval;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an ISO 8601 duration such as \"PT15M\"")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Interval, E> {
                Interval::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_str(V)
    }
}

/// Parses an RFC 3339 timestamp with `Z` or a numeric offset (`2026-01-01T00:00:00Z`,
/// `2026-01-01T09:00:00+09:00`) into UTC milliseconds; finer precision is truncated.
pub fn parse_utc_timestamp(text: &str) -> Result<i64, String> {
    text.parse::<jiff::Timestamp>()
        .map(|t| t.as_millisecond())
        .map_err(|e| {
            format!(
                "`{text}` is not a valid timestamp: {e}; write an RFC 3339 UTC time such as 2026-01-01T00:00:00Z"
            )
        })
}

/// Writes UTC milliseconds as RFC 3339 (`2026-01-01T00:00:00Z`, with `.123` when needed), or
/// `None` outside the years -9999 ..= 9999.
pub fn format_utc_timestamp(ms: i64) -> Option<String> {
    jiff::Timestamp::from_millisecond(ms)
        .ok()
        .map(|t| t.to_string())
}

/// A flow's schedule: `{ interval = "PT15M", start_time = "2026-01-01T00:00:00Z" }`.
///
/// Occurrences are `start_time + k·interval` for k ≥ 0. Without a start time the schedule
/// starts when it is given to the [`Scheduler`] (the seed's "default now").
#[derive(Clone, Debug, PartialEq, Eq, Serialize)]
#[serde(into = "RawSchedule")]
pub struct Schedule {
    interval: Interval,
    start_time: Option<i64>,
}

impl Schedule {
    /// A schedule; `start_time_ms` must lie within the years -9999 ..= 9999 (so that it can be
    /// written as RFC 3339).
    pub fn new(interval: Interval, start_time_ms: Option<i64>) -> Result<Schedule, String> {
        if let Some(ms) = start_time_ms
            && format_utc_timestamp(ms).is_none()
        {
            return Err(format!(
                "start_time: {ms} ms since 1970 is outside the years -9999..=9999"
            ));
        }
        Ok(Schedule {
            interval,
            start_time: start_time_ms,
        })
    }

    /// The time between occurrences.
    pub fn interval(&self) -> Interval {
        self.interval
    }

    /// The first occurrence, in UTC milliseconds, if the schedule names one.
    pub fn start_time_ms(&self) -> Option<i64> {
        self.start_time
    }

    /// Checks the deployment's lower bound (`min_schedule_interval`); the error names the
    /// field, the value and the minimum.
    pub fn validate(&self, min: Interval) -> Result<(), String> {
        check_min("schedule.interval", self.interval, min)
    }
}

/// `field: `PT1M` is shorter than min_schedule_interval PT5M`.
pub(crate) fn check_min(field: &str, value: Interval, min: Interval) -> Result<(), String> {
    if value < min {
        return Err(format!(
            "{field}: `{value}` is shorter than the minimum interval of this deployment, `{min}` (setting min_schedule_interval)"
        ));
    }
    Ok(())
}

impl<'de> Deserialize<'de> for Schedule {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let v = serde_json::Value::deserialize(d)?;
        if !v.is_object() {
            return Err(D::Error::custom(format!(
                "expected a table such as {{ interval = \"PT15M\" }}, got {v}"
            )));
        }
        let raw: RawSchedule = from_value(v).map_err(D::Error::custom)?;
        Schedule::try_from(raw).map_err(D::Error::custom)
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSchedule {
    interval: Interval,
    #[serde(
        default,
        deserialize_with = "de_start_time",
        skip_serializing_if = "Option::is_none"
    )]
    start_time: Option<String>,
}

/// A start time written as a string, or as a TOML offset date-time (which serde hands over as
/// a one-entry table with toml's private key).
fn de_start_time<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
    const TOML_DATETIME: &str = "$__toml_private_datetime";
    let v = serde_json::Value::deserialize(d)?;
    let text = match &v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Object(m) if m.len() == 1 => m
            .get(TOML_DATETIME)
            .and_then(|t| t.as_str())
            .map(str::to_string),
        _ => None,
    };
    let text = text.ok_or_else(|| {
        D::Error::custom(format!(
            "expected an RFC 3339 UTC time such as \"2026-01-01T00:00:00Z\", got {v}"
        ))
    })?;
    parse_utc_timestamp(&text).map_err(D::Error::custom)?;
    Ok(Some(text))
}

impl TryFrom<RawSchedule> for Schedule {
    type Error = String;

    fn try_from(raw: RawSchedule) -> Result<Self, Self::Error> {
        let start = match raw.start_time {
            Some(t) => Some(parse_utc_timestamp(&t).map_err(|e| format!("start_time: {e}"))?),
            None => None,
        };
        Schedule::new(raw.interval, start)
    }
}

impl From<Schedule> for RawSchedule {
    fn from(s: Schedule) -> Self {
        RawSchedule {
            interval: s.interval,
            start_time: s.start_time.and_then(format_utc_timestamp),
        }
    }
}

/// How a run was started; every entry of a flow's execution history carries one.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Trigger {
    /// By the scheduler, at an occurrence of the flow's schedule.
    Scheduled,
    /// On demand (CLI, API).
    Manual,
    /// A batch of live mode (changes pushed by a watcher or a connector).
    Live,
    /// A reset of the flow or of some of its items (forgetting state, not indexing).
    Reset,
}

impl Trigger {
    /// Every trigger.
    pub const ALL: [Trigger; 4] = [
        Trigger::Scheduled,
        Trigger::Manual,
        Trigger::Live,
        Trigger::Reset,
    ];

    /// The stored and displayed name.
    pub fn as_str(self) -> &'static str {
        match self {
            Trigger::Scheduled => "scheduled",
            Trigger::Manual => "manual",
            Trigger::Live => "live",
            Trigger::Reset => "reset",
        }
    }
}

impl fmt::Display for Trigger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Trigger {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Trigger::ALL
            .into_iter()
            .find(|t| t.as_str() == s)
            .ok_or_else(|| {
                format!("unknown trigger `{s}`; expected scheduled, manual, live or reset")
            })
    }
}

/// How a run ended, as far as scheduling cares.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Outcome {
    /// The run completed: consecutive failures reset and the normal schedule resumes.
    Success,
    /// The run failed (or could not start): the flow backs off.
    Failure,
    /// The run did not happen because the flow was running elsewhere (another process held
    /// it): like a skipped occurrence, it changes neither the failure count nor the next
    /// occurrence.
    NotRun,
}

/// What a [`Scheduler::tick`] asks the caller to do or record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Action {
    /// Start a run of `flow` now. The flow counts as in progress from this action on; the
    /// caller must end it with [`Scheduler::run_finished`] (with [`Outcome::Failure`] if the
    /// run could not even start).
    Start {
        /// The flow.
        flow: String,
        /// The occurrence this run is for (≤ now; earlier when it waited for a slot).
        due: i64,
        /// Always [`Trigger::Scheduled`]; carried so the caller can record it.
        trigger: Trigger,
    },
    /// The occurrence `due` found the flow's previous run still going and is skipped; record
    /// it in the flow's history. The next run starts at a later occurrence.
    Skip {
        /// The flow.
        flow: String,
        /// The skipped occurrence.
        due: i64,
    },
    /// The occurrence `due` is waiting for a slot: `max_concurrent_runs` runs are in progress.
    /// Reported once per occurrence; the run starts with a later tick.
    Wait {
        /// The flow.
        flow: String,
        /// The waiting occurrence.
        due: i64,
        /// Runs in progress, which is the cap.
        in_progress: usize,
    },
}

/// A run the scheduler knows is in progress.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunInProgress {
    /// How it started.
    pub trigger: Trigger,
    /// The occurrence it serves (scheduled runs only).
    pub due: Option<i64>,
    /// When it started (the tick that emitted [`Action::Start`], or `run_started`'s time).
    pub started: i64,
}

/// What the scheduler knows about one flow, for status pages.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FlowScheduleStatus {
    /// The schedule, if the flow has one.
    pub schedule: Option<Schedule>,
    /// The first occurrence (UTC ms) when the schedule has no start time: when it was set.
    pub anchor: Option<i64>,
    /// Paused.
    pub disabled: bool,
    /// The next occurrence that will be considered; `None` when disabled or unscheduled.
    pub next_due: Option<i64>,
    /// An occurrence that is due and waits for a slot.
    pub waiting: Option<i64>,
    /// The run in progress.
    pub in_progress: Option<RunInProgress>,
    /// Failed runs since the last success (scheduled and manual alike).
    pub consecutive_failures: u32,
    /// The interval the flow currently keeps: `interval·2^failures`, capped at 24 hours
    /// (rounded down to a whole number of intervals). `None` when unscheduled.
    pub effective_interval_ms: Option<i64>,
}

/// A schedule placed in time: occurrences `anchor + k·interval`, k ≥ 0.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Plan {
    schedule: Schedule,
    anchor: i64,
    interval: i64,
}

impl Plan {
    /// The first occurrence at or after `t`.
    fn first_at_or_after(&self, t: i64) -> i64 {
        if t <= self.anchor {
            return self.anchor;
        }
        let (a, i) = (i128::from(self.anchor), i128::from(self.interval));
        let k = (i128::from(t) - a + i - 1).div_euclid(i);
        clamp_i64(a + k * i)
    }

    /// The last grid point `anchor + k·interval` (any integer k) at or before `t`.
    fn last_at_or_before(&self, t: i64) -> i64 {
        let (a, i) = (i128::from(self.anchor), i128::from(self.interval));
        clamp_i64(a + (i128::from(t) - a).div_euclid(i) * i)
    }

    /// `interval·2^failures`, capped at the largest whole number of intervals within 24 h.
    fn effective_interval(&self, failures: u32) -> i64 {
        let cap = DAY_MS / self.interval * self.interval;
        if failures >= 32 {
            return cap;
        }
        self.interval
            .checked_mul(1_i64 << failures)
            .map_or(cap, |v| v.min(cap))
    }
}

fn clamp_i64(v: i128) -> i64 {
    v.clamp(i128::from(i64::MIN), i128::from(i64::MAX)) as i64
}

#[derive(Clone, Debug, Default)]
struct FlowState {
    /// Given by `set_flow` and not removed; otherwise the entry only tracks a run in progress
    /// and is dropped when it ends.
    registered: bool,
    plan: Option<Plan>,
    disabled: bool,
    next_due: Option<i64>,
    waiting: Option<i64>,
    run: Option<RunInProgress>,
    /// The waiting occurrence a manual run took the place of: back to waiting if that run
    /// turns out not to have run ([`Outcome::NotRun`]).
    displaced: Option<i64>,
    failures: u32,
}

impl FlowState {
    fn active_plan(&self) -> Option<&Plan> {
        self.plan.as_ref().filter(|_| !self.disabled)
    }
}

/// Decides when flows run by themselves (seed 004). A state machine fed with events and
/// polled with [`Scheduler::tick`]; it never reads a clock.
///
/// **Rules.**
/// - *Occurrences* are `start_time + k·interval` (k ≥ 0; without a start time, from when
///   [`set_flow`](Scheduler::set_flow) first gave the schedule). A start time in the past
///   behaves as if the flow had run since then: the next occurrence is the first one at or
///   after now, with no catch-up runs.
/// - An occurrence is handled by the first tick at or after it. Occurrences that all passed
///   between two ticks (a sleeping host, a long pause) collapse into the latest of them.
/// - *Single instance*: an occurrence that finds the flow's run (scheduled or manual) still in
///   progress is skipped ([`Action::Skip`]); the next run is at a later occurrence.
/// - *Capacity*: at most `max_concurrent_runs` runs (scheduled and manual) are in progress.
///   An occurrence beyond the cap waits for a slot ([`Action::Wait`], reported once); waiting
///   occurrences start in order of due time, ties by flow name. Waiting is not skipping, but a
///   flow waits for one run at most: a further occurrence arriving while it still waits is
///   merged into the waiting one (the flow runs once, for the earlier due time). A manual run
///   that starts while the flow waits takes the waiting occurrence's place.
/// - *Backoff*: after k consecutive failed runs (scheduled or manual) the next occurrence is
///   the first one at least `interval·2^k` after the failed run's occurrence (a manual run:
///   the occurrence at or before its start), the factor capped at the largest whole number of
///   intervals within 24 hours. Runs stay on the start-time grid. A success — scheduled or
///   manual — ends the backoff: the next occurrence is the first at or after its end again.
/// - *Disabled* flows (and flows without a schedule) have no occurrences. Disabling a flow or
///   changing its schedule drops its waiting occurrence. Enabling a flow, or giving it a
///   different schedule, schedules from the first occurrence at or after that moment (a
///   backoff in force is not reapplied until the next failure; the failure count is kept).
/// - Manual runs are not the scheduler's to start, but must be reported
///   ([`run_started`](Scheduler::run_started), [`run_finished`](Scheduler::run_finished)):
///   they hold a slot, make occurrences skip, and count for backoff.
///
/// **A tick** (`tick(now)`) does, in this priority order:
/// 1. *Occurrences*: for each enabled, scheduled flow (in name order) whose next occurrence is
///    due (≤ now), take the latest due occurrence and advance the next one past now; then a
///    flow with a run in progress → [`Action::Skip`]; a flow already waiting → merged; else
///    the flow starts waiting.
/// 2. *Starts*: waiting flows in order of (due time, name) get the free slots →
///    [`Action::Start`], and count as in progress at once.
/// 3. *Waits*: flows that started waiting in step 1 and got no slot → [`Action::Wait`].
///
/// Skips come before starts so that a run that starts in this tick never makes an occurrence
/// of the same tick skip: each decision sees the state as of the tick's start.
#[derive(Clone, Debug)]
pub struct Scheduler {
    max_concurrent_runs: usize,
    flows: BTreeMap<String, FlowState>,
}

impl Scheduler {
    /// A scheduler allowing `max_concurrent_runs` runs at once (0 is read as 1).
    pub fn new(max_concurrent_runs: usize) -> Scheduler {
        Scheduler {
            max_concurrent_runs: max_concurrent_runs.max(1),
            flows: BTreeMap::new(),
        }
    }

    /// The cap on runs in progress.
    pub fn max_concurrent_runs(&self) -> usize {
        self.max_concurrent_runs
    }

    /// Changes the cap (0 is read as 1). Runs already in progress are not affected.
    pub fn set_max_concurrent_runs(&mut self, max: usize) {
        self.max_concurrent_runs = max.max(1);
    }

    /// Gives a flow its schedule (`None`: on demand only) and disabled flag. Idempotent: giving
    /// the same schedule and flag again changes nothing (a schedule without a start time keeps
    /// the anchor of when it was first given). Otherwise the flow's occurrences start from the
    /// first one at or after `now`, and a waiting occurrence is dropped if the schedule changed
    /// or the flow is disabled; a run in progress and the failure count are kept.
    pub fn set_flow(&mut self, name: &str, schedule: Option<&Schedule>, disabled: bool, now: i64) {
        let st = self.flows.entry(name.to_string()).or_default();
        let same_schedule = st.plan.as_ref().map(|p| &p.schedule) == schedule;
        if st.registered && same_schedule && st.disabled == disabled {
            return;
        }
        st.registered = true;
        if !same_schedule {
            st.plan = schedule.map(|s| Plan {
                schedule: s.clone(),
                anchor: s.start_time_ms().unwrap_or(now),
                interval: s.interval().as_millis(),
            });
            // A waiting occurrence belongs to the schedule it came from.
            st.waiting = None;
            st.displaced = None;
        }
        st.disabled = disabled;
        match st.active_plan() {
            Some(plan) => st.next_due = Some(plan.first_at_or_after(now)),
            None => {
                st.next_due = None;
                st.waiting = None;
                st.displaced = None;
            }
        }
    }

    /// Forgets a flow. A run in progress keeps its slot until `run_finished`.
    pub fn remove_flow(&mut self, name: &str) {
        let Some(st) = self.flows.get_mut(name) else {
            return;
        };
        if st.run.is_some() {
            *st = FlowState {
                run: st.run,
                ..FlowState::default()
            };
        } else {
            self.flows.remove(name);
        }
    }

    /// A run of `name` started at `now`. After [`Action::Start`] this only confirms the run;
    /// otherwise it is a manual run (which takes the place of a waiting occurrence). A flow
    /// the scheduler does not know is tracked until the run ends, so that it holds a slot. A
    /// second start while a run is in progress is ignored: a flow is a single instance.
    pub fn run_started(&mut self, name: &str, now: i64) {
        let st = self.flows.entry(name.to_string()).or_default();
        if st.run.is_none() {
            st.run = Some(RunInProgress {
                trigger: Trigger::Manual,
                due: None,
                started: now,
            });
            st.displaced = st.waiting.take();
        }
    }

    /// The run of `name` ended at `now` with `outcome`. Success resets the failure count and
    /// the normal schedule; failure backs off (see the type's rules); a run that did not
    /// happen changes neither, and gives a waiting occurrence it displaced back its place.
    /// Unknown flows are ignored.
    pub fn run_finished(&mut self, name: &str, outcome: Outcome, now: i64) {
        let Some(st) = self.flows.get_mut(name) else {
            return;
        };
        let run = st.run.take();
        match outcome {
            Outcome::Success => {
                st.failures = 0;
                if let (Some(plan), Some(next)) = (st.active_plan(), st.next_due) {
                    st.next_due = Some(next.min(plan.first_at_or_after(now)));
                }
            }
            Outcome::Failure => {
                st.failures = st.failures.saturating_add(1);
                if let (Some(plan), Some(next)) = (st.active_plan(), st.next_due) {
                    let reference = run.map_or(now, |r| r.due.unwrap_or(r.started));
                    let from = plan
                        .last_at_or_before(reference)
                        .saturating_add(plan.effective_interval(st.failures));
                    st.next_due = Some(next.max(plan.first_at_or_after(from)));
                }
            }
            Outcome::NotRun => {
                // The occurrence a manual run displaced waits again.
                if st.waiting.is_none() && st.active_plan().is_some() {
                    st.waiting = st.displaced;
                }
            }
        }
        st.displaced = None;
        if !st.registered {
            self.flows.remove(name);
        }
    }

    /// After a restart: `failures` consecutive failed runs, the last of which started at
    /// `last_failure_started`, as the run history tells. The backoff applies as if that run
    /// had just failed (so a restarting server keeps backing off). Call after `set_flow`.
    pub fn restore_failures(&mut self, name: &str, failures: u32, last_failure_started: i64) {
        let Some(st) = self.flows.get_mut(name) else {
            return;
        };
        st.failures = failures;
        if failures == 0 {
            return;
        }
        if let (Some(plan), Some(next)) = (st.active_plan(), st.next_due) {
            let from = plan
                .last_at_or_before(last_failure_started)
                .saturating_add(plan.effective_interval(failures));
            st.next_due = Some(next.max(plan.first_at_or_after(from)));
        }
    }

    /// Advances to `now`; see the type's documentation for the steps and their order.
    pub fn tick(&mut self, now: i64) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut new_waits = Vec::new();
        // 1. Occurrences.
        for (name, st) in &mut self.flows {
            let (Some(plan), Some(next)) = (st.active_plan(), st.next_due) else {
                continue;
            };
            if next > now {
                continue;
            }
            let due = plan.last_at_or_before(now);
            st.next_due = Some(due.saturating_add(plan.interval));
            if st.run.is_some() {
                actions.push(Action::Skip {
                    flow: name.clone(),
                    due,
                });
            } else if st.waiting.is_none() {
                st.waiting = Some(due);
                new_waits.push(name.clone());
            }
        }
        // 2. Starts.
        let mut in_progress = self.in_progress();
        let mut queue: Vec<(i64, String)> = self
            .flows
            .iter()
            .filter_map(|(name, st)| st.waiting.map(|due| (due, name.clone())))
            .collect();
        queue.sort();
        for (due, name) in queue {
            if in_progress >= self.max_concurrent_runs {
                break;
            }
            let Some(st) = self.flows.get_mut(&name) else {
                continue;
            };
            st.waiting = None;
            st.run = Some(RunInProgress {
                trigger: Trigger::Scheduled,
                due: Some(due),
                started: now,
            });
            in_progress += 1;
            actions.push(Action::Start {
                flow: name,
                due,
                trigger: Trigger::Scheduled,
            });
        }
        // 3. Waits.
        for name in new_waits {
            if let Some(due) = self.flows.get(&name).and_then(|st| st.waiting) {
                actions.push(Action::Wait {
                    flow: name,
                    due,
                    in_progress,
                });
            }
        }
        actions
    }

    /// Runs in progress (scheduled and manual).
    pub fn in_progress(&self) -> usize {
        self.flows.values().filter(|st| st.run.is_some()).count()
    }

    /// The flow's next occurrence (UTC ms), if it is scheduled and enabled. While the flow
    /// waits for a slot this is the occurrence after the waiting one.
    pub fn next_due(&self, name: &str) -> Option<i64> {
        self.flows.get(name).and_then(|st| st.next_due)
    }

    /// The run of `name` in progress, if any.
    pub fn run_in_progress(&self, name: &str) -> Option<RunInProgress> {
        self.flows.get(name).and_then(|st| st.run)
    }

    /// Failed runs of `name` since its last success.
    pub fn consecutive_failures(&self, name: &str) -> u32 {
        self.flows.get(name).map_or(0, |st| st.failures)
    }

    /// The earliest time a tick has something to do, if any flow is scheduled: a serve loop
    /// sleeps until then (or until a run ends, after which it ticks at once for waiting flows).
    pub fn next_wakeup(&self) -> Option<i64> {
        self.flows
            .values()
            .filter(|st| st.active_plan().is_some())
            .filter_map(|st| st.next_due)
            .min()
    }

    /// Everything the scheduler knows about `name`.
    pub fn status(&self, name: &str) -> Option<FlowScheduleStatus> {
        let st = self.flows.get(name)?;
        Some(FlowScheduleStatus {
            schedule: st.plan.as_ref().map(|p| p.schedule.clone()),
            anchor: st.plan.as_ref().map(|p| p.anchor),
            disabled: st.disabled,
            next_due: st.next_due,
            waiting: st.waiting,
            in_progress: st.run,
            consecutive_failures: st.failures,
            effective_interval_ms: st.plan.as_ref().map(|p| p.effective_interval(st.failures)),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn iv(text: &str) -> Interval {
        Interval::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"))
    }

    /// jiff's reading of a text that both parsers accept, in seconds (days of 24 hours).
    fn jiff_secs(text: &str) -> u64 {
        let span: jiff::Span = text.parse().expect("jiff parses it");
        let total = span
            .total(jiff::SpanTotal::from(jiff::Unit::Second).days_are_24_hours())
            .expect("total");
        total as u64
    }

    #[test]
    fn valid_intervals_parse() {
        let cases = [
            ("PT5M", 300),
            ("PT15M", 900),
            ("PT2H", 7200),
            ("P1D", 86_400),
            ("PT24H", 86_400),
            ("PT1440M", 86_400),
            ("PT86400S", 86_400),
            ("P0DT2H30M", 9000),
            ("PT90M", 5400),
            ("PT1H30M15S", 5415),
            ("PT30S", 30),
            ("PT1S", 1),
            ("PT05M", 300),
            ("P0DT0H5M0S", 300),
            ("PT36000S", 36_000),
        ];
        for (text, secs) in cases {
            let i = iv(text);
            assert_eq!(u64::from(i.as_secs()), secs, "{text}");
            assert_eq!(i.as_millis(), secs as i64 * 1000, "{text}");
            assert_eq!(jiff_secs(text), secs, "{text} agrees with jiff");
            // The canonical form parses back to the same value.
            assert_eq!(iv(&i.to_string()), i, "{text} → {i}");
            assert_eq!(text.parse::<Interval>(), Ok(i));
        }
        assert_eq!(iv("PT90M").to_string(), "PT1H30M");
        assert_eq!(iv("PT24H").to_string(), "P1D");
        assert_eq!(iv("PT1H30M15S").to_string(), "PT1H30M15S");
        assert_eq!(Interval::MAX, iv("P1D"));
        assert_eq!(DEFAULT_MIN_SCHEDULE_INTERVAL, iv("PT5M"));
    }

    #[test]
    fn invalid_intervals_say_what_and_why() {
        let cases: &[(&str, &[&str])] = &[
            ("", &["empty", "PT15M"]),
            ("P", &["`P`", "no days, hours, minutes or seconds"]),
            ("PT", &["`PT`", "`T` must be followed by"]),
            ("P1DT", &["`P1DT`", "`T` must be followed by"]),
            ("-PT5M", &["`-PT5M`", "negative"]),
            ("+PT5M", &["`+PT5M`", "sign"]),
            ("PT-5M", &["`PT-5M`", "unexpected character `-`"]),
            ("PT1.5H", &["`PT1.5H`", "fractions", "PT90M"]),
            ("PT0.5S", &["`PT0.5S`", "fractions", "seconds included"]),
            ("PT1,5H", &["`PT1,5H`", "fractions"]),
            ("PT.5H", &["`PT.5H`", "fractions"]),
            ("P1Y", &["`P1Y`", "years"]),
            ("P1M", &["`P1M`", "months", "PT1M"]),
            ("P1W", &["`P1W`", "weeks"]),
            ("PT1W", &["`PT1W`", "weeks"]),
            ("P1H", &["`P1H`", "after `T`", "PT1H"]),
            ("P5S", &["`P5S`", "after `T`", "PT5S"]),
            ("PT1D", &["`PT1D`", "days come before `T`"]),
            ("PT5M2H", &["`PT5M2H`", "order"]),
            ("PT5M5M", &["`PT5M5M`", "at most once"]),
            ("PTT5M", &["`PTT5M`", "`T` appears twice"]),
            ("PT15", &["`PT15`", "`15` has no unit"]),
            ("PTH", &["`PTH`", "`H` has no number"]),
            ("PT5X", &["`PT5X`", "`X` is not a unit"]),
            ("PT5M€", &["`PT5M€`", "unexpected character `€`"]),
            ("P１D", &["`P１D`", "unexpected character `１`"]),
            ("hello", &["`hello`", "must start with `P`"]),
            ("15m", &["`15m`", "must start with `P`"]),
            ("15 minutes", &["`15 minutes`", "spaces"]),
            (" PT5M", &["` PT5M`", "spaces"]),
            ("PT5M\n", &["`PT5M\n`", "spaces"]),
            ("PT 5M", &["`PT 5M`", "spaces"]),
            ("pt15m", &["`pt15m`", "upper case", "PT15M"]),
            ("PT15m", &["`PT15m`", "upper case", "PT15M"]),
            (
                "PT99999999999999999999H",
                &["`PT99999999999999999999H`", "out of range"],
            ),
            (
                "PT9999999999999999H",
                &["`PT9999999999999999H`", "out of range"],
            ),
            ("PT25H", &["`PT25H`", "longer than 24 hours"]),
            ("P2D", &["`P2D`", "longer than 24 hours"]),
            ("P1DT1S", &["`P1DT1S`", "longer than 24 hours"]),
            ("P1DT2H30M", &["`P1DT2H30M`", "longer than 24 hours"]),
            ("PT86401S", &["`PT86401S`", "longer than 24 hours"]),
            ("PT0M", &["`PT0M`", "zero"]),
            ("P0D", &["`P0D`", "zero"]),
            ("PT0H0M0S", &["`PT0H0M0S`", "zero"]),
        ];
        for (text, words) in cases {
            let e = Interval::parse(text).expect_err(text);
            for w in *words {
                assert!(e.contains(w), "{text:?}: `{w}` missing from: {e}");
            }
        }
        assert!(Interval::from_secs(0).is_err());
        assert!(Interval::from_secs(86_401).is_err());
        assert_eq!(Interval::from_secs(86_400), Ok(Interval::MAX));
    }

    #[test]
    fn the_minimum_is_checked_apart_with_a_clear_error() {
        let s = Schedule::new(iv("PT1M"), None).expect("schedule");
        let e = s
            .validate(DEFAULT_MIN_SCHEDULE_INTERVAL)
            .expect_err("below 5 min");
        for w in [
            "schedule.interval",
            "`PT1M`",
            "`PT5M`",
            "min_schedule_interval",
        ] {
            assert!(e.contains(w), "`{w}` missing from: {e}");
        }
        // Deployments and tests may lower it.
        assert_eq!(s.validate(iv("PT1S")), Ok(()));
        assert_eq!(s.validate(iv("PT1M")), Ok(()));
        let s = Schedule::new(iv("PT5M"), None).expect("schedule");
        assert_eq!(s.validate(DEFAULT_MIN_SCHEDULE_INTERVAL), Ok(()));
    }

    #[test]
    fn start_times_parse_and_round_trip() {
        assert_eq!(
            parse_utc_timestamp("2026-01-01T00:00:00Z"),
            Ok(1_767_225_600_000)
        );
        assert_eq!(
            parse_utc_timestamp("2026-01-01T09:00:00+09:00"),
            Ok(1_767_225_600_000)
        );
        let e = parse_utc_timestamp("2026-01-01T00:00:00").expect_err("no offset");
        assert!(
            e.contains("`2026-01-01T00:00:00`") && e.contains("offset"),
            "{e}"
        );
        let e = parse_utc_timestamp("yesterday").expect_err("garbage");
        assert!(e.contains("`yesterday`"), "{e}");
        let s = Schedule::new(iv("PT15M"), Some(1_767_225_600_123)).expect("schedule");
        let json = serde_json::to_string(&s).expect("json");
        assert_eq!(
            json,
            r#"{"interval":"PT15M","start_time":"2026-01-01T00:00:00.123Z"}"#
        );
        assert_eq!(serde_json::from_str::<Schedule>(&json).expect("back"), s);
        let s = Schedule::new(iv("PT90M"), None).expect("schedule");
        let json = serde_json::to_string(&s).expect("json");
        assert_eq!(json, r#"{"interval":"PT1H30M"}"#);
        assert_eq!(serde_json::from_str::<Schedule>(&json).expect("back"), s);
        assert!(Schedule::new(iv("PT15M"), Some(i64::MAX)).is_err());
    }

    proptest! {
        /// Any combination of components parses to its arithmetic total when that is in
        /// range, agrees with jiff, and prints back to itself.
        #[test]
        fn components_parse_to_their_total(
            d in proptest::option::of(0u64..3),
            h in proptest::option::of(0u64..40),
            m in proptest::option::of(0u64..3000),
            s in proptest::option::of(0u64..100_000),
        ) {
            let mut text = String::from("P");
            if let Some(d) = d { text += &format!("{d}D"); }
            if h.is_some() || m.is_some() || s.is_some() { text.push('T'); }
            if let Some(h) = h { text += &format!("{h}H"); }
            if let Some(m) = m { text += &format!("{m}M"); }
            if let Some(s) = s { text += &format!("{s}S"); }
            let total = d.unwrap_or(0) * 86_400 + h.unwrap_or(0) * 3600 + m.unwrap_or(0) * 60
                + s.unwrap_or(0);
            let parsed = Interval::parse(&text);
            if d.is_none() && h.is_none() && m.is_none() && s.is_none() {
                prop_assert!(parsed.is_err());
            } else if total == 0 || total > 86_400 {
                let e = parsed.expect_err("out of range");
                prop_assert!(e.contains(&format!("`{text}`")), "{}", e);
            } else {
                let i = parsed.expect("in range");
                prop_assert_eq!(u64::from(i.as_secs()), total);
                prop_assert_eq!(jiff_secs(&text), total);
                prop_assert_eq!(Interval::parse(&i.to_string()), Ok(i));
            }
        }

        /// Arbitrary text never panics, and an error always quotes it.
        #[test]
        fn garbage_is_refused_with_the_text_quoted(text in "[PTDHMSYW0-9.,+\\- pt]{1,12}") {
            if let Err(e) = Interval::parse(&text) {
                prop_assert!(e.contains(&format!("`{text}`")), "{}", e);
            }
        }
    }

    // ---- Scheduler ----

    const MIN: i64 = 60_000;
    const HOUR: i64 = 60 * MIN;
    /// 2026-01-01T00:00:00Z.
    const T0: i64 = 1_767_225_600_000;

    fn sched(interval: &str, start: Option<i64>) -> Schedule {
        Schedule::new(iv(interval), start).expect("schedule")
    }

    fn start(flow: &str, due: i64) -> Action {
        Action::Start {
            flow: flow.into(),
            due,
            trigger: Trigger::Scheduled,
        }
    }

    fn skip(flow: &str, due: i64) -> Action {
        Action::Skip {
            flow: flow.into(),
            due,
        }
    }

    fn wait(flow: &str, due: i64, in_progress: usize) -> Action {
        Action::Wait {
            flow: flow.into(),
            due,
            in_progress,
        }
    }

    #[test]
    fn a_future_start_time_is_the_first_occurrence() {
        let mut s = Scheduler::new(4);
        s.set_flow("a", Some(&sched("PT15M", Some(T0 + 100 * MIN))), false, T0);
        assert_eq!(s.next_due("a"), Some(T0 + 100 * MIN));
        assert_eq!(s.next_wakeup(), Some(T0 + 100 * MIN));
        assert_eq!(s.tick(T0 + 99 * MIN), vec![]);
        assert_eq!(s.tick(T0 + 100 * MIN), vec![start("a", T0 + 100 * MIN)]);
        assert_eq!(s.next_due("a"), Some(T0 + 115 * MIN));
    }

    #[test]
    fn a_past_start_time_schedules_as_if_the_flow_had_run_since() {
        let mut s = Scheduler::new(4);
        // Occurrences at ..., T0 - 7, T0 + 8, ...: the next is T0 + 8, and nothing runs now.
        s.set_flow(
            "a",
            Some(&sched("PT15M", Some(T0 - 1000 * 15 * MIN - 7 * MIN))),
            false,
            T0,
        );
        assert_eq!(s.next_due("a"), Some(T0 + 8 * MIN));
        assert_eq!(s.tick(T0), vec![]);
        assert_eq!(s.tick(T0 + 8 * MIN), vec![start("a", T0 + 8 * MIN)]);
        // An occurrence exactly now is due now.
        let mut s = Scheduler::new(4);
        s.set_flow("b", Some(&sched("PT1H", Some(T0 - 5 * HOUR))), false, T0);
        assert_eq!(s.tick(T0), vec![start("b", T0)]);
    }

    #[test]
    fn without_a_start_time_the_schedule_starts_when_set_and_keeps_that_anchor() {
        let mut s = Scheduler::new(4);
        let every = sched("PT15M", None);
        s.set_flow("a", Some(&every), false, T0 + 3 * MIN);
        assert_eq!(s.next_due("a"), Some(T0 + 3 * MIN));
        // Setting the same schedule again (a config reload) moves nothing.
        s.set_flow("a", Some(&every), false, T0 + 10 * MIN);
        assert_eq!(s.next_due("a"), Some(T0 + 3 * MIN));
        assert_eq!(s.tick(T0 + 10 * MIN), vec![start("a", T0 + 3 * MIN)]);
        assert_eq!(s.next_due("a"), Some(T0 + 18 * MIN));
        // A different schedule starts from when it is set.
        s.run_finished("a", Outcome::Success, T0 + 11 * MIN);
        s.set_flow("a", Some(&sched("PT1H", None)), false, T0 + 20 * MIN);
        assert_eq!(s.next_due("a"), Some(T0 + 20 * MIN));
        assert_eq!(s.status("a").and_then(|st| st.anchor), Some(T0 + 20 * MIN));
    }

    #[test]
    fn an_occurrence_during_a_run_is_skipped_and_the_next_one_runs() {
        let mut s = Scheduler::new(4);
        s.set_flow("a", Some(&sched("PT15M", Some(T0))), false, T0);
        assert_eq!(s.tick(T0), vec![start("a", T0)]);
        s.run_started("a", T0);
        assert_eq!(
            s.run_in_progress("a"),
            Some(RunInProgress {
                trigger: Trigger::Scheduled,
                due: Some(T0),
                started: T0
            })
        );
        assert_eq!(s.tick(T0 + 15 * MIN), vec![skip("a", T0 + 15 * MIN)]);
        assert_eq!(s.tick(T0 + 20 * MIN), vec![]);
        assert_eq!(s.tick(T0 + 30 * MIN), vec![skip("a", T0 + 30 * MIN)]);
        s.run_finished("a", Outcome::Success, T0 + 31 * MIN);
        assert_eq!(s.next_due("a"), Some(T0 + 45 * MIN));
        assert_eq!(s.tick(T0 + 44 * MIN), vec![]);
        assert_eq!(s.tick(T0 + 45 * MIN), vec![start("a", T0 + 45 * MIN)]);
        // A manual run makes occurrences skip too.
        s.run_finished("a", Outcome::Success, T0 + 46 * MIN);
        s.run_started("a", T0 + 50 * MIN);
        assert_eq!(s.tick(T0 + 60 * MIN), vec![skip("a", T0 + 60 * MIN)]);
    }

    #[test]
    fn occurrences_passed_between_ticks_collapse_into_the_latest() {
        let mut s = Scheduler::new(4);
        s.set_flow("a", Some(&sched("PT15M", Some(T0))), false, T0);
        assert_eq!(s.tick(T0), vec![start("a", T0)]);
        s.run_finished("a", Outcome::Success, T0 + 5 * MIN);
        // The host slept for 100 minutes: one run, for the latest occurrence.
        assert_eq!(s.tick(T0 + 100 * MIN), vec![start("a", T0 + 90 * MIN)]);
        assert_eq!(s.next_due("a"), Some(T0 + 105 * MIN));
        // Likewise one skip while a run is going.
        assert_eq!(s.tick(T0 + 200 * MIN), vec![skip("a", T0 + 195 * MIN)]);
    }

    #[test]
    fn beyond_the_cap_occurrences_wait_in_order_of_due_time_then_name() {
        let mut s = Scheduler::new(1);
        s.set_flow("b", Some(&sched("PT10M", Some(T0))), false, T0);
        s.set_flow("a", Some(&sched("PT15M", Some(T0))), false, T0);
        s.set_flow("c", Some(&sched("PT1H", Some(T0 + 5 * MIN))), false, T0);
        // a and b are due together: the name decides.
        assert_eq!(s.tick(T0), vec![start("a", T0), wait("b", T0, 1)]);
        assert_eq!(s.status("b").and_then(|st| st.waiting), Some(T0));
        assert_eq!(s.tick(T0 + 5 * MIN), vec![wait("c", T0 + 5 * MIN, 1)]);
        // b's next occurrence arrives while it still waits: merged, b will run once.
        assert_eq!(s.tick(T0 + 10 * MIN), vec![]);
        assert_eq!(s.status("b").and_then(|st| st.waiting), Some(T0));
        assert_eq!(s.next_due("b"), Some(T0 + 20 * MIN));
        s.run_finished("a", Outcome::Success, T0 + 12 * MIN);
        // b has waited since T0, c since T0 + 5: b first.
        assert_eq!(s.tick(T0 + 12 * MIN), vec![start("b", T0)]);
        assert_eq!(s.tick(T0 + 15 * MIN), vec![wait("a", T0 + 15 * MIN, 1)]);
        s.run_finished("b", Outcome::Success, T0 + 16 * MIN);
        assert_eq!(s.tick(T0 + 16 * MIN), vec![start("c", T0 + 5 * MIN)]);
        assert_eq!(s.in_progress(), 1);
        // Due time beats name.
        s.run_finished("c", Outcome::Success, T0 + 17 * MIN);
        assert_eq!(s.tick(T0 + 17 * MIN), vec![start("a", T0 + 15 * MIN)]);
        // A manual run holds a slot too.
        s.run_finished("a", Outcome::Success, T0 + 18 * MIN);
        s.run_started("zzz", T0 + 18 * MIN);
        assert_eq!(s.tick(T0 + 20 * MIN), vec![wait("b", T0 + 20 * MIN, 1)]);
        s.run_finished("zzz", Outcome::Success, T0 + 21 * MIN);
        assert!(
            s.status("zzz").is_none(),
            "an unknown flow is forgotten after its run"
        );
        assert_eq!(s.tick(T0 + 21 * MIN), vec![start("b", T0 + 20 * MIN)]);
    }

    #[test]
    fn a_manual_run_takes_the_place_of_a_waiting_occurrence() {
        let mut s = Scheduler::new(1);
        s.set_flow("a", Some(&sched("PT15M", Some(T0))), false, T0);
        s.set_flow("b", Some(&sched("PT15M", Some(T0))), false, T0);
        assert_eq!(s.tick(T0), vec![start("a", T0), wait("b", T0, 1)]);
        s.run_started("b", T0 + MIN);
        assert_eq!(s.status("b").and_then(|st| st.waiting), None);
        assert_eq!(s.in_progress(), 2, "manual runs are not refused");
        s.run_finished("a", Outcome::Success, T0 + 2 * MIN);
        assert_eq!(s.tick(T0 + 2 * MIN), vec![]);
    }

    #[test]
    fn failures_back_off_doubling_up_to_24_hours_until_a_success() {
        let mut s = Scheduler::new(4);
        s.set_flow("a", Some(&sched("PT15M", Some(T0))), false, T0);
        let mut due = T0;
        // After k failures the next run is interval·2^k after the failed occurrence.
        for k in 1..=9u32 {
            assert_eq!(s.tick(due), vec![start("a", due)], "failure {k}");
            s.run_finished("a", Outcome::Failure, due + MIN);
            let eff = (15 * MIN * (1 << k)).min(24 * HOUR);
            let st = s.status("a").expect("status");
            assert_eq!(st.consecutive_failures, k);
            assert_eq!(st.effective_interval_ms, Some(eff));
            assert_eq!(st.next_due, Some(due + eff), "failure {k}");
            assert_eq!(
                s.tick(due + eff - MIN),
                vec![],
                "nothing before the backoff ends"
            );
            due += eff;
        }
        // A scheduled success restores the normal schedule.
        assert_eq!(s.tick(due), vec![start("a", due)]);
        assert_eq!(s.tick(due + 15 * MIN), vec![skip("a", due + 15 * MIN)]);
        s.run_finished("a", Outcome::Success, due + 20 * MIN);
        let st = s.status("a").expect("status");
        assert_eq!(st.consecutive_failures, 0);
        assert_eq!(st.effective_interval_ms, Some(15 * MIN));
        assert_eq!(
            st.next_due,
            Some(due + 30 * MIN),
            "the occurrence after the skipped one"
        );
    }

    #[test]
    fn a_successful_manual_run_restores_the_schedule() {
        let mut s = Scheduler::new(4);
        s.set_flow("a", Some(&sched("PT15M", Some(T0))), false, T0);
        for due in [T0, T0 + 30 * MIN, T0 + 90 * MIN] {
            assert_eq!(s.tick(due), vec![start("a", due)]);
            s.run_finished("a", Outcome::Failure, due + MIN);
        }
        assert_eq!(s.next_due("a"), Some(T0 + 210 * MIN));
        s.run_started("a", T0 + 100 * MIN);
        s.run_finished("a", Outcome::Success, T0 + 101 * MIN);
        assert_eq!(s.next_due("a"), Some(T0 + 105 * MIN));
        assert_eq!(s.consecutive_failures("a"), 0);
        assert_eq!(s.tick(T0 + 105 * MIN), vec![start("a", T0 + 105 * MIN)]);
    }

    #[test]
    fn a_run_that_did_not_happen_changes_neither_backoff_nor_schedule() {
        let mut s = Scheduler::new(1);
        s.set_flow("a", Some(&sched("PT15M", Some(T0))), false, T0);
        s.set_flow("b", Some(&sched("PT15M", Some(T0))), false, T0);
        assert_eq!(s.tick(T0), vec![start("a", T0), wait("b", T0, 1)]);
        s.run_finished("a", Outcome::Failure, T0 + MIN);
        assert_eq!(s.tick(T0 + MIN), vec![start("b", T0)]);
        s.run_finished("b", Outcome::Success, T0 + 2 * MIN);
        let before = s.status("a").expect("status");
        assert_eq!(
            s.tick(T0 + 30 * MIN),
            vec![start("a", T0 + 30 * MIN), wait("b", T0 + 30 * MIN, 1)]
        );
        // Another process held the flow: the slot is free again, nothing else changed.
        s.run_finished("a", Outcome::NotRun, T0 + 30 * MIN);
        assert_eq!(s.in_progress(), 0);
        assert_eq!(s.tick(T0 + 30 * MIN), vec![start("b", T0 + 30 * MIN)]);
        let after = s.status("a").expect("status");
        assert_eq!(after.consecutive_failures, before.consecutive_failures);
        assert_eq!(after.next_due, Some(T0 + 45 * MIN));
        assert_eq!(after.effective_interval_ms, before.effective_interval_ms);
        // A manual run that takes a waiting occurrence's place and does not run gives it back.
        assert_eq!(
            s.tick(T0 + 45 * MIN),
            vec![skip("b", T0 + 45 * MIN), wait("a", T0 + 45 * MIN, 1)]
        );
        s.run_started("a", T0 + 46 * MIN);
        assert_eq!(s.status("a").expect("status").waiting, None);
        s.run_finished("a", Outcome::NotRun, T0 + 46 * MIN);
        assert_eq!(s.status("a").expect("status").waiting, Some(T0 + 45 * MIN));
        s.run_finished("b", Outcome::Success, T0 + 47 * MIN);
        assert_eq!(s.tick(T0 + 47 * MIN), vec![start("a", T0 + 45 * MIN)]);
    }

    #[test]
    fn a_restart_restores_the_backoff_from_the_history() {
        let mut s = Scheduler::new(4);
        s.set_flow("a", Some(&sched("PT15M", Some(T0))), false, T0 + 50 * MIN);
        assert_eq!(s.next_due("a"), Some(T0 + 60 * MIN));
        // Three failures, the last started at T0 + 30: backoff of 120 minutes from T0 + 30.
        s.restore_failures("a", 3, T0 + 31 * MIN);
        assert_eq!(s.next_due("a"), Some(T0 + 150 * MIN));
        assert_eq!(s.consecutive_failures("a"), 3);
        // A failure long ago leaves the schedule as it is.
        let mut s = Scheduler::new(4);
        s.set_flow("b", Some(&sched("PT15M", Some(T0))), false, T0 + 50 * HOUR);
        s.restore_failures("b", 1, T0);
        assert_eq!(s.next_due("b"), Some(T0 + 50 * HOUR));
        s.restore_failures("unknown", 1, T0);
        assert!(s.status("unknown").is_none());
    }

    #[test]
    fn a_failed_manual_run_backs_off_from_the_occurrence_before_it() {
        let mut s = Scheduler::new(4);
        s.set_flow("a", Some(&sched("PT15M", Some(T0))), false, T0);
        s.run_started("a", T0 + 7 * MIN);
        s.run_finished("a", Outcome::Failure, T0 + 8 * MIN);
        // The grid point at or before the start is T0; one failure: 30 minutes from there.
        assert_eq!(s.next_due("a"), Some(T0 + 30 * MIN));
        // Never earlier than an occurrence already handled: T0 was due and is still due.
        let mut s = Scheduler::new(4);
        s.set_flow("b", Some(&sched("PT15M", Some(T0))), false, T0);
        assert_eq!(s.tick(T0), vec![start("b", T0)]);
        s.run_finished("b", Outcome::Success, T0 + MIN);
        s.run_started("b", T0 + 40 * MIN);
        assert_eq!(s.tick(T0 + 45 * MIN), vec![skip("b", T0 + 45 * MIN)]);
        s.run_finished("b", Outcome::Failure, T0 + 100 * MIN);
        assert_eq!(s.next_due("b"), Some(T0 + 60 * MIN), "not moved back");
    }

    #[test]
    fn the_backoff_cap_is_a_whole_number_of_intervals() {
        let p = |interval: &str| Plan {
            schedule: sched(interval, None),
            anchor: 0,
            interval: iv(interval).as_millis(),
        };
        assert_eq!(p("PT7H").effective_interval(0), 7 * HOUR);
        assert_eq!(p("PT7H").effective_interval(1), 14 * HOUR);
        assert_eq!(p("PT7H").effective_interval(2), 21 * HOUR);
        assert_eq!(p("P1D").effective_interval(5), 24 * HOUR);
        assert_eq!(p("PT5M").effective_interval(8), 5 * MIN * 256);
        assert_eq!(p("PT5M").effective_interval(9), 24 * HOUR);
        assert_eq!(p("PT5M").effective_interval(u32::MAX), 24 * HOUR);
        assert_eq!(p("PT1S").effective_interval(31), 24 * HOUR);
    }

    #[test]
    fn disabled_flows_have_no_occurrences_but_track_manual_runs() {
        let mut s = Scheduler::new(1);
        s.set_flow("a", Some(&sched("PT15M", Some(T0))), true, T0);
        assert_eq!(s.next_due("a"), None);
        assert_eq!(s.next_wakeup(), None);
        assert_eq!(s.tick(T0), vec![]);
        assert_eq!(s.tick(T0 + 60 * MIN), vec![]);
        s.run_started("a", T0 + 61 * MIN);
        assert!(s.run_in_progress("a").is_some());
        s.run_finished("a", Outcome::Failure, T0 + 62 * MIN);
        assert_eq!(s.consecutive_failures("a"), 1);
        assert_eq!(s.next_due("a"), None);
        // Enabling schedules from the next occurrence; the failure count is kept.
        s.set_flow("a", Some(&sched("PT15M", Some(T0))), false, T0 + 70 * MIN);
        assert_eq!(s.next_due("a"), Some(T0 + 75 * MIN));
        assert_eq!(s.consecutive_failures("a"), 1);
        // Disabling drops a waiting occurrence.
        s.run_started("other", T0 + 74 * MIN);
        assert_eq!(s.tick(T0 + 75 * MIN), vec![wait("a", T0 + 75 * MIN, 1)]);
        s.set_flow("a", Some(&sched("PT15M", Some(T0))), true, T0 + 76 * MIN);
        s.run_finished("other", Outcome::Success, T0 + 77 * MIN);
        assert_eq!(s.tick(T0 + 77 * MIN), vec![]);
        // Without a schedule, likewise nothing.
        s.set_flow("a", None, false, T0 + 80 * MIN);
        assert_eq!(s.tick(T0 + 200 * MIN), vec![]);
        assert_eq!(s.status("a").map(|st| st.effective_interval_ms), Some(None));
    }

    #[test]
    fn a_removed_flow_keeps_its_slot_until_its_run_ends() {
        let mut s = Scheduler::new(1);
        s.set_flow("a", Some(&sched("PT15M", Some(T0))), false, T0);
        s.set_flow("b", Some(&sched("PT15M", Some(T0 + MIN))), false, T0);
        assert_eq!(s.tick(T0), vec![start("a", T0)]);
        s.remove_flow("a");
        assert_eq!(s.next_due("a"), None);
        assert_eq!(s.tick(T0 + MIN), vec![wait("b", T0 + MIN, 1)]);
        s.run_finished("a", Outcome::Success, T0 + 2 * MIN);
        assert!(s.status("a").is_none());
        assert_eq!(s.tick(T0 + 2 * MIN), vec![start("b", T0 + MIN)]);
        assert_eq!(s.tick(T0 + 15 * MIN), vec![]);
        s.remove_flow("b");
        s.remove_flow("never-known");
        assert!(s.status("b").is_some(), "b is still running");
    }

    #[test]
    fn the_cap_can_change() {
        let mut s = Scheduler::new(0);
        assert_eq!(s.max_concurrent_runs(), 1);
        for f in ["a", "b", "c"] {
            s.set_flow(f, Some(&sched("PT15M", Some(T0))), false, T0);
        }
        assert_eq!(
            s.tick(T0),
            vec![start("a", T0), wait("b", T0, 1), wait("c", T0, 1)]
        );
        s.set_max_concurrent_runs(3);
        assert_eq!(s.tick(T0 + MIN), vec![start("b", T0), start("c", T0)]);
    }
}
