//! A PostgreSQL source: the rows of a table or a query, each an item.
//!
//! Changes are found in the "recent changes" mode ([`crate::source::recent`]): the rows whose
//! (ordinal, key) is greater than the flow's mark, in that order, page by page. The ordinal
//! column must grow on every change of a row (an `updated_at` set by the application or a
//! trigger, a sequence bumped on update). The mark is `ORDINAL/KEY` (the ordinal as an
//! integer: microseconds since 1970 for timestamps), so a page boundary between rows of one
//! ordinal loses nothing.
//!
//! What that cannot see, a full scan of the keys finds ([`Engine::run`] of such a flow does
//! both): rows deleted outright, and rows that became visible with an ordinal below the mark
//! (a transaction that set `updated_at` and committed after a later one was read, a row
//! restored from a backup). The scan reads only the keys, ordinals and soft-delete flags,
//! deletes the items whose rows are gone and reads again the rows whose ordinal differs from
//! the indexed version.
//!
//! Live mode listens on a channel per flow that a trigger (`freshindex setup`) notifies on
//! every insert, update and delete: each batch of notifications deletes the rows they name as
//! deleted and syncs the recent changes. Without `notify` it polls the recent changes.
//!
//! Connections are plain TCP (no TLS); a connection found closed is opened again once, after
//! a short pause, before a query fails.

use std::collections::{BTreeSet, HashMap, HashSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use freshindex_core::spec::{PostgresSource, redact_url};
use freshindex_core::{FlowSpec, ItemStatus, Trigger};
use postgres::types::{ToSql, Type};
use postgres::{Client, NoTls};

use crate::live::{LiveControl, LiveEvent, LiveOptions};
use crate::process::{Ctx, Work};
use crate::run::{RunOptions, now_ms};
use crate::source::recent::{Change, ChangeKind, ChangePage, RecentChanges};
use crate::summary::RunSummary;
use crate::{Engine, EngineError};

/// Pause before the one reconnection a closed connection gets.
const RECONNECT_PAUSE: Duration = Duration::from_millis(250);

/// Rows read again by key per query during a key scan.
const FETCH_BATCH: usize = 500;

/// The largest notification payload the trigger sends with the key (PostgreSQL's limit is
/// 8000 bytes); a larger one goes without it and the live loop scans the keys instead.
const MAX_PAYLOAD: usize = 7900;

/// How the ordinal column's values become integers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Ordinal {
    /// smallint, integer, bigint: the value.
    Int,
    /// timestamp without time zone: microseconds since 1970-01-01 00:00.
    Timestamp,
    /// timestamptz: microseconds since the epoch.
    TimestampTz,
}

impl Ordinal {
    /// The ordinal as a bigint (`col` is a quoted column reference).
    fn select(self, col: &str) -> String {
        match self {
            Ordinal::Int => format!("{col}::int8"),
            Ordinal::Timestamp | Ordinal::TimestampTz => {
                format!("(EXTRACT(EPOCH FROM {col}) * 1000000)::int8")
            }
        }
    }

    /// The column's value for the bigint parameter `param` (the inverse of `select`), so
    /// that comparisons use the column itself (and its index).
    fn bound(self, param: &str) -> String {
        match self {
            Ordinal::Int => format!("{param}::int8"),
            Ordinal::Timestamp => {
                format!("('epoch'::timestamp + {param}::int8 * interval '1 microsecond')")
            }
            Ordinal::TimestampTz => {
                format!("('epoch'::timestamptz + {param}::int8 * interval '1 microsecond')")
            }
        }
    }
}

/// An item's version from its row's ordinal: big-endian with the sign bit flipped, so that
/// byte order is value order.
pub fn ordinal_version(ordinal: i64) -> Vec<u8> {
    ((ordinal as u64) ^ (1 << 63)).to_be_bytes().to_vec()
}

/// The item key of a row from its key columns' text values: one column's value as it is;
/// several values joined by `/`, each with `%` and `/` escaped (`%25`, `%2F`).
pub fn item_key(values: &[&str]) -> String {
    match values {
        [one] => (*one).to_string(),
        _ => values
            .iter()
            .map(|v| v.replace('%', "%25").replace('/', "%2F"))
            .collect::<Vec<_>>()
            .join("/"),
    }
}

/// The key columns' values of an item key made by [`item_key`] for `n` columns.
fn key_values(key: &str, n: usize) -> Option<Vec<String>> {
    if n == 1 {
        return Some(vec![key.to_string()]);
    }
    let parts: Vec<String> = key
        .split('/')
        .map(|p| p.replace("%2F", "/").replace("%25", "%"))
        .collect();
    (parts.len() == n).then_some(parts)
}

/// The notification channel of a flow: `freshindex_<flow>`, lower case, letters, digits and
/// `_` only, at most 63 bytes; a name that had to change gets a short hash of the flow name,
/// so that two flows never share a channel.
pub fn channel_name(flow: &str) -> String {
    let clean: String = flow
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() {
                c.to_ascii_lowercase()
            } else {
                '_'
            }
        })
        .collect();
    let name = format!("freshindex_{clean}");
    if clean == flow && name.len() <= 63 {
        return name;
    }
    let hash = freshindex_core::Fingerprint::of(flow.as_bytes()).hex_prefix(4);
    let mut head = name;
    head.truncate(63 - 9);
    format!("{head}_{hash}")
}

