//! The index service inside `serve`: its housekeeping thread, the local index node's build
//! threads, and the HTTP endpoints of collections' indexes, builds and nodes.
//!
//! - A housekeeping thread, every half second: new builds for newly sealed segments of every
//!   flow's collection, lost nodes expired (their builds issued again), the local node's
//!   heartbeat; every 30 s, orphaned files of the build folder removed.
//! - `index_threads` build threads form the local node (none with 0: only remote
//!   `freshindex index-node` processes build).
//! - Remote nodes use `POST /v1/index-nodes` (register), `…/{id}:heartbeat`, `…/{id}:take` and
//!   `POST /v1/index-builds/{id}:report`.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get, post};
use freshindex_engine::indexing::{IndexParams, IndexService, IndexState, ReportOutcome};
use freshindex_engine::{Engine, EngineError};
use freshindex_vector::VectorCollection;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::error::{ApiError, Code};
use crate::extract::{ApiJson, OptionalJson, query_pairs};
use crate::{AppState, now_ms};

type St = State<Arc<AppState>>;
type ApiResult = Result<Response, ApiError>;

/// Starts the housekeeping thread and `threads` local build threads; they stop when `stop`
/// is set (a build in progress finishes first; its report is then ignored if the node was
/// deregistered meanwhile).
pub(crate) fn start(
    engine: Arc<Engine>,
    service: Arc<IndexService>,
    threads: usize,
    stop: Arc<AtomicBool>,
) -> Result<(), EngineError> {
    let address = format!("local:{}", std::process::id());
    // The local node's id; 0 while it must register (again: declared lost after a stall).
    let node = Arc::new(AtomicU64::new(0));
    let register = {
        let (service, node, address) = (service.clone(), node.clone(), address.clone());
        move || -> u64 {
            let current = node.load(Ordering::Acquire);
            if current != 0 {
                return current;
            }
            match service.register_node(&address, threads as u32, now_ms()) {
                Ok(grant) => {
                    node.store(grant.node_id, Ordering::Release);
                    grant.node_id
                }
                Err(e) => {
                    tracing::warn!("registering the local index node: {e}");
                    0
                }
            }
        }
    };
    if threads > 0 {
        register();
    }
    {
        let (engine, service, stop, node) =
            (engine.clone(), service.clone(), stop.clone(), node.clone());
        let register = register.clone();
        std::thread::Builder::new()
            .name("index-housekeeping".into())
            .spawn(move || {
                let mut ticks = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    if let Err(e) = engine.sync_indexes() {
                        tracing::warn!("index builds not updated: {e}");
                    }
                    if threads > 0 {
                        let id = register();
                        if id != 0 && service.heartbeat(id, now_ms()).is_err() {
                            // Declared lost (a stall, a clock jump): a new registration; the
                            // builds it had were issued again.
                            let _ =
                                node.compare_exchange(id, 0, Ordering::AcqRel, Ordering::Acquire);
                        }
                    }
                    if let Err(e) = service.expire(now_ms()) {
                        tracing::warn!("expiring index nodes: {e}");
                    }
                    if ticks.is_multiple_of(20) {
                        match engine.compact_collections() {
                            Ok(0) => {}
                            Ok(n) => tracing::info!(segments = n, "compacted"),
                            Err(e) => tracing::warn!("compaction: {e}"),
                        }
                    }
                    if ticks.is_multiple_of(60) {
                        let n = service.sweep_orphans();
                        if n > 0 {
                            tracing::info!(files = n, "removed orphaned index files");
                        }
                    }
                    ticks += 1;
                    std::thread::sleep(Duration::from_millis(500));
                }
                let id = node.load(Ordering::Acquire);
                if id != 0 {
                    let _ = service.deregister_node(id);
                }
            })
            .map_err(|e| EngineError::Internal(format!("starting the index thread: {e}")))?;
    }
    // Each build uses the machine's cores; several build threads only overlap them.
    let build_threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    for i in 0..threads {
        let (engine, service, stop, node) =
            (engine.clone(), service.clone(), stop.clone(), node.clone());
        let register = register.clone();
        std::thread::Builder::new()
            .name(format!("index-build-{i}"))
            .spawn(move || {
                while !stop.load(Ordering::Relaxed) {
                    let id = register();
                    if id == 0 {
                        std::thread::sleep(Duration::from_secs(1));
                        continue;
                    }
                    match service.take(id, now_ms()) {
                        Ok(Some(build)) => {
                            let outcome = std::panic::catch_unwind(|| {
                                freshindex_engine::indexing::execute_build(&build, build_threads)
                            })
                            .unwrap_or_else(|_| Err("the build panicked".to_string()));
                            let reported = match outcome {
                                Ok(_) => service.report_finished(
                                    engine.as_ref(),
                                    build.build_id,
                                    build.version,
                                    id,
                                    &build.output_path,
                                    now_ms(),
                                ),
                                Err(e) => {
                                    tracing::warn!(
                                        build = build.build_id,
                                        "index build failed: {e}"
                                    );
                                    service.report_failed(
                                        build.build_id,
                                        build.version,
                                        id,
                                        &e,
                                        now_ms(),
                                    )
                                }
                            };
                            if let Err(e) = reported {
                                tracing::warn!(build = build.build_id, "reporting a build: {e}");
                            }
                        }
                        Ok(None) => std::thread::sleep(Duration::from_millis(300)),
                        Err(EngineError::Conflict(_) | EngineError::NotFound(_)) => {
                            let _ =
                                node.compare_exchange(id, 0, Ordering::AcqRel, Ordering::Acquire);
                        }
                        Err(e) => {
                            tracing::warn!("taking an index build: {e}");
                            std::thread::sleep(Duration::from_secs(1));
                        }
                    }
                }
            })
            .map_err(|e| EngineError::Internal(format!("starting an index thread: {e}")))?;
    }
    Ok(())
}

