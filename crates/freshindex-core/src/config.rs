//! `freshindex.toml`: a list of flows.

use std::fmt;
use std::path::{Path, PathBuf};

use serde::Deserialize;

use crate::spec::{FlowSpec, SourceSpec};

/// A parsed configuration file.
#[derive(Clone, Debug, PartialEq)]
pub struct Config {
    /// The state store (`store = "postgres://…"`): `None` for the data directory's embedded
    /// SQLite store.
    pub store: Option<String>,
    /// The flows, in file order.
    pub flows: Vec<FlowSpec>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    store: Option<String>,
    #[serde(default)]
    flow: Vec<toml::Spanned<FlowSpec>>,
}

/// A configuration error with its file position.
#[derive(Debug, Clone, PartialEq)]
pub struct ConfigError {
    /// The file, when the text came from one.
    pub file: Option<PathBuf>,
    /// 1-based line and column, when known.
    pub position: Option<(usize, usize)>,
    /// What is wrong, naming the key.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let file = self
            .file
            .as_ref()
            .map(|p| p.display().to_string())
            .unwrap_or_else(|| "config".into());
        match self.position {
            Some((line, col)) => write!(f, "{file}:{line}:{col}: {}", self.message),
            None => write!(f, "{file}: {}", self.message),
        }
    }
}

impl std::error::Error for ConfigError {}

fn line_col(text: &str, offset: usize) -> (usize, usize) {
    let before = &text[..offset.min(text.len())];
    let line = before.matches('\n').count() + 1;
    let col = before
        .rfind('\n')
        .map_or(before.len(), |nl| before.len() - nl - 1)
        + 1;
    (line, col)
}

/// Serde reports errors inside a value at the enclosing table; point at the named key's own
/// line instead. The key is the unknown field of an "unknown field `x`" message, or the last
/// component of the path the message starts with (`steps[1]: chunk_size: invalid type ...`).
fn locate_key(text: &str, from: usize, message: &str) -> Option<usize> {
    let key = match message.split_once("unknown field `") {
        Some((_, rest)) => rest[..rest.find('`')?].to_string(),
        None => {
            let is_path = |seg: &str| {
                !seg.is_empty()
                    && seg
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '[' | ']'))
            };
            let last = message.split(": ").take_while(|seg| is_path(seg)).last()?;
            let last = last.rsplit('.').next()?;
            last[..last.find('[').unwrap_or(last.len())].to_string()
        }
    };
    if key.is_empty() {
        return None;
    }
    let tail = text.get(from..)?;
    let mut search = 0;
    while let Some(i) = tail[search..].find(key.as_str()) {
        let at = search + i;
        let after = tail[at + key.len()..].trim_start_matches([' ', '\t']);
        let before_ok = !tail[..at]
            .chars()
            .next_back()
            .is_some_and(|c| c.is_ascii_alphanumeric() || c == '_');
        if after.starts_with('=') && before_ok {
            return Some(from + at);
        }
        search = at + key.len();
    }
    None
}