/// A quoted identifier.
fn ident(name: &str) -> String {
    format!("\"{}\"", name.replace('"', "\"\""))
}

/// The text of a PostgreSQL error: the server's message with its detail and hint, or the
/// client's error with its cause.
fn pg_error(e: &postgres::Error) -> String {
    if let Some(db) = e.as_db_error() {
        let mut m = db.message().to_string();
        if let Some(d) = db.detail() {
            m.push_str(&format!(" ({d})"));
        }
        if let Some(h) = db.hint() {
            m.push_str(&format!("; hint: {h}"));
        }
        return m;
    }
    match std::error::Error::source(e) {
        Some(cause) => format!("{e}: {cause}"),
        None => e.to_string(),
    }
}

/// The columns of a changes query, in order.
struct Layout {
    keys: usize,
    content: usize,
    metadata: bool,
    soft_delete: bool,
}

/// One row as the key scan sees it.
struct ScannedRow {
    key: String,
    ordinal: Option<i64>,
    deleted: bool,
}

/// The rows of a table or query of a PostgreSQL database (see the module documentation).
pub struct PgSource {
    spec: PostgresSource,
    config: postgres::Config,
    /// `host:port/db` for messages.
    place: String,
    client: Mutex<Option<Client>>,
    ordinal: Mutex<Option<Ordinal>>,
}

impl std::fmt::Debug for PgSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgSource")
            .field("source", &self.describe())
            .finish_non_exhaustive()
    }
}

