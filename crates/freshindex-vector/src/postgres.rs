//! A PostgreSQL table as a flow's target.
//!
//! One row per chunk: `key TEXT PRIMARY KEY, source_key TEXT NOT NULL, text TEXT, payload
//! JSONB, vector real[] | vector(DIM)`, indexed on `source_key`. [`PgTable`] keeps the
//! [`VectorCollection`] contract: `apply` is one transaction (deletes by key, then upserts
//! `ON CONFLICT (key) DO UPDATE`), so it is atomic and idempotent like a collection's.
//! `payload` holds what the other columns do not: `{"range": [start, end]}` and, for pushed
//! items, `"metadata"`.
//!
//! The vector column is pgvector's `vector(DIM)` when the extension is installed (searched by
//! the database, `ORDER BY vector <=> $1`), else `real[]` with a `CHECK` on its length (rows
//! are streamed and scored here, by the same function as a collection's exact search). Both
//! give the cosine similarity as the score. The dimension of a `real[]` column is read back
//! from that check (named `vector_dimension`), or from a row when a table was made without it.
//!
//! One connection per handle, behind a mutex, opened on first use. A call that meets a closed
//! connection (a restarted server, a network cut) reconnects after a short pause and is made
//! once more: every call is safe to repeat — `apply` is idempotent, reads are reads, and a
//! `scan` is repeated only when it had visited no row yet. TLS is not supported (loopback and
//! private networks).

use std::sync::{Mutex, MutexGuard};
use std::time::Duration;

use postgres::fallible_iterator::FallibleIterator;
use postgres::types::ToSql;
use postgres::{Client, NoTls};

use freshindex_core::PgVectorType;

use crate::{
    Filter, Metric, Result, Row, RowPayload, SearchHit, VectorCollection, VectorError, exact_score,
};

/// Rows per `INSERT` statement (5 parameters each; PostgreSQL takes at most 65535).
const ROWS_PER_STATEMENT: usize = 500;

/// The name of the `CHECK` that holds a `real[]` column's dimension.
const DIMENSION_CHECK: &str = "vector_dimension";

/// The type of a table's `vector` column.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum VectorColumn {
    /// `real[]`: searched here.
    Real,
    /// pgvector's `vector(DIM)`: searched by the database.
    PgVector,
}

impl VectorColumn {
    fn sql_type(self, dimension: usize) -> String {
        match self {
            VectorColumn::Real => "real[]".into(),
            VectorColumn::PgVector => format!("vector({dimension})"),
        }
    }
}

/// What [`PgTable::ensure`] found or did.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Ensured {
    /// Whether the table was created now.
    pub created: bool,
    /// The type of its `vector` column.
    pub column: VectorColumn,
    /// Its dimension.
    pub dimension: usize,
}

/// The shape of an existing table, as the catalog shows it.
#[derive(Clone, Copy, Debug)]
struct Shape {
    column: VectorColumn,
    /// `None`: a `real[]` column without the check and without rows.
    dimension: Option<usize>,
}

/// A failure inside a call: a database error (repeated once after reconnecting when the
/// connection was lost) or one that ends the call as it is.
enum Fail {
    Pg(postgres::Error),
    Final(VectorError),
}

impl From<postgres::Error> for Fail {
    fn from(e: postgres::Error) -> Fail {
        Fail::Pg(e)
    }
}

/// A PostgreSQL table that a flow writes its rows to.
pub struct PgTable {
    table: String,
    /// `"schema"."table"` or `"table"`.
    quoted: String,
    /// `host:port/dbname`, for messages (never the password).
    endpoint: String,
    config: postgres::Config,
    client: Mutex<Option<Client>>,
    shape: Mutex<Option<Shape>>,
}

impl std::fmt::Debug for PgTable {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PgTable")
            .field("table", &self.table)
            .field("endpoint", &self.endpoint)
            .finish_non_exhaustive()
    }
}

