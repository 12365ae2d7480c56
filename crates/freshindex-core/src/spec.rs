//! The flow specification: one source, ordered steps, one target.
//!
//! The same serde shape is read from `freshindex.toml` (see [`crate::config`]) and, later, from
//! JSON over HTTP. Validation happens while deserializing (`try_from` on raw shapes), so the
//! TOML parser attaches the file position of the offending table to every error.

use std::fmt;
use std::path::PathBuf;

use serde::de::{DeserializeOwned, Error as _};
use serde::ser::SerializeMap;
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use crate::schedule::{Interval, Schedule, check_min};
use crate::template::Template;

/// Deserializes `T` from a JSON value, prefixing errors with the path of the offending field
/// (`steps[1]: chunk_size: invalid type ...`). Tagged tables are read through this, since
/// serde's internally tagged enums lose field names in their errors.
pub(crate) fn from_value<T: DeserializeOwned>(v: serde_json::Value) -> Result<T, String> {
    serde_path_to_error::deserialize(v).map_err(|e| {
        let path = e.path().to_string();
        let inner = e.into_inner().to_string();
        if path.is_empty() || path == "." {
            inner
        } else {
            format!("{path}: {inner}")
        }
    })
}

/// Reads a table and removes its tag field.
fn tagged<'de, D: Deserializer<'de>>(
    d: D,
    tag: &str,
) -> Result<(String, serde_json::Value), D::Error> {
    let mut v = serde_json::Value::deserialize(d)?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| D::Error::custom("expected a table"))?;
    let t = obj
        .remove(tag)
        .ok_or_else(|| D::Error::custom(format!("missing field `{tag}`")))?;
    let t = t
        .as_str()
        .ok_or_else(|| D::Error::custom(format!("{tag}: expected a string, got {t}")))?
        .to_string();
    Ok((t, v))
}

/// Default include patterns of a files source: text and Markdown.
pub const DEFAULT_INCLUDE: [&str; 4] = ["**/*.md", "**/*.markdown", "**/*.txt", "**/*.text"];

/// A declared pipeline.
#[derive(Clone, Debug, PartialEq, Serialize)]
pub struct FlowSpec {
    /// Unique name; also the default collection name.
    pub name: String,
    /// Where items come from.
    pub source: SourceSpec,
    /// What turns an item into rows: parse, split, embed, in that order (checked when the spec
    /// is built, which is why the field is private; read it with [`FlowSpec::steps`]).
    steps: Vec<StepSpec>,
    /// Where rows go.
    pub target: TargetSpec,
    /// A run fails when more items than this fail; -1 means no limit.
    pub max_failed_items: i64,
    /// When the flow runs by itself; `None` = on demand only. Batch mode only (checked when
    /// the spec is built; read it with [`FlowSpec::schedule`]).
    #[serde(skip_serializing_if = "Option::is_none")]
    schedule: Option<Schedule>,
    /// Paused: no scheduled runs (and, in live mode, no live updates or periodic refresh);
    /// manual runs still work.
    #[serde(skip_serializing_if = "is_false")]
    pub disabled: bool,
    /// Batch or live, with live mode's settings (written as the keys `mode` and
    /// `refresh_interval`; read it with [`FlowSpec::mode`]).
    #[serde(flatten)]
    mode: FlowMode,
}

fn is_false(b: &bool) -> bool {
    !*b
}

/// How a flow is kept fresh.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FlowMode {
    /// Runs start on a schedule or on demand; each run brings the target up to date.
    Batch,
    /// Continuous: changes are indexed as the source reports (pushes) them.
    Live {
        /// A periodic full scan besides the live updates, for changes the source did not
        /// report; `None` = none.
        refresh_interval: Option<Interval>,
    },
}

impl FlowMode {
    /// The name written in `mode`.
    pub fn as_str(&self) -> &'static str {
        match self {
            FlowMode::Batch => "batch",
            FlowMode::Live { .. } => "live",
        }
    }

    /// Whether the flow is live.
    pub fn is_live(&self) -> bool {
        match self {
            FlowMode::Batch => false,
            FlowMode::Live { .. } => true,
        }
    }

    /// Live mode's periodic full scan.
    pub fn refresh_interval(&self) -> Option<Interval> {
        match self {
            FlowMode::Batch => None,
            FlowMode::Live { refresh_interval } => *refresh_interval,
        }
    }
}

impl fmt::Display for FlowMode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Written flattened into the flow: `mode = "live"`, `refresh_interval = "PT1H"`.
impl Serialize for FlowMode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        let mut map = s.serialize_map(None)?;
        map.serialize_entry("mode", self.as_str())?;
        if let Some(r) = self.refresh_interval() {
            map.serialize_entry("refresh_interval", &r)?;
        }
        map.end()
    }
}

/// The values of `mode`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
enum ModeName {
    #[default]
    Batch,
    Live,
}

impl FlowSpec {
    /// A flow over `path` with the default steps and a collection named `name`.
    pub fn quick_start(name: &str, path: PathBuf) -> Result<FlowSpec, String> {
        FlowSpec::try_from(RawFlowSpec {
            name: name.to_string(),
            source: SourceSpec::Files(FilesSource::new(path)),
            steps: None,
            target: None,
            max_failed_items: -1,
            schedule: None,
            disabled: false,
            mode: ModeName::Batch,
            refresh_interval: None,
        })
    }

    /// The schedule, if the flow runs by itself.
    pub fn schedule(&self) -> Option<&Schedule> {
        self.schedule.as_ref()
    }

    /// Gives the flow a schedule (or none); refused for a live flow.
    pub fn set_schedule(&mut self, schedule: Option<Schedule>) -> Result<(), String> {
        check_mode(self.mode, schedule.as_ref())?;
        self.schedule = schedule;
        Ok(())
    }

    /// Batch or live.
    pub fn mode(&self) -> FlowMode {
        self.mode
    }

    /// Changes the mode; refused to live while the flow has a schedule.
    pub fn set_mode(&mut self, mode: FlowMode) -> Result<(), String> {
        check_mode(mode, self.schedule.as_ref())?;
        self.mode = mode;
        Ok(())
    }

    /// Checks the deployment's lower bound on intervals (`min_schedule_interval`) for
    /// `schedule.interval` and `refresh_interval`; the error names the field, the value and the
    /// minimum.
    pub fn check_min_interval(&self, min: Interval) -> Result<(), String> {
        if let Some(s) = &self.schedule {
            s.validate(min)?;
        }
        if let Some(r) = self.mode.refresh_interval() {
            check_min("refresh_interval", r, min)?;
        }
        Ok(())
    }

    /// The steps, in order.
    pub fn steps(&self) -> &[StepSpec] {
        &self.steps
    }

    /// The parse step.
    pub fn parse(&self) -> &ParseSpec {
        self.steps
            .iter()
            .find_map(|s| match s {
                StepSpec::Parse(p) => Some(p),
                _ => None,
            })
            .unwrap_or(&ParseSpec {})
    }

    /// The split step.
    pub fn split(&self) -> &SplitSpec {
        match &self.steps[self.steps.len() - 2] {
            StepSpec::Split(s) => s,
            _ => unreachable!("validated step order: split is second to last"),
        }
    }

    /// The embed step.
    pub fn embed(&self) -> &EmbedSpec {
        match &self.steps[self.steps.len() - 1] {
            StepSpec::Embed(e) => e,
            _ => unreachable!("validated step order: embed is last"),
        }
    }

    /// The same flow with another embed step (a reindex's destination model).
    pub fn with_embed(&self, embed: EmbedSpec) -> FlowSpec {
        let mut spec = self.clone();
        let last = spec.steps.len() - 1;
        spec.steps[last] = StepSpec::Embed(embed);
        spec
    }

    /// The lookup steps, in order.
    pub fn lookups(&self) -> impl Iterator<Item = &LookupSpec> {
        self.steps.iter().filter_map(|s| match s {
            StepSpec::Lookup(l) => Some(l),
            _ => None,
        })
    }

    /// The template step, if the flow makes its text from fields.
    pub fn template(&self) -> Option<&TemplateSpec> {
        self.steps.iter().find_map(|s| match s {
            StepSpec::Template(t) => Some(t),
            _ => None,
        })
    }

    /// The group step, if the flow makes one item per group of its input's items.
    pub fn group(&self) -> Option<&GroupSpec> {
        self.steps.iter().find_map(|s| match s {
            StepSpec::Group(g) => Some(g),
            _ => None,
        })
    }

    /// The flows source, if the flow's items are made from other flows' items.
    pub fn flows_source(&self) -> Option<&FlowsSource> {
        match &self.source {
            SourceSpec::Flows(f) => Some(f),
            _ => None,
        }
    }