/// The routes of this module.
pub(crate) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/collections", get(list_collections))
        .route(
            "/v1/collections/{collection}",
            get(describe_collection)
                .put(create_collection)
                .delete(drop_collection)
                .post(collection_verb),
        )
        .route(
            "/v1/collections/{collection}/points:upsert",
            post(upsert_points),
        )
        .route(
            "/v1/collections/{collection}/points:delete",
            post(delete_points),
        )
        .route("/v1/collections/{collection}/points/{*key}", get(get_point))
        .route(
            "/v1/collections/{collection}/search",
            post(search_collection),
        )
        .route("/v1/aliases", get(list_aliases))
        .route(
            "/v1/aliases/{alias}",
            axum::routing::put(put_alias).delete(delete_alias),
        )
        .route("/v1/collections/{collection}/indexes", post(build_index))
        .route(
            "/v1/collections/{collection}/indexes/{index}",
            delete(drop_index),
        )
        .route("/v1/index-builds", get(build_states))
        .route("/v1/index-builds/{id}/files", get(build_files))
        .route("/v1/index-builds/{id}", post(build_verb))
        .route("/v1/index-nodes", get(list_nodes).post(register_node))
        .route("/v1/index-nodes/{id}", post(node_verb))
        .route("/v1/index-metrics", get(index_metrics))
}

fn service(e: &Engine) -> Result<Arc<IndexService>, ApiError> {
    e.index_service()?.ok_or_else(|| {
        ApiError::new(
            Code::Busy,
            "another process runs this data directory's index service",
        )
    })
}

fn build_json(b: &freshindex_engine::indexing::IndexBuild) -> Value {
    json!({
        "buildId": b.build_id,
        "indexId": b.index_id,
        "indexName": b.index_name,
        "collection": b.collection,
        "segment": b.segment,
        "state": b.state,
        "failReason": b.fail_reason,
        "version": b.version,
        "nodeId": b.node_id,
        "retries": b.retries,
        "dataPaths": b.data_paths,
        "typeParams": b.type_params,
        "indexParams": b.index_params,
        "createdMs": b.created_ms,
        "issuedMs": b.issued_ms,
        "endedMs": b.ended_ms,
    })
}