/// Quotes a checked name part (`a-z 0-9 _`): quoting keeps reserved words usable.
fn quote(part: &str) -> String {
    format!("\"{}\"", part.replace('"', "\"\""))
}

impl PgTable {
    /// A handle on `table` of the database at `url`. Checks the name and the connection
    /// string; connects on first use.
    pub fn new(url: &str, table: &str) -> Result<PgTable> {
        freshindex_core::spec::check_pg_table(table).map_err(|m| VectorError::Postgres {
            table: table.into(),
            endpoint: "?".into(),
            user: true,
            message: format!("table: {m}"),
        })?;
        let mut config: postgres::Config = url.parse().map_err(|e| VectorError::Postgres {
            table: table.into(),
            endpoint: "?".into(),
            user: true,
            message: format!("url: not a PostgreSQL connection string: {}", describe(&e)),
        })?;
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        let host = match config.get_hosts().first() {
            Some(postgres::config::Host::Tcp(h)) => h.clone(),
            Some(postgres::config::Host::Unix(p)) => p.display().to_string(),
            None => "localhost".into(),
        };
        let port = config.get_ports().first().copied().unwrap_or(5432);
        let db = config
            .get_dbname()
            .or(config.get_user())
            .unwrap_or("postgres");
        let endpoint = format!("{host}:{port}/{db}");
        let quoted = table.split('.').map(quote).collect::<Vec<_>>().join(".");
        Ok(PgTable {
            table: table.into(),
            quoted,
            endpoint,
            config,
            client: Mutex::new(None),
            shape: Mutex::new(None),
        })
    }

    /// The table's name as configured.
    pub fn table(&self) -> &str {
        &self.table
    }

    /// `host:port/dbname`.
    pub fn endpoint(&self) -> &str {
        &self.endpoint
    }

    /// The database or the connection failed.
    fn err(&self, message: String) -> VectorError {
        VectorError::Postgres {
            table: self.table.clone(),
            endpoint: self.endpoint.clone(),
            user: false,
            message,
        }
    }

    /// The table does not fit the flow (its shape, its dimension, missing): the user fixes it.
    fn shape_err(&self, message: String) -> VectorError {
        VectorError::Postgres {
            table: self.table.clone(),
            endpoint: self.endpoint.clone(),
            user: true,
            message,
        }
    }

    fn pg_err(&self, doing: &str, e: &postgres::Error) -> VectorError {
        let message = match e.as_db_error() {
            Some(db) => format!("{doing}: {} ({})", db.message(), db.code().code()),
            None => format!("{doing}: {}", describe(e)),
        };
        self.err(message)
    }

    fn shape_slot(&self) -> MutexGuard<'_, Option<Shape>> {
        self.shape.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Runs `f` on the connection (opened if needed). When the connection turns out closed,
    /// reconnects after a short pause and runs `f` once more.
    fn call<T>(
        &self,
        doing: &str,
        mut f: impl FnMut(&mut Client) -> std::result::Result<T, Fail>,
    ) -> Result<T> {
        let mut slot = self.client.lock().unwrap_or_else(|p| p.into_inner());
        let mut attempt = 0;
        loop {
            attempt += 1;
            if slot.as_ref().is_none_or(Client::is_closed) {
                *slot = None;
                let client = self.config.connect(NoTls).map_err(|e| {
                    self.err(format!("cannot connect (while {doing}): {}", describe(&e)))
                })?;
                *slot = Some(client);
            }
            let Some(client) = slot.as_mut() else {
                return Err(self.err(format!("{doing}: no connection")));
            };
            match f(client) {
                Ok(v) => return Ok(v),
                Err(Fail::Final(e)) => return Err(e),
                Err(Fail::Pg(e)) => {
                    if e.code() == Some(&postgres::error::SqlState::UNDEFINED_TABLE) {
                        // Dropped under this handle: the next `ensure` creates it again.
                        *self.shape_slot() = None;
                    }
                    let lost = client.is_closed() || connection_lost(&e);
                    if lost {
                        *slot = None;
                    }
                    if lost && attempt == 1 {
                        std::thread::sleep(Duration::from_millis(250));
                        continue;
                    }
                    return Err(self.pg_err(doing, &e));
                }
            }
        }
    }