    /// The flows this flow reads: its flows source's inputs, then its lookups' (each once).
    pub fn inputs(&self) -> Vec<&str> {
        let mut out: Vec<&str> = Vec::new();
        let from = self
            .flows_source()
            .map(|f| f.from.iter().map(String::as_str));
        for name in from
            .into_iter()
            .flatten()
            .chain(self.lookups().map(|l| l.from.as_str()))
        {
            if !out.contains(&name) {
                out.push(name);
            }
        }
        out
    }

    /// Whether the flow takes more than its own source's items (lookups, merges, groups).
    pub fn is_multi_input(&self) -> bool {
        !self.inputs().is_empty()
    }

    /// Whether the flow works on its items' fields (multi-input, or a template): its rows
    /// then carry the fields as metadata.
    pub fn uses_fields(&self) -> bool {
        self.is_multi_input() || self.template().is_some()
    }

    /// The files source, if the flow reads a folder.
    pub fn files(&self) -> Option<&FilesSource> {
        match &self.source {
            SourceSpec::Files(f) => Some(f),
            SourceSpec::Push(_) | SourceSpec::Postgres(_) | SourceSpec::Flows(_) => None,
        }
    }

    /// The PostgreSQL source, if the flow reads a table or a query.
    pub fn postgres(&self) -> Option<&PostgresSource> {
        match &self.source {
            SourceSpec::Postgres(p) => Some(p),
            SourceSpec::Files(_) | SourceSpec::Push(_) | SourceSpec::Flows(_) => None,
        }
    }

    /// Whether runs read the flow's items from its source (a folder, a database); a push
    /// flow's items arrive through the queue API only.
    pub fn has_runs(&self) -> bool {
        match &self.source {
            SourceSpec::Files(_) | SourceSpec::Postgres(_) | SourceSpec::Flows(_) => true,
            SourceSpec::Push(_) => false,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlowSpec {
    name: String,
    source: SourceSpec,
    #[serde(default)]
    steps: Option<Vec<StepSpec>>,
    #[serde(default)]
    target: Option<TargetSpec>,
    #[serde(default = "no_limit")]
    max_failed_items: i64,
    #[serde(default)]
    schedule: Option<Schedule>,
    #[serde(default)]
    disabled: bool,
    #[serde(default)]
    mode: ModeName,
    #[serde(default)]
    refresh_interval: Option<Interval>,
}

/// A live flow is kept fresh by live updates and `refresh_interval`, not by a schedule.
fn check_mode(mode: FlowMode, schedule: Option<&Schedule>) -> Result<(), String> {
    match (mode, schedule) {
        (FlowMode::Live { .. }, Some(_)) => Err(
            "schedule: a live flow has no schedule; use refresh_interval for its periodic full scan, or mode = \"batch\"".into(),
        ),
        (FlowMode::Live { .. } | FlowMode::Batch, _) => Ok(()),
    }
}

fn no_limit() -> i64 {
    -1
}

impl<'de> Deserialize<'de> for FlowSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let raw: RawFlowSpec =
            from_value(serde_json::Value::deserialize(d)?).map_err(D::Error::custom)?;
        FlowSpec::try_from(raw).map_err(D::Error::custom)
    }
}

impl TryFrom<RawFlowSpec> for FlowSpec {
    type Error = String;

    fn try_from(raw: RawFlowSpec) -> Result<Self, Self::Error> {
        validate_name("name", &raw.name)?;
        if raw.max_failed_items < -1 {
            return Err(format!(
                "max_failed_items: {} is invalid; use -1 (no limit) or a count >= 0",
                raw.max_failed_items
            ));
        }
        let steps = match raw.steps {
            None => vec![
                StepSpec::Parse(ParseSpec {}),
                StepSpec::Split(SplitSpec::default()),
                StepSpec::Embed(EmbedSpec::default()),
            ],
            Some(steps) => steps,
        };
        check_step_order(&steps)?;
        check_inputs(&raw.name, &raw.source, &steps)?;
        let target = match raw.target {
            Some(t) => t,
            None => TargetSpec::Collection(CollectionTarget {
                name: raw.name.clone(),
            }),
        };
        let mode = match (raw.mode, raw.refresh_interval) {
            (ModeName::Batch, Some(r)) => {
                return Err(format!(
                    "refresh_interval: `{r}` is only allowed with mode = \"live\" (this flow's mode is \"batch\"); a batch flow runs on its schedule"
                ));
            }
            (ModeName::Batch, None) => FlowMode::Batch,
            (ModeName::Live, refresh_interval) => FlowMode::Live { refresh_interval },
        };
        check_mode(mode, raw.schedule.as_ref())?;
        if let (FlowMode::Live { .. }, SourceSpec::Flows(_)) = (mode, &raw.source) {
            return Err(
                "mode: a flow with a `flows` source follows its inputs on its runs, not live; use a schedule (or run it after its inputs: `freshindex index` runs every flow, inputs first)"
                    .into(),
            );
        }
        Ok(FlowSpec {
            name: raw.name,
            source: raw.source,
            steps,
            target,
            max_failed_items: raw.max_failed_items,
            schedule: raw.schedule,
            disabled: raw.disabled,
            mode,
        })
    }
}

/// Names of flows and collections: they become file names and URL path segments.
fn validate_name(field: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
        && !name.starts_with('.');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{field}: `{name}` is not a valid name (1-128 characters of letters, digits, `-`, `_`, `.`, not starting with `.`)"
        ))
    }
}

/// Turns any folder name into a valid flow/collection name.
pub fn sanitize_name(raw: &str) -> String {
    let mut s: String = raw
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                c
            } else {
                '_'
            }
        })
        .take(128)
        .collect();
    while s.starts_with('.') {
        s.remove(0);
    }
    if s.is_empty() { "default".into() } else { s }
}

/// Where items come from.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum SourceSpec {
    /// A folder on the local file system.
    Files(FilesSource),
    /// Items pushed by external connectors through the queue API: `index` carries each item's
    /// content.
    Push(PushSource),
    /// The rows of a PostgreSQL table or query, followed by their ordinal column.
    Postgres(PostgresSource),
    /// The items of other flows: merged by a key, or grouped by a `group` step.
    Flows(FlowsSource),
}

/// A source that only the queue API feeds.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PushSource {}

impl<'de> Deserialize<'de> for SourceSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (kind, rest) = tagged(d, "type")?;
        match kind.as_str() {
            "files" => from_value(rest).map(SourceSpec::Files),
            "push" => from_value(rest).map(SourceSpec::Push),
            "postgres" => from_value(rest).map(SourceSpec::Postgres),
            "flows" => from_value(rest).map(SourceSpec::Flows),
            other => Err(format!(
                "type: unknown source type `{other}`; expected `files`, `push`, `postgres` or `flows`"
            )),
        }
        .map_err(D::Error::custom)
    }
}

/// The rows of a PostgreSQL table or query: each row is an item, keyed by its key columns,
/// with its content columns as the text to index. Changes are found through the ordinal
/// column (rows with a greater (ordinal, key) than the saved mark), deletions through a
/// periodic scan of the keys.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawPostgresSource")]
pub struct PostgresSource {
    /// The connection URL (`postgres://user@host:port/db`); or
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// the environment variable that holds it (exactly one of the two).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub url_env: Option<String>,
    /// The table (`schema.table` or `table`, as the catalog spells it); or
    #[serde(skip_serializing_if = "Option::is_none")]
    pub table: Option<String>,
    /// a `SELECT` whose rows are the items (exactly one of the two), read as a subquery.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub query: Option<String>,
    /// The columns that identify a row (the item key).
    pub key_columns: Vec<String>,
    /// Text columns joined with a blank line into the text to index.
    pub content_columns: Vec<String>,
    /// Columns stored as JSON with every row of the item.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub metadata_columns: Vec<String>,
    /// A timestamp, timestamptz, integer or bigint column that grows on every change.
    pub ordinal_column: String,
    /// A column whose value marks a row deleted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub soft_delete_column: Option<String>,
    /// The value (as text) of `soft_delete_column` that marks a row deleted.
    #[serde(
        default = "default_soft_delete_marker",
        skip_serializing_if = "is_default_marker"
    )]
    pub soft_delete_marker: String,
    /// Live mode listens for the notifications of the trigger `freshindex setup` installs.
    #[serde(default, skip_serializing_if = "is_false")]
    pub notify: bool,
}

fn default_soft_delete_marker() -> String {
    "true".into()
}

