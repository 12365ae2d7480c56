//! The handlers and the router.
//!
//! Each handler checks its request (`wire`), resolves the flow (404 `flow_not_found` first),
//! then does its engine or store work in one blocking call and counts the request in the
//! metrics. Body extractors are taken as `Result`s so that rejected requests are counted too.

use std::sync::Arc;

use axum::Json;
use axum::Router;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::{HeaderValue, Method, Uri, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use freshindex_engine::EngineError;
use freshindex_store::{ListRequest, QueueEntry};
use freshindex_vector::VectorError;
use serde_json::{Value, json};

use crate::control::ControlError;
use crate::error::{ApiError, Code};
use crate::extract::{ApiJson, FlowName, MAX_BODY_BYTES, OptionalJson, query_pairs, resource_path};
use crate::metrics::{Metrics, Verb};
use crate::wire::{
    self, DEFAULT_PAGE_SIZE, DEFAULT_SEARCH_LIMIT, DeleteQueueBody, Hit, IndexBody, Indexed, Item,
    ItemList, MAX_HISTORY_LIMIT, MAX_PAGE_SIZE, MAX_PUSH_BATCH, MAX_SEARCH_LIMIT, PollBody,
    PushBody, PushResult, ResetBody, ResetItemsBody, STATUS_HISTORY, SearchBody, UnreserveBody,
};
use crate::{AppState, now_ms};

type St = State<Arc<AppState>>;
type ApiResult = Result<Response, ApiError>;

/// A JSON answer (fields in declaration order).
fn reply<T: serde::Serialize>(v: T) -> ApiResult {
    Ok(Json(v).into_response())
}

/// The API's router over `state`.
pub(crate) fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/v1/flows", get(list_flows))
        .route("/v1/flows/{flow}/items", get(list_items))
        .route("/v1/flows/{flow}/items:push", post(push))
        .route("/v1/flows/{flow}/items:poll", post(poll))
        .route("/v1/flows/{flow}/items:unreserve", post(unreserve))
        .route(
            "/v1/flows/{flow}/items:deleteQueueItems",
            post(delete_queue_items_by_body),
        )
        .route(
            "/v1/flows/{flow}/items/{*rest}",
            get(get_item).delete(delete_item).post(item_verb),
        )
        .route("/v1/flows/{flow}/queues/{*rest}", post(queue_verb))
        .route("/v1/flows/{flow}/search", post(search))
        .route(
            "/v1/flows/{flow}",
            post(flow_verb)
                .get(get_flow)
                .put(put_flow)
                .delete(delete_flow),
        )
        .route("/v1/flows/{flow}/status", get(flow_status))
        .route("/v1/flows/{flow}/history", get(flow_history))
        .merge(crate::indexes::routes())
        .merge(crate::tasks::routes())
        .fallback(route_not_found)
        .method_not_allowed_fallback(method_not_allowed)
        .layer(middleware::from_fn_with_state(Arc::clone(&state), auth))
        .layer(DefaultBodyLimit::max(MAX_BODY_BYTES))
        .with_state(state)
}

/// Counts a request of `verb` and passes its result on.
fn counted<T>(m: &Metrics, verb: Verb, r: Result<T, ApiError>) -> Result<T, ApiError> {
    m.request(verb, r.is_ok());
    r
}

async fn auth(State(st): St, req: Request, next: Next) -> Response {
    // Liveness probes carry no credentials; /healthz tells nothing but "up".
    if st.has_token() && req.uri().path() != "/healthz" {
        let given = req
            .headers()
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| {
                let (scheme, token) = v.trim().split_once(' ')?;
                scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
            });
        if !st.token_ok(given) {
            let message = if given.is_some() {
                "wrong bearer token"
            } else {
                "this server requires `Authorization: Bearer <token>`"
            };
            return ApiError::new(Code::Unauthorized, message).into_response();
        }
    }
    next.run(req).await
}

async fn route_not_found(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        Code::RouteNotFound,
        format!("no endpoint {method} {}", uri.path()),
    )
}

async fn method_not_allowed(method: Method, uri: Uri) -> ApiError {
    ApiError::new(
        Code::MethodNotAllowed,
        format!("{} does not accept {method}", uri.path()),
    )
}

async fn healthz() -> Json<Value> {
    Json(json!({"status": "ok"}))
}

