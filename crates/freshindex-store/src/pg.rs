//! The PostgreSQL backend: the same state as the SQLite backend, in the schema `freshindex` of
//! a database that many processes (on many machines) share.
//!
//! - Connections come from a small pool; every call runs through [`PgStore::run`], which
//!   retries connection-level failures (server restarting, connection lost) with a doubling
//!   pause until [`PgStore::retry_limit`] has passed.
//! - Every write runs in one transaction ([`PgStore::write`]) that notes its transaction id
//!   first: when the connection is lost during `COMMIT` (the outcome is unknown), the retry
//!   asks the server whether that transaction committed (`txid_status`) and returns the
//!   result it had computed instead of applying the change twice.
//! - Queue entries are changed under row locks (`SELECT … FOR UPDATE`, in key order), so that
//!   read-modify-write transitions of concurrent processes do not overwrite each other; polls
//!   skip entries another poll holds (`FOR UPDATE SKIP LOCKED`).
//! - Locks ([`crate::LockStore`]) are session advisory locks on connections of their own.
//!
//! TLS is not supported yet: use it on loopback or a private network.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use postgres::error::SqlState;
use postgres::{Client, Config, GenericClient, NoTls, Row, Transaction};

use crate::rows::{decode_rows, encode_rows, for_each_memo_key, fp_from};
use crate::{
    BatchCommit, FlowId, FlowRecord, FlowStore, HeldLock, IndexRecordStore, ItemChange,
    ItemLineage, ItemStatus, LineageStore, LockStore, MemoStore, Result, RunEnd, RunId, RunRecord,
    RunState, RunStore, StoreError, StoreLock, Trigger,
};
use freshindex_core::{Fingerprint, FpMap};

/// Schema version this build writes.
const SCHEMA_VERSION: i64 = 2;

/// The migration steps: `(version, SQL)`, applied in order to a database below that version,
/// in one transaction. Version 1 is the whole schema as this backend first shipped it;
/// version 2 adds the tables of multi-input flows.
const MIGRATIONS: &[(i64, &str)] = &[(1, SCHEMA_V1), (2, SCHEMA_V2)];

const SCHEMA_V1: &str = r#"
CREATE TABLE freshindex.flows (
  id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  name TEXT COLLATE "C" NOT NULL UNIQUE,
  spec_json TEXT NOT NULL,
  traversal_label TEXT,
  -- The source's high-water mark of recent changes processed (opaque to the store).
  change_mark TEXT
);
-- The indexing queue: one entry per (flow, item key). `prio` is the status's poll priority;
-- `items_poll` serves polls in order without sorting. Keys, labels and names sort by bytes
-- (COLLATE "C"), as in SQLite and Rust. Lease updates leave room for HOT updates.
CREATE TABLE freshindex.items (
  flow_id BIGINT NOT NULL,
  key TEXT COLLATE "C" NOT NULL,
  status TEXT NOT NULL,
  prio BIGINT NOT NULL,
  content_hash TEXT,
  metadata_hash TEXT,
  payload BYTEA,
  queue TEXT COLLATE "C" NOT NULL,
  enqueued_at BIGINT NOT NULL,
  leased_until BIGINT,
  lease_owner TEXT,
  attempts BIGINT NOT NULL,
  available_at BIGINT NOT NULL,
  message TEXT,
  version BYTEA,
  repushed BOOLEAN NOT NULL,
  PRIMARY KEY (flow_id, key)
) WITH (fillfactor = 80);
CREATE INDEX items_poll ON freshindex.items (flow_id, prio, enqueued_at, key);
-- The newest version of each deleted versioned item.
CREATE TABLE freshindex.tombstones (
  flow_id BIGINT NOT NULL,
  key TEXT COLLATE "C" NOT NULL,
  version BYTEA NOT NULL,
  PRIMARY KEY (flow_id, key)
);
-- Lineage: the rows each item produced, one record per item (the encoding of `rows.rs`).
CREATE TABLE freshindex.tracked (
  flow_id BIGINT NOT NULL,
  item_key TEXT COLLATE "C" NOT NULL,
  n_rows BIGINT NOT NULL,
  rows BYTEA NOT NULL,
  PRIMARY KEY (flow_id, item_key)
);
-- One record per interrupted-write attempt of an item: its row keys as a JSON array.
CREATE TABLE freshindex.pending (
  id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  flow_id BIGINT NOT NULL,
  item_key TEXT COLLATE "C" NOT NULL,
  row_keys TEXT NOT NULL
);
CREATE INDEX pending_item ON freshindex.pending (flow_id, item_key);
CREATE TABLE freshindex.memo (
  flow_id BIGINT NOT NULL,
  key BYTEA NOT NULL,
  value BYTEA NOT NULL,
  PRIMARY KEY (flow_id, key)
);
-- Entry count and value bytes of each flow's memo cache, kept with every change.
CREATE TABLE freshindex.memo_totals (
  flow_id BIGINT PRIMARY KEY,
  entries BIGINT NOT NULL,
  bytes BIGINT NOT NULL
);
CREATE TABLE freshindex.memo_gc (
  flow_id BIGINT NOT NULL,
  key BYTEA NOT NULL,
  PRIMARY KEY (flow_id, key)
);
-- The execution history, ids in recording order; `finished_at_ms` is NULL while in progress.
CREATE TABLE freshindex.runs (
  id BIGINT GENERATED ALWAYS AS IDENTITY PRIMARY KEY,
  flow_id BIGINT NOT NULL,
  trigger TEXT NOT NULL,
  status TEXT NOT NULL,
  started_at_ms BIGINT NOT NULL,
  finished_at_ms BIGINT,
  summary_json TEXT,
  message TEXT
);
CREATE INDEX runs_flow ON freshindex.runs (flow_id, id);
-- The index service's records (builds, indexes, nodes) as JSON documents.
CREATE TABLE freshindex.index_records (
  kind TEXT COLLATE "C" NOT NULL,
  id BIGINT NOT NULL,
  doc TEXT NOT NULL,
  PRIMARY KEY (kind, id)
);
"#;