impl Config {
    /// Parses configuration text. `file` only labels errors.
    pub fn parse(text: &str, file: Option<&Path>) -> Result<Config, ConfigError> {
        let err = |position, message: String| ConfigError {
            file: file.map(Path::to_path_buf),
            position,
            message,
        };
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let pos = e.span().map(|s| {
                line_col(
                    text,
                    locate_key(text, s.start, e.message()).unwrap_or(s.start),
                )
            });
            // The message names the key; flatten it to one line for the CLI.
            err(pos, e.message().replace('\n', " ").trim().to_string())
        })?;
        if raw.flow.is_empty() {
            return Err(err(
                None,
                "no [[flow]] defined; `freshindex init` writes an example".into(),
            ));
        }
        let mut flows: Vec<FlowSpec> = Vec::with_capacity(raw.flow.len());
        let mut positions = Vec::with_capacity(raw.flow.len());
        for spanned in raw.flow {
            let pos = line_col(text, spanned.span().start);
            positions.push(pos);
            let flow = spanned.into_inner();
            if flows.iter().any(|f| f.name == flow.name) {
                return Err(err(
                    Some(pos),
                    format!("name: flow `{}` is defined twice", flow.name),
                ));
            }
            if let Some(other) = flows
                .iter()
                .find(|f| f.target.identity() == flow.target.identity())
            {
                return Err(err(
                    Some(pos),
                    format!(
                        "target: flow `{}` writes to {}, already the target of flow `{}`; give each flow its own target",
                        flow.name, flow.target, other.name
                    ),
                ));
            }
            flows.push(flow);
        }
        let refs: Vec<&FlowSpec> = flows.iter().collect();
        if let Err(e) = crate::spec::check_flow_graph(&refs) {
            // The position of the flow the message starts with.
            let at = flows
                .iter()
                .position(|f| e.starts_with(&format!("flow `{}`", f.name)))
                .map(|i| positions[i]);
            return Err(err(at, e));
        }
        if let Some(store) = &raw.store
            && !(store.starts_with("postgres://") || store.starts_with("postgresql://"))
        {
            return Err(err(
                locate_key(text, 0, "unknown field `store`").map(|at| line_col(text, at)),
                "store: expected a postgres:// URL (leave it out for the embedded SQLite store)"
                    .into(),
            ));
        }
        Ok(Config {
            store: raw.store,
            flows,
        })
    }

    /// Reads and parses a file; relative source paths become relative to the file's folder.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            file: Some(path.to_path_buf()),
            position: None,
            message: format!("cannot read: {e}"),
        })?;
        let mut config = Config::parse(&text, Some(path))?;
        let base = path.parent().unwrap_or(Path::new("."));
        for flow in &mut config.flows {
            match &mut flow.source {
                SourceSpec::Files(files) => {
                    if files.path.is_relative() {
                        files.path = base.join(&files.path);
                    }
                }
                SourceSpec::Push(_) | SourceSpec::Postgres(_) | SourceSpec::Flows(_) => {}
            }
        }
        Ok(config)
    }

    /// The flow named `name`, or an error listing the flows.
    pub fn flow(&self, name: &str) -> Result<&FlowSpec, String> {
        self.flows.iter().find(|f| f.name == name).ok_or_else(|| {
            let names: Vec<&str> = self.flows.iter().map(|f| f.name.as_str()).collect();
            format!(
                "no flow named `{name}`; the config defines: {}",
                names.join(", ")
            )
        })
    }
}

/// The commented reference configuration that `freshindex init` writes. A test parses it.
pub const REFERENCE_CONFIG: &str = r#"# freshindex configuration: one [[flow]] table per flow.
# Run every flow:   freshindex index
# Run one flow:     freshindex index --flow docs
# Search it:        freshindex search "how do I rotate keys" --flow docs

# The state store, when several processes share one (see "Running on PostgreSQL with several
# workers" in the README); leave it out for the embedded SQLite store of the data directory.
# store = "postgres://freshindex@db.internal:5432/freshindex"

[[flow]]
# Unique name of the flow (letters, digits, '-', '_', '.'). Also the default collection name.
name = "docs"

# A run fails (non-zero exit) when more items than this fail. -1 = no limit.
max_failed_items = -1

# How the flow is kept fresh: "batch" (runs on its schedule or on demand) or "live"
# (changes are indexed as a file watcher reports them, within a fraction of a second:
# `freshindex serve` keeps every live flow fresh; `freshindex index --watch` does it for one
# flow without a server).
mode = "batch"

# Batch mode: `freshindex serve` runs the flow on this schedule, every `interval`, an ISO 8601
# duration P(nD)(T(nH)(nM)(nS)) in upper case, whole numbers, such as PT15M, PT2H, P1DT12H:
# at least 5 minutes (the server setting min_schedule_interval) and at most 24 hours (P1D).
# Runs happen at start_time + k * interval. `start_time` (optional, RFC 3339 with Z or an
# offset) defaults to when the server takes up the schedule; a start time in the past
# schedules as if the flow had run since then (no catch-up runs). A run still going at an
# occurrence skips it (recorded in the history); runs that keep failing back off (twice the
# interval per failure, up to 24 hours) until a run, scheduled or manual, succeeds.
# Without `schedule` the flow runs only on demand (`freshindex index`, the API).
# schedule = { interval = "PT15M", start_time = "2026-01-01T00:00:00Z" }