async fn metrics(State(st): St) -> Result<Response, ApiError> {
    let flows = st.flows();
    let stats = st
        .blocking(move |e| {
            let now = now_ms();
            flows
                .into_iter()
                .map(|(name, id)| Ok((name, e.store().queue_stats(id, now)?)))
                .collect::<Result<Vec<_>, ApiError>>()
        })
        .await?;
    let mut resp = st.metrics.render(&stats).into_response();
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; version=0.0.4; charset=utf-8"),
    );
    Ok(resp)
}

async fn list_flows(State(st): St) -> ApiResult {
    let names: Vec<String> = st.flows().into_iter().map(|(n, _)| n).collect();
    let flows = st
        .blocking(move |e| {
            let mut out = Vec::new();
            for name in names {
                let (_, spec) = e.flow(&name)?;
                let source = match &spec.source {
                    freshindex_core::SourceSpec::Files(_) => "files",
                    freshindex_core::SourceSpec::Push(_) => "push",
                    freshindex_core::SourceSpec::Postgres(_) => "postgres",
                    freshindex_core::SourceSpec::Flows(_) => "flows",
                };
                out.push((spec, source));
            }
            Ok(out)
        })
        .await?;
    let flows: Vec<Value> = flows
        .into_iter()
        .map(|(spec, source)| {
            let (schedule, live) = st.control.status(&spec.name);
            json!({
                "name": spec.name,
                "source": source,
                "collection": spec.target.name(),
                "mode": spec.mode().as_str(),
                "state": wire::flow_state(schedule.as_ref(), live.as_ref()),
                "nextRunTime": schedule
                    .as_ref()
                    .and_then(wire::schedule_status)
                    .map_or(Value::Null, |s| s["nextRunTime"].clone()),
            })
        })
        .collect();
    reply(json!({ "flows": flows }))
}

async fn push(
    State(st): St,
    FlowName(flow): FlowName,
    body: Result<ApiJson<PushBody>, ApiError>,
) -> ApiResult {
    let r = push_inner(&st, &flow, body.map(|b| b.0), None).await;
    counted(&st.metrics, Verb::Push, r)
}

async fn push_inner(
    st: &AppState,
    flow: &str,
    body: Result<PushBody, ApiError>,
    path_key: Option<String>,
) -> ApiResult {
    let body = body?;
    let (items, batch) = match (body.item, body.items) {
        (Some(it), None) => (
            vec![wire::push_item("item", it, path_key.as_deref())?],
            false,
        ),
        (None, Some(items)) if path_key.is_none() => {
            if items.is_empty() {
                return Err(ApiError::invalid("items: must not be empty"));
            }
            if items.len() > MAX_PUSH_BATCH {
                return Err(ApiError::invalid(format!(
                    "items: {} items, over the limit of {MAX_PUSH_BATCH} per push",
                    items.len()
                )));
            }
            let items = items
                .into_iter()
                .enumerate()
                .map(|(i, it)| wire::push_item(&format!("items[{i}]"), it, None))
                .collect::<Result<Vec<_>, _>>()?;
            (items, true)
        }
        (None, Some(_)) => {
            return Err(ApiError::invalid(
                "items: a push to one item's path takes `item`",
            ));
        }
        (Some(_), Some(_)) => {
            return Err(ApiError::invalid("give either `item` or `items`, not both"));
        }
        (None, None) => return Err(ApiError::invalid("item: missing")),
    };
    let flow_id = st.flow_id(flow).await?;
    let keys: Vec<String> = items.iter().map(|it| it.key.clone()).collect();
    let results = st
        .blocking(move |e| {
            let now = now_ms();
            let store = e.store();
            let results = store.push(flow_id, &items, now)?;
            items
                .iter()
                .zip(results)
                .map(|(it, r)| match r {
                    Ok(_) => match store.get(flow_id, &it.key)? {
                        Some(entry) => Ok(Ok(Item::from_entry(&entry, now))),
                        None => Ok(Err(ApiError::internal(format!(
                            "item `{}` vanished right after its push",
                            it.key
                        )))),
                    },
                    Err(rej) => Ok(Err(ApiError::from(rej))),
                })
                .collect::<Result<Vec<_>, ApiError>>()
        })
        .await?;
    let accepted = results.iter().filter(|r| r.is_ok()).count() as u64;
    Metrics::add(&st.metrics.items_pushed, accepted);
    if !batch {
        let one = results
            .into_iter()
            .next()
            .ok_or_else(|| ApiError::internal("push returned no result"))??;
        return reply(one);
    }
    let items: Vec<PushResult> = keys
        .into_iter()
        .zip(results)
        .map(|(name, r)| match r {
            Ok(item) => PushResult::Pushed(item),
            Err(e) => PushResult::Refused {
                name,
                error: e.body()["error"].clone(),
            },
        })
        .collect();
    reply(json!({ "items": items }))
}