fn is_default_marker(m: &str) -> bool {
    m == "true"
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPostgresSource {
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    url_env: Option<String>,
    #[serde(default)]
    table: Option<String>,
    #[serde(default)]
    query: Option<String>,
    key_columns: Vec<String>,
    content_columns: Vec<String>,
    #[serde(default)]
    metadata_columns: Vec<String>,
    ordinal_column: String,
    #[serde(default)]
    soft_delete_column: Option<String>,
    #[serde(default)]
    soft_delete_marker: Option<String>,
    #[serde(default)]
    notify: bool,
}

/// Most metadata columns a PostgreSQL source takes (`json_build_object` takes 100 arguments).
pub const MAX_METADATA_COLUMNS: usize = 50;

/// Checks a column or table name part: PostgreSQL identifiers are at most 63 bytes, and
/// names are used as written (quoted).
fn check_identifier(field: &str, name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err(format!("{field}: a name must not be empty"));
    }
    if name.len() > 63 {
        return Err(format!(
            "{field}: `{name}` is {} bytes; PostgreSQL names are at most 63",
            name.len()
        ));
    }
    if name.contains('\0') || name.contains('"') {
        return Err(format!(
            "{field}: `{name}` contains a NUL or a double quote"
        ));
    }
    Ok(())
}

fn check_columns(field: &str, columns: &[String], required: bool) -> Result<(), String> {
    if required && columns.is_empty() {
        return Err(format!("{field}: name at least one column"));
    }
    for (i, c) in columns.iter().enumerate() {
        check_identifier(&format!("{field}[{i}]"), c)?;
        if columns[..i].contains(c) {
            return Err(format!("{field}: `{c}` is listed twice"));
        }
    }
    Ok(())
}

impl TryFrom<RawPostgresSource> for PostgresSource {
    type Error = String;

    fn try_from(raw: RawPostgresSource) -> Result<Self, Self::Error> {
        match (&raw.url, &raw.url_env) {
            (Some(_), Some(_)) => {
                return Err("url: give either `url` or `url_env`, not both".into());
            }
            (None, None) => {
                return Err(
                    "url: missing; give `url` (postgres://user@host/db) or `url_env` (the variable that holds it)"
                        .into(),
                );
            }
            (Some(url), None) => {
                let lower = url.to_ascii_lowercase();
                if !(lower.starts_with("postgres://") || lower.starts_with("postgresql://")) {
                    return Err(format!(
                        "url: `{}` is not a postgres:// or postgresql:// URL",
                        redact_url(url)
                    ));
                }
            }
            (None, Some(var)) => {
                if var.is_empty() || var.contains('=') || var.contains('\0') {
                    return Err(format!(
                        "url_env: `{var}` is not an environment variable name"
                    ));
                }
            }
        }
        match (&raw.table, &raw.query) {
            (Some(_), Some(_)) => {
                return Err("table: give either `table` or `query`, not both".into());
            }
            (None, None) => {
                return Err(
                    "table: missing; give `table` (schema.table) or `query` (a SELECT)".into(),
                );
            }
            (Some(table), None) => {
                let parts: Vec<&str> = table.split('.').collect();
                if parts.len() > 2 {
                    return Err(format!(
                        "table: `{table}` has more than two parts; write `schema.table` or `table`"
                    ));
                }
                for p in parts {
                    check_identifier("table", p)?;
                }
            }
            (None, Some(query)) => {
                let q = query.trim().trim_end_matches(';').trim();
                if q.is_empty() {
                    return Err("query: must not be empty".into());
                }
                if query.contains('\0') {
                    return Err("query: contains a NUL".into());
                }
            }
        }
        check_columns("key_columns", &raw.key_columns, true)?;
        check_columns("content_columns", &raw.content_columns, true)?;
        check_columns("metadata_columns", &raw.metadata_columns, false)?;
        if raw.metadata_columns.len() > MAX_METADATA_COLUMNS {
            return Err(format!(
                "metadata_columns: {} columns, over the limit of {MAX_METADATA_COLUMNS}",
                raw.metadata_columns.len()
            ));
        }
        check_identifier("ordinal_column", &raw.ordinal_column)?;
        if let Some(c) = &raw.soft_delete_column {
            check_identifier("soft_delete_column", c)?;
        } else if raw.soft_delete_marker.is_some() {
            return Err("soft_delete_marker: only meaningful with `soft_delete_column`".into());
        }
        if raw.notify && raw.table.is_none() {
            return Err(
                "notify: needs `table`: the trigger that notifies is installed on a table, and a query has none"
                    .into(),
            );
        }
        Ok(PostgresSource {
            url: raw.url,
            url_env: raw.url_env,
            table: raw.table,
            // A trailing `;` would end the subquery it is read as.
            query: raw
                .query
                .map(|q| q.trim().trim_end_matches(';').trim_end().to_string()),
            key_columns: raw.key_columns,
            content_columns: raw.content_columns,
            metadata_columns: raw.metadata_columns,
            ordinal_column: raw.ordinal_column,
            soft_delete_column: raw.soft_delete_column,
            soft_delete_marker: raw
                .soft_delete_marker
                .unwrap_or_else(default_soft_delete_marker),
            notify: raw.notify,
        })
    }
}

/// A connection URL with its password replaced by `***`, for messages.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_string();
    };
    let (auth, host) = match rest.rsplit_once('@') {
        Some((auth, host)) => (auth, host),
        None => return url.to_string(),
    };
    match auth.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***@{host}"),
        None => url.to_string(),
    }
}

/// A folder, scanned in full on every run.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FilesSource {
    /// The folder; relative paths are relative to the config file.
    pub path: PathBuf,
    /// Glob patterns (relative to `path`) of files to index.
    #[serde(default = "default_include")]
    pub include: Vec<String>,
    /// Glob patterns of files and folders to leave out.
    #[serde(default)]
    pub exclude: Vec<String>,
    /// Larger files are skipped with a warning.
    #[serde(default = "default_max_file_size")]
    pub max_file_size: ByteSize,
    /// Follow symbolic links (loops are detected and reported).
    #[serde(default = "yes")]
    pub follow_symlinks: bool,
}

impl FilesSource {
    /// A source over `path` with every default.
    pub fn new(path: PathBuf) -> Self {
        FilesSource {
            path,
            include: default_include(),
            exclude: Vec::new(),
            max_file_size: default_max_file_size(),
            follow_symlinks: true,
        }
    }
}

fn default_include() -> Vec<String> {
    DEFAULT_INCLUDE.iter().map(|s| s.to_string()).collect()
}

fn default_max_file_size() -> ByteSize {
    ByteSize(10 * 1024 * 1024)
}

fn yes() -> bool {
    true
}

/// One step of a flow.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "op", rename_all = "lowercase")]
pub enum StepSpec {
    /// One item per group of the input flow's items (flows source only; first step).
    Group(GroupSpec),
    /// Adds the current item of another flow, found by key, to the item's fields.
    Lookup(LookupSpec),
    /// Makes the text to index from the item's fields.
    Template(TemplateSpec),
    /// Bytes to text.
    Parse(ParseSpec),
    /// Text to chunks.
    Split(SplitSpec),
    /// Chunks to vectors.
    Embed(EmbedSpec),
}

impl<'de> Deserialize<'de> for StepSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (op, rest) = tagged(d, "op")?;
        match op.as_str() {
            "parse" => from_value(rest).map(StepSpec::Parse),
            "split" => from_value(rest).map(StepSpec::Split),
            "embed" => from_value(rest).map(StepSpec::Embed),
            "lookup" => from_value(rest).map(StepSpec::Lookup),
            "template" => from_value(rest).map(StepSpec::Template),
            "group" => from_value(rest).map(StepSpec::Group),
            other => Err(format!(
                "op: unknown op `{other}`; expected group, lookup, template, parse, split or embed"
            )),
        }
        .map_err(D::Error::custom)
    }
}

impl StepSpec {
    /// The step kind, as written in `op`.
    pub fn kind(&self) -> &'static str {
        match self {
            StepSpec::Group(_) => "group",
            StepSpec::Lookup(_) => "lookup",
            StepSpec::Template(_) => "template",
            StepSpec::Parse(_) => "parse",
            StepSpec::Split(_) => "split",
            StepSpec::Embed(_) => "embed",
        }
    }
}

/// The items of other flows (seed 002's multi-input transformations): each item of this flow
/// is made from the items of the flows in `from` that share a key — the `merge_key` (one
/// item per key across several flows, their fields combined by `merge`), or, with a `group`
/// step, the group's `by` value (one item per group of one flow's items). Without either,
/// one item per input item. The inputs' items are read from what their flows last indexed,
/// so `from` names flows, not tables or folders.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawFlowsSource")]
pub struct FlowsSource {
    /// The input flows, highest priority first.
    pub from: Vec<String>,
    /// The key expression items are merged by (a field, or a template); `None`: an input
    /// item's own key.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub merge_key: Option<String>,
    /// How the fields of items with the same merge key are combined.
    pub merge: MergeRule,
}

/// How a merged item's fields are combined from its contributors.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MergeRule {
    /// Each field (and the text) is the first non-empty value, in the order of `from`.
    #[default]
    First,
    /// Each field is the list of the contributors' non-empty values, in the order of `from`;
    /// the text is their texts joined by blank lines.
    List,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawFlowsSource {
    from: FromList,
    #[serde(default)]
    merge_key: Option<String>,
    #[serde(default)]
    merge: MergeRule,
}

