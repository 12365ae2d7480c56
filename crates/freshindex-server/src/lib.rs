//! The freshindex HTTP API: the indexing-queue verbs (`items:push`, `items:poll`,
//! `items/{key}:index`, `items:unreserve`, delete, `deleteQueueItems`), listing, search,
//! `/metrics` and `/healthz`, shaped after Google Cloud Search's indexing REST API.
//!
//! Tasks and threads: [`run`] builds a multi-threaded tokio runtime; axum serves each
//! connection on it. Every engine or store call is blocking (SQLite) and runs on tokio's
//! blocking pool, bounded to [`MAX_BLOCKING_THREADS`]; the store serializes writes itself. A
//! signal task waits for SIGTERM or Ctrl-C: the listener stops accepting, in-flight requests
//! finish, then the leases this server handed out are released (`unreserve` by owner) so that
//! other workers get those items at once instead of after the lease expires.
//!
//! Modules: [`error`] (the one table of error codes), [`wire`] (JSON shapes and their
//! checks), [`extract`] (extractors that answer rejections in the error shape), [`metrics`],
//! `routes` (the handlers).

pub mod control;
pub mod error;
pub mod extract;
mod indexes;
pub mod metrics;
mod routes;
mod tasks;
pub mod wire;
mod worker;

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use freshindex_core::FlowSpec;
use freshindex_engine::{Engine, EngineError};
use freshindex_store::{FlowId, StoreError};

pub use control::{Control, ControlOptions};
pub use error::{ApiError, Code};

/// Lease holders remembered for release at shutdown, at most.
const MAX_TRACKED_OWNERS: usize = 1024;

/// Blocking threads (engine and store calls) at most.
pub const MAX_BLOCKING_THREADS: usize = 16;

/// What `freshindex serve` needs.
#[derive(Clone, Debug)]
pub struct ServeOptions {
    /// The data directory.
    pub data_dir: PathBuf,
    /// The state store: `None` for the data directory's embedded SQLite store, else a
    /// `postgres://` URL of a store shared by every process of a deployment.
    pub store: Option<String>,
    /// What this process does in a deployment of several.
    pub role: Role,
    /// Flows of the config file, registered at start.
    pub flows: Vec<FlowSpec>,
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Bearer token every request but `/healthz` must carry.
    pub token: Option<String>,
    /// Lease of polled entries.
    pub lease: Duration,
    /// Schedules, capacity and live flows.
    pub control: ControlOptions,
    /// Build threads of the local index node (0: only `freshindex index-node` processes
    /// build indexes).
    pub index_threads: usize,
    /// An index node is declared lost after this long without a heartbeat.
    pub index_heartbeat_timeout: Duration,
}

/// What a `serve` process does among several that share a state store.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Role {
    /// Everything: the API, the scheduler (as the leader, over a shared store), live flows,
    /// reindex tasks, and a worker that helps other processes' runs.
    #[default]
    All,
    /// The API and a worker: processes leased batches of the runs in progress (of flows whose
    /// target every process reaches); never starts a run itself.
    Worker,
    /// The API and the scheduler (one leader at a time over a shared store): starts runs,
    /// which scan, push and delete, and leave the processing of flows with a shared target to
    /// the workers.
    Scheduler,
}

impl std::str::FromStr for Role {
    type Err = String;

    fn from_str(s: &str) -> Result<Role, String> {
        match s {
            "all" => Ok(Role::All),
            "worker" => Ok(Role::Worker),
            "scheduler" => Ok(Role::Scheduler),
            other => Err(format!(
                "unknown role `{other}`; expected `all`, `worker` or `scheduler`"
            )),
        }
    }
}