/// Multi-input flows ([`crate::InputStore`]): documents of items other flows read, with a
/// per-flow sequence number; lookup dependencies; members of merged and grouped items; how
/// far each reading flow followed each input.
const SCHEMA_V2: &str = r#"
CREATE TABLE freshindex.docs (
  flow_id BIGINT NOT NULL,
  key TEXT COLLATE "C" NOT NULL,
  seq BIGINT NOT NULL,
  -- Empty for a tombstone.
  fp BYTEA NOT NULL,
  -- NULL for a tombstone.
  doc BYTEA,
  PRIMARY KEY (flow_id, key)
);
CREATE INDEX docs_by_seq ON freshindex.docs (flow_id, seq);
CREATE TABLE freshindex.docs_kept (flow_id BIGINT PRIMARY KEY);
CREATE TABLE freshindex.deps (
  flow_id BIGINT NOT NULL,
  key TEXT COLLATE "C" NOT NULL,
  up_flow BIGINT NOT NULL,
  up_key TEXT COLLATE "C" NOT NULL,
  PRIMARY KEY (flow_id, key, up_flow, up_key)
);
CREATE INDEX deps_by_input ON freshindex.deps (up_flow, up_key, flow_id);
CREATE TABLE freshindex.members (
  flow_id BIGINT NOT NULL,
  up_flow BIGINT NOT NULL,
  up_key TEXT COLLATE "C" NOT NULL,
  grp TEXT COLLATE "C" NOT NULL,
  fp BYTEA NOT NULL,
  PRIMARY KEY (flow_id, up_flow, up_key)
);
CREATE INDEX members_by_group ON freshindex.members (flow_id, grp);
CREATE TABLE freshindex.input_marks (
  flow_id BIGINT NOT NULL,
  up_flow BIGINT NOT NULL,
  seq BIGINT NOT NULL,
  PRIMARY KEY (flow_id, up_flow)
);
"#;

/// First key of the advisory lock that serializes schema migrations.
const MIGRATION_LOCK: i32 = 0x4652_4d31;
/// First key of the per-flow advisory lock between commits (shared) and memo garbage
/// collection (exclusive).
const MEMO_GC_LOCK: i32 = 0x4652_4d47;
/// First key of the advisory locks of [`LockStore`]; the second is a hash of the name.
const NAMED_LOCK: i32 = 0x4652_4c4b;
/// First key of the per-flow advisory lock that orders document sequence numbers: writers of
/// a flow's documents take it exclusively (so `MAX(seq) + 1` is given in commit order),
/// readers of `docs_since` take it shared (so they wait for writes in flight).
pub(crate) const DOCS_SEQ_LOCK: i32 = 0x4652_4453;

/// How long calls of a [`PgStore`] retry connection-level failures by default.
pub const DEFAULT_RETRY_LIMIT: Duration = Duration::from_secs(120);
const FIRST_PAUSE: Duration = Duration::from_millis(100);
const LONGEST_PAUSE: Duration = Duration::from_secs(5);
/// Connections a store opens at most (calls beyond wait for one).
const MAX_CONNECTIONS: usize = 16;

/// Why one attempt of a call failed.
#[derive(Debug)]
pub(crate) enum Fail {
    /// The client or the server failed; retried when connection-level.
    Pg(postgres::Error),
    /// Worth another attempt after a pause (the outcome of an earlier commit is not known yet).
    Again(String),
    /// A final answer (invalid request, corrupt data): never retried.
    Store(StoreError),
}

impl From<postgres::Error> for Fail {
    fn from(e: postgres::Error) -> Fail {
        Fail::Pg(e)
    }
}

impl From<StoreError> for Fail {
    fn from(e: StoreError) -> Fail {
        Fail::Store(e)
    }
}

/// The result of one attempt.
pub(crate) type PgResult<T> = std::result::Result<T, Fail>;

/// Whether the error says the connection (or the server behind it) is gone or not ready:
/// closed, I/O, SQLSTATE class 08, `admin_shutdown`, `crash_shutdown`, `cannot_connect_now`,
/// or a connect timeout.
fn is_connection_error(e: &postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    if let Some(code) = e.code() {
        let c = code.code();
        return c.starts_with("08") || matches!(c, "57P01" | "57P02" | "57P03");
    }
    let mut source = std::error::Error::source(e);
    while let Some(s) = source {
        if s.is::<std::io::Error>() {
            return true;
        }
        source = s.source();
    }
    e.as_db_error().is_none() && e.to_string().starts_with("timeout")
}

/// Whether the transaction lost a race that running it again resolves (a deadlock between
/// concurrent writers, a serialization failure).
fn is_conflict(e: &postgres::Error) -> bool {
    e.code().is_some_and(|c| {
        *c == SqlState::T_R_DEADLOCK_DETECTED || *c == SqlState::T_R_SERIALIZATION_FAILURE
    })
}

/// The error's text: the server's message, detail and SQLSTATE for a database error.
fn error_text(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => {
            let mut s = format!("{} (SQLSTATE {})", db.message(), db.code().code());
            if let Some(d) = db.detail() {
                s.push_str(": ");
                s.push_str(d);
            }
            s
        }
        None => e.to_string(),
    }
}

/// `url` with its password hidden, to name it in messages.
pub(crate) fn redact_url(url: &str) -> String {
    let Some(scheme_end) = url.find("://") else {
        return url.to_string();
    };
    let rest = &url[scheme_end + 3..];
    let authority_end = rest.find('/').unwrap_or(rest.len());
    let Some(at) = rest[..authority_end].rfind('@') else {
        return url.to_string();
    };
    match rest[..at].find(':') {
        Some(colon) => format!(
            "{}{}:***{}",
            &url[..scheme_end + 3],
            &rest[..colon],
            &rest[at..]
        ),
        None => url.to_string(),
    }
}

/// `host:port/database` of a configuration, to name the server in messages.
fn describe(config: &Config) -> String {
    use postgres::config::Host;
    let host = match config.get_hosts().first() {
        Some(Host::Tcp(h)) => h.clone(),
        #[cfg(unix)]
        Some(Host::Unix(p)) => p.display().to_string(),
        None => "localhost".into(),
    };
    let port = config.get_ports().first().copied().unwrap_or(5432);
    format!(
        "{host}:{port}/{}",
        config
            .get_dbname()
            .or(config.get_user())
            .unwrap_or("postgres")
    )
}

/// A small connection pool: idle connections are reused, at most [`MAX_CONNECTIONS`] are
/// open, and a connection that failed at the connection level is dropped with every idle one
/// (after a server restart they are all dead).
struct Pool {
    config: Config,
    state: Mutex<PoolState>,
    freed: Condvar,
}

struct PoolState {
    idle: Vec<Client>,
    open: usize,
}

impl Pool {
    fn state(&self) -> MutexGuard<'_, PoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn get(&self) -> std::result::Result<Pooled<'_>, postgres::Error> {
        let mut st = self.state();
        loop {
            if let Some(c) = st.idle.pop() {
                if c.is_closed() {
                    st.open -= 1;
                    continue;
                }
                return Ok(Pooled {
                    pool: self,
                    client: Some(c),
                    broken: false,
                });
            }
            if st.open < MAX_CONNECTIONS {
                st.open += 1;
                break;
            }
            st = self.freed.wait(st).unwrap_or_else(|p| p.into_inner());
        }
        drop(st);
        match self.config.connect(NoTls) {
            Ok(c) => Ok(Pooled {
                pool: self,
                client: Some(c),
                broken: false,
            }),
            Err(e) => {
                self.state().open -= 1;
                self.freed.notify_one();
                Err(e)
            }
        }
    }

