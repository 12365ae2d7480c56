//! Multi-input flows (seed 002: "multi-input transformations re-fetch the related rows they
//! need"): lookups, merges and groups, kept exact through the same queue, lineage and
//! two-phase write as every flow.
//!
//! - **Documents.** A flow that another flow reads keeps the fields of each item it indexes
//!   (key, text, metadata, what its own lookups added) as a document in the store, written
//!   in the batch's commit with the item's state (so a document is never newer or older than
//!   what the item's entry says was indexed), with a per-flow sequence number that every
//!   change takes.
//! - **Lookups** read documents by key and record dependency edges (this item read that
//!   key of that flow, present or not). A run of the reading flow first follows the
//!   sequence of each looked-up flow past its mark: the items that depend on a changed key
//!   are requeued (`MODIFIED`, content hash forgotten, the reason as their message), so the
//!   run processes them again — the memo cache keeps unchanged chunks free.
//! - **Merges and groups** (a `flows` source) make one item per key: a run follows each
//!   input's sequence, places every changed document in its group (the merge key or the
//!   group's `by`, evaluated on the document), records the membership, and requeues the
//!   groups a document left and joined. Processing a group reads its members' documents
//!   and combines them; a group without members is deleted like any gone item.
//!
//! The requeues happen before the membership and the mark move (one transaction), so a
//! crash in between requeues again rather than losing a change.

use std::collections::{BTreeMap, BTreeSet, HashMap};

use freshindex_core::queue::check_key;
use freshindex_core::spec::{Aggregate, MergeRule};
use freshindex_core::template::{Template, is_empty, lookup};
use freshindex_core::{Fingerprint, FlowSpec, PushType};
use freshindex_store::{FlowId, MemberChange, PushItem, PushKind, StoredDoc};
use serde_json::{Map, Value};

use crate::process::Ctx;
use crate::run::now_ms;
use crate::summary::Issue;
use crate::{Engine, EngineError};

/// Documents read per page while following an input's sequence.
const PAGE: usize = 4096;

/// What processing one item wrote for the flows that read it, and what it read of others.
#[derive(Debug, Default)]
pub(crate) struct ItemInputs {
    /// The item's document: `None` keeps the stored one, `Some(None)` records that it has
    /// none (a tombstone).
    pub(crate) doc: Option<Option<Vec<u8>>>,
    /// The keys of other flows the item read; `None` keeps the recorded ones.
    pub(crate) deps: Option<Vec<(FlowId, String)>>,
}

impl ItemInputs {
    /// A gone (or skipped) item: no document, no dependencies.
    pub(crate) fn gone() -> ItemInputs {
        ItemInputs {
            doc: Some(None),
            deps: Some(Vec::new()),
        }
    }
}

/// A flow's templates, parsed once per run: each lookup's key, and the text template.
pub(crate) struct Shape {
    lookup_keys: Vec<Template>,
    text: Option<Template>,
}

impl Shape {
    /// The templates of `spec` (checked when the spec was read, so errors are unexpected).
    pub(crate) fn of(spec: &FlowSpec) -> Result<Shape, EngineError> {
        let lookup_keys = spec
            .lookups()
            .map(|l| {
                Template::key_expr(&l.key).map_err(|e| format!("lookup `{}`: key: {e}", l.as_field))
            })
            .collect::<Result<_, _>>()
            .map_err(EngineError::Config)?;
        let text = spec
            .template()
            .map(|t| Template::parse(&t.text).map_err(|e| format!("template: {e}")))
            .transpose()
            .map_err(EngineError::Config)?;
        Ok(Shape { lookup_keys, text })
    }
}

/// The fields of an item made ready for splitting.
pub(crate) struct Finished {
    /// The text to index.
    pub(crate) text: String,
    /// What the item's rows carry as metadata.
    pub(crate) metadata: Option<Value>,
    /// Its document and dependencies.
    pub(crate) inputs: ItemInputs,
}