fn items_of(entries: &[QueueEntry], now: i64) -> Vec<Item> {
    entries.iter().map(|e| Item::from_entry(e, now)).collect()
}

async fn poll(
    State(st): St,
    FlowName(flow): FlowName,
    body: Result<OptionalJson<PollBody>, ApiError>,
) -> ApiResult {
    let r = async {
        let req = wire::poll_request(body?.0, &st.default_owner, st.lease_ms)?;
        let flow_id = st.flow_id(&flow).await?;
        // Remembered before the leases exist, so a shutdown racing this poll releases them.
        st.saw_owner(&req.owner);
        let items = st
            .blocking(move |e| {
                let now = now_ms();
                let entries = e.store().poll(flow_id, &req, now)?;
                Ok(items_of(&entries, now))
            })
            .await?;
        Metrics::add(&st.metrics.items_polled, items.len() as u64);
        reply(ItemList {
            items,
            next_page_token: None,
        })
    }
    .await;
    counted(&st.metrics, Verb::Poll, r)
}

async fn unreserve(
    State(st): St,
    FlowName(flow): FlowName,
    body: Result<OptionalJson<UnreserveBody>, ApiError>,
) -> ApiResult {
    let r = async {
        let body = body?.0;
        if let Some(q) = &body.queue {
            freshindex_core::queue::check_label("queue", q).map_err(ApiError::invalid)?;
        }
        if let Some(o) = &body.owner {
            wire::owner("owner", o)?;
        }
        let flow_id = st.flow_id(&flow).await?;
        let n = st
            .blocking(move |e| {
                Ok(e.store().unreserve(
                    flow_id,
                    body.queue.as_deref(),
                    body.owner.as_deref(),
                    now_ms(),
                )?)
            })
            .await?;
        reply(json!({ "unreserved": n }))
    }
    .await;
    counted(&st.metrics, Verb::Unreserve, r)
}

/// `POST items/{key}:index` and `POST items/{key}:push`.
async fn item_verb(State(st): St, FlowName(flow): FlowName, uri: Uri, req: Request) -> Response {
    let path = match resource_path(uri.path(), "items", true) {
        Ok(p) => p,
        Err(e) => return e.into_response(),
    };
    match path.verb.as_deref() {
        Some("index") => {
            let body = ApiJson::<IndexBody>::from_request(req, &()).await;
            let r = index(&st, &flow, path.name, body.map(|b| b.0)).await;
            counted(&st.metrics, Verb::Index, r).into_response()
        }
        Some("push") => {
            let body = ApiJson::<PushBody>::from_request(req, &()).await;
            let r = push_inner(&st, &flow, body.map(|b| b.0), Some(path.name)).await;
            counted(&st.metrics, Verb::Push, r).into_response()
        }
        Some(other) => ApiError::new(
            Code::RouteNotFound,
            format!("no method `:{other}` on items; expected `:index` or `:push`"),
        )
        .into_response(),
        None => ApiError::new(
            Code::RouteNotFound,
            "POST on an item needs a method: `items/{key}:index` or `items/{key}:push`",
        )
        .into_response(),
    }
}

async fn index(
    st: &AppState,
    flow: &str,
    key: String,
    body: Result<IndexBody, ApiError>,
) -> ApiResult {
    let req = wire::index_request(&key, body?)?;
    st.flow_id(flow).await?;
    let name = flow.to_string();
    let outcome = st.blocking(move |e| Ok(e.index_item(&name, req)?)).await?;
    let m = &st.metrics;
    Metrics::add(&m.rows_written, outcome.rows_written);
    Metrics::add(&m.rows_deleted, outcome.rows_deleted);
    Metrics::add(&m.embeddings_computed, outcome.embeddings_computed);
    Metrics::add(&m.embeddings_reused, outcome.embeddings_reused);
    reply(Indexed { name: key, outcome })
}