    /// Whether pgvector is installed in the database.
    pub fn has_pgvector(&self) -> Result<bool> {
        self.call("checking for pgvector", |c| {
            Ok(
                c.query_opt("SELECT 1 FROM pg_extension WHERE extname = 'vector'", &[])?
                    .is_some(),
            )
        })
    }

    /// Reads the table's shape from the catalog (`None`: no such table). A column missing or
    /// of another type is an error naming it.
    fn inspect(&self) -> Result<Option<Shape>> {
        let quoted = self.quoted.clone();
        let found = self.call("reading the table's columns", |c| {
            let exists: bool = c
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&quoted])?
                .get(0);
            if !exists {
                return Ok(None);
            }
            let columns: Vec<(String, String, bool)> = c
                .query(
                    "SELECT a.attname::text, format_type(a.atttypid, a.atttypmod), a.attnotnull \
                     FROM pg_attribute a WHERE a.attrelid = to_regclass($1) AND a.attnum > 0 \
                     AND NOT a.attisdropped ORDER BY a.attnum",
                    &[&quoted],
                )?
                .iter()
                .map(|r| (r.get(0), r.get(1), r.get(2)))
                .collect();
            let key_unique: bool = c
                .query_one(
                    "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a \
                     ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] \
                     WHERE i.indrelid = to_regclass($1) AND i.indisunique AND i.indnatts = 1 \
                     AND a.attname = 'key')",
                    &[&quoted],
                )?
                .get(0);
            let check: Option<String> = c
                .query_opt(
                    "SELECT pg_get_constraintdef(oid) FROM pg_constraint \
                     WHERE conrelid = to_regclass($1) AND contype = 'c' AND conname = $2",
                    &[&quoted, &DIMENSION_CHECK],
                )?
                .map(|r| r.get(0));
            Ok(Some((columns, key_unique, check)))
        })?;
        let Some((columns, key_unique, check)) = found else {
            return Ok(None);
        };
        let type_of = |name: &str| {
            columns
                .iter()
                .find(|(n, _, _)| n == name)
                .map(|(_, t, nn)| (t.as_str(), *nn))
        };
        for (name, want) in [
            ("key", "text"),
            ("source_key", "text"),
            ("text", "text"),
            ("payload", "jsonb"),
        ] {
            match type_of(name) {
                None => {
                    return Err(self.shape_err(format!(
                        "column `{name}` is missing (expected `{name} {want}`); drop the table (`freshindex drop`) or fix it"
                    )));
                }
                Some((t, _)) if t != want => {
                    return Err(self.shape_err(format!(
                        "column `{name}` has type `{t}` where `{want}` is expected"
                    )));
                }
                Some(_) => {}
            }
        }
        if !key_unique {
            return Err(self.shape_err(
                "column `key` is not the primary key (nor alone in a unique index); upserts need it"
                    .into(),
            ));
        }
        let shape = match type_of("vector") {
            None => {
                return Err(self.shape_err(
                    "column `vector` is missing (expected `vector real[]` or `vector vector(DIM)`)"
                        .into(),
                ));
            }
            Some(("real[]", _)) => {
                let mut dimension = check.as_deref().and_then(dimension_in_check);
                if dimension.is_none() {
                    let q = format!(
                        "SELECT array_length(\"vector\", 1) FROM {} WHERE \"vector\" IS NOT NULL LIMIT 1",
                        self.quoted
                    );
                    dimension = self
                        .call("reading a row's dimension", |c| {
                            Ok(c.query_opt(q.as_str(), &[])?
                                .and_then(|r| r.get::<_, Option<i32>>(0)))
                        })?
                        .map(|d| d.max(0) as usize);
                }
                Shape {
                    column: VectorColumn::Real,
                    dimension,
                }
            }
            Some((t, _)) => match t
                .strip_prefix("vector(")
                .and_then(|r| r.strip_suffix(')'))
                .and_then(|d| d.parse::<usize>().ok())
            {
                Some(d) => Shape {
                    column: VectorColumn::PgVector,
                    dimension: Some(d),
                },
                None => {
                    return Err(self.shape_err(format!(
                        "column `vector` has type `{t}` where `real[]` or `vector(DIM)` is expected"
                    )));
                }
            },
        };
        Ok(Some(shape))
    }

    /// Reads the table's shape; `false` when the table does not exist.
    pub fn exists(&self) -> Result<bool> {
        let shape = self.inspect()?;
        let found = shape.is_some();
        *self.shape_slot() = shape;
        Ok(found)
    }

    /// Makes sure the table exists with vectors of `dimension`: creates it (with the column
    /// type `want` decides: `Auto` takes pgvector when it is installed) and its `source_key`
    /// index, or checks the one that exists — another dimension, or another column type than
    /// an explicit `want`, is an error naming the column and both values.
    pub fn ensure(&self, dimension: usize, want: PgVectorType) -> Result<Ensured> {
        let mut created = false;
        let shape = match self.inspect()? {
            Some(s) => s,
            None => {
                let column = match want {
                    PgVectorType::Real => VectorColumn::Real,
                    PgVectorType::Vector => VectorColumn::PgVector,
                    PgVectorType::Auto if self.has_pgvector()? => VectorColumn::PgVector,
                    PgVectorType::Auto => VectorColumn::Real,
                };
                created = self.create(column, dimension)?;
                self.inspect()?
                    .ok_or_else(|| self.err("created, then not found".into()))?
            }
        };
        let found_type = shape.column.sql_type(shape.dimension.unwrap_or(dimension));
        match (want, shape.column) {
            (PgVectorType::Real, VectorColumn::PgVector)
            | (PgVectorType::Vector, VectorColumn::Real) => {
                return Err(self.shape_err(format!(
                    "column `vector` has type `{found_type}` where the flow's vector_type asks for `{}`; drop the table (`freshindex drop`) or set vector_type = \"auto\"",
                    match want {
                        PgVectorType::Vector => "vector",
                        PgVectorType::Real | PgVectorType::Auto => "real[]",
                    }
                )));
            }
            _ => {}
        }
        if let Some(d) = shape.dimension
            && d != dimension
        {
            return Err(self.shape_err(format!(
                "column `vector` holds vectors of dimension {d} and the flow's model makes dimension {dimension}; drop the table (`freshindex drop`) and set it up again, or use another table"
            )));
        }
        let shape = Shape {
            column: shape.column,
            dimension: Some(dimension),
        };
        *self.shape_slot() = Some(shape);
        Ok(Ensured {
            created,
            column: shape.column,
            dimension,
        })
    }

    /// [`ensure`](Self::ensure) once per handle: when this handle already checked the table
    /// for `dimension`, nothing is asked of the database (a table dropped since is created
    /// again by the next `ensure` after a write finds it missing).
    pub fn ensure_checked(&self, dimension: usize, want: PgVectorType) -> Result<Ensured> {
        if let Some(shape) = *self.shape_slot()
            && shape.dimension == Some(dimension)
        {
            return Ok(Ensured {
                created: false,
                column: shape.column,
                dimension,
            });
        }
        self.ensure(dimension, want)
    }

    /// `CREATE TABLE IF NOT EXISTS` and its index, in one transaction. Returns whether this
    /// call created it.
    fn create(&self, column: VectorColumn, dimension: usize) -> Result<bool> {
        let vector = match column {
            VectorColumn::Real => format!(
                "\"vector\" real[] CONSTRAINT {DIMENSION_CHECK} CHECK (array_length(\"vector\", 1) = {dimension})"
            ),
            VectorColumn::PgVector => format!("\"vector\" vector({dimension})"),
        };
        let bare = self.table.rsplit('.').next().unwrap_or(&self.table);
        let mut index = format!("{bare}_source_key_idx");
        if index.len() > 63 {
            // Names are ASCII: cutting at a byte is cutting at a character.
            index = format!(
                "{}_sk_{}",
                &bare[..48],
                &blake3::hash(bare.as_bytes()).to_hex()[..8]
            );
        }
        let sql = format!(
            "CREATE TABLE IF NOT EXISTS {q} (\"key\" TEXT PRIMARY KEY, \"source_key\" TEXT NOT NULL, \
             \"text\" TEXT, \"payload\" JSONB, {vector});\n\
             CREATE INDEX IF NOT EXISTS {idx} ON {q} (\"source_key\");",
            q = self.quoted,
            idx = quote(&index),
        );
        let quoted = self.quoted.clone();
        self.call("creating the table", |c| {
            let mut tx = c.transaction()?;
            let existed: bool = tx
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&quoted])?
                .get(0);
            tx.batch_execute(&sql)?;
            tx.commit()?;
            Ok(!existed)
        })
    }

    /// `DROP TABLE IF EXISTS`. Returns whether the table existed.
    pub fn drop_table(&self) -> Result<bool> {
        let quoted = self.quoted.clone();
        let sql = format!("DROP TABLE IF EXISTS {}", self.quoted);
        let existed = self.call("dropping the table", |c| {
            let mut tx = c.transaction()?;
            let existed: bool = tx
                .query_one("SELECT to_regclass($1) IS NOT NULL", &[&quoted])?
                .get(0);
            tx.batch_execute(&sql)?;
            tx.commit()?;
            Ok(existed)
        })?;
        *self.shape_slot() = None;
        Ok(existed)
    }

    /// The shape, read from the catalog when this handle has not seen it yet.
    fn known_shape(&self) -> Result<Shape> {
        if let Some(s) = *self.shape_slot() {
            return Ok(s);
        }
        match self.inspect()? {
            Some(s) => {
                *self.shape_slot() = Some(s);
                Ok(s)
            }
            None => Err(self.shape_err(
                "the table does not exist; `freshindex setup` or a run of the flow creates it"
                    .into(),
            )),
        }
    }

    /// The vector parameter and its placeholder for the column type.
    fn vector_param(column: VectorColumn, v: &[f32]) -> Box<dyn ToSql + Sync> {
        match column {
            VectorColumn::Real => Box::new(v.to_vec()),
            VectorColumn::PgVector => Box::new(pgvector_text(v)),
        }
    }

    fn vector_placeholder(column: VectorColumn, n: usize) -> String {
        match column {
            VectorColumn::Real => format!("${n}::real[]"),
            VectorColumn::PgVector => format!("${n}::text::vector"),
        }
    }
}