    /// Closes the idle connections (the server they talked to went away).
    fn discard_idle(&self) {
        let idle = {
            let mut st = self.state();
            st.open -= st.idle.len();
            std::mem::take(&mut st.idle)
        };
        self.freed.notify_all();
        drop(idle);
    }
}

/// A connection taken from the pool; it goes back when dropped unless it broke.
struct Pooled<'a> {
    pool: &'a Pool,
    client: Option<Client>,
    broken: bool,
}

impl Pooled<'_> {
    fn client(&mut self) -> PgResult<&mut Client> {
        self.client
            .as_mut()
            .ok_or_else(|| Fail::Again("the pooled connection was released".into()))
    }
}

impl Drop for Pooled<'_> {
    fn drop(&mut self) {
        let Some(client) = self.client.take() else {
            return;
        };
        if self.broken || client.is_closed() {
            self.pool.state().open -= 1;
            drop(client);
        } else {
            self.pool.state().idle.push(client);
        }
        self.pool.freed.notify_one();
    }
}

/// The PostgreSQL state store.
pub struct PgStore {
    pool: Pool,
    /// `host:port/database`, for messages.
    target: String,
    /// How long a call retries connection-level failures before it fails.
    retry_limit: Duration,
}

impl std::fmt::Debug for PgStore {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgStore")
            .field("target", &self.target)
            .finish_non_exhaustive()
    }
}

impl PgStore {
    /// Connects to the database at `url` (`postgres://user:password@host:port/database`),
    /// creating the schema `freshindex` and its tables, or migrating them, when needed.
    /// Connection-level failures are retried for [`DEFAULT_RETRY_LIMIT`]; a database whose
    /// schema is newer than this build is refused with [`StoreError::SchemaTooNew`].
    pub fn connect(url: &str) -> Result<PgStore> {
        Self::connect_with_retry_limit(url, DEFAULT_RETRY_LIMIT)
    }