async fn get_item(State(st): St, FlowName(flow): FlowName, uri: Uri) -> ApiResult {
    let r = async {
        let key = resource_path(uri.path(), "items", false)?.name;
        if uri.query().is_some_and(|q| !q.is_empty()) {
            return Err(ApiError::invalid(
                "query: GET of one item takes no parameters",
            ));
        }
        let flow_id = st.flow_id(&flow).await?;
        let entry = st
            .blocking({
                let key = key.clone();
                move |e| Ok(e.store().get(flow_id, &key)?)
            })
            .await?;
        match entry {
            Some(entry) => reply(Item::from_entry(&entry, now_ms())),
            None => Err(ApiError::new(
                Code::ItemNotFound,
                format!("item `{key}` is not in the queue of flow `{flow}`"),
            )),
        }
    }
    .await;
    counted(&st.metrics, Verb::Get, r)
}

async fn delete_item(State(st): St, FlowName(flow): FlowName, uri: Uri) -> ApiResult {
    let r = async {
        let key = resource_path(uri.path(), "items", false)?.name;
        freshindex_core::queue::check_key(&key).map_err(ApiError::invalid)?;
        let mut version = None;
        for (k, v) in query_pairs(uri.query())? {
            match k.as_str() {
                "version" => version = Some(wire::decode_b64("version", &v)?),
                other => {
                    return Err(ApiError::invalid(format!(
                        "query: unknown parameter `{other}`; expected `version`"
                    )));
                }
            }
        }
        st.flow_id(&flow).await?;
        let deleted = st
            .blocking({
                let (flow, key) = (flow.clone(), key.clone());
                move |e| Ok(e.delete_item(&flow, &key, version)?)
            })
            .await?;
        if !deleted {
            return Err(ApiError::new(
                Code::ItemNotFound,
                format!("item `{key}` is not in the queue of flow `{flow}`"),
            ));
        }
        reply(json!({ "name": key, "deleted": true }))
    }
    .await;
    counted(&st.metrics, Verb::Delete, r)
}

async fn list_items(State(st): St, FlowName(flow): FlowName, uri: Uri) -> ApiResult {
    let r = async {
        let mut req = ListRequest {
            limit: DEFAULT_PAGE_SIZE,
            ..ListRequest::default()
        };
        for (k, v) in query_pairs(uri.query())? {
            match k.as_str() {
                "status" => {
                    for s in v.split(',').filter(|s| !s.is_empty()) {
                        req.statuses.push(wire::parse_status("status", s)?);
                    }
                }
                "queue" => {
                    freshindex_core::queue::check_label("queue", &v).map_err(ApiError::invalid)?;
                    req.queue = Some(v);
                }
                "pageToken" => req.after = Some(wire::parse_page_token(&v)?),
                "pageSize" => {
                    let n = v.parse::<i64>().map_err(|_| {
                        ApiError::invalid(format!("pageSize: `{v}` is not a number"))
                    })?;
                    req.limit =
                        wire::check_limit("pageSize", Some(n), DEFAULT_PAGE_SIZE, MAX_PAGE_SIZE)?;
                }
                other => {
                    return Err(ApiError::invalid(format!(
                        "query: unknown parameter `{other}`; expected status, queue, pageToken or pageSize"
                    )));
                }
            }
        }
        let flow_id = st.flow_id(&flow).await?;
        let page = req.limit;
        let (items, next) = st
            .blocking(move |e| {
                // One more than the page tells whether another page follows.
                let ask = ListRequest {
                    limit: page + 1,
                    ..req
                };
                let mut entries = e.store().list(flow_id, &ask)?;
                let more = entries.len() > page;
                entries.truncate(page);
                let next = more
                    .then(|| entries.last().map(|l| wire::page_token(&l.item.key)))
                    .flatten();
                Ok((items_of(&entries, now_ms()), next))
            })
            .await?;
        reply(ItemList {
            items,
            next_page_token: next,
        })
    }
    .await;
    counted(&st.metrics, Verb::List, r)
}