/// The dimension in `CHECK ((array_length(vector, 1) = 384))`.
fn dimension_in_check(def: &str) -> Option<usize> {
    let (_, after) = def.rsplit_once('=')?;
    let digits: String = after
        .trim_start()
        .chars()
        .take_while(char::is_ascii_digit)
        .collect();
    digits.parse().ok()
}

/// pgvector's text form: `[1,2.5,-3]`.
fn pgvector_text(v: &[f32]) -> String {
    let mut s = String::with_capacity(v.len() * 10 + 2);
    s.push('[');
    for (i, x) in v.iter().enumerate() {
        if i > 0 {
            s.push(',');
        }
        s.push_str(&x.to_string());
    }
    s.push(']');
    s
}

/// An error with its causes (the driver's own message names only its kind), or the
/// server's message.
fn describe(e: &postgres::Error) -> String {
    match e.as_db_error() {
        Some(db) => db.message().to_string(),
        None => {
            let mut msg = e.to_string();
            let mut source = std::error::Error::source(e);
            while let Some(s) = source {
                msg = format!("{msg}: {s}");
                source = s.source();
            }
            msg
        }
    }
}

/// Whether an error means the connection is gone: closed, a broken socket, or the server
/// shutting down or refusing the session (SQLSTATE classes 08 and 57P).
fn connection_lost(e: &postgres::Error) -> bool {
    if e.is_closed() {
        return true;
    }
    match e.code() {
        Some(code) => {
            let c = code.code();
            c.starts_with("08") || c.starts_with("57P")
        }
        // No SQLSTATE: an I/O error of the socket rather than an answer of the server.
        None => e.as_db_error().is_none(),
    }
}