# Pause the flow's schedule (and a live flow's updates) without removing it; manual runs
# still work.
disabled = false

# Live mode only: also scan the whole source this often (ISO 8601 duration, as `interval`;
# default one hour), for changes the watcher missed. Not allowed with mode = "batch".
# refresh_interval = "PT1H"

# The source: a folder scanned in full on every run — or, for items that external connectors
# push through the HTTP queue API (`freshindex serve`), `source = { type = "push" }` — or
# the rows of a PostgreSQL table: `type = "postgres"` with `url` (or `url_env`), `table` (or
# `query`), `key_columns`, `content_columns`, `ordinal_column` (README: PostgreSQL source).
# Unchanged files (same size and
# modification time) are not read; changed ones are fingerprinted with BLAKE3, and only
# files whose content changed are processed again. Deleted files lose their rows.
[flow.source]
type = "files"
# Relative paths are relative to this file.
path = "docs"
# Glob patterns of files to index, relative to `path`.
include = ["**/*.md", "**/*.markdown", "**/*.txt", "**/*.text"]
# Glob patterns of files or folders to leave out.
exclude = ["**/node_modules/**", "**/.git/**"]
# Larger files are skipped with a warning. Units: B, KB, KiB, MB, MiB, GB, GiB.
max_file_size = "10MiB"
# Follow symbolic links; loops are detected and reported.
follow_symlinks = true

# The steps, in this order. Omit `steps` to get exactly these defaults.
[[flow.steps]]
# Decode UTF-8 text and Markdown. Binary, empty and non-UTF-8 files are skipped with a warning.
op = "parse"

[[flow.steps]]
# Split into chunks of at most `chunk_size` characters (Markdown-aware for .md/.markdown),
# neighbours sharing `chunk_overlap` characters. Changing these re-splits every file but only
# embeds chunk texts never seen before.
op = "split"
chunk_size = 1000
chunk_overlap = 200

[[flow.steps]]
# Embed every chunk. Results are cached by (model, chunk text): an identical chunk anywhere
# in the flow is embedded once. Changing the model re-embeds everything.
op = "embed"
# "builtin": hashed word and character n-gram features, 384 dimensions, no download.
# "local:PATH": a sentence-transformers model in Hugging Face format in folder PATH, on the CPU
#   (threads = N bounds its threads). "hf:ORG/NAME": the same from the local Hugging Face cache
#   (nothing is downloaded). "openai:MODEL": a server of the OpenAI embeddings protocol, with
#   base_url, api_key_env (the variable holding the key), dimensions, timeout_secs,
#   max_concurrency and max_retries. To move a serving flow to another model without downtime,
#   use `freshindex reindex --flow NAME --to MODEL --blue`.
model = "builtin"
# Texts per embedding call.
batch_size = 64

# The target: a built-in vector collection stored in the data directory.
# Omit it to get a collection named after the flow.
[flow.target]
type = "collection"
name = "docs"
# Or a table of a PostgreSQL database (`freshindex setup` creates it; a run does too):
#   type = "postgres"
#   url = "postgres://user@host:5432/db"   # or url_env = "VAR", the variable holding it
#   table = "public.doc_chunks"            # schema.table or a bare name; lower case
#   vector_type = "auto"                   # "real[]", "vector" (pgvector), or auto: pgvector if installed