/// The fields of an item: `key`, `text`, and the source's metadata (an object's fields; any
/// other value as `metadata`).
pub(crate) fn fields_of(key: &str, text: &str, metadata: Option<&Value>) -> Value {
    let mut m = Map::new();
    match metadata {
        Some(Value::Object(o)) => {
            for (k, v) in o {
                m.insert(k.clone(), v.clone());
            }
        }
        Some(Value::Null) | None => {}
        Some(other) => {
            m.insert("metadata".into(), other.clone());
        }
    }
    m.insert("key".into(), Value::String(key.to_string()));
    m.insert("text".into(), Value::String(text.to_string()));
    Value::Object(m)
}

/// The fields of a Markdown front matter block (`---` lines around `name: value` lines at
/// the start of a file) and the text after it: a files item's fields in multi-input flows.
/// Values are strings; quotes around a value are removed. `None` when the text has no such
/// block.
pub(crate) fn front_matter(text: &str) -> Option<(Value, &str)> {
    let first = text.split_inclusive('\n').next()?;
    if first.trim_end() != "---" {
        return None;
    }
    let mut m = Map::new();
    let mut at = first.len();
    for line in text[at..].split_inclusive('\n') {
        at += line.len();
        let line = line.trim_end();
        if line == "---" || line == "..." {
            return Some((Value::Object(m), &text[at..]));
        }
        if line.trim().is_empty() || line.trim_start().starts_with('#') {
            continue;
        }
        // Lines that are no `name: value` (a list item, a continued value) are passed over.
        let Some((k, v)) = line.split_once(':') else {
            continue;
        };
        let k = k.trim();
        if k.is_empty() || k == "key" || k == "text" {
            continue;
        }
        let v = v.trim();
        let v = v
            .strip_prefix('"')
            .and_then(|x| x.strip_suffix('"'))
            .or_else(|| v.strip_prefix('\'').and_then(|x| x.strip_suffix('\'')))
            .unwrap_or(v);
        m.insert(k.to_string(), Value::String(v.to_string()));
    }
    None
}

/// The input flows of a flow, by name, as registered in the store.
pub(crate) fn resolve_inputs(
    engine: &Engine,
    spec: &FlowSpec,
) -> Result<HashMap<String, FlowId>, EngineError> {
    let mut out = HashMap::new();
    for name in spec.inputs() {
        let rec = engine.store().flow(name)?.ok_or_else(|| {
            EngineError::Config(format!(
                "flow `{}` reads flow `{name}`, which is not defined here; define or run `{name}` first (`freshindex index` runs every flow of the config, inputs first)",
                spec.name
            ))
        })?;
        out.insert(name.to_string(), rec.id);
    }
    Ok(out)
}

