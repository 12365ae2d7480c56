//! Progress display: bars on a terminal, plain log lines otherwise.

use std::sync::Mutex;
use std::time::Instant;

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};

use freshindex_engine::{Phase, Progress};

/// The progress receiver for one flow's run.
pub fn for_terminal(flow: &str, terminal: bool) -> Box<dyn Progress> {
    if terminal {
        Box::new(Bars::new(flow))
    } else {
        Box::new(Lines {
            flow: flow.to_string(),
            state: Mutex::new(LineState::default()),
        })
    }
}

struct Bars {
    _multi: MultiProgress,
    scan: ProgressBar,
    process: ProgressBar,
    write: ProgressBar,
}

impl Bars {
    fn new(flow: &str) -> Bars {
        let multi = MultiProgress::with_draw_target(ProgressDrawTarget::stderr());
        let spinner = |label: &str| {
            let b = multi.add(ProgressBar::new_spinner());
            b.set_style(
                ProgressStyle::with_template("{spinner} {prefix:>10} {msg} {pos} {wide_msg}")
                    .unwrap_or_else(|_| ProgressStyle::default_spinner()),
            );
            b.set_prefix(label.to_string());
            b
        };
        let scan = spinner("scanning");
        scan.set_message(format!("{flow}: files"));
        let process = multi.add(ProgressBar::hidden());
        process.set_style(
            ProgressStyle::with_template(
                "  {prefix:>10} [{bar:30}] {pos}/{len} queue items {per_sec} eta {eta}",
            )
            .unwrap_or_else(|_| ProgressStyle::default_bar())
            .progress_chars("=> "),
        );
        process.set_prefix("indexing");
        let write = spinner("writing");
        write.set_message("rows");
        Bars {
            _multi: multi,
            scan,
            process,
            write,
        }
    }

    fn bar(&self, phase: Phase) -> &ProgressBar {
        match phase {
            Phase::Scanning => &self.scan,
            Phase::Processing => &self.process,
            Phase::Writing => &self.write,
        }
    }
}

impl Progress for Bars {
    fn start(&self, phase: Phase, total: Option<u64>) {
        let bar = self.bar(phase);
        if let Some(t) = total {
            bar.set_length(t);
            bar.set_draw_target(ProgressDrawTarget::stderr());
        }
        bar.enable_steady_tick(std::time::Duration::from_millis(120));
    }

    fn inc(&self, phase: Phase, n: u64) {
        self.bar(phase).inc(n);
    }

    fn finish(&self, phase: Phase) {
        self.bar(phase).finish_and_clear();
    }
}

#[derive(Default)]
struct LineState {
    started: Option<Instant>,
    last_report: Option<Instant>,
    done: u64,
    total: Option<u64>,
    written: u64,
}

/// Log lines for a non-terminal stderr: one at each phase boundary and at most one every
/// five seconds during processing.
struct Lines {
    flow: String,
    state: Mutex<LineState>,
}

impl Progress for Lines {
    fn start(&self, phase: Phase, total: Option<u64>) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match phase {
            Phase::Scanning => eprintln!("[{}] scanning source", self.flow),
            Phase::Processing => {
                s.started = Some(Instant::now());
                s.total = total;
                eprintln!(
                    "[{}] queue: {} items to index",
                    self.flow,
                    total.unwrap_or(0)
                );
            }
            Phase::Writing => {}
        }
    }

    fn inc(&self, phase: Phase, n: u64) {
        let mut s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        match phase {
            Phase::Scanning => eprintln!("[{}] scanned {n} files", self.flow),
            Phase::Processing => {
                s.done += n;
                let due = s
                    .last_report
                    .or(s.started)
                    .is_some_and(|t| t.elapsed().as_secs() >= 5);
                if due {
                    s.last_report = Some(Instant::now());
                    eprintln!(
                        "[{}] indexed {}/{} queue items",
                        self.flow,
                        s.done,
                        s.total.unwrap_or(0)
                    );
                }
            }
            Phase::Writing => s.written += n,
        }
    }

    fn finish(&self, phase: Phase) {
        let s = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if phase == Phase::Writing {
            eprintln!("[{}] wrote {} row changes", self.flow, s.written);
        }
    }
}
