//! What a flow needs outside the program, made and removed on request (`freshindex setup`,
//! `freshindex drop`).
//!
//! Each part of a flow that lives outside the data directory — a PostgreSQL source's notify
//! trigger, a PostgreSQL target's table — is one [`Step`]: [`Engine::setup_flow`] makes what each step needs (a second
//! time, it finds it there and says so), [`Engine::drop_flow_resources`] removes it and then
//! forgets the flow's state when it removed the target, whose rows that state described. Steps are a plain list,
//! sources' first, then the target's; a part that keeps nothing outside the data directory
//! (a files source, a built-in collection) has no step.
//!
//! Setting up is optional: a run creates a missing table the same way.

use freshindex_core::FlowSpec;
use freshindex_core::spec::{PostgresSource, PostgresTarget};

use crate::source::postgres::PgSource;

use crate::steps::embed::embedder_for;
use crate::{Engine, EngineError};

/// One part of a flow that keeps something outside the data directory.
enum Step<'a> {
    /// A `postgres` source with `notify = true`: the trigger that notifies its live loop.
    PgTrigger(&'a PostgresSource),
    /// A `postgres` target: its table (and the table's `source_key` index).
    PgTable(&'a PostgresTarget),
}

/// The flow's steps, in the order they are set up (and dropped).
fn steps(spec: &FlowSpec) -> Vec<Step<'_>> {
    let mut steps = Vec::new();
    if let Some(p) = spec.postgres().filter(|p| p.notify) {
        steps.push(Step::PgTrigger(p));
    }
    if let Some(p) = spec.target.postgres() {
        steps.push(Step::PgTable(p));
    }
    steps
}

impl Engine {
    /// Creates what the flow needs outside the program: for a PostgreSQL target, its table
    /// (`CREATE TABLE IF NOT EXISTS`, the vector column typed after the pgvector check and the
    /// model's dimension). An existing table of another shape is an error naming the column.
    /// Returns one line per step saying what was created or found.
    pub fn setup_flow(&self, spec: &FlowSpec) -> Result<Vec<String>, EngineError> {
        let spec = &self.effective(spec)?;
        let mut lines = Vec::new();
        for step in steps(spec) {
            match step {
                Step::PgTrigger(p) => lines.extend(PgSource::new(p)?.setup(&spec.name)?),
                Step::PgTable(p) => lines.push(self.setup_pg_table(spec, p)?),
            }
        }
        if lines.is_empty() {
            lines.push(format!(
                "flow `{}`: nothing to set up (its source and {} need nothing outside the data directory)",
                spec.name, spec.target
            ));
        }
        Ok(lines)
    }

    /// Removes what [`setup_flow`](Self::setup_flow) creates (`DROP TABLE IF EXISTS`), then
    /// forgets the flow's state (queue, lineage, memo cache, history, as
    /// [`delete_flow`](Self::delete_flow) does) when it described this target; a flow stored
    /// with another target keeps its state. A flow with no step is left as it is. Takes the
    /// flow's run lock (refused with [`EngineError::Busy`] while a run holds it). Returns one
    /// line per thing done.
    pub fn drop_flow_resources(&self, spec: &FlowSpec) -> Result<Vec<String>, EngineError> {
        let steps = steps(spec);
        if steps.is_empty() {
            return Ok(vec![format!(
                "flow `{}`: nothing to drop (its source and {} keep nothing outside the data directory; `freshindex reset` forgets what it derived)",
                spec.name, spec.target
            )]);
        }
        let stored = self.store().flow(&spec.name)?;
        // A name no flow has names no lock file either.
        let _lock = match &stored {
            Some(_) => Some(self.lock(&spec.name)?),
            None => None,
        };
        let mut lines = Vec::new();
        let drops_target = steps.iter().any(|s| matches!(s, Step::PgTable(_)));
        {
            let _writer = self.writer();
            for step in steps {
                lines.push(match step {
                    Step::PgTrigger(p) => {
                        lines.extend(PgSource::new(p)?.teardown(&spec.name)?);
                        continue;
                    }
                    Step::PgTable(p) => {
                        let table = self.pg_table(p)?;
                        let place =
                            format!("PostgreSQL table `{}` at {}", p.table, table.endpoint());
                        if table.drop_table()? {
                            format!("flow `{}`: dropped {place}", spec.name)
                        } else {
                            format!("flow `{}`: {place} was not there", spec.name)
                        }
                    }
                });
            }
        }
        // The table went first: a drop that fails to reach the database changes nothing, and
        // a run after a drop cut short here finds the table missing and indexes everything.
        // A flow whose target stays (a collection) keeps the state that describes it.
        if stored.is_some() && drops_target {
            let (id, before) = self.flow(&spec.name)?;
            if before.target.identity() == spec.target.identity() {
                let _writer = self.writer();
                self.store().delete_flow(id)?;
                drop(_writer);
                self.forget_reindex_state(&spec.name)?;
                lines.push(format!(
                    "flow `{}`: forgot its state (queue, lineage, embedding cache, history)",
                    spec.name
                ));
            } else {
                lines.push(format!(
                    "flow `{}`: kept its state, which describes {} (the target it last ran with)",
                    spec.name, before.target
                ));
            }
        }
        Ok(lines)
    }

    /// A PostgreSQL target's table, for vectors of the flow model's dimension.
    fn setup_pg_table(&self, spec: &FlowSpec, p: &PostgresTarget) -> Result<String, EngineError> {
        let dimension = embedder_for(spec.embed())
            .map_err(EngineError::Config)?
            .dimension();
        let table = self.pg_table(p)?;
        let ensured = table.ensure(dimension, p.vector_type)?;
        let column = match ensured.column {
            freshindex_vector::VectorColumn::Real => "real[]".to_string(),
            freshindex_vector::VectorColumn::PgVector => format!("vector({dimension})"),
        };
        let place = format!("PostgreSQL table `{}` at {}", p.table, table.endpoint());
        Ok(if ensured.created {
            format!(
                "flow `{}`: created {place} (vector column {column}, dimension {dimension})",
                spec.name
            )
        } else {
            format!(
                "flow `{}`: {place} is already there (vector column {column}, dimension {dimension})",
                spec.name
            )
        })
    }
}