impl Ctx<'_> {
    /// Whether this flow's items pass through the multi-input steps (their rows then carry
    /// the item's fields as metadata).
    fn multi(&self) -> bool {
        self.spec.uses_fields()
    }

    fn input_id(&self, name: &str) -> Result<FlowId, String> {
        self.inputs
            .get(name)
            .copied()
            .ok_or_else(|| format!("flow `{name}` is not known to this run"))
    }

    /// Applies the lookups and the template to an item's fields. `Err` is a failed item
    /// (the message names the lookup and the key) with the dependencies it recorded.
    pub(crate) fn finish(
        &self,
        mut fields: Value,
        source_metadata: Option<Value>,
    ) -> Result<Finished, (String, ItemInputs)> {
        if !self.multi() && !self.keeps_docs() {
            let text = fields
                .get("text")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string();
            return Ok(Finished {
                text,
                metadata: source_metadata,
                inputs: ItemInputs::default(),
            });
        }
        let mut deps: Vec<(FlowId, String)> = Vec::new();
        let has_lookups = self.spec.lookups().next().is_some();
        for (l, expr) in self.spec.lookups().zip(&self.shape.lookup_keys) {
            let k = expr.render(&fields);
            let found = if k.is_empty() {
                None
            } else {
                let up = self
                    .input_id(&l.from)
                    .map_err(|e| (e, ItemInputs::default()))?;
                deps.push((up, k.clone()));
                match self.engine.store().docs(up, std::slice::from_ref(&k)) {
                    Ok(mut d) => d.pop().and_then(|d| d.doc),
                    Err(e) => {
                        return Err((
                            format!("lookup `{}` in `{}`: {e}", l.as_field, l.from),
                            ItemInputs::default(),
                        ));
                    }
                }
            };
            let value = match found {
                Some(bytes) => serde_json::from_slice(&bytes).unwrap_or(Value::Null),
                None => Value::Null,
            };
            if value.is_null() && l.required {
                let why = if k.is_empty() {
                    format!(
                        "lookup `{}`: the key `{}` is empty for this item (required = true)",
                        l.as_field, l.key
                    )
                } else {
                    format!(
                        "lookup `{}`: flow `{}` has no item `{k}` (required = true)",
                        l.as_field, l.from
                    )
                };
                return Err((
                    why,
                    ItemInputs {
                        doc: None,
                        deps: Some(deps),
                    },
                ));
            }
            if let Value::Object(m) = &mut fields {
                m.insert(l.as_field.clone(), value);
            }
        }
        let text = match &self.shape.text {
            Some(t) => t.render(&fields),
            None => fields
                .get("text")
                .and_then(Value::as_str)
                .unwrap_or_default()
                .to_string(),
        };
        if let Value::Object(m) = &mut fields {
            m.insert("text".into(), Value::String(text.clone()));
        }
        let doc = self
            .keeps_docs()
            .then(|| Some(serde_json::to_vec(&fields).unwrap_or_default()));
        let metadata = if self.multi() {
            let mut m = match fields {
                Value::Object(m) => m,
                _ => Map::new(),
            };
            m.remove("text");
            m.remove("key");
            cap_metadata(&mut m);
            (!m.is_empty()).then_some(Value::Object(m))
        } else {
            source_metadata
        };
        Ok(Finished {
            text,
            metadata,
            inputs: ItemInputs {
                doc,
                deps: has_lookups.then_some(deps),
            },
        })
    }

    /// The fields of item `group` of a flows source, combined from its members' documents,
    /// with the content hash of that combination; `None` when it has no members any more.
    pub(crate) fn combine(&self, group: &str) -> Result<Option<(Value, String)>, EngineError> {
        let Some(src) = self.spec.flows_source() else {
            return Ok(None);
        };
        let store = self.engine.store();
        let members = store.group_members(self.flow, group)?;
        // Members in priority order (the order of `from`), then by key.
        let mut by_flow: BTreeMap<usize, Vec<String>> = BTreeMap::new();
        for (up, key) in members {
            if let Some(i) = src
                .from
                .iter()
                .position(|n| self.inputs.get(n) == Some(&up))
            {
                by_flow.entry(i).or_default().push(key);
            }
        }
        let mut docs: Vec<(usize, StoredDoc, Value)> = Vec::new();
        for (i, keys) in by_flow {
            let up = self.inputs[&src.from[i]];
            for d in store.docs(up, &keys)? {
                let v = d
                    .doc
                    .as_deref()
                    .and_then(|b| serde_json::from_slice(b).ok())
                    .unwrap_or(Value::Null);
                docs.push((i, d, v));
            }
        }
        if docs.is_empty() {
            return Ok(None);
        }
        let mut h = Fingerprint::builder("freshindex/group").fp(&self.spec_fp);
        for (i, d, _) in &docs {
            h = h.u64(*i as u64).str(&d.key).field(&d.fp);
        }
        let hash = h.finish().hex_prefix(32);
        let values: Vec<&Value> = docs.iter().map(|(_, _, v)| v).collect();
        let mut fields = match self.spec.group() {
            Some(g) => aggregate(&g.aggregate, &values),
            None => merge(src.merge, &values),
        };
        if let Value::Object(m) = &mut fields {
            if self.spec.group().is_none() {
                let sources: Vec<Value> = docs
                    .iter()
                    .map(|(i, d, _)| Value::String(format!("{}/{}", src.from[*i], d.key)))
                    .collect();
                m.insert("sources".into(), Value::Array(sources));
            }
            if self.spec.group().is_some() || src.merge == MergeRule::List {
                let texts: Vec<&str> = values
                    .iter()
                    .filter_map(|v| v.get("text").and_then(Value::as_str))
                    .filter(|t| !t.is_empty())
                    .collect();
                m.insert("text".into(), Value::String(texts.join("\n\n")));
            }
            m.insert("key".into(), Value::String(group.to_string()));
        }
        Ok(Some((fields, hash)))
    }
}