#[derive(Deserialize)]
#[serde(untagged)]
enum FromList {
    One(String),
    Many(Vec<String>),
}

impl TryFrom<RawFlowsSource> for FlowsSource {
    type Error = String;

    fn try_from(raw: RawFlowsSource) -> Result<Self, Self::Error> {
        let from = match raw.from {
            FromList::One(f) => vec![f],
            FromList::Many(v) => v,
        };
        if from.is_empty() {
            return Err("from: name at least one flow".into());
        }
        for (i, name) in from.iter().enumerate() {
            validate_name(&format!("from[{i}]"), name)?;
            if from[..i].contains(name) {
                return Err(format!("from[{i}]: `{name}` is listed twice"));
            }
        }
        if let Some(k) = &raw.merge_key {
            Template::key_expr(k).map_err(|e| format!("merge_key: {e}"))?;
        }
        Ok(FlowsSource {
            from,
            merge_key: raw.merge_key,
            merge: raw.merge,
        })
    }
}

/// `{ op = "lookup", from, key, as, required }`: reads the current item of flow `from` whose
/// key is `key` evaluated on this item's fields, and adds its fields (with `key` and `text`)
/// as the field `as` (`null` when there is none). The item then depends on that key of that
/// flow: when the looked-up item is created, changed or deleted, the item is processed again.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawLookupSpec")]
pub struct LookupSpec {
    /// The flow whose items are looked up.
    pub from: String,
    /// Key expression: a field (`company_id`) or a template (`{region}/{id}`).
    pub key: String,
    /// The field the looked-up item is added as.
    #[serde(rename = "as")]
    pub as_field: String,
    /// A missing item fails this item (naming the key) instead of adding `null`.
    #[serde(skip_serializing_if = "is_false")]
    pub required: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawLookupSpec {
    from: String,
    key: String,
    #[serde(rename = "as")]
    as_field: String,
    #[serde(default)]
    required: bool,
}

/// Fields every item has; steps cannot write them.
const OWN_FIELDS: [&str; 2] = ["key", "text"];

impl TryFrom<RawLookupSpec> for LookupSpec {
    type Error = String;

    fn try_from(raw: RawLookupSpec) -> Result<Self, Self::Error> {
        validate_name("from", &raw.from)?;
        Template::key_expr(&raw.key).map_err(|e| format!("key: {e}"))?;
        check_field_name("as", &raw.as_field)?;
        Ok(LookupSpec {
            from: raw.from,
            key: raw.key,
            as_field: raw.as_field,
            required: raw.required,
        })
    }
}

fn check_field_name(what: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name
            .chars()
            .all(|c| c.is_alphanumeric() || matches!(c, '_' | '-'));
    if !ok {
        return Err(format!(
            "{what}: `{name}` is not a field name (letters, digits, `_`, `-`)"
        ));
    }
    if OWN_FIELDS.contains(&name) {
        return Err(format!(
            "{what}: `{name}` is a field every item has; choose another name"
        ));
    }
    Ok(())
}

/// `{ op = "template", text }`: the text to index, made from the item's fields.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawTemplateSpec")]
pub struct TemplateSpec {
    /// `{field}` placeholders (see [`crate::template`]).
    pub text: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTemplateSpec {
    text: String,
}

impl TryFrom<RawTemplateSpec> for TemplateSpec {
    type Error = String;

    fn try_from(raw: RawTemplateSpec) -> Result<Self, Self::Error> {
        Template::parse(&raw.text).map_err(|e| format!("text: {e}"))?;
        Ok(TemplateSpec { text: raw.text })
    }
}

/// `{ op = "group", by, aggregate }`: one item per value of `by` among the input flow's
/// items, with the aggregates as its fields (and `key` = the group's value). Its text is its
/// members' texts joined by blank lines, unless a template step makes it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawGroupSpec")]
pub struct GroupSpec {
    /// Key expression of a member's group; members where it is empty belong to none.
    pub by: String,
    /// Output field → aggregate, in name order.
    pub aggregate: std::collections::BTreeMap<String, Aggregate>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawGroupSpec {
    by: String,
    #[serde(default)]
    aggregate: std::collections::BTreeMap<String, String>,
}

impl TryFrom<RawGroupSpec> for GroupSpec {
    type Error = String;

    fn try_from(raw: RawGroupSpec) -> Result<Self, Self::Error> {
        Template::key_expr(&raw.by).map_err(|e| format!("by: {e}"))?;
        let mut aggregate = std::collections::BTreeMap::new();
        for (name, a) in raw.aggregate {
            check_field_name(&format!("aggregate.{name}"), &name)?;
            let parsed = Aggregate::parse(&a).map_err(|e| format!("aggregate.{name}: {e}"))?;
            aggregate.insert(name, parsed);
        }
        Ok(GroupSpec {
            by: raw.by,
            aggregate,
        })
    }
}

/// One aggregate of a group's members (members in key order).
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Aggregate {
    /// `count`: how many members.
    Count,
    /// `list:FIELD`: the members' non-empty values of a field.
    List(String),
    /// `first:FIELD`: the first member's non-empty value of a field.
    First(String),
    /// `sum:FIELD`: the sum of the members' numeric values of a field.
    Sum(String),
    /// `min:FIELD` / `max:FIELD`: the least or greatest numeric value of a field.
    Min(String),
    /// See [`Aggregate::Min`].
    Max(String),
}

impl Aggregate {
    /// Parses `count` or `FUNCTION:FIELD`.
    pub fn parse(text: &str) -> Result<Aggregate, String> {
        if text == "count" {
            return Ok(Aggregate::Count);
        }
        let Some((f, field)) = text.split_once(':') else {
            return Err(format!(
                "`{text}` is not an aggregate; expected count, list:FIELD, first:FIELD, sum:FIELD, min:FIELD or max:FIELD"
            ));
        };
        Template::key_expr(field)?;
        let field = field.to_string();
        match f {
            "list" => Ok(Aggregate::List(field)),
            "first" => Ok(Aggregate::First(field)),
            "sum" => Ok(Aggregate::Sum(field)),
            "min" => Ok(Aggregate::Min(field)),
            "max" => Ok(Aggregate::Max(field)),
            other => Err(format!(
                "unknown aggregate function `{other}`; expected count, list, first, sum, min or max"
            )),
        }
    }
}

impl fmt::Display for Aggregate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Aggregate::Count => f.write_str("count"),
            Aggregate::List(x) => write!(f, "list:{x}"),
            Aggregate::First(x) => write!(f, "first:{x}"),
            Aggregate::Sum(x) => write!(f, "sum:{x}"),
            Aggregate::Min(x) => write!(f, "min:{x}"),
            Aggregate::Max(x) => write!(f, "max:{x}"),
        }
    }
}

impl Serialize for Aggregate {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.collect_str(self)
    }
}

/// Steps: an optional `group`, any `lookup`s, an optional `template`, then parse, split,
/// embed.
fn check_step_order(steps: &[StepSpec]) -> Result<(), String> {
    let rank = |s: &StepSpec| match s {
        StepSpec::Group(_) => 0,
        StepSpec::Lookup(_) => 1,
        StepSpec::Template(_) => 2,
        StepSpec::Parse(_) => 3,
        StepSpec::Split(_) => 4,
        StepSpec::Embed(_) => 5,
    };
    let kinds: Vec<&str> = steps.iter().map(StepSpec::kind).collect();
    let ranks: Vec<u8> = steps.iter().map(rank).collect();
    let tail_ok = kinds.ends_with(&["parse", "split", "embed"]);
    let ordered = ranks
        .windows(2)
        .all(|w| w[0] < w[1] || (w[0] == 1 && w[1] == 1));
    if !tail_ok || !ordered {
        return Err(format!(
            "steps: expected an optional group, any lookups, an optional template, then parse, split, embed, in that order; got [{}]",
            kinds.join(", ")
        ));
    }
    Ok(())
}