impl PgSource {
    /// The source of a flow (the connection opens on first use).
    pub fn new(spec: &PostgresSource) -> Result<PgSource, EngineError> {
        let url = match (&spec.url, &spec.url_env) {
            (Some(url), _) => url.clone(),
            (None, Some(var)) => std::env::var(var).map_err(|_| {
                EngineError::Config(format!(
                    "source: url_env: the environment variable `{var}` is not set (or not UTF-8)"
                ))
            })?,
            (None, None) => {
                return Err(EngineError::Config("source: url: missing".into()));
            }
        };
        let mut config: postgres::Config = url.parse().map_err(|e| {
            EngineError::Config(format!(
                "source: url: `{}` is not a usable PostgreSQL URL: {e}",
                redact_url(&url)
            ))
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        if config.get_application_name().is_none() {
            config.application_name("freshindex");
        }
        let host = config
            .get_hosts()
            .first()
            .map(|h| match h {
                postgres::config::Host::Tcp(h) => h.clone(),
                postgres::config::Host::Unix(p) => p.display().to_string(),
            })
            .unwrap_or_else(|| "localhost".into());
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let db = config
            .get_dbname()
            .or(config.get_user())
            .unwrap_or("postgres");
        Ok(PgSource {
            spec: spec.clone(),
            place: format!("{host}:{port}/{db}"),
            config,
            client: Mutex::new(None),
            ordinal: Mutex::new(None),
        })
    }

    /// What the rows come from: `table public.docs` or `query`.
    fn what(&self) -> String {
        match (&self.spec.table, &self.spec.query) {
            (Some(t), _) => format!("table {t}"),
            _ => "query".to_string(),
        }
    }

    fn connect(&self) -> Result<Client, EngineError> {
        self.config.connect(NoTls).map_err(|e| {
            EngineError::Source(format!(
                "postgres {}: cannot connect: {}",
                self.place,
                pg_error(&e)
            ))
        })
    }

    /// Runs `f` on the connection (opened when needed); a connection found closed is
    /// opened again once, after a short pause. `doing` names the operation in errors.
    /// Runs `sql` (several statements) in one transaction.
    fn execute_in_transaction(&self, doing: &str, sql: &str) -> Result<(), EngineError> {
        self.with_client(doing, |c| {
            let mut tx = c.transaction()?;
            tx.batch_execute(sql)?;
            tx.commit()
        })
    }

    fn with_client<T>(
        &self,
        doing: &str,
        mut f: impl FnMut(&mut Client) -> Result<T, postgres::Error>,
    ) -> Result<T, EngineError> {
        let mut slot = self.client.lock().unwrap_or_else(|p| p.into_inner());
        let mut retried = false;
        loop {
            if slot.as_ref().is_none_or(Client::is_closed) {
                *slot = Some(self.connect()?);
            }
            let Some(client) = slot.as_mut() else {
                return Err(EngineError::Internal("no connection".into()));
            };
            match f(client) {
                Ok(v) => return Ok(v),
                Err(e) if !retried && (e.is_closed() || client.is_closed()) => {
                    tracing::warn!(
                        source = self.describe(),
                        "connection lost ({}); reconnecting",
                        pg_error(&e)
                    );
                    *slot = None;
                    retried = true;
                    std::thread::sleep(RECONNECT_PAUSE);
                }
                Err(e) => {
                    if client.is_closed() {
                        *slot = None;
                    }
                    return Err(EngineError::Source(format!(
                        "{}: {doing}: {}",
                        self.describe(),
                        pg_error(&e)
                    )));
                }
            }
        }
    }

    /// `FROM` of every query: the table or the query as a subquery, named `freshindex_src`.
    fn from(&self) -> String {
        match (&self.spec.table, &self.spec.query) {
            (Some(t), _) => {
                let parts: Vec<String> = t.split('.').map(ident).collect();
                format!("{} AS freshindex_src", parts.join("."))
            }
            (None, Some(q)) => format!("({q}) AS freshindex_src"),
            (None, None) => "freshindex_src".into(),
        }
    }

    fn col(name: &str) -> String {
        format!("freshindex_src.{}", ident(name))
    }

    /// The ordinal column's kind, read once from the catalog of the query's result.
    fn ordinal(&self) -> Result<Ordinal, EngineError> {
        if let Some(o) = *self.ordinal.lock().unwrap_or_else(|p| p.into_inner()) {
            return Ok(o);
        }
        let column = &self.spec.ordinal_column;
        let sql = format!("SELECT {} FROM {} LIMIT 0", Self::col(column), self.from());
        let ty = self.with_client("reading the ordinal column's type", |c| {
            Ok(c.prepare(&sql)?.columns()[0].type_().clone())
        })?;
        let kind = match ty {
            Type::INT2 | Type::INT4 | Type::INT8 => Ordinal::Int,
            Type::TIMESTAMP => Ordinal::Timestamp,
            Type::TIMESTAMPTZ => Ordinal::TimestampTz,
            other => {
                return Err(EngineError::Config(format!(
                    "{}: ordinal_column `{column}` is of type {}; expected timestamp, timestamptz, integer or bigint",
                    self.describe(),
                    other.name()
                )));
            }
        };
        *self.ordinal.lock().unwrap_or_else(|p| p.into_inner()) = Some(kind);
        Ok(kind)
    }

    /// The select list of rows read for their content: keys, ordinal, content columns,
    /// metadata (one JSON text), soft-delete flag.
    fn content_select(&self, ord: Ordinal) -> (String, Layout) {
        let s = &self.spec;
        let mut cols: Vec<String> = s
            .key_columns
            .iter()
            .map(|k| format!("{}::text", Self::col(k)))
            .collect();
        cols.push(ord.select(&Self::col(&s.ordinal_column)));
        cols.extend(s.content_columns.iter().map(|c| Self::col(c)));
        if !s.metadata_columns.is_empty() {
            let pairs: Vec<String> = s
                .metadata_columns
                .iter()
                .map(|m| format!("'{}', {}", m.replace('\'', "''"), Self::col(m)))
                .collect();
            cols.push(format!("json_build_object({})::text", pairs.join(", ")));
        }
        if let Some(d) = &s.soft_delete_column {
            cols.push(format!("{}::text", Self::col(d)));
        }
        (
            cols.join(", "),
            Layout {
                keys: s.key_columns.len(),
                content: s.content_columns.len(),
                metadata: !s.metadata_columns.is_empty(),
                soft_delete: s.soft_delete_column.is_some(),
            },
        )
    }

    /// The key columns as compared and ordered: text in byte order, NULL as empty.
    fn key_order(&self) -> Vec<String> {
        self.spec
            .key_columns
            .iter()
            .map(|k| format!("COALESCE({}::text, '') COLLATE \"C\"", Self::col(k)))
            .collect()
    }

    /// The change a row read by a content query stands for, with its ordinal and key values
    /// (for the mark).
    fn change_of(
        &self,
        row: &postgres::Row,
        layout: &Layout,
    ) -> (Change, Option<i64>, Vec<String>) {
        let s = &self.spec;
        let mut values = Vec::with_capacity(layout.keys);
        let mut null_key = None;
        for (i, name) in s.key_columns.iter().enumerate() {
            match row.try_get::<_, Option<String>>(i) {
                Ok(Some(v)) => values.push(v),
                _ => {
                    null_key.get_or_insert(name.as_str());
                    values.push(String::new());
                }
            }
        }
        let ordinal = row.try_get::<_, Option<i64>>(layout.keys).ok().flatten();
        let version = ordinal.map(ordinal_version);
        let ord_text = ordinal.map_or_else(|| "NULL".to_string(), |o| o.to_string());
        if let Some(col) = null_key {
            let error = format!(
                "a row with {} = {ord_text}: key column `{col}` is NULL; it cannot be indexed",
                s.ordinal_column
            );
            let change = Change {
                key: String::new(),
                version,
                kind: ChangeKind::Invalid { error },
            };
            return (change, ordinal, values);
        }
        let refs: Vec<&str> = values.iter().map(String::as_str).collect();
        let key = item_key(&refs);
        let mut at = layout.keys + 1 + layout.content;
        let metadata = if layout.metadata {
            let m = row
                .try_get::<_, Option<String>>(at)
                .ok()
                .flatten()
                .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok());
            at += 1;
            m
        } else {
            None
        };
        let deleted = layout.soft_delete
            && row
                .try_get::<_, Option<String>>(at)
                .ok()
                .flatten()
                .is_some_and(|v| v == s.soft_delete_marker);
        let kind = if deleted {
            ChangeKind::Deleted
        } else {
            self.content_of(row, layout, &key, metadata)
        };
        (Change { key, version, kind }, ordinal, values)
    }

    /// The text of a row's content columns joined with a blank line, or what is wrong.
    fn content_of(
        &self,
        row: &postgres::Row,
        layout: &Layout,
        key: &str,
        metadata: Option<serde_json::Value>,
    ) -> ChangeKind {
        let mut parts = Vec::with_capacity(layout.content);
        for (j, name) in self.spec.content_columns.iter().enumerate() {
            let i = layout.keys + 1 + j;
            match row.try_get::<_, Option<String>>(i) {
                Ok(Some(v)) => {
                    if !v.is_empty() {
                        parts.push(v);
                    }
                }
                Ok(None) => {
                    return ChangeKind::Invalid {
                        error: format!(
                            "row `{key}`: content column `{name}` is NULL; give it a value (or COALESCE it in a query)"
                        ),
                    };
                }
                Err(_) => {
                    let ty = row.columns()[i].type_().name().to_string();
                    return ChangeKind::Invalid {
                        error: format!(
                            "row `{key}`: content column `{name}` is of type {ty}, not text (text, varchar, char); cast it in a query (`{name}::text`)"
                        ),
                    };
                }
            }
        }
        ChangeKind::Upsert {
            text: parts.join("\n\n"),
            metadata,
        }
    }

    /// Every row's key, ordinal and soft-delete flag (rows without a key are left out).
    fn scan_keys(&self) -> Result<Vec<ScannedRow>, EngineError> {
        let ord = self.ordinal()?;
        let s = &self.spec;
        let mut cols: Vec<String> = s
            .key_columns
            .iter()
            .map(|k| format!("{}::text", Self::col(k)))
            .collect();
        cols.push(ord.select(&Self::col(&s.ordinal_column)));
        if let Some(d) = &s.soft_delete_column {
            cols.push(format!("{}::text", Self::col(d)));
        }
        let sql = format!("SELECT {} FROM {}", cols.join(", "), self.from());
        let n = s.key_columns.len();
        let marker = &s.soft_delete_marker;
        let soft = s.soft_delete_column.is_some();
        self.with_client("scanning the keys", |c| {
            let mut out = Vec::new();
            let mut rows = c.query_raw(&sql, std::iter::empty::<&dyn ToSql>())?;
            while let Some(row) = postgres::fallible_iterator::FallibleIterator::next(&mut rows)? {
                let values: Option<Vec<String>> =
                    (0..n).map(|i| row.get::<_, Option<String>>(i)).collect();
                let Some(values) = values else { continue };
                let refs: Vec<&str> = values.iter().map(String::as_str).collect();
                out.push(ScannedRow {
                    key: item_key(&refs),
                    ordinal: row.get::<_, Option<i64>>(n),
                    deleted: soft
                        && row
                            .get::<_, Option<String>>(n + 1)
                            .is_some_and(|v| &v == marker),
                });
            }
            Ok(out)
        })
    }

    /// The current rows of these item keys (those still there), as changes.
    fn fetch(&self, keys: &[String]) -> Result<Vec<Change>, EngineError> {
        let ord = self.ordinal()?;
        let (select, layout) = self.content_select(ord);
        let n = layout.keys;
        let mut columns: Vec<Vec<String>> = vec![Vec::with_capacity(keys.len()); n];
        for key in keys {
            let Some(values) = key_values(key, n) else {
                continue;
            };
            for (i, v) in values.into_iter().enumerate() {
                columns[i].push(v);
            }
        }
        let texts: Vec<String> = self
            .spec
            .key_columns
            .iter()
            .map(|k| format!("{}::text", Self::col(k)))
            .collect();
        let params: Vec<String> = (1..=n).map(|i| format!("${i}::text[]")).collect();
        let sql = format!(
            "SELECT {select} FROM {} WHERE ({}) IN (SELECT * FROM unnest({}))",
            self.from(),
            texts.join(", "),
            params.join(", ")
        );
        let rows = self.with_client("reading rows by key", |c| {
            let args: Vec<&(dyn ToSql + Sync)> =
                columns.iter().map(|v| v as &(dyn ToSql + Sync)).collect();
            c.query(&sql, &args)
        })?;
        Ok(rows.iter().map(|r| self.change_of(r, &layout).0).collect())
    }

    /// Opens a connection listening on the flow's channel.
    fn listen(&self, flow: &str) -> Result<Listener, EngineError> {
        let channel = channel_name(flow);
        let mut client = self.connect()?;
        client
            .batch_execute(&format!("LISTEN {}", ident(&channel)))
            .map_err(|e| {
                EngineError::Source(format!(
                    "{}: LISTEN {channel}: {}",
                    self.describe(),
                    pg_error(&e)
                ))
            })?;
        Ok(Listener {
            client,
            channel,
            checked: Instant::now(),
        })
    }

    /// The trigger's and its function's names, and the table, of a flow with `notify`.
    fn trigger_names(&self, flow: &str) -> Result<(String, String, String), EngineError> {
        let Some(table) = &self.spec.table else {
            return Err(EngineError::Config(format!(
                "flow `{flow}`: notify needs `table`; a query has no table to put a trigger on"
            )));
        };
        let parts: Vec<&str> = table.split('.').collect();
        let channel = channel_name(flow);
        let function_name = format!("{channel}_notify");
        let function_name = if function_name.len() > 63 {
            let hash = freshindex_core::Fingerprint::of(function_name.as_bytes()).hex_prefix(4);
            format!("{}_{hash}", &channel[..63 - 9])
        } else {
            function_name
        };
        // The function lives in the table's schema.
        let function = match parts.as_slice() {
            [schema, _] => format!("{}.{}", ident(schema), ident(&function_name)),
            _ => ident(&function_name),
        };
        let table_sql: Vec<String> = parts.iter().map(|p| ident(p)).collect();
        Ok((channel, function, table_sql.join(".")))
    }

    /// Installs the trigger that notifies the flow's channel on every insert, update and
    /// delete of the table (payload: `{"op": ..., "key": [...]}`; a key too large for a
    /// notification goes without it). Returns what it did, one line each.
    pub(crate) fn setup(&self, flow: &str) -> Result<Vec<String>, EngineError> {
        if !self.spec.notify {
            return Ok(vec![format!(
                "flow `{flow}`: nothing to set up for {} (notify is off: live mode polls)",
                self.describe()
            )]);
        }
        let (channel, function, table) = self.trigger_names(flow)?;
        let old: Vec<String> = self
            .spec
            .key_columns
            .iter()
            .map(|k| format!("OLD.{}", ident(k)))
            .collect();
        let new: Vec<String> = self
            .spec
            .key_columns
            .iter()
            .map(|k| format!("NEW.{}", ident(k)))
            .collect();
        let texts = |cols: &[String]| {
            cols.iter()
                .map(|c| format!("{c}::text"))
                .collect::<Vec<_>>()
                .join(", ")
        };
        let trigger = ident(&channel);
        let sql = format!(
            r#"
CREATE OR REPLACE FUNCTION {function}() RETURNS trigger LANGUAGE plpgsql AS $freshindex$
DECLARE
  payload text;
BEGIN
  IF TG_OP = 'DELETE' OR (TG_OP = 'UPDATE' AND ROW({old}) IS DISTINCT FROM ROW({new})) THEN
    payload := json_build_object('op', 'DELETE', 'key', json_build_array({old_text}))::text;
    IF octet_length(payload) > {MAX_PAYLOAD} THEN
      payload := '{{"op":"DELETE"}}';
    END IF;
    PERFORM pg_notify('{channel}', payload);
  END IF;
  IF TG_OP <> 'DELETE' THEN
    payload := json_build_object('op', TG_OP, 'key', json_build_array({new_text}))::text;
    IF octet_length(payload) > {MAX_PAYLOAD} THEN
      payload := json_build_object('op', TG_OP)::text;
    END IF;
    PERFORM pg_notify('{channel}', payload);
  END IF;
  RETURN NULL;
END
$freshindex$;
DROP TRIGGER IF EXISTS {trigger} ON {table};
CREATE TRIGGER {trigger} AFTER INSERT OR UPDATE OR DELETE ON {table}
  FOR EACH ROW EXECUTE FUNCTION {function}();
"#,
            old = old.join(", "),
            new = new.join(", "),
            old_text = texts(&old),
            new_text = texts(&new),
        );
        self.execute_in_transaction("installing the trigger", &sql)?;
        Ok(vec![format!(
            "flow `{flow}`: trigger {channel} on {} notifies channel {channel} ({})",
            self.spec.table.as_deref().unwrap_or_default(),
            self.place
        )])
    }

    /// Removes the trigger and function [`PgSource::setup`] installs (if there).
    pub(crate) fn teardown(&self, flow: &str) -> Result<Vec<String>, EngineError> {
        if !self.spec.notify {
            return Ok(Vec::new());
        }
        let (channel, function, table) = self.trigger_names(flow)?;
        let sql = format!(
            "DROP TRIGGER IF EXISTS {} ON {table}; DROP FUNCTION IF EXISTS {function}();",
            ident(&channel)
        );
        self.execute_in_transaction("removing the trigger", &sql)?;
        Ok(vec![format!(
            "flow `{flow}`: trigger {channel} removed from {} ({})",
            self.spec.table.as_deref().unwrap_or_default(),
            self.place
        )])
    }
}

impl RecentChanges for PgSource {
    fn describe(&self) -> String {
        format!("postgres {} {}", self.place, self.what())
    }