/// `POST queues/{queue}:deleteQueueItems`.
async fn queue_verb(
    State(st): St,
    FlowName(flow): FlowName,
    uri: Uri,
    body: Result<OptionalJson<DeleteQueueBody>, ApiError>,
) -> ApiResult {
    let r = async {
        let path = resource_path(uri.path(), "queues", true)?;
        match path.verb.as_deref() {
            Some("deleteQueueItems") => {}
            Some(other) => {
                return Err(ApiError::new(
                    Code::RouteNotFound,
                    format!("no method `:{other}` on queues; expected `:deleteQueueItems`"),
                ));
            }
            None => {
                return Err(ApiError::new(
                    Code::RouteNotFound,
                    "POST on a queue needs a method: `queues/{queue}:deleteQueueItems`",
                ));
            }
        }
        let queue = wire::delete_queue_label(Some(&path.name), body?.0)?;
        delete_queue_items(&st, &flow, queue).await
    }
    .await;
    counted(&st.metrics, Verb::DeleteQueueItems, r)
}

/// `POST items:deleteQueueItems` with `{"queue"}` (the Cloud Search form).
async fn delete_queue_items_by_body(
    State(st): St,
    FlowName(flow): FlowName,
    body: Result<ApiJson<DeleteQueueBody>, ApiError>,
) -> ApiResult {
    let r = async {
        let queue = wire::delete_queue_label(None, body?.0)?;
        delete_queue_items(&st, &flow, queue).await
    }
    .await;
    counted(&st.metrics, Verb::DeleteQueueItems, r)
}

async fn delete_queue_items(st: &AppState, flow: &str, queue: String) -> ApiResult {
    st.flow_id(flow).await?;
    let deleted = st
        .blocking({
            let (flow, queue) = (flow.to_string(), queue.clone());
            move |e| Ok(e.delete_queue_items(&flow, &queue)?)
        })
        .await?;
    reply(json!({ "queue": queue, "deleted": deleted }))
}

async fn search(
    State(st): St,
    FlowName(flow): FlowName,
    body: Result<ApiJson<SearchBody>, ApiError>,
) -> ApiResult {
    let r = async {
        let body = body?.0;
        let k = wire::check_limit("limit", body.limit, DEFAULT_SEARCH_LIMIT, MAX_SEARCH_LIMIT)?;
        if body.query.trim().is_empty() {
            return Err(ApiError::invalid("query: must not be empty"));
        }
        st.flow_id(&flow).await?;
        let filter = body.source_prefix.map(|p| freshindex_vector::Filter {
            source_prefix: Some(p),
        });
        let hits = st
            .blocking(
                move |e| match e.search_with_model(&flow, &body.query, k, filter.as_ref()) {
                    Ok(s) => Ok((s.hits, Some(s.collection), Some(s.model))),
                    // Nothing was ever indexed into the flow's collection.
                    Err(EngineError::Target(VectorError::NotFound(_))) => {
                        Ok((Vec::new(), None, None))
                    }
                    Err(e) => Err(e.into()),
                },
            )
            .await?;
        let (hits, collection, model) = hits;
        let hits: Vec<Hit> = hits
            .into_iter()
            .map(|h| Hit {
                key: h.key,
                name: h.payload.source,
                range: h.payload.range,
                score: h.score,
                text: h.payload.text,
                metadata: h.payload.metadata,
            })
            .collect();
        reply(json!({ "hits": hits, "collection": collection, "model": model }))
    }
    .await;
    counted(&st.metrics, Verb::Search, r)
}

/// The flow name and `:verb` of the raw path `/v1/flows/{flow}:{verb}`.
fn flow_and_verb(raw_path: &str) -> Result<(String, String), ApiError> {
    let rest = raw_path
        .strip_prefix("/v1/flows/")
        .ok_or_else(|| ApiError::internal(format!("unexpected path {raw_path}")))?;
    let Some((flow, verb)) = rest.rsplit_once(':') else {
        return Err(ApiError::new(
            Code::RouteNotFound,
            "POST on a flow needs a method: `{flow}:run`, `{flow}:reset` or `{flow}:resetItems`",
        ));
    };
    let decode = |s: &str| {
        percent_encoding::percent_decode_str(s)
            .decode_utf8()
            .map(|c| c.into_owned())
    };
    let flow =
        decode(flow).map_err(|_| ApiError::invalid("flow: not UTF-8 after percent-decoding"))?;
    let verb = decode(verb).map_err(|_| ApiError::new(Code::RouteNotFound, "unknown method"))?;
    Ok((flow, verb))
}