/// Why the server could not start or stop cleanly.
#[derive(Debug, thiserror::Error)]
pub enum ServeError {
    /// A non-loopback address without a token.
    #[error(
        "refusing to listen on {0} without a token: anyone who can reach it could read and change the index; pass --token (or set FRESHINDEX_TOKEN), or listen on a loopback address such as 127.0.0.1"
    )]
    NoToken(SocketAddr),
    /// An empty token.
    #[error("--token: must not be empty")]
    EmptyToken,
    /// A flow of the config cannot be served as it is.
    #[error("flow `{flow}`: {message}")]
    Flow {
        /// The flow.
        flow: String,
        /// What is wrong.
        message: String,
    },
    /// The data directory or a flow could not be opened.
    #[error("{context}: {source}")]
    Engine {
        /// What was being done.
        context: String,
        /// Why it failed.
        #[source]
        source: EngineError,
    },
    /// The state store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// Binding, the runtime or serving failed.
    #[error("{context}: {source}")]
    Io {
        /// What was being done.
        context: String,
        /// Why it failed.
        #[source]
        source: std::io::Error,
    },
}

/// How a server run ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ServeReport {
    /// Leases released at shutdown.
    pub leases_released: u64,
}

/// Milliseconds since the epoch (the queue's clock).
pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Checks the listen address against the token: a server reachable from other machines must
/// require one.
pub fn check_listen(listen: SocketAddr, token: Option<&str>) -> Result<(), ServeError> {
    match token {
        Some("") => Err(ServeError::EmptyToken),
        Some(_) => Ok(()),
        None if listen.ip().is_loopback() => Ok(()),
        None => Err(ServeError::NoToken(listen)),
    }
}

// Handlers share the engine across tasks and blocking threads.
const _: fn() = || {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Engine>();
};

/// State shared by the handlers.
#[derive(Debug)]
pub(crate) struct AppState {
    pub(crate) engine: Arc<Engine>,
    /// Flows known to be served, by name (more are looked up on first use: a flow defined by
    /// another process after start).
    flows: Mutex<BTreeMap<String, FlowId>>,
    /// Lease holders this server polled for: released at shutdown.
    owners: Mutex<BTreeSet<String>>,
    /// Lease holder of polls that name none.
    pub(crate) default_owner: String,
    pub(crate) lease_ms: i64,
    /// BLAKE3 of the token: comparing hashes (in constant time) hides the token's length too.
    token: Option<blake3::Hash>,
    pub(crate) metrics: Arc<metrics::Metrics>,
    pub(crate) control: Arc<Control>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

impl AppState {
    /// Runs a blocking engine or store call on the blocking pool.
    pub(crate) async fn blocking<T, F>(&self, f: F) -> Result<T, ApiError>
    where
        T: Send + 'static,
        F: FnOnce(&Engine) -> Result<T, ApiError> + Send + 'static,
    {
        let engine = Arc::clone(&self.engine);
        tokio::task::spawn_blocking(move || f(&engine))
            .await
            .map_err(|e| ApiError::internal(format!("request worker failed: {e}")))?
    }

    /// The id of a served flow, or `flow_not_found`.
    /// Forgets the cached id of flow `name` (a reindex switch or a rollback gave the name
    /// another state).
    pub(crate) fn forget_flow_id(&self, name: &str) {
        lock(&self.flows).remove(name);
    }

    pub(crate) async fn flow_id(&self, name: &str) -> Result<FlowId, ApiError> {
        if let Some(id) = lock(&self.flows).get(name) {
            return Ok(*id);
        }
        let n = name.to_string();
        let found = self
            .blocking(move |e| Ok(e.store().flow(&n)?.map(|r| r.id)))
            .await?;
        match found {
            Some(id) => {
                lock(&self.flows).insert(name.to_string(), id);
                Ok(id)
            }
            None => Err(ApiError::new(
                Code::FlowNotFound,
                format!(
                    "flow `{name}` is not defined: neither the server's config nor its data directory has it"
                ),
            )),
        }
    }

    /// Remembers a flow defined over the API.
    pub(crate) fn add_flow(&self, name: &str, id: FlowId) {
        lock(&self.flows).insert(name.to_string(), id);
    }

    /// Forgets a deleted flow.
    pub(crate) fn remove_flow(&self, name: &str) {
        lock(&self.flows).remove(name);
    }

    /// Flows served so far, by name.
    pub(crate) fn flows(&self) -> Vec<(String, FlowId)> {
        lock(&self.flows)
            .iter()
            .map(|(n, id)| (n.clone(), *id))
            .collect()
    }