/// What multi-input steps need of the flow's source, and names that cannot work.
fn check_inputs(name: &str, source: &SourceSpec, steps: &[StepSpec]) -> Result<(), String> {
    let group = steps.iter().position(|s| matches!(s, StepSpec::Group(_)));
    let mut fields: Vec<&str> = Vec::new();
    for (i, s) in steps.iter().enumerate() {
        match s {
            StepSpec::Lookup(l) => {
                if l.from == name {
                    return Err(format!(
                        "steps[{i}]: from: flow `{name}` cannot look up its own items"
                    ));
                }
                if fields.contains(&l.as_field.as_str()) {
                    return Err(format!(
                        "steps[{i}]: as: the field `{}` is already written by an earlier step",
                        l.as_field
                    ));
                }
                fields.push(&l.as_field);
            }
            StepSpec::Group(g) => fields.extend(g.aggregate.keys().map(String::as_str)),
            _ => {}
        }
    }
    match source {
        SourceSpec::Flows(f) => {
            if f.from.iter().any(|f| f == name) {
                return Err(format!(
                    "source.from: flow `{name}` cannot read its own items"
                ));
            }
            if let Some(g) = group {
                if f.from.len() != 1 {
                    return Err(format!(
                        "steps[{g}]: a group step reads one flow; source.from names {}",
                        f.from.len()
                    ));
                }
                if f.merge_key.is_some() {
                    return Err(format!(
                        "steps[{g}]: a group step and source.merge_key both key the items; keep one"
                    ));
                }
            }
        }
        SourceSpec::Push(_) if steps.iter().any(|s| matches!(s, StepSpec::Lookup(_))) => {
            return Err(
                "steps: a push flow cannot have lookups: its items cannot be read again when a looked-up item changes (read the items through a `flows` source instead)"
                    .into(),
            );
        }
        SourceSpec::Files(_) | SourceSpec::Push(_) | SourceSpec::Postgres(_) => {
            if let Some(g) = group {
                return Err(format!(
                    "steps[{g}]: a group step needs source type `flows` (the flow whose items it groups)"
                ));
            }
        }
    }
    Ok(())
}

/// Checks the flows' inputs as a whole: every input names a flow of `flows`, and no flow
/// reads itself through others (`a` looks up `b`, `b` looks up `a`). The error names the
/// cycle.
pub fn check_flow_graph(flows: &[&FlowSpec]) -> Result<(), String> {
    for f in flows {
        for input in f.inputs() {
            if !flows.iter().any(|g| g.name == input) {
                return Err(format!(
                    "flow `{}`: reads flow `{input}`, which is not defined",
                    f.name
                ));
            }
        }
    }
    check_cycles(flows)
}

/// Checks that no flow reads itself through others; inputs that name no flow of `flows`
/// are passed over. The error names the cycle.
pub fn check_cycles(flows: &[&FlowSpec]) -> Result<(), String> {
    // Depth-first search with colours; the path on the stack names the cycle.
    fn visit<'a>(
        f: &'a FlowSpec,
        flows: &[&'a FlowSpec],
        state: &mut std::collections::HashMap<&'a str, bool>,
        path: &mut Vec<&'a str>,
    ) -> Result<(), String> {
        match state.get(f.name.as_str()) {
            Some(true) => return Ok(()),
            Some(false) => {
                let start = path.iter().position(|n| *n == f.name).unwrap_or(0);
                let mut cycle: Vec<&str> = path[start..].to_vec();
                cycle.push(&f.name);
                return Err(format!(
                    "flow `{}`: its inputs make a cycle: {}; a flow cannot depend on itself",
                    f.name,
                    cycle.join(" → ")
                ));
            }
            None => {}
        }
        state.insert(&f.name, false);
        path.push(&f.name);
        for input in f.inputs() {
            if let Some(g) = flows.iter().find(|g| g.name == input) {
                visit(g, flows, state, path)?;
            }
        }
        path.pop();
        state.insert(&f.name, true);
        Ok(())
    }
    let mut state = std::collections::HashMap::new();
    for f in flows {
        visit(f, flows, &mut state, &mut Vec::new())?;
    }
    Ok(())
}

/// The flows in an order where every flow comes after the flows it reads (the file order
/// otherwise); flows in a cycle (refused by [`check_flow_graph`]) keep their place.
pub fn dependency_order<'a>(flows: &[&'a FlowSpec]) -> Vec<&'a FlowSpec> {
    let mut out: Vec<&FlowSpec> = Vec::with_capacity(flows.len());
    let mut left: Vec<&FlowSpec> = flows.to_vec();
    while !left.is_empty() {
        let ready = left.iter().position(|f| {
            f.inputs()
                .iter()
                .all(|i| out.iter().any(|o| o.name == *i) || !left.iter().any(|l| l.name == *i))
        });
        out.push(left.remove(ready.unwrap_or(0)));
    }
    out
}

/// Decodes UTF-8 text and Markdown; binary and non-UTF-8 files are skipped.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ParseSpec {}

/// Splits text into chunks of at most `chunk_size` characters, Markdown-aware for Markdown files.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawSplitSpec")]
pub struct SplitSpec {
    /// Maximum chunk length in characters.
    pub chunk_size: usize,
    /// Characters shared by neighbouring chunks; less than `chunk_size`.
    pub chunk_overlap: usize,
}

