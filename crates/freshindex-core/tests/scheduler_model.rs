//! The scheduler against a brute-force model of seed 004's rules.
//!
//! Time advances in steps of 15 minutes and the scheduler is ticked at every step. The model
//! keeps no "next due" time: at each step it asks, for each flow, "is this step an occurrence
//! (start + k·interval), past the backoff, of an enabled flow?" — so it checks the scheduler's
//! grid arithmetic, collapsing and backoff bookkeeping instead of repeating them. Random run
//! durations, failures, manual runs, pauses and schedule changes drive both; the actions of
//! every tick must be equal, and the invariants hold throughout:
//! - a flow never has two runs at once;
//! - a scheduled start never takes more than `max_concurrent_runs` slots;
//! - every start is at or after its due time, which is on the flow's grid;
//! - disabled or unscheduled flows get no scheduled start;
//! - after a success the next due time is on the start_time + k·interval grid.
//!
//! A second property ticks at irregular times (ms precision, gaps up to hours) and checks the
//! invariants alone.

use std::collections::BTreeMap;

use freshindex_core::{Action, Interval, Outcome, Schedule, Scheduler, Trigger};
use proptest::prelude::*;

/// 2026-01-01T00:00:00Z.
const T0: i64 = 1_767_225_600_000;
/// One model step.
const STEP: i64 = 15 * 60_000;
/// 24 hours in steps.
const DAY_STEPS: i64 = 96;
const STEPS: i64 = 600;

/// A schedule in steps: (interval, start time relative to T0).
type Sched = Option<(i64, Option<i64>)>;

fn to_schedule(s: Sched) -> Option<Schedule> {
    s.map(|(i, start)| {
        Schedule::new(
            Interval::from_secs((i * STEP / 1000) as u64).expect("interval"),
            start.map(|st| T0 + st * STEP),
        )
        .expect("schedule")
    })
}

#[derive(Clone, Debug)]
enum Event {
    Toggle,
    Manual,
    Reschedule(Sched),
}

#[derive(Clone, Debug, Default)]
struct MFlow {
    registered: bool,
    sched: Sched,
    anchor: i64,
    disabled: bool,
    /// (due, started) of the run in progress; due is `None` for manual runs.
    run: Option<(Option<i64>, i64)>,
    waiting: Option<i64>,
    failures: u32,
    /// Occurrences before this step are suppressed by the backoff.
    blocked: Option<i64>,
}

impl MFlow {
    fn interval(&self) -> Option<i64> {
        self.sched.map(|(i, _)| i)
    }

    fn is_occurrence(&self, m: i64) -> bool {
        match self.interval() {
            Some(i) if !self.disabled => {
                m >= self.anchor
                    && (m - self.anchor) % i == 0
                    && self.blocked.is_none_or(|b| m >= b)
            }
            _ => false,
        }
    }

    /// What the scheduler should report as the next due time after the tick at `m`.
    fn next_due_after(&self, m: i64) -> Option<i64> {
        let i = self.interval().filter(|_| !self.disabled)?;
        let from = (m + 1)
            .max(self.blocked.unwrap_or(i64::MIN))
            .max(self.anchor);
        Some(self.anchor + (from - self.anchor + i - 1).div_euclid(i) * i)
    }
}

#[derive(Debug, Default)]
struct Model {
    cap: usize,
    flows: BTreeMap<String, MFlow>,
}

impl Model {
    fn set_flow(&mut self, name: &str, sched: Sched, disabled: bool, m: i64) {
        let f = self.flows.entry(name.to_string()).or_default();
        if f.registered && f.sched == sched && f.disabled == disabled {
            return;
        }
        if !f.registered || f.sched != sched {
            f.sched = sched;
            f.anchor = sched.and_then(|(_, s)| s).unwrap_or(m);
            f.waiting = None;
        }
        f.registered = true;
        f.disabled = disabled;
        f.blocked = None;
        if disabled || sched.is_none() {
            f.waiting = None;
        }
    }

    fn manual_start(&mut self, name: &str, m: i64) {
        let f = self.flows.get_mut(name).expect("flow");
        if f.run.is_none() {
            f.run = Some((None, m));
            f.waiting = None;
        }
    }