    /// Remembers a lease holder to release at shutdown.
    pub(crate) fn saw_owner(&self, owner: &str) {
        let mut owners = lock(&self.owners);
        // Bounded: leases of owners past the cap still expire on their own.
        if owners.len() < MAX_TRACKED_OWNERS {
            owners.insert(owner.to_string());
        }
    }

    /// Whether `given` is the configured token (true when there is none).
    pub(crate) fn token_ok(&self, given: Option<&str>) -> bool {
        match &self.token {
            None => true,
            Some(expected) => given.is_some_and(|g| blake3::hash(g.as_bytes()) == *expected),
        }
    }

    pub(crate) fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// Ends every live lease this server handed out; returns how many.
    fn release_leases(&self) -> Result<u64, StoreError> {
        let owners: Vec<String> = lock(&self.owners).iter().cloned().collect();
        let store = self.engine.store();
        let now = now_ms();
        let mut released = 0;
        for (_, flow) in self.flows() {
            for owner in &owners {
                released += store.unreserve(flow, None, Some(owner), now)?;
            }
        }
        Ok(released)
    }
}

/// Opens the data directory, registers the config's flows and builds the shared state.
fn prepare(opts: &ServeOptions) -> Result<Arc<AppState>, ServeError> {
    let engine =
        Engine::open_with_store(&opts.data_dir, opts.store.as_deref()).map_err(|source| {
            ServeError::Engine {
                context: match &opts.store {
                    Some(url) => format!(
                        "state store {}",
                        freshindex_engine::distributed::redact(url)
                    ),
                    None => format!("data dir {}", opts.data_dir.display()),
                },
                source,
            }
        })?;
    let mut flows = BTreeMap::new();
    for spec in &opts.flows {
        control::check_servable(spec, opts.control.min_schedule_interval).map_err(|message| {
            ServeError::Flow {
                flow: spec.name.clone(),
                message,
            }
        })?;
        match engine.define_flow(spec) {
            Ok(id) => {
                flows.insert(spec.name.clone(), id);
            }
            // Another process is running the flow: it stores its own definition.
            Err(EngineError::Busy(m)) => {
                tracing::warn!(flow = spec.name, "definition not stored: {m}");
            }
            Err(source) => {
                return Err(ServeError::Engine {
                    context: format!("flow `{}`", spec.name),
                    source,
                });
            }
        }
    }
    for rec in engine.store().flows()? {
        if freshindex_engine::reindex::is_hidden(&rec.name) {
            continue;
        }
        flows.entry(rec.name).or_insert(rec.id);
    }
    let default_owner = format!("http-{}", std::process::id());
    let engine = Arc::new(engine);
    let metrics = Arc::new(metrics::Metrics::default());
    let control = Control::new(
        Arc::clone(&engine),
        Arc::clone(&metrics),
        opts.control.clone(),
    )
    .map_err(|source| ServeError::Engine {
        context: "starting the scheduler".into(),
        source,
    })?;
    Ok(Arc::new(AppState {
        engine,
        flows: Mutex::new(flows),
        owners: Mutex::new(BTreeSet::from([default_owner.clone()])),
        default_owner,
        lease_ms: i64::try_from(opts.lease.as_millis()).unwrap_or(i64::MAX),
        token: opts.token.as_deref().map(|t| blake3::hash(t.as_bytes())),
        metrics,
        control,
    }))
}

/// Serves until SIGTERM or Ctrl-C, then releases this server's leases. `on_listening` gets
/// the bound address once the server accepts connections (and the signal handlers are in
/// place). Blocks the calling thread.
pub fn run(
    opts: ServeOptions,
    on_listening: impl FnOnce(SocketAddr),
) -> Result<ServeReport, ServeError> {
    check_listen(opts.listen, opts.token.as_deref())?;
    let state = prepare(&opts)?;
    let io = |context: &str| {
        let context = context.to_string();
        move |source| ServeError::Io { context, source }
    };
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .max_blocking_threads(MAX_BLOCKING_THREADS)
        .thread_name("freshindex-http")
        .build()
        .map_err(io("starting the runtime"))?;
    runtime.block_on(async move {
        // Installed before the address is announced, so that a signal sent as soon as the
        // caller knows the port takes the graceful path.
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).map_err(io("installing signal handlers"))?;
        let mut int = signal(SignalKind::interrupt()).map_err(io("installing signal handlers"))?;
        let listener = tokio::net::TcpListener::bind(opts.listen)
            .await
            .map_err(io(&format!("cannot listen on {}", opts.listen)))?;
        let addr = listener.local_addr().map_err(io("reading the bound address"))?;
        // Runs start only once the server is sure to serve (the address is bound).
        let started = Arc::clone(&state.control);
        tokio::task::spawn_blocking(move || started.start())
            .await
            .map_err(|e| ServeError::Io {
                context: "starting the scheduler".into(),
                source: std::io::Error::other(e.to_string()),
            })?
            .map_err(|source| ServeError::Engine {
                context: "starting the scheduler".into(),
                source,
            })?;
        let index_stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        if opts.role != Role::Scheduler && state.engine.store().has_shared_locks() {
            worker::start(
                Arc::clone(&state.engine),
                opts.lease,
                Arc::clone(&index_stop),
            )
            .map_err(io("starting the worker"))?;
        }
        if opts.role != Role::Worker {
            // Reindex tasks: started or resumed by their own thread. A switch gives a flow's
            // name another state (id): the name is looked up again.
            let weak = Arc::downgrade(&state);
            tasks::start(
                Arc::clone(&state.engine),
                freshindex_engine::default_workers(),
                Arc::clone(&index_stop),
                move |flow| {
                    if let Some(st) = weak.upgrade() {
                        st.forget_flow_id(flow);
                    }
                },
            )
            .map_err(io("starting the reindex task runner"))?;
        }
        let engine = Arc::clone(&state.engine);
        let (threads, timeout) = (opts.index_threads, opts.index_heartbeat_timeout);
        let stop = Arc::clone(&index_stop);
        tokio::task::spawn_blocking(move || {
            let mut o = freshindex_engine::indexing::IndexServiceOptions::new(
                engine.build_dir().to_path_buf(),
            );
            o.heartbeat_timeout_ms = u64::try_from(timeout.as_millis()).unwrap_or(u64::MAX);
            let service = engine.open_index_service(o)?;
            indexes::start(engine, service, threads, stop)
        })
        .await
        .map_err(|e| ServeError::Io {
            context: "starting the index service".into(),
            source: std::io::Error::other(e.to_string()),
        })?
        .map_err(|source| ServeError::Engine {
            context: "starting the index service".into(),
            source,
        })?;
        tracing::info!(%addr, flows = ?state.flows().iter().map(|f| f.0.clone()).collect::<Vec<_>>(), auth = state.has_token(), "serving");
        on_listening(addr);
        let app = routes::router(Arc::clone(&state));
        axum::serve(listener, app)
            .with_graceful_shutdown(async move {
                tokio::select! {
                    _ = term.recv() => tracing::info!("SIGTERM: finishing in-flight requests"),
                    _ = int.recv() => tracing::info!("interrupted: finishing in-flight requests"),
                }
            })
            .await
            .map_err(io("serving"))?;
        index_stop.store(true, std::sync::atomic::Ordering::Relaxed);
        let st = Arc::clone(&state);
        let released = tokio::task::spawn_blocking(move || {
            st.control.shutdown();
            st.release_leases()
        })
            .await
            .map_err(|e| ServeError::Io {
                context: "releasing leases".into(),
                source: std::io::Error::other(e.to_string()),
            })??;
        tracing::info!(released, "leases released; stopped");
        Ok(ServeReport {
            leases_released: released,
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn non_loopback_needs_a_token() {
        let public: SocketAddr = "0.0.0.0:7700".parse().unwrap();
        let local: SocketAddr = "127.0.0.1:7700".parse().unwrap();
        let local6: SocketAddr = "[::1]:7700".parse().unwrap();
        assert!(matches!(
            check_listen(public, None),
            Err(ServeError::NoToken(_))
        ));
        assert!(check_listen(public, Some("s3cret")).is_ok());
        assert!(check_listen(local, None).is_ok());
        assert!(check_listen(local6, None).is_ok());
        assert!(matches!(
            check_listen(local, Some("")),
            Err(ServeError::EmptyToken)
        ));
    }
}