impl Default for SplitSpec {
    fn default() -> Self {
        SplitSpec {
            chunk_size: 1000,
            chunk_overlap: 200,
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawSplitSpec {
    #[serde(default = "default_chunk_size")]
    chunk_size: usize,
    #[serde(default = "default_chunk_overlap")]
    chunk_overlap: usize,
}

fn default_chunk_size() -> usize {
    1000
}

fn default_chunk_overlap() -> usize {
    200
}

impl TryFrom<RawSplitSpec> for SplitSpec {
    type Error = String;

    fn try_from(raw: RawSplitSpec) -> Result<Self, Self::Error> {
        if raw.chunk_size == 0 {
            return Err("chunk_size: must be at least 1".into());
        }
        if raw.chunk_overlap >= raw.chunk_size {
            return Err(format!(
                "chunk_overlap: {} must be less than chunk_size {}",
                raw.chunk_overlap, raw.chunk_size
            ));
        }
        Ok(SplitSpec {
            chunk_size: raw.chunk_size,
            chunk_overlap: raw.chunk_overlap,
        })
    }
}

/// Embeds chunk texts with a model.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawEmbedSpec", into = "RawEmbedSpec")]
pub struct EmbedSpec {
    /// The model, as written: `builtin`, `local:PATH`, `hf:ORG/NAME` or `openai:MODEL`
    /// (see [`ModelRef`]).
    pub model: String,
    /// Texts per embedding call. Does not change results, so it is not part of the cache key.
    pub batch_size: usize,
    /// `openai:` models: the API's base URL (default `https://api.openai.com/v1`).
    pub base_url: Option<String>,
    /// `openai:` models: the environment variable holding the API key (default
    /// `OPENAI_API_KEY`; a missing variable sends no key, for local servers).
    pub api_key_env: Option<String>,
    /// `openai:` models: the `dimensions` request parameter (models that can shorten vectors).
    pub dimensions: Option<usize>,
    /// `openai:` models: seconds a request may take before it is retried (default 60).
    pub timeout_secs: Option<u64>,
    /// `openai:` models: requests in flight at once (default 4).
    pub max_concurrency: Option<usize>,
    /// `openai:` models: retries of a throttled (429), failed (5xx) or timed-out request
    /// (default 6).
    pub max_retries: Option<u32>,
    /// Local models: CPU threads of the model (default: one per core).
    pub threads: Option<usize>,
}

impl Default for EmbedSpec {
    fn default() -> Self {
        EmbedSpec {
            model: "builtin".into(),
            batch_size: 64,
            base_url: None,
            api_key_env: None,
            dimensions: None,
            timeout_secs: None,
            max_concurrency: None,
            max_retries: None,
            threads: None,
        }
    }
}

impl EmbedSpec {
    /// A spec of this model with every other setting at its default.
    pub fn of_model(model: &str) -> Result<EmbedSpec, String> {
        ModelRef::parse(model)?;
        Ok(EmbedSpec {
            model: model.to_string(),
            ..EmbedSpec::default()
        })
    }

    /// The parsed model reference.
    pub fn model_ref(&self) -> ModelRef {
        // Validated at construction; a spec built by hand with a bad model reads as builtin's
        // error at embedder construction instead.
        ModelRef::parse(&self.model).unwrap_or(ModelRef::Invalid(self.model.clone()))
    }

    /// The part of the spec that decides the vectors (the memo-cache key uses only this).
    pub fn identity(&self) -> String {
        let mut id = format!("model={}", self.model);
        if let ModelRef::OpenAi(_) = self.model_ref() {
            id.push_str(&format!(
                ";base_url={}",
                self.base_url.as_deref().unwrap_or(DEFAULT_OPENAI_BASE_URL)
            ));
            if let Some(d) = self.dimensions {
                id.push_str(&format!(";dimensions={d}"));
            }
        }
        id
    }
}

/// Base URL of `openai:` models when the flow names none.
pub const DEFAULT_OPENAI_BASE_URL: &str = "https://api.openai.com/v1";

/// A model reference, parsed from `EmbedSpec::model`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ModelRef {
    /// The built-in hashed n-gram model.
    Builtin,
    /// A sentence-embedding model in Hugging Face format in a local folder.
    Local(String),
    /// A model of the local Hugging Face cache (`HF_HOME` or `~/.cache/huggingface`), by id.
    Hf(String),
    /// A model served over the OpenAI embeddings protocol.
    OpenAi(String),
    /// Not a model reference (only from a spec built by hand).
    Invalid(String),
}

impl ModelRef {
    /// Parses `builtin`, `local:PATH`, `hf:ORG/NAME` or `openai:MODEL`.
    pub fn parse(model: &str) -> Result<ModelRef, String> {
        let bad = |why: &str| {
            Err(format!(
                "model: `{model}` {why}; expected `builtin`, `local:PATH`, `hf:ORG/NAME` or `openai:MODEL`"
            ))
        };
        if model == "builtin" {
            return Ok(ModelRef::Builtin);
        }
        let Some((scheme, rest)) = model.split_once(':') else {
            return bad("is not a known model");
        };
        let rest = rest.trim();
        if rest.is_empty() {
            return bad("names no model after the colon");
        }
        match scheme {
            "local" => Ok(ModelRef::Local(rest.to_string())),
            "hf" => {
                let parts: Vec<&str> = rest.split('/').collect();
                if parts.len() != 2
                    || parts
                        .iter()
                        .any(|p| p.is_empty() || *p == "." || *p == "..")
                {
                    return bad("is not a Hugging Face id of the form ORG/NAME");
                }
                Ok(ModelRef::Hf(rest.to_string()))
            }
            "openai" => Ok(ModelRef::OpenAi(rest.to_string())),
            _ => bad("has an unknown scheme"),
        }
    }
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawEmbedSpec {
    #[serde(default = "default_model")]
    model: String,
    #[serde(default = "default_batch_size")]
    batch_size: usize,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    base_url: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    api_key_env: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    dimensions: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    timeout_secs: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_concurrency: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    max_retries: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    threads: Option<usize>,
}

fn default_model() -> String {
    "builtin".into()
}

fn default_batch_size() -> usize {
    64
}

impl From<EmbedSpec> for RawEmbedSpec {
    fn from(s: EmbedSpec) -> RawEmbedSpec {
        RawEmbedSpec {
            model: s.model,
            batch_size: s.batch_size,
            base_url: s.base_url,
            api_key_env: s.api_key_env,
            dimensions: s.dimensions,
            timeout_secs: s.timeout_secs,
            max_concurrency: s.max_concurrency,
            max_retries: s.max_retries,
            threads: s.threads,
        }
    }
}

impl TryFrom<RawEmbedSpec> for EmbedSpec {
    type Error = String;

    fn try_from(raw: RawEmbedSpec) -> Result<Self, Self::Error> {
        let model = ModelRef::parse(&raw.model)?;
        if raw.batch_size == 0 || raw.batch_size > 4096 {
            return Err(format!(
                "batch_size: {} is out of range 1..=4096",
                raw.batch_size
            ));
        }
        let openai_only = [
            ("base_url", raw.base_url.is_some()),
            ("api_key_env", raw.api_key_env.is_some()),
            ("dimensions", raw.dimensions.is_some()),
            ("timeout_secs", raw.timeout_secs.is_some()),
            ("max_concurrency", raw.max_concurrency.is_some()),
            ("max_retries", raw.max_retries.is_some()),
        ];
        if !matches!(model, ModelRef::OpenAi(_))
            && let Some((field, _)) = openai_only.iter().find(|(_, set)| *set)
        {
            return Err(format!(
                "{field}: only `openai:` models take it (the model is `{}`)",
                raw.model
            ));
        }
        if raw.threads.is_some() && !matches!(model, ModelRef::Local(_) | ModelRef::Hf(_)) {
            return Err(format!(
                "threads: only local models (`local:`, `hf:`) take it (the model is `{}`)",
                raw.model
            ));
        }
        if let Some(url) = &raw.base_url
            && !(url.starts_with("http://") || url.starts_with("https://"))
        {
            return Err(format!(
                "base_url: `{url}` is not an http:// or https:// URL"
            ));
        }
        for (field, value) in [
            ("dimensions", raw.dimensions),
            ("max_concurrency", raw.max_concurrency),
            ("threads", raw.threads),
        ] {
            if value == Some(0) {
                return Err(format!("{field}: must be at least 1"));
            }
        }
        if raw.timeout_secs == Some(0) {
            return Err("timeout_secs: must be at least 1".into());
        }
        Ok(EmbedSpec {
            model: raw.model,
            batch_size: raw.batch_size,
            base_url: raw.base_url,
            api_key_env: raw.api_key_env,
            dimensions: raw.dimensions,
            timeout_secs: raw.timeout_secs,
            max_concurrency: raw.max_concurrency,
            max_retries: raw.max_retries,
            threads: raw.threads,
        })
    }
}

/// Where rows go.
#[derive(Clone, Debug, PartialEq, Serialize)]
#[serde(tag = "type", rename_all = "lowercase")]
pub enum TargetSpec {
    /// A built-in vector collection in the data directory.
    Collection(CollectionTarget),
    /// A table of a PostgreSQL database.
    Postgres(PostgresTarget),
}

impl<'de> Deserialize<'de> for TargetSpec {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let (kind, rest) = tagged(d, "type")?;
        match kind.as_str() {
            "collection" => from_value(rest).map(TargetSpec::Collection),
            "postgres" => from_value(rest).map(TargetSpec::Postgres),
            other => Err(format!(
                "type: unknown target type `{other}`; expected `collection` or `postgres`"
            )),
        }
        .map_err(D::Error::custom)
    }
}

impl TargetSpec {
    /// The built-in collection's name; `None` for a target outside the data directory.
    pub fn collection(&self) -> Option<&str> {
        match self {
            TargetSpec::Collection(c) => Some(&c.name),
            TargetSpec::Postgres(_) => None,
        }
    }

    /// The PostgreSQL table, for a `postgres` target.
    pub fn postgres(&self) -> Option<&PostgresTarget> {
        match self {
            TargetSpec::Collection(_) => None,
            TargetSpec::Postgres(p) => Some(p),
        }
    }

    /// The name users know the target by: the collection's name, or the table's.
    pub fn name(&self) -> &str {
        match self {
            TargetSpec::Collection(c) => &c.name,
            TargetSpec::Postgres(p) => &p.table,
        }
    }

    /// What makes two targets the same place: flows whose targets have the same identity
    /// write the same rows, and a change of identity is a change of target. A collection's
    /// is its name (part of every row's fingerprint since the first release); a table's is
    /// its database address (credentials left out, so a new password is not a new target)
    /// and its name.
    pub fn identity(&self) -> String {
        match self {
            TargetSpec::Collection(c) => c.name.clone(),
            TargetSpec::Postgres(p) => {
                let place = match (&p.url, &p.url_env) {
                    (Some(url), _) => without_credentials(url),
                    (None, Some(var)) => format!("env:{var}"),
                    (None, None) => String::new(),
                };
                format!("postgres:{place}#{}", p.table)
            }
        }
    }
}

impl fmt::Display for TargetSpec {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TargetSpec::Collection(c) => write!(f, "collection `{}`", c.name),
            TargetSpec::Postgres(p) => write!(f, "PostgreSQL table `{}`", p.table),
        }
    }
}

/// A connection string without its user and password: `postgres://user:pw@host/db` →
/// `postgres://host/db`; `host=h user=u password=p dbname=d` → `host=h dbname=d`.
fn without_credentials(url: &str) -> String {
    if let Some((scheme, rest)) = url.split_once("://") {
        let (authority, tail) = match rest.find(['/', '?']) {
            Some(i) => rest.split_at(i),
            None => (rest, ""),
        };
        let host = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
        return format!("{scheme}://{host}{tail}");
    }
    url.split_whitespace()
        .filter(|kv| !(kv.starts_with("user=") || kv.starts_with("password=")))
        .collect::<Vec<_>>()
        .join(" ")
}

/// A built-in vector collection.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawCollectionTarget")]
pub struct CollectionTarget {
    /// Collection name.
    pub name: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCollectionTarget {
    name: String,
}

impl TryFrom<RawCollectionTarget> for CollectionTarget {
    type Error = String;

    fn try_from(raw: RawCollectionTarget) -> Result<Self, Self::Error> {
        validate_name("name", &raw.name)?;
        Ok(CollectionTarget { name: raw.name })
    }
}

/// The type of a PostgreSQL target's `vector` column.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum PgVectorType {
    /// pgvector's `vector(DIM)` when the extension is installed in the database, else
    /// `real[]`; an existing table keeps the type it has.
    #[default]
    #[serde(rename = "auto")]
    Auto,
    /// `real[]` (searched exactly, scored by freshindex).
    #[serde(rename = "real[]")]
    Real,
    /// pgvector's `vector(DIM)` (searched by the database).
    #[serde(rename = "vector")]
    Vector,
}

