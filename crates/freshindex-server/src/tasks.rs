//! Reindex tasks inside `serve`: the runner thread and the HTTP endpoints.
//!
//! - The runner starts (or resumes, after a restart) every task that may run, one after the
//!   other, every half second; a task stopped by the shutdown resumes at the next start.
//! - `POST /v1/tasks/reindex`, `GET /v1/tasks[?flow=]`, `GET /v1/tasks/{id}`,
//!   `POST /v1/tasks/{id}:cancel`, `POST /v1/tasks/{id}:retryFailed`,
//!   `POST /v1/flows/{flow}:rollback` (in `routes.rs`'s flow verbs).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use axum::Json;
use axum::Router;
use axum::extract::{Path, State};
use axum::http::{StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use freshindex_core::EmbedSpec;
use freshindex_engine::{Engine, EngineError, ReindexRequest, ReindexTask, TaskRunOptions};
use serde::Deserialize;
use serde_json::{Value, json};

use crate::AppState;
use crate::error::{ApiError, Code};
use crate::extract::{ApiJson, OptionalJson, query_pairs};

type St = State<Arc<AppState>>;
type ApiResult = Result<Response, ApiError>;

/// Starts the runner thread; it stops (leaving a task in progress to resume) when `stop` is
/// set. `on_switch` hears of every flow whose state a task switched.
pub(crate) fn start(
    engine: Arc<Engine>,
    workers: usize,
    stop: Arc<AtomicBool>,
    on_switch: impl Fn(&str) + Send + 'static,
) -> std::io::Result<()> {
    std::thread::Builder::new()
        .name("reindex-tasks".into())
        .spawn(move || {
            let opts = TaskRunOptions {
                workers,
                ..TaskRunOptions::default()
            };
            while !stop.load(Ordering::Relaxed) {
                let runnable = engine.runnable_tasks().unwrap_or_else(|e| {
                    tracing::warn!("listing reindex tasks: {e}");
                    Vec::new()
                });
                for id in runnable {
                    if stop.load(Ordering::Relaxed) {
                        break;
                    }
                    match engine.run_task(id, &opts, Some(&stop)) {
                        Ok(t) => {
                            if t.switched {
                                on_switch(&t.flow);
                            }
                        }
                        // Another process runs it.
                        Err(EngineError::Busy(_)) => {}
                        Err(e) => tracing::warn!(task = id, "reindex task: {e}"),
                    }
                }
                std::thread::sleep(Duration::from_millis(500));
            }
        })
        .map(|_| ())
}

pub(crate) fn routes() -> Router<Arc<AppState>> {
    Router::new()
        .route("/v1/tasks", get(list_tasks))
        .route("/v1/tasks/reindex", post(create_reindex))
        .route("/v1/tasks/{id}", get(get_task).post(task_verb))
}

/// A task with its subtasks' states.
fn task_json(e: &Engine, t: &ReindexTask) -> Result<Value, ApiError> {
    let mut v = serde_json::to_value(t).map_err(|e| ApiError::internal(e.to_string()))?;
    let subs = e.subtasks(t.id)?;
    if let Some(o) = v.as_object_mut() {
        o.insert(
            "subtasks".into(),
            serde_json::to_value(&subs).map_err(|e| ApiError::internal(e.to_string()))?,
        );
    }
    Ok(v)
}

fn not_found(e: EngineError) -> ApiError {
    match e {
        EngineError::NotFound(m) => ApiError::new(Code::NotFound, m),
        e => e.into(),
    }
}

/// The destination model: a model reference, or a full embed step (`openai:` settings).
#[derive(Deserialize)]
#[serde(untagged)]
enum ModelArg {
    Name(String),
    Spec(EmbedSpec),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields, rename_all = "camelCase")]
struct ReindexBody {
    flow: String,
    to: ModelArg,
    #[serde(default)]
    deploy_as_blue: bool,
    #[serde(default)]
    wait_on_conflict: bool,
    #[serde(default)]
    batch_size: Option<usize>,
    #[serde(default)]
    max_failed_items: Option<i64>,
}

/// `POST /v1/tasks/reindex`: 201 with the task; 409 naming the active task of the flow.
async fn create_reindex(State(st): St, body: Result<ApiJson<ReindexBody>, ApiError>) -> ApiResult {
    let body = body?.0;
    let to = match body.to {
        ModelArg::Name(m) => {
            EmbedSpec::of_model(&m).map_err(|m| ApiError::invalid(format!("to: {m}")))?
        }
        ModelArg::Spec(s) => s,
    };
    st.flow_id(&body.flow).await?;
    let req = ReindexRequest {
        flow: body.flow,
        to,
        deploy_as_blue: body.deploy_as_blue,
        wait_on_conflict: body.wait_on_conflict,
        batch_size: body.batch_size,
        max_failed_items: body.max_failed_items,
    };
    let v = st
        .blocking(move |e| {
            let t = e.create_reindex(&req)?;
            task_json(e, &t)
        })
        .await?;
    Ok((StatusCode::CREATED, Json(v)).into_response())
}

/// `GET /v1/tasks[?flow=F]`: newest first.
async fn list_tasks(State(st): St, uri: Uri) -> ApiResult {
    let mut flow = None;
    for (k, v) in query_pairs(uri.query())? {
        match k.as_str() {
            "flow" => flow = Some(v),
            other => {
                return Err(ApiError::invalid(format!(
                    "{other}: unknown query parameter; expected `flow`"
                )));
            }
        }
    }
    let v = st
        .blocking(move |e| {
            let tasks = e.tasks(flow.as_deref())?;
            Ok(json!({ "tasks": tasks }))
        })
        .await?;
    Ok(Json(v).into_response())
}

fn task_id(raw: &str) -> Result<u64, ApiError> {
    raw.parse()
        .map_err(|_| ApiError::invalid(format!("task id: `{raw}` is not a number")))
}

/// `GET /v1/tasks/{id}`.
async fn get_task(State(st): St, Path(id): Path<String>) -> ApiResult {
    let id = task_id(&id)?;
    let v = st
        .blocking(move |e| {
            let t = e.task(id).map_err(not_found)?;
            task_json(e, &t)
        })
        .await?;
    Ok(Json(v).into_response())
}

/// `POST /v1/tasks/{id}:cancel` and `POST /v1/tasks/{id}:retryFailed`.
async fn task_verb(
    State(st): St,
    Path(raw): Path<String>,
    body: OptionalJson<serde::de::IgnoredAny>,
) -> ApiResult {
    let _ = body;
    let Some((id, verb)) = raw.rsplit_once(':') else {
        return Err(ApiError::new(
            Code::RouteNotFound,
            "POST a task with `:cancel` or `:retryFailed`",
        ));
    };
    let id = task_id(id)?;
    let verb = verb.to_string();
    let v = st
        .blocking(move |e| {
            let t = match verb.as_str() {
                "cancel" => e.cancel_task(id).map_err(not_found)?,
                "retryFailed" => e.retry_failed(id).map_err(not_found)?,
                other => {
                    return Err(ApiError::new(
                        Code::RouteNotFound,
                        format!(
                            "no method `:{other}` on tasks; expected `:cancel` or `:retryFailed`"
                        ),
                    ));
                }
            };
            task_json(e, &t)
        })
        .await?;
    Ok(Json(v).into_response())
}