    fn changes_since(&self, mark: Option<&str>, limit: usize) -> Result<ChangePage, EngineError> {
        let ord = self.ordinal()?;
        let (select, layout) = self.content_select(ord);
        let ord_col = Self::col(&self.spec.ordinal_column);
        let keys = self.key_order();
        let n = layout.keys;
        let after = match mark {
            None => None,
            Some(m) => {
                let bad = || {
                    EngineError::Source(format!(
                        "mark `{m}` is not a mark of this source (ORDINAL/KEY with {n} key column(s)); reset the flow to read it from the start"
                    ))
                };
                let (o, key) = m.split_once('/').ok_or_else(bad)?;
                let o: i64 = o.parse().map_err(|_| bad())?;
                Some((o, key_values(key, n).ok_or_else(bad)?))
            }
        };
        let filter = match &after {
            None => String::new(),
            Some(_) => {
                let b = ord.bound("$1");
                let params: Vec<String> = (2..=n + 1)
                    .map(|i| format!("${i}::text COLLATE \"C\""))
                    .collect();
                format!(
                    " AND {ord_col} >= {b} AND ({ord_col} > {b} OR ({}) > ({}))",
                    keys.join(", "),
                    params.join(", ")
                )
            }
        };
        let sql = format!(
            "SELECT {select} FROM {} WHERE {ord_col} IS NOT NULL{filter} ORDER BY {ord_col}, {} LIMIT {}",
            self.from(),
            keys.join(", "),
            limit.max(1)
        );
        let rows = self.with_client("reading recent changes", |c| {
            let mut args: Vec<&(dyn ToSql + Sync)> = Vec::new();
            if let Some((o, values)) = &after {
                args.push(o);
                args.extend(values.iter().map(|v| v as &(dyn ToSql + Sync)));
            }
            c.query(&sql, &args)
        })?;
        let mut changes = Vec::with_capacity(rows.len());
        let mut last = None;
        for row in &rows {
            let (change, ordinal, values) = self.change_of(row, &layout);
            if let Some(o) = ordinal {
                last = Some((o, values));
            }
            changes.push(change);
        }
        let mark = last.map(|(o, values)| {
            let refs: Vec<&str> = values.iter().map(String::as_str).collect();
            format!("{o}/{}", item_key(&refs))
        });
        Ok(ChangePage {
            more: rows.len() >= limit.max(1),
            changes,
            mark,
        })
    }
}

/// A listening connection without notifications is checked this often.
const LISTEN_CHECK: Duration = Duration::from_secs(5);

/// A connection listening on a flow's channel.
struct Listener {
    client: Client,
    channel: String,
    /// When the connection last proved alive.
    checked: Instant,
}

/// What a batch of notifications asks for.
#[derive(Debug, Default)]
struct Notified {
    /// Keys of deleted rows.
    deleted: BTreeSet<String>,
    /// A delete without its key: scan the keys.
    rescan: bool,
}

impl Listener {
    /// Waits up to `wait` for a notification, then gathers more until none came for
    /// `quiet` or `max_delay` passed since the first. `Ok(None)`: nothing came. An error
    /// says the connection is lost (a quiet connection is checked every
    /// [`LISTEN_CHECK`], so that a server that went away is noticed).
    fn next_batch(
        &mut self,
        wait: Duration,
        quiet: Duration,
        max_delay: Duration,
        key_columns: usize,
    ) -> Result<Option<Notified>, String> {
        let first = {
            let mut notes = self.client.notifications();
            let mut it = notes.timeout_iter(wait);
            postgres::fallible_iterator::FallibleIterator::next(&mut it)
                .map_err(|e| pg_error(&e))?
        };
        let Some(first) = first else {
            if self.client.is_closed() {
                return Err("the connection is closed".into());
            }
            if self.checked.elapsed() >= LISTEN_CHECK {
                self.client
                    .is_valid(Duration::from_secs(5))
                    .map_err(|e| pg_error(&e))?;
                self.checked = Instant::now();
            }
            return Ok(None);
        };
        self.checked = Instant::now();
        let mut notes = self.client.notifications();
        let mut batch = Notified::default();
        read_payload(first.payload(), key_columns, &mut batch);
        let started = Instant::now();
        loop {
            let left = max_delay.saturating_sub(started.elapsed());
            if left.is_zero() {
                break;
            }
            let mut it = notes.timeout_iter(quiet.min(left));
            match postgres::fallible_iterator::FallibleIterator::next(&mut it)
                .map_err(|e| pg_error(&e))?
            {
                Some(n) => read_payload(n.payload(), key_columns, &mut batch),
                None => break,
            }
        }
        Ok(Some(batch))
    }
}

/// Reads one notification's payload into a batch.
fn read_payload(payload: &str, key_columns: usize, batch: &mut Notified) {
    #[derive(serde::Deserialize)]
    struct Payload {
        op: String,
        #[serde(default)]
        key: Option<Vec<Option<String>>>,
    }
    let Ok(p) = serde_json::from_str::<Payload>(payload) else {
        tracing::warn!("unreadable notification payload `{payload}`; scanning the keys");
        batch.rescan = true;
        return;
    };
    if p.op != "DELETE" {
        return;
    }
    let values: Option<Vec<String>> = p.key.and_then(|k| k.into_iter().collect());
    match values {
        Some(v) if v.len() == key_columns => {
            let refs: Vec<&str> = v.iter().map(String::as_str).collect();
            batch.deleted.insert(item_key(&refs));
        }
        _ => batch.rescan = true,
    }
}

impl Engine {
    /// A run of a PostgreSQL-source flow: the recent changes after its mark, then a scan of
    /// the keys for deletions and rows the mark missed.
    pub(crate) fn run_postgres(
        &self,
        spec: &FlowSpec,
        source: &PgSource,
        opts: &RunOptions<'_>,
    ) -> Result<RunSummary, EngineError> {
        let started = Instant::now();
        crate::run::check_steps(spec)?;
        let _lock = self.lock(&spec.name)?;
        let started_ms = now_ms();
        let flow = self.register_or_record(spec, opts.trigger, started_ms)?;
        let summary = self.recorded(flow, opts.trigger, started_ms, || {
            // Items whose looked-up keys changed are requeued; the key scan reads them again.
            let issues = self.sync_inputs(flow, spec)?;
            let ctx = self.ctx(flow, spec, opts.progress, None)?;
            ctx.tally().issues(&issues);
            let synced = self.sync_pages(&ctx, source)?;
            self.cancelled(opts)?;
            self.key_scan(&ctx, source, &synced)?;
            self.store().memo_gc(flow)?;
            ctx.into_summary(started)
        })?;
        if let Some(c) = spec.target.collection() {
            self.after_write(c);
        }
        Ok(summary)
    }