/// A table of a PostgreSQL database: one row per chunk (`key`, `source_key`, `text`,
/// `payload`, `vector`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(try_from = "RawPostgresTarget")]
pub struct PostgresTarget {
    /// The connection string (`postgres://user@host:5432/db` or `host=... dbname=...`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url: Option<String>,
    /// The environment variable holding the connection string (instead of `url`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub url_env: Option<String>,
    /// The table: `schema.table` or a bare name (found through the search path).
    pub table: String,
    /// The type of the `vector` column.
    #[serde(default, skip_serializing_if = "is_auto")]
    pub vector_type: PgVectorType,
}

fn is_auto(t: &PgVectorType) -> bool {
    *t == PgVectorType::Auto
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPostgresTarget {
    #[serde(default)]
    url: Option<String>,
    #[serde(default)]
    url_env: Option<String>,
    table: String,
    #[serde(default)]
    vector_type: PgVectorType,
}

impl TryFrom<RawPostgresTarget> for PostgresTarget {
    type Error = String;

    fn try_from(raw: RawPostgresTarget) -> Result<Self, Self::Error> {
        match (&raw.url, &raw.url_env) {
            (Some(_), Some(_)) => {
                return Err("url, url_env: give one of them, not both".into());
            }
            (None, None) => {
                return Err(
                    "url: missing; give the connection string in `url` or name the environment variable holding it in `url_env`".into(),
                );
            }
            (Some(url), None) if url.trim().is_empty() => return Err("url: is empty".into()),
            (None, Some(var)) if var.is_empty() || var.contains('=') || var.contains('\0') => {
                return Err(format!(
                    "url_env: `{var}` is not an environment variable name"
                ));
            }
            _ => {}
        }
        check_pg_table(&raw.table).map_err(|e| format!("table: {e}"))?;
        Ok(PostgresTarget {
            url: raw.url,
            url_env: raw.url_env,
            table: raw.table,
            vector_type: raw.vector_type,
        })
    }
}

impl PostgresTarget {
    /// The connection string: `url`, or the value of the variable `url_env` names.
    pub fn resolve_url(&self) -> Result<String, String> {
        match (&self.url, &self.url_env) {
            (Some(url), _) => Ok(url.clone()),
            (None, Some(var)) => match std::env::var(var) {
                Ok(v) if !v.trim().is_empty() => Ok(v),
                Ok(_) => Err(format!(
                    "target.url_env: environment variable `{var}` is empty; it should hold the connection string of table `{}`",
                    self.table
                )),
                Err(_) => Err(format!(
                    "target.url_env: environment variable `{var}` is not set; it should hold the connection string of table `{}`",
                    self.table
                )),
            },
            (None, None) => Err(format!(
                "target: table `{}` has no `url` or `url_env`",
                self.table
            )),
        }
    }
}

/// Checks a PostgreSQL table name: `schema.table` or `table`, each part 1 to 63 of
/// `a-z 0-9 _`, not starting with a digit. Upper case is refused rather than folded:
/// PostgreSQL folds unquoted names to lower case, and freshindex quotes the names it writes,
/// so `Docs` would name another table than the one `psql` shows for `Docs`.
pub fn check_pg_table(table: &str) -> Result<(), String> {
    let parts: Vec<&str> = table.split('.').collect();
    if parts.len() > 2 {
        return Err(format!(
            "`{table}` has {} dots; write `schema.table` or `table`",
            parts.len() - 1
        ));
    }
    for part in parts {
        let ok = !part.is_empty()
            && part.len() <= 63
            && !part.starts_with(|c: char| c.is_ascii_digit())
            && part
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_');
        if !ok {
            return Err(format!(
                "`{table}`: `{part}` is not a valid name (1 to 63 of a-z, 0-9, `_`, not starting with a digit; lower case only)"
            ));
        }
    }
    Ok(())
}

/// A size in bytes, written as an integer or as text such as `"10MiB"`, `"512 KB"`, `"1GB"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct ByteSize(pub u64);

impl ByteSize {
    /// Parses `10MiB`, `10 MB`, `1024`, `2k`.
    pub fn parse(text: &str) -> Result<ByteSize, String> {
        let t = text.trim();
        let split = t
            .find(|c: char| !(c.is_ascii_digit() || c == '.'))
            .unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let num: f64 = num
            .parse()
            .map_err(|_| format!("`{text}` is not a size (examples: 10MiB, 512KB, 1048576)"))?;
        let mult: u64 = match unit.trim().to_ascii_lowercase().as_str() {
            "" | "b" => 1,
            "k" | "kb" => 1000,
            "kib" => 1 << 10,
            "m" | "mb" => 1000 * 1000,
            "mib" => 1 << 20,
            "g" | "gb" => 1000 * 1000 * 1000,
            "gib" => 1 << 30,
            other => {
                return Err(format!(
                    "`{text}`: unknown unit `{other}` (use B, KB, KiB, MB, MiB, GB, GiB)"
                ));
            }
        };
        Ok(ByteSize((num * mult as f64).round() as u64))
    }
}

impl fmt::Display for ByteSize {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let b = self.0 as f64;
        if self.0 >= 1 << 30 {
            write!(f, "{:.1} GiB", b / (1u64 << 30) as f64)
        } else if self.0 >= 1 << 20 {
            write!(f, "{:.1} MiB", b / (1u64 << 20) as f64)
        } else if self.0 >= 1 << 10 {
            write!(f, "{:.1} KiB", b / 1024.0)
        } else {
            write!(f, "{} B", self.0)
        }
    }
}

impl Serialize for ByteSize {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_u64(self.0)
    }
}