/// The `payload` column: what the other columns do not hold.
fn payload_json(p: &RowPayload) -> serde_json::Value {
    let mut obj = serde_json::Map::new();
    obj.insert("range".into(), serde_json::json!(p.range));
    if let Some(m) = &p.metadata {
        obj.insert("metadata".into(), m.clone());
    }
    serde_json::Value::Object(obj)
}

fn payload_from(
    source: String,
    text: Option<String>,
    json: Option<serde_json::Value>,
) -> RowPayload {
    let range = json
        .as_ref()
        .and_then(|j| j.get("range"))
        .and_then(|r| serde_json::from_value::<[usize; 2]>(r.clone()).ok())
        .unwrap_or([0, 0]);
    let metadata = json.and_then(|mut j| j.as_object_mut().and_then(|o| o.remove("metadata")));
    RowPayload {
        source,
        range,
        text: text.unwrap_or_default(),
        metadata,
    }
}

/// `WHERE` clause and parameter of a filter (parameter `$n`).
fn filter_sql(filter: Option<&Filter>, n: usize) -> (String, Option<String>) {
    match filter.and_then(|f| f.source_prefix.clone()) {
        Some(prefix) => (
            format!(" WHERE left(\"source_key\", length(${n})) = ${n}"),
            Some(prefix),
        ),
        None => (String::new(), None),
    }
}