    /// [`connect`](Self::connect), retrying connection-level failures (of the connect and of
    /// every later call) for `retry_limit`.
    pub fn connect_with_retry_limit(url: &str, retry_limit: Duration) -> Result<PgStore> {
        let mut config: Config = url.parse().map_err(|e| {
            StoreError::Invalid(format!(
                "state store URL `{}` is not a PostgreSQL connection URL: {e}",
                redact_url(url)
            ))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        if config.get_application_name().is_none() {
            config.application_name("freshindex");
        }
        let store = PgStore {
            target: describe(&config),
            pool: Pool {
                config,
                state: Mutex::new(PoolState {
                    idle: Vec::new(),
                    open: 0,
                }),
                freed: Condvar::new(),
            },
            retry_limit,
        };
        store.migrate()?;
        Ok(store)
    }

    /// How long a call retries connection-level failures before it fails.
    pub fn retry_limit(&self) -> Duration {
        self.retry_limit
    }

    /// Sets how long a call retries connection-level failures before it fails.
    pub fn set_retry_limit(&mut self, limit: Duration) {
        self.retry_limit = limit;
    }

    /// `host:port/database` of the server.
    pub fn target(&self) -> &str {
        &self.target
    }

    fn failed(&self, what: &str, e: &postgres::Error) -> StoreError {
        StoreError::Backend(format!(
            "PostgreSQL at {}: {what}: {}",
            self.target,
            error_text(e)
        ))
    }

    /// Runs `attempt` until it succeeds, retrying connection-level failures and lost races
    /// with a pause doubling from 100 ms to 5 s, for [`retry_limit`](Self::retry_limit) in
    /// all; other failures return at once.
    fn retry<T>(&self, what: &str, mut attempt: impl FnMut() -> PgResult<T>) -> Result<T> {
        let started = Instant::now();
        let mut pause = FIRST_PAUSE;
        loop {
            let why = match attempt() {
                Ok(v) => return Ok(v),
                Err(Fail::Store(e)) => return Err(e),
                Err(Fail::Again(why)) => why,
                Err(Fail::Pg(e)) if is_connection_error(&e) || is_conflict(&e) => error_text(&e),
                Err(Fail::Pg(e)) => return Err(self.failed(what, &e)),
            };
            if started.elapsed() + pause > self.retry_limit {
                return Err(StoreError::Backend(format!(
                    "PostgreSQL at {}: {what}: still failing after retrying for {} s: {why}",
                    self.target,
                    started.elapsed().as_secs()
                )));
            }
            std::thread::sleep(pause);
            pause = (pause * 2).min(LONGEST_PAUSE);
        }
    }

    /// Runs `body` on a pooled connection (see [`retry`](Self::retry)). `body` may run more
    /// than once: it must be safe to repeat (reads are).
    pub(crate) fn run<T>(
        &self,
        what: &str,
        mut body: impl FnMut(&mut Client) -> PgResult<T>,
    ) -> Result<T> {
        self.retry(what, || {
            let mut conn = self.pool.get()?;
            let out = body(conn.client()?);
            if let Err(Fail::Pg(e)) = &out
                && is_connection_error(e)
            {
                conn.broken = true;
                drop(conn);
                self.pool.discard_idle();
            }
            out
        })
    }

    /// Runs `body` in one transaction and commits it (see [`run`](Self::run)). When the
    /// connection is lost during the commit, the next attempt asks the server whether the
    /// transaction committed and, if it did, returns what `body` returned then: a write is
    /// applied once even when its outcome was unknown.
    pub(crate) fn write<T>(
        &self,
        what: &str,
        mut body: impl FnMut(&mut Transaction<'_>) -> PgResult<T>,
    ) -> Result<T> {
        let mut unknown: Option<(i64, T)> = None;
        self.run(what, |client| {
            if let Some(xid) = unknown.as_ref().map(|u| u.0) {
                let status: Option<String> = client
                    .query_one("SELECT txid_status($1)", &[&xid])?
                    .try_get(0)?;
                match status.as_deref() {
                    Some("committed") => {
                        if let Some((_, out)) = unknown.take() {
                            return Ok(out);
                        }
                    }
                    Some("in progress") => {
                        return Err(Fail::Again(format!(
                            "the commit of transaction {xid} has no outcome yet"
                        )));
                    }
                    _ => unknown = None,
                }
            }
            let mut tx = client.transaction()?;
            let xid: i64 = tx.query_one("SELECT txid_current()", &[])?.try_get(0)?;
            let out = body(&mut tx)?;
            match tx.commit() {
                Ok(()) => Ok(out),
                Err(e) => {
                    if is_connection_error(&e) {
                        unknown = Some((xid, out));
                    }
                    Err(e.into())
                }
            }
        })
    }

    /// Creates or migrates the schema. An up-to-date database is only read.
    fn migrate(&self) -> Result<()> {
        self.run("checking the schema version", |client| {
            let found = schema_version(client)?;
            if found == Some(SCHEMA_VERSION) {
                return Ok(());
            }
            too_new(found)?;
            let mut tx = client.transaction()?;
            // Processes starting at once migrate one after the other.
            tx.execute("SELECT pg_advisory_xact_lock($1, 0)", &[&MIGRATION_LOCK])?;
            tx.batch_execute(
                "CREATE SCHEMA IF NOT EXISTS freshindex;
                 CREATE TABLE IF NOT EXISTS freshindex.meta (
                   key TEXT PRIMARY KEY, value TEXT NOT NULL);",
            )?;
            let found = schema_version(&mut tx)?;
            too_new(found)?;
            for (version, sql) in MIGRATIONS {
                if found.is_none_or(|f| *version > f) {
                    tx.batch_execute(sql)?;
                }
            }
            tx.execute(
                "INSERT INTO freshindex.meta (key, value) VALUES ('schema_version', $1)
                 ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                &[&SCHEMA_VERSION.to_string()],
            )?;
            tx.commit()?;
            Ok(())
        })
    }
}

fn too_new(found: Option<i64>) -> PgResult<()> {
    match found {
        Some(v) if v > SCHEMA_VERSION => Err(Fail::Store(StoreError::SchemaTooNew {
            found: v,
            supported: SCHEMA_VERSION,
        })),
        _ => Ok(()),
    }
}

/// The schema version the database records (`None`: no schema yet).
fn schema_version(c: &mut impl GenericClient) -> PgResult<Option<i64>> {
    let exists: bool = c
        .query_one("SELECT to_regclass('freshindex.meta') IS NOT NULL", &[])?
        .try_get(0)?;
    if !exists {
        return Ok(None);
    }
    let v: Option<String> = c
        .query_opt(
            "SELECT value FROM freshindex.meta WHERE key = 'schema_version'",
            &[],
        )?
        .map(|r| r.try_get(0))
        .transpose()?;
    v.map(|v| {
        v.parse::<i64>().map_err(|_| {
            Fail::Store(StoreError::Corrupt(format!(
                "freshindex.meta: schema_version `{v}` is not a number"
            )))
        })
    })
    .transpose()
}

/// The second key of a per-flow advisory lock.
pub(crate) fn flow_lock_key(flow: FlowId) -> i32 {
    (flow.0 & 0x7fff_ffff) as i32
}

fn parse<T: std::str::FromStr<Err = String>>(s: &str) -> PgResult<T> {
    s.parse().map_err(|e| Fail::Store(StoreError::Corrupt(e)))
}

fn corrupt(what: String) -> Fail {
    Fail::Store(StoreError::Corrupt(what))
}

fn add_memo_totals(
    tx: &mut Transaction<'_>,
    flow: FlowId,
    entries: i64,
    bytes: i64,
) -> PgResult<()> {
    if entries == 0 && bytes == 0 {
        return Ok(());
    }
    tx.execute(
        "INSERT INTO freshindex.memo_totals AS t (flow_id, entries, bytes) VALUES ($1, $2, $3)
         ON CONFLICT (flow_id) DO UPDATE SET entries = t.entries + excluded.entries,
           bytes = t.bytes + excluded.bytes",
        &[&flow.0, &entries, &bytes],
    )?;
    Ok(())
}

fn flow_record(r: &Row) -> PgResult<FlowRecord> {
    Ok(FlowRecord {
        id: FlowId(r.try_get(0)?),
        name: r.try_get(1)?,
        spec_json: r.try_get(2)?,
    })
}

impl FlowStore for PgStore {
    fn register_flow(&self, name: &str, spec_json: &str) -> Result<FlowId> {
        self.write(&format!("registering flow `{name}`"), |tx| {
            let stored = tx.query_opt(
                "SELECT id, spec_json FROM freshindex.flows WHERE name = $1",
                &[&name],
            )?;
            if let Some(r) = stored
                && r.try_get::<_, &str>(1)? == spec_json
            {
                return Ok(FlowId(r.try_get(0)?));
            }
            let r = tx.query_one(
                "INSERT INTO freshindex.flows (name, spec_json) VALUES ($1, $2)
                 ON CONFLICT (name) DO UPDATE SET spec_json = excluded.spec_json
                 RETURNING id",
                &[&name, &spec_json],
            )?;
            Ok(FlowId(r.try_get(0)?))
        })
    }

    fn flow(&self, name: &str) -> Result<Option<FlowRecord>> {
        self.run(&format!("reading flow `{name}`"), |c| {
            c.query_opt(
                "SELECT id, name, spec_json FROM freshindex.flows WHERE name = $1",
                &[&name],
            )?
            .as_ref()
            .map(flow_record)
            .transpose()
        })
    }

    fn flows(&self) -> Result<Vec<FlowRecord>> {
        self.run("listing flows", |c| {
            c.query(
                "SELECT id, name, spec_json FROM freshindex.flows ORDER BY name",
                &[],
            )?
            .iter()
            .map(flow_record)
            .collect()
        })
    }

    fn traversal_label(&self, flow: FlowId) -> Result<Option<String>> {
        self.run("reading the traversal label", |c| {
            Ok(c.query_opt(
                "SELECT traversal_label FROM freshindex.flows WHERE id = $1",
                &[&flow.0],
            )?
            .map(|r| r.try_get::<_, Option<String>>(0))
            .transpose()?
            .flatten())
        })
    }

    fn set_traversal_label(&self, flow: FlowId, label: &str) -> Result<()> {
        self.write("recording the traversal label", |tx| {
            tx.execute(
                "UPDATE freshindex.flows SET traversal_label = $2 WHERE id = $1",
                &[&flow.0, &label],
            )?;
            Ok(())
        })
    }

    fn change_mark(&self, flow: FlowId) -> Result<Option<String>> {
        self.run("reading the change mark", |c| {
            Ok(c.query_opt(
                "SELECT change_mark FROM freshindex.flows WHERE id = $1",
                &[&flow.0],
            )?
            .map(|r| r.try_get::<_, Option<String>>(0))
            .transpose()?
            .flatten())
        })
    }

    fn set_change_mark(&self, flow: FlowId, mark: Option<&str>) -> Result<()> {
        self.write("recording the change mark", |tx| {
            tx.execute(
                "UPDATE freshindex.flows SET change_mark = $2 WHERE id = $1",
                &[&flow.0, &mark],
            )?;
            Ok(())
        })
    }

    fn reset_flow(&self, flow: FlowId, drop_cache: bool) -> Result<()> {
        self.write("resetting a flow", |tx| {
            tx.execute(
                "UPDATE freshindex.flows SET traversal_label = NULL, change_mark = NULL
                 WHERE id = $1",
                &[&flow.0],
            )?;
            tx.execute(
                "DELETE FROM freshindex.tombstones WHERE flow_id = $1",
                &[&flow.0],
            )?;
            if drop_cache {
                for table in ["memo", "memo_totals", "memo_gc"] {
                    tx.execute(
                        &format!("DELETE FROM freshindex.{table} WHERE flow_id = $1"),
                        &[&flow.0],
                    )?;
                }
            }
            Ok(())
        })
    }

    fn delete_flow(&self, flow: FlowId) -> Result<bool> {
        self.write("deleting a flow", |tx| {
            for table in [
                "items",
                "tombstones",
                "tracked",
                "pending",
                "memo",
                "memo_totals",
                "memo_gc",
                "runs",
                "docs",
                "docs_kept",
                "deps",
                "members",
                "input_marks",
            ] {
                tx.execute(
                    &format!("DELETE FROM freshindex.{table} WHERE flow_id = $1"),
                    &[&flow.0],
                )?;
            }
            Ok(tx.execute("DELETE FROM freshindex.flows WHERE id = $1", &[&flow.0])? > 0)
        })
    }

    fn rename_flows(&self, renames: &[(FlowId, String)]) -> Result<()> {
        self.write("renaming flows", |tx| {
            // Temporary names first, so that two flows can swap theirs.
            for (id, _) in renames {
                tx.execute(
                    "UPDATE freshindex.flows SET name = '#renaming-' || id WHERE id = $1",
                    &[&id.0],
                )?;
            }
            for (id, name) in renames {
                let n = tx
                    .execute(
                        "UPDATE freshindex.flows SET name = $1 WHERE id = $2",
                        &[name, &id.0],
                    )
                    .map_err(|e| {
                        if e.code() == Some(&SqlState::UNIQUE_VIOLATION) {
                            Fail::Store(StoreError::Invalid(format!(
                                "renaming flow {} to `{name}`: another flow has that name",
                                id.0
                            )))
                        } else {
                            Fail::Pg(e)
                        }
                    })?;
                if n != 1 {
                    return Err(Fail::Store(StoreError::Invalid(format!(
                        "no flow has id {}",
                        id.0
                    ))));
                }
            }
            Ok(())
        })
    }
}

impl LineageStore for PgStore {
    fn lineage(&self, flow: FlowId, items: &[&str]) -> Result<HashMap<String, ItemLineage>> {
        self.run("reading lineage", |c| {
            let mut out: HashMap<String, ItemLineage> = items
                .iter()
                .map(|k| (k.to_string(), ItemLineage::default()))
                .collect();
            for r in c.query(
                "SELECT item_key, rows FROM freshindex.tracked
                 WHERE flow_id = $1 AND item_key = ANY($2)",
                &[&flow.0, &items],
            )? {
                let key: String = r.try_get(0)?;
                let rows = decode_rows(r.try_get(1)?)
                    .map_err(|e| corrupt(format!("lineage of item `{key}`: {e}")))?;
                out.entry(key).or_default().tracked = rows;
            }
            for r in c.query(
                "SELECT item_key, row_keys FROM freshindex.pending
                 WHERE flow_id = $1 AND item_key = ANY($2) ORDER BY id",
                &[&flow.0, &items],
            )? {
                let key: String = r.try_get(0)?;
                let keys: Vec<String> = serde_json::from_str(r.try_get(1)?)
                    .map_err(|e| corrupt(format!("pending keys of `{key}`: {e}")))?;
                let lin = out.entry(key).or_default();
                for k in keys {
                    if !lin.pending.contains(&k) {
                        lin.pending.push(k);
                    }
                }
            }
            Ok(out)
        })
    }

    fn record_pending(&self, flow: FlowId, pending: &[(String, Vec<String>)]) -> Result<()> {
        let mut keys = Vec::with_capacity(pending.len());
        let mut sets = Vec::with_capacity(pending.len());
        for (item, row_keys) in pending {
            keys.push(item.as_str());
            sets.push(
                serde_json::to_string(row_keys)
                    .map_err(|e| StoreError::Invalid(format!("pending keys of `{item}`: {e}")))?,
            );
        }
        self.write("recording pending row keys", |tx| {
            tx.execute(
                "INSERT INTO freshindex.pending (flow_id, item_key, row_keys)
                 SELECT $1, k, r FROM unnest($2::text[], $3::text[]) WITH ORDINALITY AS t(k, r, n)
                 ORDER BY n",
                &[&flow.0, &keys, &sets],
            )?;
            // An accepted entry whose rows are about to change is no longer settled: if the
            // write is cut short, the entry stays pollable and the next run finishes it.
            tx.execute(
                "UPDATE freshindex.items SET status = 'MODIFIED', prio = $3
                 WHERE flow_id = $1 AND key = ANY($2) AND status IN ('ACCEPTED', 'SKIPPED')",
                &[
                    &flow.0,
                    &keys,
                    &freshindex_core::queue::priority(ItemStatus::Modified),
                ],
            )?;
            Ok(())
        })
    }

    fn commit(&self, flow: FlowId, batch: BatchCommit) -> Result<()> {
        self.write("committing a batch", |tx| commit_batch(tx, flow, &batch))
    }

    fn tracked_count(&self, flow: FlowId) -> Result<u64> {
        self.run("counting tracked rows", |c| {
            let n: i64 = c
                .query_one(
                    "SELECT COALESCE(SUM(n_rows), 0)::BIGINT FROM freshindex.tracked
                     WHERE flow_id = $1",
                    &[&flow.0],
                )?
                .try_get(0)?;
            Ok(n.max(0) as u64)
        })
    }
}

/// The batch commit of [`LineageStore::commit`] inside its transaction.
fn commit_batch(tx: &mut Transaction<'_>, flow: FlowId, batch: &BatchCommit) -> PgResult<()> {
    use crate::pg_items::{EntryWriter, lock_entries, lock_entry, raise_tombstone};
    // Memo garbage collection waits for commits in progress (it must see their rows).
    tx.execute(
        "SELECT pg_advisory_xact_lock_shared($1, $2)",
        &[&MEMO_GC_LOCK, &flow_lock_key(flow)],
    )?;
    if !batch.memo.is_empty() {
        let keys: Vec<&[u8]> = batch.memo.iter().map(|(k, _)| &k.0[..]).collect();
        let values: Vec<&[u8]> = batch.memo.iter().map(|(_, v)| v.as_slice()).collect();
        let added = tx.query(
            "INSERT INTO freshindex.memo (flow_id, key, value)
             SELECT $1, k, v FROM unnest($2::bytea[], $3::bytea[]) AS t(k, v)
             ON CONFLICT DO NOTHING RETURNING length(value)::BIGINT",
            &[&flow.0, &keys, &values],
        )?;
        let mut bytes = 0i64;
        for r in &added {
            bytes += r.try_get::<_, i64>(0)?;
        }
        add_memo_totals(tx, flow, added.len() as i64, bytes)?;
    }
    let mut gc: FpMap<()> = batch.gc_candidates.iter().map(|k| (*k, ())).collect();

    // Entries are locked in key order (concurrent writers do the same: no deadlock between
    // them), then each change applies to the entry as the previous one left it.
    let mut keys: Vec<&str> = batch.items.iter().map(ItemChange::key).collect();
    keys.sort_unstable();
    keys.dedup();
    let mut known = lock_entries(tx, flow, &keys)?;
    let writer = EntryWriter::prepare(tx)?;
    let del_item = tx.prepare("DELETE FROM freshindex.items WHERE flow_id = $1 AND key = $2")?;
    // Item → its rows after the batch, for the items whose rows change.
    let mut new_rows: Vec<(&str, &[crate::TrackedRow])> = Vec::new();
    for change in &batch.items {
        let key = change.key();
        match change {
            ItemChange::Delete {
                if_queue, version, ..
            } => {
                let before = known.get(key).cloned();
                match (before, if_queue) {
                    // Seen again since the deletion was decided: its rows are gone from the
                    // target, so it is indexed again.
                    (Some(mut e), Some(label)) if &e.queue != label => {
                        if e.status != ItemStatus::Modified {
                            e.status = ItemStatus::Modified;
                            e.enqueued_at_ms = batch.now_ms;
                        }
                        e.content_hash = None;
                        writer.store(tx, flow, true, &e, None)?;
                        known.insert(key.to_string(), e);
                    }
                    (before, _) => {
                        let indexed = before.and_then(|e| e.version);
                        let newest = match (indexed, version.clone()) {
                            (Some(a), Some(b)) => Some(a.max(b)),
                            (a, b) => a.or(b),
                        };
                        if let Some(v) = newest {
                            raise_tombstone(tx, flow, key, &v)?;
                        }
                        tx.execute(&del_item, &[&flow.0, &key])?;
                        known.remove(key);
                    }
                }
                new_rows.push((key, &[]));
            }
            ItemChange::Upsert { record, rows } => {
                loop {
                    let before = known.get(key).cloned();
                    let exists = before.is_some();
                    let after = crate::rules::index(before, record, batch.now_ms);
                    if writer.store(tx, flow, exists, &after, None)? {
                        known.insert(key.to_string(), after);
                        break;
                    }
                    // Another transaction created the entry meanwhile: apply to it.
                    match lock_entry(tx, flow, key)? {
                        Some(e) => known.insert(key.to_string(), e),
                        None => known.remove(key),
                    };
                }
                if let Some(rows) = rows {
                    new_rows.push((key, rows));
                }
            }
        }
    }
    if !new_rows.is_empty() {
        let mut touched: Vec<&str> = new_rows.iter().map(|(k, _)| *k).collect();
        touched.sort_unstable();
        touched.dedup();
        // The item's lineage is now exact: whatever was pending is resolved. (An item
        // committed without rows keeps its pending keys for a later run.)
        tx.execute(
            "DELETE FROM freshindex.pending WHERE flow_id = $1 AND item_key = ANY($2)",
            &[&flow.0, &touched],
        )?;
        let mut current: HashMap<String, Vec<crate::TrackedRow>> = HashMap::new();
        for r in tx.query(
            "DELETE FROM freshindex.tracked WHERE flow_id = $1 AND item_key = ANY($2)
             RETURNING item_key, rows",
            &[&flow.0, &touched],
        )? {
            let key: String = r.try_get(0)?;
            let rows = decode_rows(r.try_get(1)?)
                .map_err(|e| corrupt(format!("lineage of item `{key}`: {e}")))?;
            current.insert(key, rows);
        }
        // Memo keys the old rows used may now be unused: candidates for the GC.
        for (key, rows) in &new_rows {
            let kept: FpMap<()> = rows
                .iter()
                .filter_map(|r| r.memo_key)
                .map(|m| (m, ()))
                .collect();
            if let Some(old) = current.insert(key.to_string(), rows.to_vec()) {
                for m in old.iter().filter_map(|r| r.memo_key) {
                    if !kept.contains_key(&m) {
                        gc.insert(m, ());
                    }
                }
            }
        }
        let mut ins_keys = Vec::new();
        let mut ins_counts = Vec::new();
        let mut ins_rows = Vec::new();
        for key in &touched {
            if let Some(rows) = current.get(*key)
                && !rows.is_empty()
            {
                ins_keys.push(*key);
                ins_counts.push(rows.len() as i64);
                ins_rows.push(encode_rows(rows));
            }
        }
        if !ins_keys.is_empty() {
            tx.execute(
                "INSERT INTO freshindex.tracked (flow_id, item_key, n_rows, rows)
                 SELECT $1, k, n, r FROM unnest($2::text[], $3::bigint[], $4::bytea[]) AS t(k, n, r)",
                &[&flow.0, &ins_keys, &ins_counts, &ins_rows],
            )?;
        }
    }
    if !gc.is_empty() {
        let keys: Vec<&[u8]> = gc.keys().map(|k| &k.0[..]).collect();
        tx.execute(
            "INSERT INTO freshindex.memo_gc (flow_id, key) SELECT $1, unnest($2::bytea[])
             ON CONFLICT DO NOTHING",
            &[&flow.0, &keys],
        )?;
    }
    crate::pg_inputs::put_docs_in(tx, flow, &batch.inputs.docs)?;
    crate::pg_inputs::set_deps_in(tx, flow, &batch.inputs.deps)?;
    Ok(())
}

impl MemoStore for PgStore {
    fn memo_get(
        &self,
        flow: FlowId,
        keys: &[Fingerprint],
    ) -> Result<HashMap<Fingerprint, Vec<u8>>> {
        if keys.is_empty() {
            return Ok(HashMap::new());
        }
        let wanted: Vec<&[u8]> = keys.iter().map(|k| &k.0[..]).collect();
        self.run("reading the memo cache", |c| {
            let mut out = HashMap::new();
            for r in c.query(
                "SELECT key, value FROM freshindex.memo WHERE flow_id = $1 AND key = ANY($2)",
                &[&flow.0, &wanted],
            )? {
                if let Some(k) = fp_from(Some(r.try_get(0)?))? {
                    out.insert(k, r.try_get(1)?);
                }
            }
            Ok(out)
        })
    }

    fn memo_gc(&self, flow: FlowId) -> Result<u64> {
        let any: bool = self.run("reading memo collection candidates", |c| {
            Ok(c.query_one(
                "SELECT EXISTS (SELECT 1 FROM freshindex.memo_gc WHERE flow_id = $1)",
                &[&flow.0],
            )?
            .try_get(0)?)
        })?;
        if !any {
            return Ok(0);
        }
        self.write("collecting the memo cache", |tx| {
            // No commit is in progress from here on: every row that uses an entry is seen.
            tx.execute(
                "SELECT pg_advisory_xact_lock($1, $2)",
                &[&MEMO_GC_LOCK, &flow_lock_key(flow)],
            )?;
            let mut unused: FpMap<()> = FpMap::default();
            for r in tx.query(
                "SELECT key FROM freshindex.memo_gc WHERE flow_id = $1",
                &[&flow.0],
            )? {
                if let Some(k) = fp_from(Some(r.try_get(0)?))? {
                    unused.insert(k, ());
                }
            }
            // One pass over the lineage drops every candidate a row still uses.
            for r in tx.query(
                "SELECT rows FROM freshindex.tracked WHERE flow_id = $1",
                &[&flow.0],
            )? {
                for_each_memo_key(r.try_get(0)?, |k| {
                    unused.remove(&k);
                })?;
            }
            let keys: Vec<&[u8]> = unused.keys().map(|k| &k.0[..]).collect();
            let removed = tx.query(
                "DELETE FROM freshindex.memo WHERE flow_id = $1 AND key = ANY($2)
                 RETURNING length(value)::BIGINT",
                &[&flow.0, &keys],
            )?;
            let mut bytes = 0i64;
            for r in &removed {
                bytes += r.try_get::<_, i64>(0)?;
            }
            add_memo_totals(tx, flow, -(removed.len() as i64), -bytes)?;
            tx.execute(
                "DELETE FROM freshindex.memo_gc WHERE flow_id = $1",
                &[&flow.0],
            )?;
            Ok(removed.len() as u64)
        })
    }

    fn memo_stats(&self, flow: FlowId) -> Result<(u64, u64)> {
        self.run("reading memo cache totals", |c| {
            match c.query_opt(
                "SELECT entries, bytes FROM freshindex.memo_totals WHERE flow_id = $1",
                &[&flow.0],
            )? {
                Some(r) => Ok((
                    r.try_get::<_, i64>(0)?.max(0) as u64,
                    r.try_get::<_, i64>(1)?.max(0) as u64,
                )),
                None => Ok((0, 0)),
            }
        })
    }
}

/// Deletes the flow's entries older than the newest [`crate::RUNS_KEPT`], except those still
/// in progress.
fn prune_runs(tx: &mut Transaction<'_>, flow: i64) -> PgResult<()> {
    tx.execute(
        "DELETE FROM freshindex.runs WHERE flow_id = $1 AND status <> 'inProgress' AND id NOT IN
           (SELECT id FROM freshindex.runs WHERE flow_id = $1 ORDER BY id DESC LIMIT $2)",
        &[&flow, &i64::from(crate::RUNS_KEPT)],
    )?;
    Ok(())
}

fn read_run(r: &Row) -> PgResult<RunRecord> {
    Ok(RunRecord {
        id: RunId(r.try_get(0)?),
        flow: FlowId(r.try_get(1)?),
        trigger: parse(r.try_get(2)?)?,
        status: parse(r.try_get(3)?)?,
        started_at_ms: r.try_get(4)?,
        finished_at_ms: r.try_get(5)?,
        summary_json: r.try_get(6)?,
        message: r.try_get(7)?,
    })
}

fn final_status(status: RunState, what: &str) -> Result<()> {
    if status.is_finished() {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "{what} needs a final status, not `{status}`"
        )))
    }
}