impl<'de> Deserialize<'de> for ByteSize {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl serde::de::Visitor<'_> for V {
            type Value = ByteSize;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a size such as \"10MiB\" or a number of bytes")
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<ByteSize, E> {
                Ok(ByteSize(v))
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<ByteSize, E> {
                u64::try_from(v)
                    .map(ByteSize)
                    .map_err(|_| E::custom(format!("size {v} is negative")))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<ByteSize, E> {
                ByteSize::parse(v).map_err(E::custom)
            }
        }
        d.deserialize_any(V)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn byte_sizes_parse() {
        assert_eq!(ByteSize::parse("10MiB"), Ok(ByteSize(10 << 20)));
        assert_eq!(ByteSize::parse("512 KB"), Ok(ByteSize(512_000)));
        assert_eq!(ByteSize::parse("1024"), Ok(ByteSize(1024)));
        assert!(ByteSize::parse("ten").is_err());
        assert!(ByteSize::parse("5 parsecs").is_err());
    }

    fn flow(json: serde_json::Value) -> Result<FlowSpec, String> {
        serde_json::from_value(json).map_err(|e| e.to_string())
    }

    #[test]
    fn specs_without_the_schedule_fields_get_the_defaults() {
        let f = flow(serde_json::json!({
            "name": "a",
            "source": { "type": "files", "path": "x" },
        }))
        .expect("old spec");
        assert_eq!(f.schedule(), None);
        assert!(!f.disabled);
        assert_eq!(f.mode(), FlowMode::Batch);
        assert_eq!(f.mode().refresh_interval(), None);
        // What the engine stores (serde_json::to_string) reads back the same.
        let back: FlowSpec =
            serde_json::from_str(&serde_json::to_string(&f).expect("json")).expect("round trip");
        assert_eq!(back, f);
        let q = FlowSpec::quick_start("q", PathBuf::from("/x")).expect("quick start");
        assert_eq!(q.mode(), FlowMode::Batch);
        assert_eq!(q.schedule(), None);
    }

    #[test]
    fn schedule_fields_round_trip_through_json() {
        let f = flow(serde_json::json!({
            "name": "a",
            "source": { "type": "files", "path": "x" },
            "schedule": { "interval": "PT90M", "start_time": "2026-01-01T01:00:00+01:00" },
            "disabled": true,
            "mode": "batch",
        }))
        .expect("scheduled spec");
        let s = f.schedule().expect("schedule");
        assert_eq!(s.interval().as_secs(), 5400);
        assert_eq!(s.start_time_ms(), Some(1_767_225_600_000));
        assert!(f.disabled);
        let json = serde_json::to_value(&f).expect("json");
        assert_eq!(
            json["schedule"],
            serde_json::json!({ "interval": "PT1H30M", "start_time": "2026-01-01T00:00:00Z" })
        );
        assert_eq!(json["mode"], "batch");
        assert_eq!(json["disabled"], true);
        assert_eq!(flow(json).expect("round trip"), f);

        let live = flow(serde_json::json!({
            "name": "b",
            "source": { "type": "push" },
            "mode": "live",
            "refresh_interval": "PT1H",
        }))
        .expect("live spec");
        assert_eq!(
            live.mode(),
            FlowMode::Live {
                refresh_interval: Some(Interval::parse("PT1H").expect("interval"))
            }
        );
        let json = serde_json::to_value(&live).expect("json");
        assert_eq!(json["mode"], "live");
        assert_eq!(json["refresh_interval"], "PT1H");
        assert!(json.get("schedule").is_none() && json.get("disabled").is_none());
        assert_eq!(flow(json).expect("round trip"), live);
    }

    #[test]
    fn schedule_field_errors_name_the_key() {
        let base = serde_json::json!({ "name": "a", "source": { "type": "push" } });
        let with = |k: &str, v: serde_json::Value| {
            let mut j = base.clone();
            j[k] = v;
            flow(j).expect_err(k)
        };
        let e = with("schedule", serde_json::json!({ "interval": "P1W" }));
        assert!(
            e.contains("schedule: interval: `P1W`") && e.contains("weeks"),
            "{e}"
        );
        let e = with("refresh_interval", serde_json::json!("PT1H"));
        assert!(e.contains("refresh_interval") && e.contains("live"), "{e}");
        let e = with("mode", serde_json::json!("Live"));
        assert!(e.contains("mode") && e.contains("`Live`"), "{e}");
        let mut j = base.clone();
        j["mode"] = "live".into();
        j["refresh_interval"] = "PT0S".into();
        let e = flow(j).expect_err("zero");
        assert!(
            e.contains("refresh_interval: `PT0S`") && e.contains("zero"),
            "{e}"
        );
    }

    #[test]
    fn mode_and_schedule_stay_consistent_and_the_minimum_is_checked() {
        let mut f = FlowSpec::quick_start("q", PathBuf::from("/x")).expect("quick start");
        let every = |t: &str| Schedule::new(Interval::parse(t).expect("interval"), None);
        f.set_schedule(Some(every("PT1M").expect("schedule")))
            .expect("batch flows take a schedule");
        let e = f
            .check_min_interval(crate::schedule::DEFAULT_MIN_SCHEDULE_INTERVAL)
            .expect_err("below the minimum");
        assert!(
            e.contains("schedule.interval") && e.contains("`PT1M`") && e.contains("`PT5M`"),
            "{e}"
        );
        let live = FlowMode::Live {
            refresh_interval: Some(Interval::parse("PT2M").expect("interval")),
        };
        let e = f.set_mode(live).expect_err("live with a schedule");
        assert!(e.contains("schedule"), "{e}");
        f.set_schedule(None).expect("no schedule");
        f.set_mode(live).expect("live");
        let e = f
            .check_min_interval(crate::schedule::DEFAULT_MIN_SCHEDULE_INTERVAL)
            .expect_err("below the minimum");
        assert!(
            e.contains("refresh_interval") && e.contains("`PT2M`"),
            "{e}"
        );
        assert_eq!(
            f.check_min_interval(Interval::parse("PT1M").expect("interval")),
            Ok(())
        );
        assert!(
            f.set_schedule(Some(every("PT5M").expect("schedule")))
                .is_err()
        );
    }

    #[test]
    fn postgres_sources_are_checked_while_read_and_round_trip() {
        let base = serde_json::json!({
            "type": "postgres",
            "url": "postgres://app:secret@db.internal:5433/app",
            "table": "public.docs",
            "key_columns": ["id"],
            "content_columns": ["title", "body"],
            "ordinal_column": "updated_at",
        });
        let read = |edit: &dyn Fn(&mut serde_json::Value)| {
            let mut source = base.clone();
            edit(&mut source);
            flow(serde_json::json!({ "name": "pg", "source": source }))
        };
        let f = read(&|_| {}).expect("valid");
        let pg = f.postgres().expect("a postgres source");
        assert_eq!(pg.soft_delete_marker, "true");
        assert!(f.has_runs() && f.files().is_none());
        let back: FlowSpec =
            serde_json::from_str(&serde_json::to_string(&f).expect("json")).expect("round trip");
        assert_eq!(back, f);

        type Edit<'a> = &'a dyn Fn(&mut serde_json::Value);
        let cases: [(Edit<'_>, &[&str]); 9] = [
            (&|s| s["url_env"] = "DB_URL".into(), &["url:", "not both"]),
            (
                &|s| {
                    s.as_object_mut().map(|o| o.remove("url"));
                },
                &["url:", "url_env"],
            ),
            (
                &|s| s["url"] = "mysql://u:pw@h/db".into(),
                &["url:", "u:***@h/db"],
            ),
            (&|s| s["query"] = "SELECT 1".into(), &["table:", "not both"]),
            (&|s| s["table"] = "a.b.c".into(), &["table:", "two parts"]),
            (
                &|s| s["key_columns"] = serde_json::json!([]),
                &["key_columns:", "at least one"],
            ),
            (
                &|s| s["content_columns"] = serde_json::json!(["body", "body"]),
                &["content_columns:", "`body`", "twice"],
            ),
            (
                &|s| s["soft_delete_marker"] = "yes".into(),
                &["soft_delete_marker:", "soft_delete_column"],
            ),
            (
                &|s| {
                    s.as_object_mut().map(|o| o.remove("table"));
                    s["query"] = "SELECT * FROM docs".into();
                    s["notify"] = true.into();
                },
                &["notify:", "table"],
            ),
        ];
        for (edit, words) in cases {
            let e = read(edit).expect_err("invalid");
            assert!(words.iter().all(|w| e.contains(w)), "{words:?}: {e}");
            assert!(!e.contains("secret"), "the password leaked: {e}");
        }
        // A trailing `;` would end the subquery.
        let q = read(&|s| {
            s.as_object_mut().map(|o| o.remove("table"));
            s["query"] = "SELECT * FROM docs ; ".into();
        })
        .expect("query");
        assert_eq!(
            q.postgres().and_then(|p| p.query.as_deref()),
            Some("SELECT * FROM docs")
        );
    }

    #[test]
    fn postgres_targets_are_checked_and_round_trip() {
        let with = |target: serde_json::Value| {
            flow(serde_json::json!({
                "name": "a",
                "source": { "type": "files", "path": "x" },
                "target": target,
            }))
        };
        let f = with(serde_json::json!({
            "type": "postgres",
            "url": "postgres://me:secret@db:5432/app",
            "table": "public.doc_chunks",
        }))
        .expect("postgres target");
        let p = f.target.postgres().expect("postgres");
        assert_eq!(p.vector_type, PgVectorType::Auto);
        assert_eq!(f.target.collection(), None);
        assert_eq!(f.target.name(), "public.doc_chunks");
        assert_eq!(
            f.target.identity(),
            "postgres:postgres://db:5432/app#public.doc_chunks"
        );
        let json = serde_json::to_value(&f).expect("json");
        assert_eq!(flow(json).expect("round trip"), f);
        let f = with(serde_json::json!({
            "type": "postgres", "url_env": "DB_URL", "table": "chunks", "vector_type": "real[]",
        }))
        .expect("url_env");
        assert_eq!(
            f.target.postgres().map(|p| p.vector_type),
            Some(PgVectorType::Real)
        );
        for (target, words) in [
            (
                serde_json::json!({ "type": "postgres", "table": "t" }),
                &["url", "url_env"][..],
            ),
            (
                serde_json::json!({ "type": "postgres", "url": "u", "url_env": "V", "table": "t" }),
                &["not both"],
            ),
            (
                serde_json::json!({ "type": "postgres", "url": "u", "table": "a.b.c" }),
                &["table", "dots"],
            ),
            (
                serde_json::json!({ "type": "postgres", "url": "u", "table": "Docs" }),
                &["table", "`Docs`", "lower case"],
            ),
            (
                serde_json::json!({ "type": "postgres", "url": "u", "table": "t; drop" }),
                &["table"],
            ),
            (
                serde_json::json!({ "type": "postgres", "url": "u", "table": "t", "vector_type": "float" }),
                &["vector_type", "float"],
            ),
            (
                serde_json::json!({ "type": "mysql", "table": "t" }),
                &["mysql", "postgres"],
            ),
        ] {
            let e = with(target.clone()).expect_err("invalid");
            for w in words {
                assert!(e.contains(w), "{target}: `{w}` missing from: {e}");
            }
        }
    }

    #[test]
    fn identities_leave_credentials_out() {
        assert_eq!(
            without_credentials("postgresql://u:p@h:1/d?sslmode=disable"),
            "postgresql://h:1/d?sslmode=disable"
        );
        assert_eq!(without_credentials("postgres://h/d"), "postgres://h/d");
        assert_eq!(
            without_credentials("host=h user=u password=p dbname=d"),
            "host=h dbname=d"
        );
    }

    #[test]
    fn sanitize_makes_valid_names() {
        assert_eq!(sanitize_name("my docs"), "my_docs");
        assert_eq!(sanitize_name(".hidden"), "hidden");
        assert_eq!(sanitize_name(""), "default");
        assert!(validate_name("n", &sanitize_name("ünï cøde")).is_ok());
    }
}
