//! Named failpoints for crash and race tests of the real binary.
//!
//! `FRESHINDEX_FAILPOINT=<point>[:<nth>]` makes the process stop at the nth time it reaches
//! `<point>`: it prints `failpoint <point> reached` on stderr, then waits until the file named by
//! `FRESHINDEX_FAILPOINT_RESUME` exists (when set) or forever (the test kills it). With the
//! variable unset a failpoint costs one relaxed atomic load.

use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, OnceLock};
use std::time::Duration;

struct Armed {
    point: String,
    nth: u64,
    resume: Option<PathBuf>,
    hits: Mutex<HashMap<String, u64>>,
}

static ARMED: OnceLock<Option<Armed>> = OnceLock::new();
static ANY: AtomicBool = AtomicBool::new(true);

fn armed() -> Option<&'static Armed> {
    ARMED
        .get_or_init(|| {
            let spec = std::env::var("FRESHINDEX_FAILPOINT").ok()?;
            let (point, nth) = match spec.rsplit_once(':') {
                Some((p, n)) => (p.to_string(), n.parse().unwrap_or(1)),
                None => (spec, 1),
            };
            Some(Armed {
                point,
                nth,
                resume: std::env::var_os("FRESHINDEX_FAILPOINT_RESUME").map(PathBuf::from),
                hits: Mutex::new(HashMap::new()),
            })
        })
        .as_ref()
}

/// Marks that the run reached `point`.
pub fn hit(point: &str) {
    if !ANY.load(Ordering::Relaxed) {
        return;
    }
    let Some(armed) = armed() else {
        ANY.store(false, Ordering::Relaxed);
        return;
    };
    if armed.point != point {
        return;
    }
    let n = {
        let mut hits = armed.hits.lock().unwrap_or_else(|p| p.into_inner());
        let n = hits.entry(point.to_string()).or_insert(0);
        *n += 1;
        *n
    };
    if n != armed.nth {
        return;
    }
    let mut err = std::io::stderr();
    let _ = writeln!(err, "failpoint {point} reached");
    let _ = err.flush();
    loop {
        if armed.resume.as_ref().is_some_and(|p| p.exists()) {
            return;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}