/// Most bytes of fields (as JSON) every row of a multi-input item carries as metadata.
pub(crate) const MAX_ROW_METADATA: usize = 16 * 1024;

/// Keeps a row's metadata under [`MAX_ROW_METADATA`]: every chunk row of an item repeats
/// it, so a group's long member lists would otherwise be copied into each of its chunks.
/// The largest fields are left out first, and their names listed in `omitted_fields`.
fn cap_metadata(m: &mut Map<String, Value>) {
    let size = |v: &Value| serde_json::to_string(v).map_or(0, |s| s.len());
    let mut total: usize = m.iter().map(|(k, v)| k.len() + 4 + size(v)).sum();
    if total <= MAX_ROW_METADATA {
        return;
    }
    let mut by_size: Vec<(usize, String)> = m.iter().map(|(k, v)| (size(v), k.clone())).collect();
    by_size.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    let mut omitted = Vec::new();
    for (n, k) in by_size {
        if total <= MAX_ROW_METADATA {
            break;
        }
        m.remove(&k);
        total = total.saturating_sub(n + k.len() + 4);
        omitted.push(Value::String(k));
    }
    omitted.sort_by(|a, b| a.as_str().cmp(&b.as_str()));
    m.insert("omitted_fields".into(), Value::Array(omitted));
}

/// Most distinct reasons one page of changes requeues with: past it, one transaction
/// requeues the page's items with a reason that counts the changes.
const MAX_REASONS: usize = 32;

/// Items to requeue by reason, as few requeues as [`MAX_REASONS`] allows.
fn merge_reasons(
    reasons: BTreeMap<String, Vec<String>>,
    input: &str,
) -> Vec<(String, Vec<String>)> {
    if reasons.len() <= MAX_REASONS {
        return reasons.into_iter().collect();
    }
    let n = reasons.len();
    let mut items: Vec<String> = reasons.into_values().flatten().collect();
    items.sort_unstable();
    items.dedup();
    vec![(
        format!("{n} items of flow `{input}` it reads changed"),
        items,
    )]
}

fn requeue_by_reason(
    store: &dyn freshindex_store::StateStore,
    flow: FlowId,
    reasons: BTreeMap<String, Vec<String>>,
    input: &str,
) -> Result<(), EngineError> {
    for (reason, items) in merge_reasons(reasons, input) {
        store.requeue_items(flow, &items, Some(&reason), now_ms())?;
    }
    Ok(())
}

/// Fields merged from documents in priority order.
fn merge(rule: MergeRule, docs: &[&Value]) -> Value {
    let mut out = Map::new();
    for d in docs {
        let Some(o) = d.as_object() else { continue };
        for (k, v) in o {
            if k == "key" || is_empty(Some(v)) {
                continue;
            }
            match rule {
                MergeRule::First => {
                    if is_empty(out.get(k)) {
                        out.insert(k.clone(), v.clone());
                    }
                }
                MergeRule::List => {
                    if k == "text" {
                        continue;
                    }
                    if let Value::Array(a) = out
                        .entry(k.clone())
                        .or_insert_with(|| Value::Array(Vec::new()))
                    {
                        a.push(v.clone());
                    }
                }
            }
        }
    }
    Value::Object(out)
}