    fn finish(&mut self, name: &str, outcome: Outcome) {
        let f = self.flows.get_mut(name).expect("flow");
        let (due, started) = f.run.take().expect("running");
        match outcome {
            Outcome::Success => {
                f.failures = 0;
                f.blocked = None;
            }
            Outcome::Failure => {
                f.failures += 1;
                if let Some(i) = f.interval() {
                    let r = due.unwrap_or(started);
                    let r_grid = f.anchor + (r - f.anchor).div_euclid(i) * i;
                    let cap = DAY_STEPS / i * i;
                    let eff = if f.failures >= 20 {
                        cap
                    } else {
                        (i << f.failures).min(cap)
                    };
                    f.blocked = Some(r_grid + eff);
                }
            }
            Outcome::NotRun => {}
        }
    }

    fn tick(&mut self, m: i64) -> Vec<Action> {
        let mut actions = Vec::new();
        let mut new_waits = Vec::new();
        for (name, f) in &mut self.flows {
            if !f.is_occurrence(m) {
                continue;
            }
            if f.run.is_some() {
                actions.push(Action::Skip {
                    flow: name.clone(),
                    due: T0 + m * STEP,
                });
            } else if f.waiting.is_none() {
                f.waiting = Some(m);
                new_waits.push(name.clone());
            }
        }
        let mut in_progress = self.flows.values().filter(|f| f.run.is_some()).count();
        let mut queue: Vec<(i64, String)> = self
            .flows
            .iter()
            .filter_map(|(n, f)| f.waiting.map(|w| (w, n.clone())))
            .collect();
        queue.sort();
        for (due, name) in queue {
            if in_progress >= self.cap {
                break;
            }
            let f = self.flows.get_mut(&name).expect("flow");
            f.waiting = None;
            f.run = Some((Some(due), m));
            in_progress += 1;
            actions.push(Action::Start {
                flow: name,
                due: T0 + due * STEP,
                trigger: Trigger::Scheduled,
            });
        }
        for name in new_waits {
            if let Some(due) = self.flows[&name].waiting {
                actions.push(Action::Wait {
                    flow: name,
                    due: T0 + due * STEP,
                    in_progress,
                });
            }
        }
        actions
    }
}

/// Checks the invariants over one tick's actions; `running` maps flows to their run's end.
fn check_actions(
    s: &Scheduler,
    actions: &[Action],
    now: i64,
    running_before: usize,
    grid: impl Fn(&str) -> Option<(i64, i64)>,
    disabled: impl Fn(&str) -> bool,
    running: &BTreeMap<String, (i64, Outcome)>,
) -> Result<(), TestCaseError> {
    let mut in_progress = running_before;
    for a in actions {
        match a {
            Action::Start { flow, due, trigger } => {
                prop_assert_eq!(*trigger, Trigger::Scheduled);
                prop_assert!(!running.contains_key(flow), "{flow} started twice at {now}");
                prop_assert!(*due <= now, "{flow} started before due {due} at {now}");
                prop_assert!(!disabled(flow), "{flow} is disabled");
                let (anchor, interval) = grid(flow).expect("scheduled flows only");
                prop_assert!(*due >= anchor && (due - anchor) % interval == 0);
                prop_assert!(
                    in_progress < s.max_concurrent_runs(),
                    "{flow}: start beyond the cap"
                );
                in_progress += 1;
            }
            Action::Skip { flow, due } => {
                prop_assert!(running.contains_key(flow), "{flow} skipped but not running");
                prop_assert!(*due <= now);
            }
            Action::Wait { flow, .. } => {
                prop_assert!(!running.contains_key(flow));
                prop_assert!(in_progress >= s.max_concurrent_runs());
            }
        }
    }
    Ok(())
}

fn sched_strategy() -> impl Strategy<Value = Sched> {
    let interval = prop_oneof![4 => 1i64..=16, 1 => Just(7i64), 1 => Just(DAY_STEPS)];
    proptest::option::weighted(
        0.9,
        (interval, proptest::option::weighted(0.7, -300i64..300)),
    )
}

fn event_strategy() -> impl Strategy<Value = Event> {
    prop_oneof![
        2 => Just(Event::Toggle),
        3 => Just(Event::Manual),
        1 => sched_strategy().prop_map(Event::Reschedule),
    ]
}