impl RunStore for PgStore {
    fn begin_run(&self, flow: FlowId, trigger: Trigger, started_at_ms: i64) -> Result<RunId> {
        self.write("recording the start of a run", |tx| {
            let id: i64 = tx
                .query_one(
                    "INSERT INTO freshindex.runs (flow_id, trigger, status, started_at_ms)
                     VALUES ($1, $2, $3, $4) RETURNING id",
                    &[
                        &flow.0,
                        &trigger.as_str(),
                        &RunState::InProgress.as_str(),
                        &started_at_ms,
                    ],
                )?
                .try_get(0)?;
            prune_runs(tx, flow.0)?;
            Ok(RunId(id))
        })
    }

    fn finish_run(&self, run: RunId, end: &RunEnd) -> Result<bool> {
        final_status(end.status, "finishing a run")?;
        self.write("recording the end of a run", |tx| {
            let flow: Option<i64> = tx
                .query_opt(
                    "UPDATE freshindex.runs SET status = $2, finished_at_ms = $3,
                       summary_json = $4, message = $5
                     WHERE id = $1 RETURNING flow_id",
                    &[
                        &run.0,
                        &end.status.as_str(),
                        &end.finished_at_ms,
                        &end.summary_json,
                        &end.message,
                    ],
                )?
                .map(|r| r.try_get(0))
                .transpose()?;
            if let Some(flow) = flow {
                // An old entry kept only because it was in progress may go now.
                prune_runs(tx, flow)?;
            }
            Ok(flow.is_some())
        })
    }