/// A data directory held by a run is a conflict with the request (409), not a server fault.
fn run_lock_error(e: EngineError) -> ApiError {
    match e {
        EngineError::Busy(m) => ApiError::new(Code::Conflict, m),
        e => e.into(),
    }
}

impl From<ControlError> for ApiError {
    fn from(e: ControlError) -> ApiError {
        match e {
            ControlError::Invalid(m) => ApiError::invalid(m),
            ControlError::Conflict(m) => ApiError::new(Code::Conflict, m),
            ControlError::Engine(e) => run_lock_error(e),
        }
    }
}

/// `GET /v1/flows/{flow}`: the stored definition, in the shape `PUT` takes.
async fn get_flow(State(st): St, FlowName(flow): FlowName) -> ApiResult {
    st.flow_id(&flow).await?;
    let (_, spec) = st.blocking(move |e| Ok(e.flow(&flow)?)).await?;
    reply(spec)
}

/// `PUT /v1/flows/{flow}`: defines or replaces a flow (the JSON shape of a `[[flow]]` table;
/// `name` may be left out). 201 when the flow is new, 200 when it replaced a definition.
async fn put_flow(
    State(st): St,
    FlowName(flow): FlowName,
    body: Result<ApiJson<Value>, ApiError>,
) -> ApiResult {
    let spec = wire::flow_definition(&flow, body?.0)?;
    let control = Arc::clone(&st.control);
    let name = spec.name.clone();
    let (created, id, stored) = st
        .blocking(move |e| {
            let created = control.define(&spec)?;
            let (id, stored) = e.flow(&spec.name)?;
            Ok((created, id, stored))
        })
        .await?;
    st.add_flow(&name, id);
    let status = if created {
        axum::http::StatusCode::CREATED
    } else {
        axum::http::StatusCode::OK
    };
    Ok((status, Json(json!({ "created": created, "flow": stored }))).into_response())
}

/// `DELETE /v1/flows/{flow}`: stops the flow and forgets it, with its target collection.
async fn delete_flow(State(st): St, FlowName(flow): FlowName) -> ApiResult {
    st.flow_id(&flow).await?;
    let control = Arc::clone(&st.control);
    let name = flow.clone();
    let report = st.blocking(move |_| Ok(control.delete(&name)?)).await?;
    st.remove_flow(&flow);
    reply(json!({
        "flow": report.flow,
        "deleted": true,
        "collection": report.collection,
        "rowsDeleted": report.rows,
        "collectionDropped": report.collection_dropped,
    }))
}

/// `POST {flow}:run`, `POST {flow}:reset` and `POST {flow}:resetItems`.
async fn flow_verb(State(st): St, uri: Uri, req: Request) -> ApiResult {
    let (flow, verb) = flow_and_verb(uri.path())?;
    match verb.as_str() {
        "run" => {
            OptionalJson::<serde::de::IgnoredAny>::from_request(req, &()).await?;
            run_flow(&st, flow).await
        }
        "reset" => {
            let body = OptionalJson::<ResetBody>::from_request(req, &()).await?.0;
            st.flow_id(&flow).await?;
            let drop_cache = body.drop_cache.unwrap_or(false);
            let control = Arc::clone(&st.control);
            let r = st
                .blocking(move |e| {
                    let r = e.reset(&flow, drop_cache).map_err(run_lock_error)?;
                    control.after_reset(&flow);
                    Ok(r)
                })
                .await?;
            reply(json!({
                "flow": r.flow,
                "reset": true,
                "items": r.items,
                "rowsDeleted": r.rows_deleted,
                "cacheEntries": r.cache_entries,
                "cacheDropped": r.cache_dropped,
            }))
        }
        "resetItems" => {
            let body = ApiJson::<ResetItemsBody>::from_request(req, &()).await?.0;
            let names = wire::reset_item_names(body)?;
            st.flow_id(&flow).await?;
            let r = st
                .blocking(move |e| e.reset_items(&flow, &names).map_err(run_lock_error))
                .await?;
            reply(json!({
                "flow": r.flow,
                "requeued": r.reset.len(),
                "reset": r.reset,
                "unknown": r.unknown,
            }))
        }
        "rollback" => {
            OptionalJson::<serde::de::IgnoredAny>::from_request(req, &()).await?;
            st.flow_id(&flow).await?;
            let f = flow.clone();
            let r = st
                .blocking(move |e| {
                    e.rollback(&f, &freshindex_engine::RunOptions::default())
                        .map_err(run_lock_error)
                })
                .await;
            st.forget_flow_id(&flow);
            let r = r?;
            reply(json!({
                "flow": r.flow,
                "collection": r.collection,
                "model": r.model,
                "left": r.left,
                "caughtUp": r.caught_up,
            }))
        }
        "dropPrevious" => {
            OptionalJson::<serde::de::IgnoredAny>::from_request(req, &()).await?;
            st.flow_id(&flow).await?;
            let r = st
                .blocking(move |e| e.drop_previous(&flow).map_err(run_lock_error))
                .await?;
            reply(json!({ "dropped": r }))
        }
        other => Err(ApiError::new(
            Code::RouteNotFound,
            format!(
                "no method `:{other}` on flows; expected `:run`, `:reset`, `:resetItems`, `:rollback` or `:dropPrevious`"
            ),
        )),
    }
}