#[derive(Clone, Debug)]
struct Scenario {
    cap: usize,
    flows: Vec<(Sched, bool)>,
    /// (duration in steps, fails), consumed in order by every run.
    runs: Vec<(i64, bool)>,
    events: Vec<(i64, usize, Event)>,
}

fn scenario() -> impl Strategy<Value = Scenario> {
    (
        1usize..=3,
        proptest::collection::vec((sched_strategy(), proptest::bool::weighted(0.2)), 1..=4),
        proptest::collection::vec((1i64..=40, proptest::bool::weighted(0.4)), 1..64),
        proptest::collection::vec((0..STEPS, 0usize..4, event_strategy()), 0..25),
    )
        .prop_map(|(cap, flows, runs, mut events)| {
            events.sort_by_key(|e| e.0);
            Scenario {
                cap,
                flows,
                runs,
                events,
            }
        })
}

fn run_scenario(sc: &Scenario) -> Result<(), TestCaseError> {
    let t = |m: i64| T0 + m * STEP;
    let names: Vec<String> = (0..sc.flows.len()).map(|i| format!("f{i}")).collect();
    let mut s = Scheduler::new(sc.cap);
    let mut model = Model {
        cap: sc.cap,
        ..Model::default()
    };
    let mut conf: Vec<(Sched, bool)> = sc.flows.clone();
    for (name, (sched, disabled)) in names.iter().zip(&conf) {
        s.set_flow(name, to_schedule(*sched).as_ref(), *disabled, t(0));
        model.set_flow(name, *sched, *disabled, 0);
    }
    let mut runs = sc.runs.iter().cycle();
    // Flow → (end step, outcome) of its run in progress.
    let mut running: BTreeMap<String, (i64, Outcome)> = BTreeMap::new();
    let mut events = sc.events.iter().peekable();
    for m in 0..STEPS {
        // 1. Runs that end now.
        let ending: Vec<(String, Outcome)> = running
            .iter()
            .filter(|(_, (end, _))| *end == m)
            .map(|(n, (_, o))| (n.clone(), *o))
            .collect();
        for (name, outcome) in ending {
            running.remove(&name);
            s.run_finished(&name, outcome, t(m));
            model.finish(&name, outcome);
            let st = s.status(&name).expect("status");
            prop_assert_eq!(st.consecutive_failures, model.flows[&name].failures);
            if outcome == Outcome::Success
                && let (Some(next), Some(sched), Some(anchor)) =
                    (st.next_due, &st.schedule, st.anchor)
            {
                let i = sched.interval().as_millis();
                prop_assert!(
                    next >= anchor && (next - anchor) % i == 0,
                    "{name}: next due {next} off the grid after a success"
                );
            }
        }
        // 2. Operator events.
        while let Some((_, f, ev)) = events.next_if(|e| e.0 == m) {
            let Some(name) = names.get(*f) else { continue };
            match ev {
                Event::Toggle => {
                    conf[*f].1 = !conf[*f].1;
                    s.set_flow(name, to_schedule(conf[*f].0).as_ref(), conf[*f].1, t(m));
                    model.set_flow(name, conf[*f].0, conf[*f].1, m);
                }
                Event::Reschedule(sched) => {
                    conf[*f].0 = *sched;
                    s.set_flow(name, to_schedule(*sched).as_ref(), conf[*f].1, t(m));
                    model.set_flow(name, *sched, conf[*f].1, m);
                }
                Event::Manual => {
                    // The engine refuses a second run of a running flow.
                    if !running.contains_key(name) {
                        s.run_started(name, t(m));
                        model.manual_start(name, m);
                        let (d, fail) = runs.next().expect("cycle");
                        let o = if *fail {
                            Outcome::Failure
                        } else {
                            Outcome::Success
                        };
                        running.insert(name.clone(), (m + d, o));
                    }
                }
            }
        }
        // 3. The tick.
        let before = running.len();
        let actions = s.tick(t(m));
        let expected = model.tick(m);
        prop_assert_eq!(&actions, &expected, "tick at step {}", m);
        let grid = |flow: &str| {
            let st = s.status(flow)?;
            Some((st.anchor?, st.schedule?.interval().as_millis()))
        };
        let disabled = |flow: &str| s.status(flow).is_none_or(|st| st.disabled);
        check_actions(&s, &actions, t(m), before, grid, disabled, &running)?;
        for a in &actions {
            if let Action::Start { flow, .. } = a {
                s.run_started(flow, t(m));
                let (d, fail) = runs.next().expect("cycle");
                let o = if *fail {
                    Outcome::Failure
                } else {
                    Outcome::Success
                };
                running.insert(flow.clone(), (m + d, o));
            }
        }
        // 4. The scheduler's view matches the model's.
        prop_assert_eq!(s.in_progress(), running.len());
        for name in &names {
            let st = s.status(name).expect("status");
            let mf = &model.flows[name];
            prop_assert_eq!(
                st.next_due,
                mf.next_due_after(m).map(t),
                "{} at {}",
                name,
                m
            );
            prop_assert_eq!(st.waiting, mf.waiting.map(t), "{} at {}", name, m);
            prop_assert_eq!(st.in_progress.is_some(), running.contains_key(name));
            prop_assert_eq!(st.consecutive_failures, mf.failures);
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn scheduler_matches_the_brute_force_model(sc in scenario()) {
        run_scenario(&sc)?;
    }

    /// Irregular ticks (the scheduler must not depend on being ticked at occurrences):
    /// invariants only.
    #[test]
    fn invariants_hold_with_irregular_ticks(
        cap in 1usize..=3,
        flows in proptest::collection::vec(
            (1u64..=360, proptest::option::of(-100_000i64..100_000), proptest::bool::weighted(0.2)),
            1..=4,
        ),
        // (gap to the next tick in seconds, duration of a run started then in seconds, fails)
        steps in proptest::collection::vec((1i64..=3 * 3600, 1i64..=6 * 3600, proptest::bool::ANY), 1..300),
    ) {
        let mut s = Scheduler::new(cap);
        let mut now = T0;
        let names: Vec<String> = (0..flows.len()).map(|i| format!("f{i}")).collect();
        let mut disabled_flows = Vec::new();
        for (name, (minutes, start, disabled)) in names.iter().zip(&flows) {
            let sched = Schedule::new(
                Interval::from_secs(minutes * 60).expect("interval"),
                start.map(|st| T0 + st * 1000),
            )
            .expect("schedule");
            s.set_flow(name, Some(&sched), *disabled, now);
            if *disabled {
                disabled_flows.push(name.clone());
            }
        }
        let mut running: BTreeMap<String, (i64, Outcome)> = BTreeMap::new();
        for (gap, duration, fail) in steps {
            now += gap * 1000 + gap % 997;
            let ending: Vec<(String, Outcome)> = running
                .iter()
                .filter(|(_, (end, _))| *end <= now)
                .map(|(n, (_, o))| (n.clone(), *o))
                .collect();
            for (name, outcome) in ending {
                let end = running.remove(&name).expect("running").0;
                s.run_finished(&name, outcome, end);
                if outcome == Outcome::Success {
                    let st = s.status(&name).expect("status");
                    if let (Some(next), Some(sched), Some(anchor)) = (st.next_due, st.schedule, st.anchor) {
                        prop_assert_eq!((next - anchor) % sched.interval().as_millis(), 0);
                    }
                }
            }
            let before = running.len();
            let actions = s.tick(now);
            let grid = |flow: &str| {
                let st = s.status(flow)?;
                Some((st.anchor?, st.schedule?.interval().as_millis()))
            };
            let disabled = |flow: &str| disabled_flows.iter().any(|d| d == flow);
            check_actions(&s, &actions, now, before, grid, disabled, &running)?;
            for a in &actions {
                if let Action::Start { flow, .. } = a {
                    s.run_started(flow, now);
                    let o = if fail { Outcome::Failure } else { Outcome::Success };
                    running.insert(flow.clone(), (now + duration * 1000, o));
                }
            }
            prop_assert_eq!(s.in_progress(), running.len());
            for name in &names {
                let st = s.status(name).expect("status");
                if let Some(next) = st.next_due {
                    prop_assert!(next > now, "{name}: next due {next} not after the tick {now}");
                }
                if st.waiting.is_some() {
                    prop_assert!(running.len() >= cap, "{name} waits beside a free slot");
                }
            }
        }
    }
}