    fn record_run_event(
        &self,
        flow: FlowId,
        trigger: Trigger,
        status: RunState,
        at_ms: i64,
        message: Option<&str>,
    ) -> Result<RunId> {
        final_status(status, "a history event")?;
        self.write("recording a history event", |tx| {
            let id: i64 = tx
                .query_one(
                    "INSERT INTO freshindex.runs (flow_id, trigger, status, started_at_ms,
                       finished_at_ms, message)
                     VALUES ($1, $2, $3, $4, $4, $5) RETURNING id",
                    &[
                        &flow.0,
                        &trigger.as_str(),
                        &status.as_str(),
                        &at_ms,
                        &message,
                    ],
                )?
                .try_get(0)?;
            prune_runs(tx, flow.0)?;
            Ok(RunId(id))
        })
    }

    fn runs(&self, flow: FlowId, limit: usize) -> Result<Vec<RunRecord>> {
        let limit = i64::try_from(limit).unwrap_or(i64::MAX);
        self.run("reading the run history", |c| {
            c.query(
                "SELECT id, flow_id, trigger, status, started_at_ms, finished_at_ms,
                   summary_json, message
                 FROM freshindex.runs WHERE flow_id = $1 ORDER BY id DESC LIMIT $2",
                &[&flow.0, &limit],
            )?
            .iter()
            .map(read_run)
            .collect()
        })
    }

    fn last_run(&self, flow: FlowId) -> Result<Option<String>> {
        self.run("reading the last run", |c| {
            Ok(c.query_opt(
                "SELECT summary_json FROM freshindex.runs
                 WHERE flow_id = $1 AND summary_json IS NOT NULL ORDER BY id DESC LIMIT 1",
                &[&flow.0],
            )?
            .map(|r| r.try_get(0))
            .transpose()?)
        })
    }

    fn interrupt_runs(&self, flow: Option<FlowId>, at_ms: i64, message: &str) -> Result<u64> {
        let flow = flow.map(|f| f.0);
        self.write("marking interrupted runs", |tx| {
            let flows: Vec<i64> = tx
                .query(
                    "UPDATE freshindex.runs SET status = $2,
                       finished_at_ms = GREATEST(started_at_ms, $3), message = $4
                     WHERE status = $1 AND ($5::BIGINT IS NULL OR flow_id = $5)
                     RETURNING flow_id",
                    &[
                        &RunState::InProgress.as_str(),
                        &RunState::TransientFailure.as_str(),
                        &at_ms,
                        &message,
                        &flow,
                    ],
                )?
                .iter()
                .map(|r| r.try_get(0))
                .collect::<std::result::Result<_, _>>()?;
            let mut pruned = flows.clone();
            pruned.sort_unstable();
            pruned.dedup();
            for f in pruned {
                prune_runs(tx, f)?;
            }
            Ok(flows.len() as u64)
        })
    }
}