/// Runs a files flow once; answers its summary (also when it ended `failed`).
async fn run_flow(st: &AppState, flow: String) -> ApiResult {
    st.flow_id(&flow).await?;
    let control = Arc::clone(&st.control);
    let summary = st.blocking(move |_| Ok(control.run_now(&flow)?)).await?;
    reply(summary)
}

/// `GET {flow}/status`: the flow's state, last run and newest history entries.
async fn flow_status(State(st): St, FlowName(flow): FlowName, uri: Uri) -> ApiResult {
    if uri.query().is_some_and(|q| !q.is_empty()) {
        return Err(ApiError::invalid("query: GET status takes no parameters"));
    }
    st.flow_id(&flow).await?;
    let name = flow.clone();
    let (s, spec, history) = st
        .blocking(move |e| {
            Ok((
                e.status(&flow)?,
                e.flow(&flow)?.1,
                e.history(&flow, STATUS_HISTORY)?,
            ))
        })
        .await?;
    let (schedule, live) = st.control.status(&name);
    reply(json!({
        "flow": s.flow,
        "mode": spec.mode().as_str(),
        "disabled": spec.disabled,
        "state": wire::flow_state(schedule.as_ref(), live.as_ref()),
        "schedule": schedule.as_ref().and_then(wire::schedule_status),
        "running": schedule.as_ref().and_then(|s| s.in_progress).map(wire::running),
        "live": live,
        "collection": s.collection,
        "items": s.items,
        "rows": s.rows,
        "cacheEntries": s.cache_entries,
        "cacheBytes": s.cache_bytes,
        "lastRun": s.last_run,
        "history": history,
    }))
}

/// `GET {flow}/history?limit=N`: the newest entries of the flow's execution history.
async fn flow_history(State(st): St, FlowName(flow): FlowName, uri: Uri) -> ApiResult {
    let mut limit = MAX_HISTORY_LIMIT;
    for (k, v) in query_pairs(uri.query())? {
        match k.as_str() {
            "limit" => {
                let n = v
                    .parse::<i64>()
                    .map_err(|_| ApiError::invalid(format!("limit: `{v}` is not a number")))?;
                limit = wire::check_limit("limit", Some(n), MAX_HISTORY_LIMIT, MAX_HISTORY_LIMIT)?;
            }
            other => {
                return Err(ApiError::invalid(format!(
                    "query: unknown parameter `{other}`; expected `limit`"
                )));
            }
        }
    }
    st.flow_id(&flow).await?;
    let runs = st.blocking(move |e| Ok(e.history(&flow, limit)?)).await?;
    reply(json!({ "runs": runs }))
}

/// In-process checks of what the process tests cannot send reliably (a body over the limit)
/// and of the shutdown release, through the real router and a real data directory.
#[cfg(test)]
mod tests {
    use std::time::Duration;

    use axum::body::{Body, to_bytes};
    use axum::http::{Request as HttpRequest, StatusCode};
    use tower::ServiceExt as _;

    use super::*;
    use crate::{ServeOptions, prepare};