    /// A stop asked for through `opts.cancel`, as an error.
    fn cancelled(&self, opts: &RunOptions<'_>) -> Result<(), EngineError> {
        if opts
            .cancel
            .is_some_and(|c| c.load(std::sync::atomic::Ordering::Relaxed))
        {
            return Err(EngineError::Cancelled(
                "stopped before the end: the next run does the rest".into(),
            ));
        }
        Ok(())
    }

    /// Compares every row's key and ordinal with the flow's items: items whose rows are gone
    /// (or soft-deleted) are deleted like the files a traversal did not see
    /// (`deleteQueueItems`); rows whose ordinal differs from the indexed version, or whose
    /// item failed, are read again — unless this run's sync read them (`synced`).
    fn key_scan(
        &self,
        ctx: &Ctx<'_>,
        source: &PgSource,
        synced: &HashSet<String>,
    ) -> Result<(), EngineError> {
        let store = self.store().as_ref();
        let rows = source.scan_keys()?;
        let stored = store.items(ctx.flow)?;
        let present: HashMap<&str, &ScannedRow> =
            rows.iter().map(|r| (r.key.as_str(), r)).collect();
        let mut gone = Vec::new();
        let mut indexed: HashMap<&str, (Option<&Vec<u8>>, ItemStatus)> = HashMap::new();
        for item in &stored {
            match present.get(item.key.as_str()) {
                Some(row) if !row.deleted => {
                    indexed.insert(item.key.as_str(), (item.version.as_ref(), item.status));
                }
                _ => gone.push(Work::Gone {
                    key: item.key.clone(),
                    existed: true,
                    // Deleted only if nothing moved it since it was listed.
                    if_queue: (!item.queue.is_empty()).then(|| item.queue.clone()),
                    version: None,
                    warning: None,
                }),
            }
        }
        while !gone.is_empty() {
            let rest = gone.split_off(gone.len().min(FETCH_BATCH));
            ctx.process(std::mem::replace(&mut gone, rest))?;
        }
        // Rows to read again: not indexed, indexed at another ordinal, or failed.
        let mut again: Vec<String> = Vec::new();
        let mut retry: BTreeSet<String> = BTreeSet::new();
        for row in rows
            .iter()
            .filter(|r| !r.deleted && !synced.contains(&r.key))
        {
            let version = row.ordinal.map(ordinal_version);
            match indexed.get(row.key.as_str()) {
                None => again.push(row.key.clone()),
                Some((v, _)) if v.cloned() != version => again.push(row.key.clone()),
                Some((_, ItemStatus::Error | ItemStatus::Modified | ItemStatus::NewItem)) => {
                    // Failed, or requeued (a reset, a looked-up item that changed): the same
                    // version would be refused as stale, so it is read again unversioned.
                    retry.insert(row.key.clone());
                    again.push(row.key.clone());
                }
                Some(_) => {}
            }
        }
        for part in again.chunks(FETCH_BATCH) {
            let mut changes = source.fetch(part)?;
            for c in &mut changes {
                if retry.contains(&c.key) {
                    c.version = None;
                }
            }
            self.apply_changes(ctx, changes)?;
        }
        Ok(())
    }