/// A group's aggregates over its members' documents (in member order).
fn aggregate(specs: &BTreeMap<String, Aggregate>, docs: &[&Value]) -> Value {
    let mut out = Map::new();
    let path = |f: &str| -> Vec<String> { f.split('.').map(str::to_string).collect() };
    let values = |f: &str| -> Vec<Value> {
        let p = path(f);
        docs.iter()
            .filter_map(|d| lookup(d, &p))
            .filter(|v| !is_empty(Some(v)))
            .cloned()
            .collect()
    };
    let numbers = |f: &str| -> Vec<f64> {
        values(f)
            .iter()
            .filter_map(|v| match v {
                Value::Number(n) => n.as_f64(),
                Value::String(s) => s.trim().parse().ok(),
                _ => None,
            })
            .collect()
    };
    let num = |x: f64| {
        serde_json::Number::from_f64(x)
            .map(Value::Number)
            .unwrap_or(Value::Null)
    };
    for (name, a) in specs {
        let v = match a {
            Aggregate::Count => Value::from(docs.len() as u64),
            Aggregate::List(f) => Value::Array(values(f)),
            Aggregate::First(f) => values(f).into_iter().next().unwrap_or(Value::Null),
            Aggregate::Sum(f) => num(numbers(f).iter().sum()),
            Aggregate::Min(f) => numbers(f)
                .into_iter()
                .reduce(f64::min)
                .map_or(Value::Null, num),
            Aggregate::Max(f) => numbers(f)
                .into_iter()
                .reduce(f64::max)
                .map_or(Value::Null, num),
        };
        out.insert(name.clone(), v);
    }
    Value::Object(out)
}

/// A document's fingerprint: BLAKE3 of its bytes.
pub(crate) fn doc_fp(bytes: &[u8]) -> Vec<u8> {
    Fingerprint::of(bytes).0.to_vec()
}

impl Engine {
    /// A reset of `flow` for the flows that read it and what it read: its documents become
    /// tombstones (readers drop them on their next run) and its dependencies, members and
    /// marks are forgotten (its next run reads its inputs from the start).
    pub(crate) fn reset_inputs(&self, flow: FlowId) -> Result<(), EngineError> {
        let store = self.store();
        // What it read first: cut short after this, its next run follows its inputs anew
        // and requeues every item it still has.
        store.forget_inputs(flow)?;
        if !store.docs_kept(flow)? {
            return Ok(());
        }
        let mut live = Vec::new();
        self.each_page(flow, 0, |page, _| {
            live.extend(
                page.into_iter()
                    .filter(|d| d.doc.is_some())
                    .map(|d| (d.key, None)),
            );
            Ok(())
        })?;
        for part in live.chunks(PAGE) {
            store.put_docs(flow, part)?;
        }
        // Cut short before the items are forgotten, the next run processes them all again
        // and writes their documents back.
        self.requeue_all(flow, "reset")?;
        Ok(())
    }

    /// When a flow is registered: every flow it reads keeps documents, and so does the flow
    /// itself when a stored flow reads it. A flow that starts keeping documents requeues
    /// its items, so that its next run writes their documents (the memo cache keeps it
    /// cheap).
    pub(crate) fn link_inputs(
        &self,
        spec: &FlowSpec,
        id: FlowId,
        stored: &[FlowSpec],
    ) -> Result<(), EngineError> {
        let store = self.store();
        let mut keep: Vec<(FlowId, String)> = Vec::new();
        for name in spec.inputs() {
            if let Some(rec) = store.flow(name)? {
                keep.push((rec.id, name.to_string()));
            }
        }
        if let Some(reader) = stored
            .iter()
            .find(|f| f.name != spec.name && f.inputs().contains(&spec.name.as_str()))
        {
            keep.push((id, reader.name.clone()));
        }
        for (flow, why) in keep {
            if store.docs_kept(flow)? {
                continue;
            }
            // Requeued before and after the switch: a crash after it leaves the items
            // requeued, and a run going on meanwhile processed some without documents.
            let reason = format!("read by flow `{why}`: indexed again to record its fields");
            self.requeue_all(flow, &reason)?;
            store.keep_docs(flow, true)?;
            self.requeue_all(flow, &reason)?;
        }
        Ok(())
    }