fn not_found(e: EngineError) -> ApiError {
    match e {
        EngineError::NotFound(m) => ApiError::new(Code::NotFound, m),
        e => e.into(),
    }
}

/// `GET /v1/collections`: every collection, the flow writing it, and the aliases.
async fn list_collections(State(st): St) -> ApiResult {
    let v = st
        .blocking(|e| {
            let aliases = e.collections().aliases()?;
            let mut list = Vec::new();
            for name in e.collections().names()? {
                let named_by: Vec<&String> = aliases
                    .iter()
                    .filter(|(_, c)| **c == name)
                    .map(|(a, _)| a)
                    .collect();
                list.push(json!({
                    "collection": name,
                    "flow": e.collection_owner(&name)?,
                    "aliases": named_by,
                }));
            }
            Ok(json!({ "collections": list, "aliases": aliases }))
        })
        .await?;
    Ok(Json(v).into_response())
}

/// The collection a path names (through an alias), open for writing in this server.
fn collection(
    e: &Engine,
    name: &str,
) -> Result<Arc<freshindex_vector::SegmentedCollection>, ApiError> {
    e.open_collection(name)?
        .ok_or_else(|| ApiError::new(Code::NotFound, format!("no collection named `{name}`")))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct CreateBody {
    dimension: usize,
    #[serde(default)]
    metric: Option<freshindex_vector::Metric>,
}

/// `PUT /v1/collections/{c}`: creates a collection (201), or answers 200 when it exists with
/// the same dimension and metric (409 otherwise).
async fn create_collection(
    State(st): St,
    Path(name): Path<String>,
    body: Result<ApiJson<CreateBody>, ApiError>,
) -> ApiResult {
    let body = body?.0;
    let metric = body.metric.unwrap_or(freshindex_vector::Metric::Cosine);
    let n = name.clone();
    let created = st
        .blocking(move |e| Ok(e.create_collection(&n, body.dimension, metric)?.1))
        .await?;
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok((
        status,
        Json(json!({ "collection": name, "created": created, "dimension": body.dimension, "metric": metric })),
    )
        .into_response())
}

/// `POST /v1/collections/{c}:compact`: rewrites the segments past their tombstone ratio now
/// (the server also does it every 10 s).
async fn collection_verb(State(st): St, Path(rest): Path<String>) -> ApiResult {
    let Some((name, "compact")) = rest.rsplit_once(':') else {
        return Err(ApiError::new(
            Code::RouteNotFound,
            format!("no method on collections at `{rest}`; expected `{{collection}}:compact`"),
        ));
    };
    let name = name.to_string();
    let n = st
        .blocking(move |e| {
            let c = collection(e, &name)?;
            let n = c.compact().map_err(EngineError::from)?;
            e.sync_collection_indexes(&name);
            Ok(n)
        })
        .await?;
    Ok(Json(json!({ "segmentsRewritten": n })).into_response())
}

/// `DELETE /v1/collections/{c}`.
async fn drop_collection(State(st): St, Path(name): Path<String>) -> ApiResult {
    let n = name.clone();
    let existed = st.blocking(move |e| Ok(e.drop_collection(&n)?)).await?;
    if !existed {
        return Err(ApiError::new(
            Code::NotFound,
            format!("no collection named `{name}`"),
        ));
    }
    Ok(Json(json!({ "collection": name, "dropped": true })).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct Point {
    key: String,
    vector: Vec<f32>,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    text: Option<String>,
    #[serde(default)]
    metadata: Option<Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct UpsertBody {
    points: Vec<Point>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct DeleteBody {
    keys: Vec<String>,
}

/// `POST /v1/collections/{c}/points:upsert`: one durable, atomic write.
async fn upsert_points(
    State(st): St,
    Path(name): Path<String>,
    body: Result<ApiJson<UpsertBody>, ApiError>,
) -> ApiResult {
    let body = body?.0;
    let mut rows = Vec::with_capacity(body.points.len());
    for (i, p) in body.points.into_iter().enumerate() {
        if p.key.is_empty() || p.key.len() > 1024 {
            return Err(ApiError::invalid(format!(
                "points[{i}].key: 1 to 1024 bytes"
            )));
        }
        if let Some(j) = p.vector.iter().position(|x| !x.is_finite()) {
            return Err(ApiError::invalid(format!(
                "points[{i}].vector[{j}]: not a finite number"
            )));
        }
        rows.push(freshindex_vector::Row {
            key: p.key,
            vector: p.vector,
            payload: freshindex_vector::RowPayload {
                source: p.source.unwrap_or_default(),
                range: [0, 0],
                text: p.text.unwrap_or_default(),
                metadata: p.metadata,
            },
        });
    }
    let n = rows.len();
    st.blocking(move |e| {
        let c = collection(e, &name)?;
        c.upsert(&rows).map_err(|err| match err {
            freshindex_vector::VectorError::Dimension { expected, got, .. } => {
                ApiError::invalid(format!(
                    "points: a vector of dimension {got} where the collection takes {expected}"
                ))
            }
            err => EngineError::from(err).into(),
        })?;
        e.sync_collection_indexes(&name);
        Ok(())
    })
    .await?;
    Ok(Json(json!({ "upserted": n })).into_response())
}

/// `POST /v1/collections/{c}/points:delete`: unknown keys are ignored.
async fn delete_points(
    State(st): St,
    Path(name): Path<String>,
    body: Result<ApiJson<DeleteBody>, ApiError>,
) -> ApiResult {
    let keys = body?.0.keys;
    let n = keys.len();
    st.blocking(move |e| {
        collection(e, &name)?
            .delete(&keys)
            .map_err(EngineError::from)?;
        Ok(())
    })
    .await?;
    Ok(Json(json!({ "deleted": n })).into_response())
}

fn row_json(r: &freshindex_vector::Row) -> Value {
    json!({
        "key": r.key,
        "vector": r.vector,
        "source": r.payload.source,
        "text": r.payload.text,
        "metadata": r.payload.metadata,
    })
}

/// `GET /v1/collections/{c}/points/{key}`.
async fn get_point(State(st): St, Path((name, key)): Path<(String, String)>) -> ApiResult {
    let v = st
        .blocking(move |e| {
            let c = collection(e, &name)?;
            c.get(&key).map(|r| row_json(&r)).ok_or_else(|| {
                ApiError::new(
                    Code::NotFound,
                    format!("collection `{name}` has no point `{key}`"),
                )
            })
        })
        .await?;
    Ok(Json(v).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct VectorSearchBody {
    vector: Vec<f32>,
    #[serde(default)]
    limit: Option<usize>,
    #[serde(default)]
    source_prefix: Option<String>,
}

/// `POST /v1/collections/{c}/search`: the top `limit` (default 10, at most 1000) points by
/// vector, optionally only those whose source starts with `sourcePrefix`.
async fn search_collection(
    State(st): St,
    Path(name): Path<String>,
    body: Result<ApiJson<VectorSearchBody>, ApiError>,
) -> ApiResult {
    let body = body?.0;
    let limit = body.limit.unwrap_or(10);
    if !(1..=1000).contains(&limit) {
        return Err(ApiError::invalid("limit: 1 to 1000"));
    }
    let filter = body.source_prefix.map(|p| freshindex_vector::Filter {
        source_prefix: Some(p),
    });
    let v = st
        .blocking(move |e| {
            let c = collection(e, &name)?;
            let hits = c
                .search(&body.vector, limit, filter.as_ref())
                .map_err(|err| match err {
                    freshindex_vector::VectorError::Dimension { expected, got, .. } => {
                        ApiError::invalid(format!(
                            "vector: dimension {got} where the collection takes {expected}"
                        ))
                    }
                    err => EngineError::from(err).into(),
                })?;
            let hits: Vec<Value> = hits
                .iter()
                .map(|h| {
                    json!({
                        "key": h.key, "score": h.score, "source": h.payload.source,
                        "text": h.payload.text, "metadata": h.payload.metadata,
                    })
                })
                .collect();
            Ok(json!({ "hits": hits }))
        })
        .await?;
    Ok(Json(v).into_response())
}

/// `GET /v1/aliases`.
async fn list_aliases(State(st): St) -> ApiResult {
    let v = st
        .blocking(|e| Ok(json!({ "aliases": e.collections().aliases()? })))
        .await?;
    Ok(Json(v).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AliasBody {
    collection: String,
}

/// `PUT /v1/aliases/{alias}`: points the alias at a collection, atomically.
async fn put_alias(
    State(st): St,
    Path(alias): Path<String>,
    body: Result<ApiJson<AliasBody>, ApiError>,
) -> ApiResult {
    let target = body?.0.collection;
    let (a, t) = (alias.clone(), target.clone());
    let previous = st
        .blocking(move |e| {
            e.collections().set_alias(&a, &t).map_err(|err| match err {
                freshindex_vector::VectorError::NotFound(c) => {
                    ApiError::new(Code::NotFound, format!("no collection named `{c}`"))
                }
                freshindex_vector::VectorError::Storage { message, .. } => {
                    ApiError::invalid(message)
                }
                err => EngineError::from(err).into(),
            })
        })
        .await?;
    Ok(Json(json!({ "alias": alias, "collection": target, "previous": previous })).into_response())
}

/// `DELETE /v1/aliases/{alias}`.
async fn delete_alias(State(st): St, Path(alias): Path<String>) -> ApiResult {
    let a = alias.clone();
    let removed = st
        .blocking(move |e| {
            Ok(e.collections()
                .remove_alias(&a)
                .map_err(EngineError::from)?)
        })
        .await?;
    match removed {
        Some(c) => {
            Ok(Json(json!({ "alias": alias, "collection": c, "removed": true })).into_response())
        }
        None => Err(ApiError::new(
            Code::NotFound,
            format!("no alias named `{alias}`"),
        )),
    }
}

/// `GET /v1/collections/{c}`: rows (total, indexed, pending), segments and the index.
async fn describe_collection(State(st): St, Path(collection): Path<String>) -> ApiResult {
    let v = st
        .blocking(move |e| {
            let Some(c) = e.open_collection(&collection).map_err(not_found)? else {
                return Err(ApiError::new(
                    Code::NotFound,
                    format!("no collection named `{collection}`"),
                ));
            };
            let stats = c.stats();
            let physical = e.collections().resolve(&collection)?;
            let index = e.index_service()?.and_then(|s| s.index_of(&physical));
            Ok(json!({
                "collection": collection,
                "dimension": c.dimension(),
                "metric": c.metric(),
                "rows": {
                    "total": c.count().map_err(EngineError::from)?,
                    "indexed": stats.indexed_rows,
                    "pending": stats.growing_rows + stats.unindexed_rows,
                    "growing": stats.growing_rows,
                    "sealedUnindexed": stats.unindexed_rows,
                    "tombstones": stats.tombstones,
                },
                "segments": c.segments(),
                "index": index,
            }))
        })
        .await?;
    Ok(Json(v).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct BuildIndexBody {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    index_params: Option<IndexParams>,
}

/// `POST /v1/collections/{c}/indexes`: BuildIndex.
async fn build_index(
    State(st): St,
    Path(collection): Path<String>,
    body: Result<OptionalJson<Option<BuildIndexBody>>, ApiError>,
) -> ApiResult {
    let body = body?.0;
    let (name, params) = match body {
        Some(b) => (b.name, b.index_params),
        None => (None, None),
    };
    let name = name.unwrap_or_else(|| freshindex_engine::indexing::DEFAULT_INDEX.into());
    if name.is_empty() || name.len() > 64 {
        return Err(ApiError::invalid("name: 1 to 64 characters"));
    }
    let (index_id, builds) = st
        .blocking(move |e| {
            let s = service(e)?;
            let physical = e.collections().resolve(&collection)?;
            s.build_index(e, &physical, &name, params, now_ms())
                .map_err(not_found)
        })
        .await?;
    Ok(Json(json!({ "indexId": index_id, "buildIds": builds })).into_response())
}

/// `DELETE /v1/collections/{c}/indexes/{index}`: DropIndex.
async fn drop_index(State(st): St, Path((collection, index)): Path<(String, String)>) -> ApiResult {
    let (index_id, n) = st
        .blocking(move |e| {
            let s = service(e)?;
            let physical = e.collections().resolve(&collection)?;
            s.drop_index(e, &physical, &index, now_ms())
                .map_err(not_found)
        })
        .await?;
    Ok(Json(json!({ "indexId": index_id, "deletedBuilds": n })).into_response())
}

fn parse_ids(uri: &Uri) -> Result<Vec<u64>, ApiError> {
    let mut ids = Vec::new();
    for (k, v) in query_pairs(uri.query())? {
        if k != "ids" {
            return Err(ApiError::invalid(format!(
                "query: unknown parameter `{k}`; expected `ids`"
            )));
        }
        for part in v.split(',').filter(|p| !p.is_empty()) {
            ids.push(
                part.parse()
                    .map_err(|_| ApiError::invalid(format!("ids: `{part}` is not a build id")))?,
            );
        }
    }
    Ok(ids)
}

/// `GET /v1/index-builds?ids=1,2`: GetIndexStates (every build without `ids`).
async fn build_states(State(st): St, uri: Uri) -> ApiResult {
    let ids = parse_ids(&uri)?;
    let v = st
        .blocking(move |e| {
            let s = service(e)?;
            let list: Vec<Value> = if ids.is_empty() {
                s.builds_of(None).iter().map(build_json).collect()
            } else {
                s.builds(&ids)
                    .into_iter()
                    .map(|(id, b)| match b {
                        Some(b) => build_json(&b),
                        None => json!({ "buildId": id, "state": IndexState::None }),
                    })
                    .collect()
            };
            Ok(json!({ "builds": list }))
        })
        .await?;
    Ok(Json(v).into_response())
}

/// `GET /v1/index-builds/{id}/files`: GetIndexFilePaths.
async fn build_files(State(st): St, Path(id): Path<String>) -> ApiResult {
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::invalid(format!("id: `{id}` is not a build id")))?;
    let v = st
        .blocking(move |e| {
            let s = service(e)?;
            match s.builds(&[id]).pop().and_then(|(_, b)| b) {
                Some(b) => Ok(json!({
                    "buildId": id,
                    "state": b.state,
                    "filePaths": b.file_paths,
                })),
                None => Err(ApiError::new(
                    Code::NotFound,
                    format!("no index build {id}"),
                )),
            }
        })
        .await?;
    Ok(Json(v).into_response())
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ReportBody {
    node_id: u64,
    version: u64,
    state: IndexState,
    #[serde(default)]
    path: Option<std::path::PathBuf>,
    #[serde(default)]
    reason: Option<String>,
}

/// `POST /v1/index-builds/{id}:report`: a node's result. 409 when the report is no longer
/// current (the build was issued again, dropped, or the node declared lost).
async fn build_verb(
    State(st): St,
    Path(rest): Path<String>,
    body: Result<ApiJson<ReportBody>, ApiError>,
) -> ApiResult {
    let Some((id, "report")) = rest.split_once(':') else {
        return Err(ApiError::new(
            Code::RouteNotFound,
            format!("no method on index builds at `{rest}`; expected `{{id}}:report`"),
        ));
    };
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::invalid(format!("id: `{id}` is not a build id")))?;
    let body = body?.0;
    let outcome = st
        .blocking(move |e| {
            let s = service(e)?;
            match body.state {
                IndexState::Finished => {
                    let path = body.path.ok_or_else(|| {
                        ApiError::invalid("path: required when state is Finished")
                    })?;
                    Ok(s.report_finished(e, id, body.version, body.node_id, &path, now_ms())?)
                }
                IndexState::Failed => {
                    let reason = body.reason.unwrap_or_else(|| "no reason given".into());
                    Ok(s.report_failed(id, body.version, body.node_id, &reason, now_ms())?)
                }
                other => Err(ApiError::invalid(format!(
                    "state: a node reports Finished or Failed, not {other:?}"
                ))),
            }
        })
        .await?;
    match outcome {
        ReportOutcome::Accepted => Ok(Json(json!({ "accepted": true })).into_response()),
        ReportOutcome::Ignored(why) => Err(ApiError::new(
            Code::Conflict,
            format!("report ignored: {why}"),
        )),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct RegisterBody {
    address: String,
    #[serde(default)]
    capacity: Option<u32>,
}

/// `POST /v1/index-nodes`: RegisterNode → node id and heartbeat parameters.
async fn register_node(State(st): St, body: Result<ApiJson<RegisterBody>, ApiError>) -> ApiResult {
    let body = body?.0;
    let grant = st
        .blocking(move |e| {
            let s = service(e)?;
            let grant = s.register_node(&body.address, body.capacity.unwrap_or(1), now_ms())?;
            Ok(json!({
                "nodeId": grant.node_id,
                "heartbeatIntervalMs": grant.heartbeat_interval_ms,
                "heartbeatTimeoutMs": grant.heartbeat_timeout_ms,
                "buildDir": s.build_dir(),
            }))
        })
        .await?;
    Ok((StatusCode::CREATED, Json(grant)).into_response())
}

/// `POST /v1/index-nodes/{id}:heartbeat` and `…/{id}:take` (a build, or 204 when none).
async fn node_verb(State(st): St, Path(rest): Path<String>, uri: Uri) -> ApiResult {
    let _ = uri;
    let Some((id, verb)) = rest.split_once(':') else {
        return Err(ApiError::new(
            Code::RouteNotFound,
            format!("no method on index nodes at `{rest}`; expected `:heartbeat` or `:take`"),
        ));
    };
    let id: u64 = id
        .parse()
        .map_err(|_| ApiError::invalid(format!("id: `{id}` is not a node id")))?;
    let verb = verb.to_string();
    let out = st
        .blocking(move |e| {
            let s = service(e)?;
            match verb.as_str() {
                "heartbeat" => {
                    s.heartbeat(id, now_ms()).map_err(not_found)?;
                    Ok(None)
                }
                "take" => Ok(Some(s.take(id, now_ms()).map_err(not_found)?)),
                other => Err(ApiError::new(
                    Code::RouteNotFound,
                    format!(
                        "no method `:{other}` on index nodes; expected `:heartbeat` or `:take`"
                    ),
                )),
            }
        })
        .await?;
    match out {
        None => Ok(Json(json!({ "ok": true })).into_response()),
        Some(None) => Ok(StatusCode::NO_CONTENT.into_response()),
        Some(Some(b)) => Ok(Json(b).into_response()),
    }
}

/// `GET /v1/index-nodes`: nodes and their load.
async fn list_nodes(State(st): St) -> ApiResult {
    let v = st
        .blocking(|e| Ok(json!({ "nodes": service(e)?.nodes() })))
        .await?;
    Ok(Json(v).into_response())
}

/// `GET /v1/index-metrics`: GetMetrics.
async fn index_metrics(State(st): St) -> ApiResult {
    let v = st
        .blocking(|e| Ok(serde_json::to_value(service(e)?.metrics()).unwrap_or_default()))
        .await?;
    Ok(Json(v).into_response())
}