# Flows can read other flows' items (see the README's "Flows that combine sources"):
#   [[flow]]
#   name = "products"                       # one item per item of flow `catalog`,
#   source = { type = "flows", from = "catalog" }
#   steps = [                               # with its maker's item from flow `companies`
#     { op = "lookup", from = "companies", key = "company", as = "maker", required = false },
#     { op = "template", text = "{name} by {maker.name}: {text}" },
#     { op = "parse" }, { op = "split" }, { op = "embed" },
#   ]
# A merge: source = { type = "flows", from = ["eu", "us"], merge_key = "sku", merge = "first" }
# A group: { op = "group", by = "category", aggregate = { count = "count", names = "list:name" } }
# as the first step of a flow whose source reads one flow. Fields come from Markdown front
# matter, a table's metadata_columns, or pushed metadata. `freshindex index` runs inputs first.
"#;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::FlowMode;

    #[test]
    fn the_store_is_a_postgres_url_or_nothing() {
        let flow = "[[flow]]\nname = \"a\"\nsource = { type = \"files\", path = \".\" }\n";
        let c = Config::parse(flow, None).expect("no store");
        assert_eq!(c.store, None);
        let text = format!("store = \"postgres://u@h/db\"\n{flow}");
        let c = Config::parse(&text, None).expect("a store");
        assert_eq!(c.store.as_deref(), Some("postgres://u@h/db"));
        let text = format!("store = \"mysql://h/db\"\n{flow}");
        let e = Config::parse(&text, None).expect_err("not postgres");
        assert!(e.message.starts_with("store:"), "{e}");
        assert_eq!(e.position.map(|p| p.0), Some(1), "{e}");
    }

    #[test]
    fn reference_config_parses() {
        let c = Config::parse(REFERENCE_CONFIG, None).expect("reference config");
        assert_eq!(c.flows.len(), 1);
        assert_eq!(c.flows[0].split().chunk_size, 1000);
        assert_eq!(c.flows[0].files().unwrap().exclude.len(), 2);
        assert_eq!(c.flows[0].mode(), FlowMode::Batch);
        assert!(c.flows[0].schedule().is_none());
        assert!(!c.flows[0].disabled);
    }

    /// The commented-out examples of the reference config are valid too.
    #[test]
    fn reference_config_examples_parse() {
        let text = REFERENCE_CONFIG.replace("# schedule = ", "schedule = ");
        let c = Config::parse(&text, None).expect("reference config with a schedule");
        let s = c.flows[0].schedule().expect("schedule");
        assert_eq!(s.interval().as_secs(), 15 * 60);
        assert_eq!(s.start_time_ms(), Some(1_767_225_600_000));

        let text = REFERENCE_CONFIG
            .replace("mode = \"batch\"", "mode = \"live\"")
            .replace("# refresh_interval = ", "refresh_interval = ");
        let c = Config::parse(&text, None).expect("reference config in live mode");
        assert_eq!(
            c.flows[0].mode().refresh_interval().map(|r| r.as_secs()),
            Some(3600)
        );
    }

    #[test]
    fn schedule_fields_parse_and_name_their_key() {
        let base = "[[flow]]\nname = \"a\"\nsource = { type = \"files\", path = \"x\" }\n";
        // A TOML date-time works as well as a string.
        let c = Config::parse(
            &format!(
                "{base}schedule = {{ interval = \"PT2H\", start_time = 2026-01-01T00:00:00Z }}\n"
            ),
            None,
        )
        .expect("toml datetime");
        assert_eq!(
            c.flows[0].schedule().and_then(|s| s.start_time_ms()),
            Some(1_767_225_600_000)
        );

        let cases: [(&str, &[&str]); 9] = [
            (
                "schedule = { interval = \"PT1.5H\" }\n",
                &["interval", "PT1.5H", "fraction"],
            ),
            (
                "schedule = { interval = \"P1M\" }\n",
                &["interval", "P1M", "months"],
            ),
            ("schedule = { interval = 15 }\n", &["interval", "ISO 8601"]),
            (
                "schedule = { start_time = \"2026-01-01T00:00:00Z\" }\n",
                &["schedule", "interval"],
            ),
            (
                "schedule = { interval = \"PT15M\", startTime = \"x\" }\n",
                &["startTime"],
            ),
            (
                "schedule = { interval = \"PT15M\", start_time = \"2026-01-01T00:00:00\" }\n",
                &["start_time", "2026-01-01T00:00:00", "offset"],
            ),
            ("mode = \"stream\"\n", &["mode", "stream", "live"]),
            (
                "refresh_interval = \"PT1H\"\n",
                &["refresh_interval", "live", "batch"],
            ),
            (
                "mode = \"live\"\nschedule = { interval = \"PT15M\" }\n",
                &["schedule", "live", "refresh_interval"],
            ),
        ];
        for (extra, words) in cases {
            let e = Config::parse(&format!("{base}{extra}"), None).expect_err(extra);
            for w in words {
                assert!(e.message.contains(w), "{extra}: `{w}` missing from: {e}");
            }
            // The offending key is on the last line of the case.
            let line = 3 + extra.lines().count();
            assert_eq!(e.position.map(|p| p.0), Some(line), "{extra}: {e}");
        }
        let e = Config::parse(&format!("{base}disabled = \"yes\"\n"), None).expect_err("bool");
        assert!(e.message.contains("disabled"), "{e}");
    }

    #[test]
    fn defaults_fill_steps_and_target() {
        let c = Config::parse(
            "[[flow]]\nname = \"a\"\nsource = { type = \"files\", path = \"x\" }\n",
            None,
        )
        .expect("minimal config");
        let f = &c.flows[0];
        assert_eq!(f.steps().len(), 3);
        assert_eq!(f.target.collection(), Some("a"));
        assert_eq!(f.split().chunk_overlap, 200);
        assert_eq!(f.embed().model, "builtin");
    }

    #[test]
    fn unknown_key_is_named_with_its_line() {
        let text = "[[flow]]\nname = \"a\"\nsource = { type = \"files\", path = \"x\" }\nsteps = [\n { op = \"parse\" },\n { op = \"split\", chunk_sise = 5 },\n { op = \"embed\" },\n]\n";
        let e = Config::parse(text, None).expect_err("unknown key");
        assert!(e.message.contains("chunk_sise"), "{e}");
        assert_eq!(e.position.map(|p| p.0), Some(6), "{e}");
    }

    #[test]
    fn invalid_values_are_named() {
        let text = "[[flow]]\nname = \"a\"\nsource = { type = \"files\", path = \"x\", max_file_size = \"3 parsecs\" }\n";
        let e = Config::parse(text, None).expect_err("bad size");
        assert!(e.message.contains("parsecs"), "{e}");
        assert!(e.message.contains("max_file_size"), "{e}");
        let text = "[[flow]]\nname = \"a\"\nsource = { type = \"files\", path = \"x\" }\nsteps = [\n { op = \"parse\" },\n { op = \"split\", chunk_size = \"big\" },\n { op = \"embed\" },\n]\n";
        let e = Config::parse(text, None).expect_err("bad type");
        assert!(e.message.contains("chunk_size"), "{e}");
        assert_eq!(e.position.map(|p| p.0), Some(6), "{e}");
        let text = "[[flow]]\nname = \"a\"\nsource = { type = \"ftp\", path = \"x\" }\n";
        let e = Config::parse(text, None).expect_err("bad source type");
        assert!(e.message.contains("ftp"), "{e}");
        let text = "[[flow]]\nname = \"a\"\nsource = { type = \"files\", path = \"x\" }\nsteps = [{ op = \"parse\" }, { op = \"split\", chunk_size = 10, chunk_overlap = 10 }, { op = \"embed\" }]\n";
        let e = Config::parse(text, None).expect_err("bad overlap");
        assert!(e.message.contains("chunk_overlap"), "{e}");
        let text = "[[flow]]\nname = \"a\"\nsource = { type = \"files\", path = \"x\" }\n[[flow]]\nname = \"a\"\nsource = { type = \"files\", path = \"y\" }\n";
        let e = Config::parse(text, None).expect_err("duplicate");
        assert!(e.message.contains("defined twice"), "{e}");
        assert_eq!(e.position.map(|p| p.0), Some(4), "{e}");
        let text = "[[flow]]\nname = \"a\"\nsource = { type = \"files\", path = \"x\" }\ntarget = { type = \"collection\", name = \"c\" }\n[[flow]]\nname = \"b\"\nsource = { type = \"files\", path = \"y\" }\ntarget = { type = \"collection\", name = \"c\" }\n";
        let e = Config::parse(text, None).expect_err("shared collection");
        assert!(e.message.contains("collection `c`"), "{e}");
        assert_eq!(e.position.map(|p| p.0), Some(5), "{e}");
    }
}