    /// Requeues every item of `flow`, with `reason` as their message.
    fn requeue_all(&self, flow: FlowId, reason: &str) -> Result<(), EngineError> {
        let store = self.store();
        let keys: Vec<String> = store.items(flow)?.into_iter().map(|i| i.key).collect();
        for part in keys.chunks(PAGE) {
            store.requeue_items(flow, part, Some(reason), now_ms())?;
        }
        Ok(())
    }

    /// The mark `flow` follows input `up` from. A flow that never followed this input (a
    /// new input, or one deleted and defined again under a new id) requeues every item it
    /// has, since its records of what it read name the input's old id.
    fn follow_from(&self, flow: FlowId, name: &str, up: FlowId) -> Result<i64, EngineError> {
        match self.store().input_mark(flow, up)? {
            Some(mark) => Ok(mark),
            None => {
                let reason = format!("follows flow `{name}` from its start");
                self.requeue_all(flow, &reason)?;
                self.store().set_input_mark(flow, up, 0)?;
                Ok(0)
            }
        }
    }

    /// Follows the flow's inputs past its marks, before a run looks at its queue: requeues
    /// the items whose looked-up keys changed, and places changed documents of a flows
    /// source in their groups (requeueing the groups they left and joined). Returns the
    /// issues (members whose group key is not a valid item key).
    pub(crate) fn sync_inputs(
        &self,
        flow: FlowId,
        spec: &FlowSpec,
    ) -> Result<Vec<Issue>, EngineError> {
        if !spec.is_multi_input() {
            return Ok(Vec::new());
        }
        let inputs = resolve_inputs(self, spec)?;
        let mut issues = Vec::new();
        let lookups: BTreeSet<&str> = spec.lookups().map(|l| l.from.as_str()).collect();
        for name in lookups {
            self.sync_lookup(flow, name, inputs[name])?;
        }
        if let Some(src) = spec.flows_source() {
            let by = match spec.group() {
                Some(g) => Some(Template::key_expr(&g.by).map_err(EngineError::Config)?),
                None => match &src.merge_key {
                    Some(k) => Some(Template::key_expr(k).map_err(EngineError::Config)?),
                    None => None,
                },
            };
            for name in &src.from {
                self.sync_members(flow, name, inputs[name.as_str()], by.as_ref(), &mut issues)?;
            }
        }
        Ok(issues)
    }

    /// Requeues the items of `flow` that looked up keys of `up` that changed.
    fn sync_lookup(&self, flow: FlowId, name: &str, up: FlowId) -> Result<(), EngineError> {
        let store = self.store();
        let from = self.follow_from(flow, name, up)?;
        self.each_page(up, from, |page, last| {
            let keys: Vec<String> = page.into_iter().map(|d| d.key).collect();
            // Each dependent item with the first changed key it read, as its reason.
            let mut reasons: BTreeMap<String, Vec<String>> = BTreeMap::new();
            let mut seen: BTreeSet<String> = BTreeSet::new();
            for key in &keys {
                for item in store.dependents(flow, up, std::slice::from_ref(key))? {
                    if seen.insert(item.clone()) {
                        reasons
                            .entry(format!("looked-up item `{name}`/`{key}` changed"))
                            .or_default()
                            .push(item);
                    }
                }
            }
            requeue_by_reason(store.as_ref(), flow, reasons, name)?;
            store.set_input_mark(flow, up, last)?;
            Ok(())
        })
    }