impl IndexRecordStore for PgStore {
    fn put_index_records(&self, records: &[(&str, u64, String)]) -> Result<()> {
        let kinds: Vec<&str> = records.iter().map(|r| r.0).collect();
        let ids: Vec<i64> = records.iter().map(|r| r.1 as i64).collect();
        let docs: Vec<&str> = records.iter().map(|r| r.2.as_str()).collect();
        self.write("writing index records", |tx| {
            // One statement may not change a row twice: the last record of a (kind, id) wins,
            // as it would written one after the other.
            let put = tx.prepare(
                "INSERT INTO freshindex.index_records (kind, id, doc) VALUES ($1, $2, $3)
                 ON CONFLICT (kind, id) DO UPDATE SET doc = excluded.doc",
            )?;
            for ((kind, id), doc) in kinds.iter().zip(&ids).zip(&docs) {
                tx.execute(&put, &[kind, id, doc])?;
            }
            Ok(())
        })
    }

    fn index_records(&self, kind: &str) -> Result<Vec<(u64, String)>> {
        self.run(&format!("reading index records of kind `{kind}`"), |c| {
            c.query(
                "SELECT id, doc FROM freshindex.index_records WHERE kind = $1 ORDER BY id",
                &[&kind],
            )?
            .iter()
            .map(|r| Ok((r.try_get::<_, i64>(0)? as u64, r.try_get(1)?)))
            .collect()
        })
    }