    /// The rows of a live batch: the deleted keys the notifications named, then the recent
    /// changes. Recorded as a `live` run.
    fn postgres_batch(
        &self,
        spec: &FlowSpec,
        source: &PgSource,
        deleted: &BTreeSet<String>,
        opts: &RunOptions<'_>,
    ) -> Result<RunSummary, EngineError> {
        let started = Instant::now();
        let _lock = self.lock(&spec.name)?;
        let flow = self.register(spec)?;
        let summary = self.recorded(flow, Trigger::Live, now_ms(), || {
            let ctx = self.ctx(flow, spec, opts.progress, None)?;
            let store = self.store().as_ref();
            let mut work = Vec::new();
            for key in deleted {
                if store.get(flow, key)?.is_some() {
                    work.push(Work::Gone {
                        key: key.clone(),
                        existed: true,
                        if_queue: None,
                        version: None,
                        warning: None,
                    });
                }
            }
            if !work.is_empty() {
                ctx.process(work)?;
            }
            // Deletes first: a row deleted and inserted again since is read back here.
            self.sync_pages(&ctx, source)?;
            ctx.into_summary(started)
        })?;
        if let Some(c) = spec.target.collection() {
            self.after_write(c);
        }
        Ok(summary)
    }

    /// Whether the source has changes after the flow's mark (a cheap look before a sync
    /// that would be recorded in the history).
    fn has_changes(&self, spec: &FlowSpec, source: &PgSource) -> Result<bool, EngineError> {
        let mark = match self.store().flow(&spec.name)? {
            Some(rec) => self.store().change_mark(rec.id)?,
            None => None,
        };
        Ok(!source.changes_since(mark.as_deref(), 1)?.changes.is_empty())
    }