    /// Places the changed documents of input `up` in their groups of `flow`.
    fn sync_members(
        &self,
        flow: FlowId,
        name: &str,
        up: FlowId,
        by: Option<&Template>,
        issues: &mut Vec<Issue>,
    ) -> Result<(), EngineError> {
        let store = self.store();
        let from = self.follow_from(flow, name, up)?;
        self.each_page(up, from, |page, last| {
            let keys: Vec<String> = page.iter().map(|d| d.key.clone()).collect();
            let before = store.member_groups(flow, up, &keys)?;
            let mut changes: Vec<MemberChange> = Vec::new();
            // Group → the first member change that touched it, as its reason.
            let mut touched: BTreeMap<String, String> = BTreeMap::new();
            for d in page {
                let group = match &d.doc {
                    None => None,
                    Some(bytes) => {
                        let v: Value = serde_json::from_slice(bytes).unwrap_or(Value::Null);
                        let g = match by {
                            Some(t) => t.render(&v),
                            None => d.key.clone(),
                        };
                        if g.is_empty() {
                            None
                        } else if let Err(e) = check_key(&g) {
                            issues.push(Issue::warning(
                                format!("{name}/{}", d.key),
                                format!("its group key is not a valid item key, so it is in no group: {e}"),
                            ));
                            None
                        } else {
                            Some(g)
                        }
                    }
                };
                let old = before.get(&d.key);
                let new = group.map(|g| (g, d.fp.clone()));
                if old == new.as_ref() {
                    continue;
                }
                let reason = format!("input item `{name}`/`{}` changed", d.key);
                for g in [old.map(|o| o.0.clone()), new.as_ref().map(|n| n.0.clone())]
                    .into_iter()
                    .flatten()
                {
                    touched.entry(g).or_insert_with(|| reason.clone());
                }
                changes.push((d.key, new));
            }
            // Requeue first: a crash before the membership commits requeues again.
            let mut by_reason: BTreeMap<String, Vec<String>> = BTreeMap::new();
            for (g, r) in touched {
                by_reason.entry(r).or_default().push(g);
            }
            for (reason, groups) in merge_reasons(by_reason, name) {
                let unknown = store.requeue_items(flow, &groups, Some(&reason), now_ms())?;
                if !unknown.is_empty() {
                    let push: Vec<PushItem> = unknown
                        .into_iter()
                        .map(|key| PushItem {
                            key,
                            kind: PushKind::Type(PushType::Modified),
                            payload: None,
                            queue: None,
                        })
                        .collect();
                    store.push(flow, &push, now_ms())?;
                }
            }
            store.update_members(flow, up, &changes, last)?;
            Ok(())
        })
    }

    /// Calls `each` with the pages of `flow`'s documents and tombstones after `mark`, in
    /// sequence order, with the sequence number of each page's last one.
    fn each_page(
        &self,
        flow: FlowId,
        mut mark: i64,
        mut each: impl FnMut(Vec<StoredDoc>, i64) -> Result<(), EngineError>,
    ) -> Result<(), EngineError> {
        loop {
            let page = self.store().docs_since(flow, mark, PAGE)?;
            let Some(last) = page.last().map(|d| d.seq) else {
                return Ok(());
            };
            each(page, last)?;
            mark = last;
        }
    }
}