    fn delete_index_records(&self, kind: &str, ids: &[u64]) -> Result<()> {
        let ids: Vec<i64> = ids.iter().map(|&i| i as i64).collect();
        self.write(&format!("deleting index records of kind `{kind}`"), |tx| {
            tx.execute(
                "DELETE FROM freshindex.index_records WHERE kind = $1 AND id = ANY($2)",
                &[&kind, &ids],
            )?;
            Ok(())
        })
    }
}

/// The advisory lock keys of a named lock: a fixed namespace and 32 bits of the name's hash.
fn lock_keys(name: &str) -> (i32, i32) {
    let h = blake3::hash(name.as_bytes());
    let b = h.as_bytes();
    (NAMED_LOCK, i32::from_le_bytes([b[0], b[1], b[2], b[3]]))
}

/// How often [`PgLock::is_held`] asks the server whether the session still lives.
const LOCK_CHECK_EVERY: Duration = Duration::from_secs(1);

/// A session advisory lock on a connection of its own: held while the connection lives.
struct PgLock {
    /// The advisory lock's keys.
    keys: (i32, i32),
    state: Mutex<LockState>,
}

struct LockState {
    client: Option<Client>,
    held: bool,
    checked: Instant,
}

impl HeldLock for PgLock {
    fn is_held(&self) -> bool {
        let mut st = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if !st.held {
            return false;
        }
        let due = st.checked.elapsed() >= LOCK_CHECK_EVERY;
        let alive = match st.client.as_mut() {
            None => false,
            Some(c) if c.is_closed() => false,
            Some(c) if due => c.simple_query("SELECT 1").is_ok(),
            Some(_) => true,
        };
        if due {
            st.checked = Instant::now();
        }
        if !alive {
            // The session is gone, and the lock with it: another process may hold it now.
            st.held = false;
            st.client = None;
        }
        alive
    }
}

impl Drop for PgLock {
    fn drop(&mut self) {
        let st = self.state.get_mut().unwrap_or_else(|p| p.into_inner());
        if let Some(mut c) = st.client.take() {
            // Released before the session ends, so that the lock is free when the drop
            // returns; ending the session would release it too, a moment later.
            let (k1, k2) = self.keys;
            let _ = c.execute("SELECT pg_advisory_unlock($1, $2)", &[&k1, &k2]);
            let _ = c.close();
        }
    }
}

impl LockStore for PgStore {
    fn has_shared_locks(&self) -> bool {
        true
    }

    fn try_lock(&self, name: &str) -> Result<Option<StoreLock>> {
        let (k1, k2) = lock_keys(name);
        let mut config = self.pool.config.clone();
        // A lost peer ends the session (and so the lock) within about a minute, on both sides.
        config
            .keepalives(true)
            .keepalives_idle(Duration::from_secs(20))
            .keepalives_interval(Duration::from_secs(5))
            .keepalives_retries(4)
            .tcp_user_timeout(Duration::from_secs(40));
        self.retry(&format!("taking lock `{name}`"), || {
            let mut client = config.connect(NoTls)?;
            client.batch_execute(
                "SET tcp_keepalives_idle = 20; SET tcp_keepalives_interval = 5;
                 SET tcp_keepalives_count = 4;",
            )?;
            let got: bool = client
                .query_one("SELECT pg_try_advisory_lock($1, $2)", &[&k1, &k2])?
                .try_get(0)?;
            if !got {
                return Ok(None);
            }
            Ok(Some(StoreLock::new(Box::new(PgLock {
                keys: (k1, k2),
                state: Mutex::new(LockState {
                    client: Some(client),
                    held: true,
                    checked: Instant::now(),
                }),
            }))))
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_are_shown_without_their_password() {
        assert_eq!(
            redact_url("postgres://u:secret@db:5432/x"),
            "postgres://u:***@db:5432/x"
        );
        assert_eq!(redact_url("postgres://u@db/x"), "postgres://u@db/x");
        assert_eq!(redact_url("postgres://db/x?a=b@c"), "postgres://db/x?a=b@c");
        assert_eq!(redact_url("not a url"), "not a url");
    }

    #[test]
    fn lock_keys_depend_on_the_name() {
        assert_eq!(lock_keys("flow/a"), lock_keys("flow/a"));
        assert_ne!(lock_keys("flow/a").1, lock_keys("flow/b").1);
        assert_eq!(lock_keys("x").0, NAMED_LOCK);
    }
}