impl VectorCollection for PgTable {
    fn name(&self) -> &str {
        &self.table
    }

    fn dimension(&self) -> usize {
        self.shape_slot().and_then(|s| s.dimension).unwrap_or(0)
    }

    fn apply(&self, upserts: &[Row], deletes: &[String]) -> Result<()> {
        if upserts.is_empty() && deletes.is_empty() {
            return Ok(());
        }
        let shape = self.known_shape()?;
        if let Some(d) = shape.dimension
            && let Some(r) = upserts.iter().find(|r| r.vector.len() != d)
        {
            return Err(self.shape_err(format!(
                "row `{}`: vector of dimension {} where column `vector` holds dimension {d}",
                r.key,
                r.vector.len()
            )));
        }
        // One row per key, the last one given (as a collection does): a statement cannot
        // update the same row twice.
        let mut last = std::collections::HashMap::with_capacity(upserts.len());
        for (i, r) in upserts.iter().enumerate() {
            last.insert(r.key.as_str(), i);
        }
        let rows: Vec<&Row> = upserts
            .iter()
            .enumerate()
            .filter(|(i, r)| last.get(r.key.as_str()) == Some(i))
            .map(|(_, r)| r)
            .collect();
        let mut statements: Vec<(String, Vec<Box<dyn ToSql + Sync>>)> = Vec::new();
        for chunk in rows.chunks(ROWS_PER_STATEMENT) {
            let mut sql = format!(
                "INSERT INTO {} (\"key\", \"source_key\", \"text\", \"payload\", \"vector\") VALUES ",
                self.quoted
            );
            let mut params: Vec<Box<dyn ToSql + Sync>> = Vec::with_capacity(chunk.len() * 5);
            for (i, r) in chunk.iter().enumerate() {
                let b = i * 5;
                if i > 0 {
                    sql.push(',');
                }
                sql.push_str(&format!(
                    "(${}, ${}, ${}, ${}, {})",
                    b + 1,
                    b + 2,
                    b + 3,
                    b + 4,
                    Self::vector_placeholder(shape.column, b + 5)
                ));
                params.push(Box::new(r.key.clone()));
                params.push(Box::new(r.payload.source.clone()));
                params.push(Box::new(r.payload.text.clone()));
                params.push(Box::new(payload_json(&r.payload)));
                params.push(Self::vector_param(shape.column, &r.vector));
            }
            sql.push_str(
                " ON CONFLICT (\"key\") DO UPDATE SET \"source_key\" = EXCLUDED.\"source_key\", \
                 \"text\" = EXCLUDED.\"text\", \"payload\" = EXCLUDED.\"payload\", \
                 \"vector\" = EXCLUDED.\"vector\"",
            );
            statements.push((sql, params));
        }
        let delete_sql = format!("DELETE FROM {} WHERE \"key\" = ANY($1)", self.quoted);
        self.call("writing rows", |c| {
            let mut tx = c.transaction()?;
            // Deletes first, then upserts: a key in both ends up written, as in a collection.
            if !deletes.is_empty() {
                tx.execute(delete_sql.as_str(), &[&deletes])?;
            }
            for (sql, params) in &statements {
                let refs: Vec<&(dyn ToSql + Sync)> = params.iter().map(|p| p.as_ref()).collect();
                tx.execute(sql.as_str(), &refs)?;
            }
            tx.commit()?;
            Ok(())
        })
    }