impl Engine {
    /// A run of a flows-source flow: follows its inputs (requeueing the groups whose
    /// members changed), then its workers process the queue like a files run's — each group
    /// read from its members' documents — and drain it.
    pub(crate) fn run_flows(
        &self,
        spec: &FlowSpec,
        opts: &crate::run::RunOptions<'_>,
    ) -> Result<crate::summary::RunSummary, EngineError> {
        let started = std::time::Instant::now();
        crate::run::check_steps(spec)?;
        let _lock = self.lock_run(&spec.name)?;
        let started_ms = now_ms();
        let flow = self.register_or_record(spec, opts.trigger, started_ms)?;
        let summary = self.recorded(flow, opts.trigger, started_ms, || {
            self.prepare_table(flow, spec)?;
            let issues = self.sync_inputs(flow, spec)?;
            let ctx = self.ctx(
                flow,
                spec,
                opts.progress,
                Some(self.run_owner().to_string()),
            )?;
            ctx.tally().issues(&issues);
            let store = self.store().as_ref();
            // No traversal looks at every item: a new definition (template, aggregates,
            // chunking, model) requeues them all, then its fingerprint is recorded.
            let fp = ctx.spec_fp.to_hex();
            if store.change_mark(flow)?.as_deref() != Some(fp.as_str()) {
                self.requeue_all(flow, "the flow's definition changed")?;
                store.set_change_mark(flow, Some(&fp))?;
            }
            store.unreserve(flow, None, Some(self.run_owner()), now_ms())?;
            let stats = store.item_counts(flow)?;
            let total: u64 = stats.iter().map(|(_, n)| n).sum();
            let settled: u64 = stats
                .iter()
                .filter(|(s, _)| s.is_settled())
                .map(|(_, n)| n)
                .sum();
            {
                let mut t = ctx.tally();
                t.summary.items.seen = total;
                t.summary.items.unchanged += settled;
            }
            let files = HashMap::new();
            opts.progress
                .start(crate::run::Phase::Processing, Some(total - settled));
            self.work(&ctx, &files, None, opts, None)?;
            if store.has_shared_locks() && opts.queue.is_none() {
                self.drain_shared(&ctx, &files, opts)?;
            }
            opts.progress.finish(crate::run::Phase::Processing);
            store.memo_gc(flow)?;
            ctx.into_summary(started)
        })?;
        if let Some(c) = spec.target.collection() {
            self.after_write(c);
        }
        Ok(summary)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn row_metadata_leaves_out_the_largest_fields_first() {
        let mut m = Map::new();
        m.insert("names".into(), json!(vec!["x".repeat(100); 300]));
        m.insert("count".into(), json!(300));
        m.insert("about".into(), json!("y".repeat(1000)));
        cap_metadata(&mut m);
        assert_eq!(
            Value::Object(m),
            json!({"count": 300, "about": "y".repeat(1000), "omitted_fields": ["names"]})
        );
        let mut small = Map::new();
        small.insert("a".into(), json!("b"));
        cap_metadata(&mut small);
        assert_eq!(Value::Object(small), json!({"a": "b"}));
    }

    #[test]
    fn front_matter_gives_string_fields() {
        let t = "---\ncompany: acme.md\ntitle: \"A: b\"\n# note\n---\nbody";
        assert_eq!(
            front_matter(t),
            Some((json!({"company": "acme.md", "title": "A: b"}), "body"))
        );
        assert_eq!(front_matter("no block"), None);
        assert_eq!(front_matter("---\nunclosed: x\n"), None);
    }

    #[test]
    fn first_takes_the_first_non_empty_value_by_priority() {
        let a = json!({"key": "1", "name": "", "price": 3, "text": "A"});
        let b = json!({"key": "9", "name": "Drill", "price": 5, "text": "B", "color": "red"});
        let m = merge(MergeRule::First, &[&a, &b]);
        assert_eq!(
            m,
            json!({"name": "Drill", "price": 3, "text": "A", "color": "red"})
        );
    }

    #[test]
    fn list_keeps_every_non_empty_value_in_priority_order() {
        let a = json!({"name": "x", "tags": []});
        let b = json!({"name": "y", "tags": ["t"]});
        let m = merge(MergeRule::List, &[&a, &b]);
        assert_eq!(m, json!({"name": ["x", "y"], "tags": [["t"]]}));
    }

    #[test]
    fn aggregates_count_list_sum_min_max_first() {
        let docs = [
            json!({"name": "a", "price": 2}),
            json!({"name": "b", "price": "5"}),
            json!({"name": "", "price": null}),
        ];
        let refs: Vec<&Value> = docs.iter().collect();
        let mut specs = BTreeMap::new();
        for (n, a) in [
            ("n", "count"),
            ("names", "list:name"),
            ("total", "sum:price"),
            ("low", "min:price"),
            ("high", "max:price"),
            ("first", "first:name"),
        ] {
            specs.insert(n.to_string(), Aggregate::parse(a).unwrap());
        }
        let v = aggregate(&specs, &refs);
        assert_eq!(
            v,
            json!({"n": 3, "names": ["a", "b"], "total": 7.0, "low": 2.0, "high": 5.0, "first": "a"})
        );
    }
}