    /// Live mode of a PostgreSQL-source flow (see [`Engine::watch`]): a full run, then a sync
    /// per batch of notifications (or per poll without `notify`), a full run every
    /// `refresh_interval` and on request.
    pub(crate) fn watch_postgres(
        &self,
        spec: &FlowSpec,
        pg: &PostgresSource,
        opts: &RunOptions<'_>,
        live: &LiveOptions,
        control: &LiveControl,
        report: &mut dyn FnMut(LiveEvent),
    ) -> Result<(), EngineError> {
        let spec = &self.effective(spec)?;
        let source = PgSource::new(pg)?;
        let keys = pg.key_columns.len();
        // Listening before the first run, so that no change during it is missed.
        let mut listener = if pg.notify {
            Some(source.listen(&spec.name)?)
        } else {
            None
        };
        report(LiveEvent::Full(self.run_postgres(spec, &source, opts)?));
        let mut last_full = Instant::now();
        let mut last_poll = Instant::now();
        let manual = RunOptions {
            trigger: Trigger::Manual,
            ..*opts
        };
        let none = BTreeSet::new();
        while !control.is_stopped() {
            if let Some(reply) = control.take_request() {
                let result = self.run_postgres(spec, &source, &manual);
                if let Ok(summary) = &result {
                    report(LiveEvent::Full(summary.clone()));
                    last_full = Instant::now();
                }
                let _ = reply.send(result);
                continue;
            }
            if live
                .refresh_interval
                .is_some_and(|every| last_full.elapsed() >= every)
            {
                report(LiveEvent::Full(self.run_postgres(spec, &source, opts)?));
                last_full = Instant::now();
                continue;
            }
            match &mut listener {
                Some(l) => {
                    let batch =
                        l.next_batch(Duration::from_millis(200), live.quiet, live.max_delay, keys);
                    match batch {
                        Ok(None) => {}
                        Ok(Some(b)) if b.rescan => {
                            report(LiveEvent::Full(self.run_postgres(spec, &source, opts)?));
                            last_full = Instant::now();
                        }
                        Ok(Some(b)) => {
                            report(LiveEvent::Batch(
                                self.postgres_batch(spec, &source, &b.deleted, opts)?,
                            ));
                        }
                        Err(e) => {
                            tracing::warn!(
                                flow = spec.name,
                                channel = l.channel,
                                "listening connection lost ({e}); listening again"
                            );
                            std::thread::sleep(RECONNECT_PAUSE);
                            *l = source.listen(&spec.name)?;
                            // Notifications sent meanwhile are lost: a full run catches up.
                            report(LiveEvent::Full(self.run_postgres(spec, &source, opts)?));
                            last_full = Instant::now();
                        }
                    }
                }
                None => {
                    if last_poll.elapsed() < live.poll_interval {
                        std::thread::sleep(Duration::from_millis(100));
                        continue;
                    }
                    last_poll = Instant::now();
                    if self.has_changes(spec, &source)? {
                        report(LiveEvent::Batch(
                            self.postgres_batch(spec, &source, &none, opts)?,
                        ));
                    }
                }
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn versions_sort_like_ordinals() {
        let mut values = [i64::MIN, -5, -1, 0, 1, 7, 1 << 40, i64::MAX];
        values.sort_unstable();
        let versions: Vec<Vec<u8>> = values.iter().map(|v| ordinal_version(*v)).collect();
        let mut sorted = versions.clone();
        sorted.sort();
        assert_eq!(versions, sorted);
    }

    #[test]
    fn keys_of_several_columns_escape_and_split_back() {
        assert_eq!(item_key(&["a/b%c"]), "a/b%c");
        let k = item_key(&["a/b", "50%", ""]);
        assert_eq!(k, "a%2Fb/50%25/");
        assert_eq!(
            key_values(&k, 3),
            Some(vec!["a/b".to_string(), "50%".to_string(), String::new()])
        );
        assert_eq!(key_values("a/b", 3), None);
        assert_eq!(key_values("a/b", 1), Some(vec!["a/b".to_string()]));
    }

    #[test]
    fn channel_names_are_identifiers_of_at_most_63_bytes() {
        assert_eq!(channel_name("docs"), "freshindex_docs");
        let odd = channel_name("My-Docs.v2");
        assert!(odd.starts_with("freshindex_my_docs_v2_"), "{odd}");
        assert_ne!(channel_name("a-b"), channel_name("a_b"));
        let long = channel_name(&"x".repeat(100));
        assert!(long.len() <= 63, "{long}");
        assert!(
            long.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
        );
    }

    #[test]
    fn payloads_name_deleted_keys_or_ask_for_a_scan() {
        let mut b = Notified::default();
        read_payload(r#"{"op":"INSERT","key":["1"]}"#, 1, &mut b);
        read_payload(r#"{"op":"DELETE","key":["a","b/c"]}"#, 2, &mut b);
        assert_eq!(b.deleted.iter().collect::<Vec<_>>(), ["a/b%2Fc"]);
        assert!(!b.rescan);
        read_payload(r#"{"op":"DELETE"}"#, 2, &mut b);
        assert!(b.rescan);
    }
}