    fn state(dir: &std::path::Path) -> Arc<AppState> {
        let config = freshindex_core::Config::parse(
            "[[flow]]\nname = \"docs\"\nsource = { type = \"push\" }\n",
            None,
        )
        .expect("push config");
        prepare(&ServeOptions {
            data_dir: dir.to_path_buf(),
            store: None,
            role: crate::Role::All,
            flows: config.flows,
            listen: ([127, 0, 0, 1], 0).into(),
            token: None,
            lease: Duration::from_secs(60),
            control: crate::ControlOptions {
                min_schedule_interval: freshindex_core::schedule::DEFAULT_MIN_SCHEDULE_INTERVAL,
                max_concurrent_runs: 2,
                scheduler: true,
                run_workers: None,
            },
            index_threads: 0,
            index_heartbeat_timeout: Duration::from_secs(30),
        })
        .expect("prepare")
    }

    async fn call(st: &Arc<AppState>, path: &str, body: Vec<u8>) -> (StatusCode, Value) {
        let req = HttpRequest::post(path)
            .header("content-type", "application/json")
            .body(Body::from(body))
            .expect("request");
        let resp = router(Arc::clone(st))
            .oneshot(req)
            .await
            .expect("infallible");
        let status = resp.status();
        let bytes = to_bytes(resp.into_body(), usize::MAX).await.expect("body");
        (status, serde_json::from_slice(&bytes).expect("JSON answer"))
    }

    #[test]
    fn a_held_data_directory_is_a_conflict_for_runs_and_resets() {
        let e = run_lock_error(EngineError::Busy("held".into()));
        assert_eq!(e.code, Code::Conflict);
        assert_eq!(e.code.status(), StatusCode::CONFLICT);
        assert_eq!(
            run_lock_error(EngineError::NotFound("x".into())).code,
            Code::FlowNotFound
        );
    }

    #[test]
    fn flow_verbs_split_at_the_last_colon() {
        assert_eq!(
            flow_and_verb("/v1/flows/my%20flow:resetItems").unwrap(),
            ("my flow".to_string(), "resetItems".to_string())
        );
        assert_eq!(
            flow_and_verb("/v1/flows/docs").unwrap_err().code,
            Code::RouteNotFound
        );
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn a_body_over_the_limit_is_413_in_the_error_shape() {
        let dir = tempfile::tempdir().expect("tempdir");
        let st = state(dir.path());
        let (status, body) = call(
            &st,
            "/v1/flows/docs/items:poll",
            vec![b' '; MAX_BODY_BYTES + 1],
        )
        .await;
        assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE, "{body}");
        assert_eq!(body["error"]["code"], "body_too_large");
        // Just under the limit it is read (and blank means an all-defaults poll).
        let (status, body) =
            call(&st, "/v1/flows/docs/items:poll", vec![b' '; MAX_BODY_BYTES]).await;
        assert_eq!(status, StatusCode::OK, "{body}");
    }

    #[tokio::test(flavor = "multi_thread")]
    async fn shutdown_releases_only_the_leases_this_server_handed_out() {
        let dir = tempfile::tempdir().expect("tempdir");
        let st = state(dir.path());
        let push = serde_json::json!({"items": [
            {"name": "a", "contentHash": "1"},
            {"name": "b", "contentHash": "2"},
            {"name": "c", "contentHash": "3"},
        ]});
        let (status, _) = call(
            &st,
            "/v1/flows/docs/items:push",
            push.to_string().into_bytes(),
        )
        .await;
        assert_eq!(status, StatusCode::OK);
        let poll = |body: Value| {
            call(
                &st,
                "/v1/flows/docs/items:poll",
                body.to_string().into_bytes(),
            )
        };
        let (_, polled) = poll(serde_json::json!({"limit": 1})).await;
        assert_eq!(polled["items"][0]["leaseOwner"], st.default_owner.as_str());
        let (_, polled) = poll(serde_json::json!({"limit": 1, "owner": "w"})).await;
        assert_eq!(polled["items"][0]["leaseOwner"], "w");
        // Another process's lease, taken directly in the store.
        let (flow, _) = st.engine.flow("docs").expect("flow");
        let other = freshindex_store::PollRequest {
            queue: None,
            limit: 1,
            statuses: Vec::new(),
            owner: "elsewhere".into(),
            lease_ms: 60_000,
        };
        assert_eq!(
            st.engine
                .store()
                .poll(flow, &other, now_ms())
                .expect("poll")
                .len(),
            1
        );
        assert_eq!(st.release_leases().expect("release"), 2);
        let stats = st
            .engine
            .store()
            .queue_stats(flow, now_ms())
            .expect("stats");
        assert_eq!(stats.leased, 1, "the other process keeps its lease");
    }
}