    fn search(&self, vector: &[f32], k: usize, filter: Option<&Filter>) -> Result<Vec<SearchHit>> {
        let shape = self.known_shape()?;
        if let Some(d) = shape.dimension
            && vector.len() != d
        {
            return Err(self.shape_err(format!(
                "query vector of dimension {} where column `vector` holds dimension {d}",
                vector.len()
            )));
        }
        if k == 0 {
            return Ok(Vec::new());
        }
        match shape.column {
            VectorColumn::PgVector => {
                let (filter_where, prefix) = filter_sql(filter, 3);
                let sql = format!(
                    "SELECT \"key\", \"source_key\", \"text\", \"payload\", \
                     (1 - (\"vector\" <=> $1::text::vector))::real FROM {}{filter_where} \
                     ORDER BY \"vector\" <=> $1::text::vector, \"key\" COLLATE \"C\" LIMIT $2",
                    self.quoted
                );
                let q = pgvector_text(vector);
                let limit = i64::try_from(k).unwrap_or(i64::MAX);
                self.call("searching", |c| {
                    let mut params: Vec<&(dyn ToSql + Sync)> = vec![&q, &limit];
                    if let Some(p) = &prefix {
                        params.push(p);
                    }
                    Ok(c.query(sql.as_str(), &params)?
                        .into_iter()
                        .map(|r| SearchHit {
                            key: r.get(0),
                            // pgvector's distance of a zero vector is NaN; a collection scores 0.
                            score: r
                                .get::<_, Option<f32>>(4)
                                .filter(|s| !s.is_nan())
                                .unwrap_or(0.0),
                            payload: payload_from(r.get(1), r.get(2), r.get(3)),
                        })
                        .collect())
                })
            }
            VectorColumn::Real => {
                let (filter_where, prefix) = filter_sql(filter, 1);
                let sql = format!(
                    "SELECT \"key\", \"source_key\", \"text\", \"payload\", \"vector\" FROM {}{filter_where}",
                    self.quoted
                );
                self.call("searching", |c| {
                    let params: Vec<&(dyn ToSql + Sync)> = match &prefix {
                        Some(p) => vec![p],
                        None => vec![],
                    };
                    let mut rows = c.query_raw(sql.as_str(), params)?;
                    // The best k so far, kept small: sorted and cut whenever it doubles.
                    let mut best: Vec<(f32, String, postgres::Row)> = Vec::new();
                    while let Some(r) = rows.next()? {
                        let v: Option<Vec<f32>> = r.get(4);
                        let Some(v) = v else { continue };
                        let score = exact_score(Metric::Cosine, vector, &v);
                        best.push((score, r.get(0), r));
                        if best.len() >= 2 * k.max(64) {
                            best.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
                            best.truncate(k);
                        }
                    }
                    best.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
                    best.truncate(k);
                    Ok(best
                        .into_iter()
                        .map(|(score, key, r)| SearchHit {
                            key,
                            score,
                            payload: payload_from(r.get(1), r.get(2), r.get(3)),
                        })
                        .collect())
                })
            }
        }
    }

    fn count(&self) -> Result<u64> {
        let sql = format!("SELECT count(*) FROM {}", self.quoted);
        self.call("counting rows", |c| {
            let n: i64 = c.query_one(sql.as_str(), &[])?.get(0);
            Ok(n.max(0) as u64)
        })
    }

    fn scan(&self, visit: &mut dyn FnMut(Row) -> Result<()>) -> Result<()> {
        let shape = self.known_shape()?;
        let vector = match shape.column {
            VectorColumn::Real => "\"vector\"",
            VectorColumn::PgVector => "\"vector\"::real[]",
        };
        let sql = format!(
            "SELECT \"key\", \"source_key\", \"text\", \"payload\", {vector} FROM {} ORDER BY \"key\" COLLATE \"C\"",
            self.quoted
        );
        let mut visited = 0u64;
        self.call("reading rows", |c| {
            let no_params: [&(dyn ToSql + Sync); 0] = [];
            let mut rows = c.query_raw(sql.as_str(), no_params)?;
            loop {
                let r = match rows.next() {
                    Ok(Some(r)) => r,
                    Ok(None) => return Ok(()),
                    // Rows were handed out: repeating would hand them out twice.
                    Err(e) if visited > 0 => {
                        return Err(Fail::Final(self.pg_err("reading rows", &e)));
                    }
                    Err(e) => return Err(Fail::Pg(e)),
                };
                let v: Option<Vec<f32>> = r.get(4);
                let row = Row {
                    key: r.get(0),
                    vector: v.unwrap_or_default(),
                    payload: payload_from(r.get(1), r.get(2), r.get(3)),
                };
                visited += 1;
                visit(row).map_err(Fail::Final)?;
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dimensions_are_read_from_the_check() {
        assert_eq!(
            dimension_in_check("CHECK ((array_length(vector, 1) = 384))"),
            Some(384)
        );
        assert_eq!(dimension_in_check("CHECK (true)"), None);
    }

    #[test]
    fn payloads_round_trip_through_the_columns() {
        let p = RowPayload {
            source: "a/b.md".into(),
            range: [3, 9],
            text: "hello".into(),
            metadata: Some(serde_json::json!({ "k": 1 })),
        };
        let back = payload_from(
            p.source.clone(),
            Some(p.text.clone()),
            Some(payload_json(&p)),
        );
        assert_eq!(back, p);
        assert_eq!(pgvector_text(&[1.0, -0.5]), "[1,-0.5]");
    }

    #[test]
    fn handles_refuse_bad_names_and_urls_and_hide_passwords() {
        let e = PgTable::new("postgres://u@h/d", "Bad").expect_err("upper case");
        assert!(e.to_string().contains("Bad"), "{e}");
        let e = PgTable::new("postgres://u@h:99999/d", "t").expect_err("bad port");
        assert!(e.to_string().contains("url"), "{e}");
        let t = PgTable::new("postgres://u:secret@db:6543/app", "s.t").expect("handle");
        assert_eq!(t.endpoint(), "db:6543/app");
        assert!(!format!("{t:?}").contains("secret"));
    }
}
