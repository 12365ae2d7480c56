//! The one table of API error codes, and the error every handler returns.
//!
//! Every failure the API reports is an [`ApiError`]: a [`Code`] (which fixes the HTTP status)
//! and a message naming the field or item at fault. The body is always
//! `{"error": {"code": "...", "message": "..."}}` — also for axum's own rejections (bad JSON,
//! missing content type, body too large, unknown route), which the extractors and fallbacks of
//! this crate translate. The README's "HTTP API" section lists the same table; a test checks
//! that every code is there.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use freshindex_engine::EngineError;
use freshindex_store::{FenceError, PushRejection, StoreError};

/// An error code of the API: its wire name, HTTP status and meaning.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Code {
    /// The body is not valid JSON.
    MalformedJson,
    /// The JSON does not have the request's shape: a missing or unknown field, a wrong type.
    InvalidBody,
    /// A body was sent without `Content-Type: application/json`.
    UnsupportedMediaType,
    /// A value is out of range or malformed (the message names the field).
    InvalidArgument,
    /// Missing or wrong `Authorization: Bearer` token.
    Unauthorized,
    /// No such endpoint.
    RouteNotFound,
    /// The endpoint exists but not for this method.
    MethodNotAllowed,
    /// The data directory has no such flow and the config declares none.
    FlowNotFound,
    /// The queue holds no such item.
    ItemNotFound,
    /// No such collection, index, index build or index node.
    NotFound,
    /// The request conflicts with the item's state: a version not newer than the indexed one,
    /// a lease another holder took, a run of the flow in progress.
    Conflict,
    /// `REQUEUE` of an item that no live lease holds.
    NotReserved,
    /// The flow cannot serve the request as configured (its stored spec is unusable, or it
    /// takes no pushed content).
    FailedPrecondition,
    /// An item payload over 8 KiB (decoded).
    PayloadTooLarge,
    /// A request body over the server's limit (16 MiB).
    BodyTooLarge,
    /// Another process holds the data directory (a run); retry later.
    Busy,
    /// The state store or a target failed, or a bug; retrying may help.
    Internal,
}

impl Code {
    /// Every code, in the order of the documented table.
    pub const ALL: [Code; 17] = [
        Code::MalformedJson,
        Code::InvalidBody,
        Code::UnsupportedMediaType,
        Code::InvalidArgument,
        Code::Unauthorized,
        Code::RouteNotFound,
        Code::MethodNotAllowed,
        Code::FlowNotFound,
        Code::ItemNotFound,
        Code::NotFound,
        Code::Conflict,
        Code::NotReserved,
        Code::FailedPrecondition,
        Code::PayloadTooLarge,
        Code::BodyTooLarge,
        Code::Busy,
        Code::Internal,
    ];

    /// The wire name.
    pub fn as_str(self) -> &'static str {
        match self {
            Code::MalformedJson => "malformed_json",
            Code::InvalidBody => "invalid_body",
            Code::UnsupportedMediaType => "unsupported_media_type",
            Code::InvalidArgument => "invalid_argument",
            Code::Unauthorized => "unauthorized",
            Code::RouteNotFound => "route_not_found",
            Code::MethodNotAllowed => "method_not_allowed",
            Code::FlowNotFound => "flow_not_found",
            Code::ItemNotFound => "item_not_found",
            Code::NotFound => "not_found",
            Code::Conflict => "conflict",
            Code::NotReserved => "not_reserved",
            Code::FailedPrecondition => "failed_precondition",
            Code::PayloadTooLarge => "payload_too_large",
            Code::BodyTooLarge => "body_too_large",
            Code::Busy => "busy",
            Code::Internal => "internal",
        }
    }

    /// The HTTP status it is answered with.
    pub fn status(self) -> StatusCode {
        match self {
            Code::MalformedJson | Code::InvalidBody => StatusCode::BAD_REQUEST,
            Code::UnsupportedMediaType => StatusCode::UNSUPPORTED_MEDIA_TYPE,
            Code::InvalidArgument => StatusCode::UNPROCESSABLE_ENTITY,
            Code::Unauthorized => StatusCode::UNAUTHORIZED,
            Code::RouteNotFound | Code::FlowNotFound | Code::ItemNotFound | Code::NotFound => {
                StatusCode::NOT_FOUND
            }
            Code::MethodNotAllowed => StatusCode::METHOD_NOT_ALLOWED,
            Code::Conflict | Code::NotReserved | Code::FailedPrecondition => StatusCode::CONFLICT,
            Code::PayloadTooLarge | Code::BodyTooLarge => StatusCode::PAYLOAD_TOO_LARGE,
            Code::Busy => StatusCode::SERVICE_UNAVAILABLE,
            Code::Internal => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// Whether the caller caused it (and must change the request) rather than the server.
    pub fn is_user_error(self) -> bool {
        match self {
            Code::MalformedJson
            | Code::InvalidBody
            | Code::UnsupportedMediaType
            | Code::InvalidArgument
            | Code::Unauthorized
            | Code::RouteNotFound
            | Code::MethodNotAllowed
            | Code::FlowNotFound
            | Code::ItemNotFound
            | Code::NotFound
            | Code::Conflict
            | Code::NotReserved
            | Code::FailedPrecondition
            | Code::PayloadTooLarge
            | Code::BodyTooLarge => true,
            Code::Busy | Code::Internal => false,
        }
    }

    /// Whether the same request may succeed later: exactly the errors that are not the
    /// caller's.
    pub fn is_retryable(self) -> bool {
        !self.is_user_error()
    }
}

impl std::fmt::Display for Code {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An error answered to a request.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    /// What kind of error.
    pub code: Code,
    /// What went wrong, naming the field or item.
    pub message: String,
}

impl ApiError {
    /// An error with `code`.
    pub fn new(code: Code, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
        }
    }

    /// `invalid_argument` (422).
    pub fn invalid(message: impl Into<String>) -> ApiError {
        ApiError::new(Code::InvalidArgument, message)
    }

    /// `internal` (500).
    pub fn internal(message: impl Into<String>) -> ApiError {
        ApiError::new(Code::Internal, message)
    }

    /// The JSON body.
    pub fn body(&self) -> serde_json::Value {
        serde_json::json!({"error": {"code": self.code.as_str(), "message": self.message}})
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        if self.code == Code::Internal {
            tracing::error!(message = %self.message, "internal error");
        }
        let mut resp = (self.code.status(), axum::Json(self.body())).into_response();
        if self.code == Code::Unauthorized {
            resp.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                HeaderValue::from_static("Bearer realm=\"freshindex\""),
            );
        }
        resp
    }
}

impl From<EngineError> for ApiError {
    fn from(e: EngineError) -> ApiError {
        let code = match &e {
            EngineError::Config(_) | EngineError::Source(_) => Code::FailedPrecondition,
            EngineError::NotFound(_) => Code::FlowNotFound,
            EngineError::Busy(_) | EngineError::Cancelled(_) => Code::Busy,
            EngineError::Conflict(_) => Code::Conflict,
            EngineError::Invalid(_) => Code::InvalidArgument,
            EngineError::Store(_) | EngineError::Target(_) | EngineError::Internal(_) => {
                Code::Internal
            }
        };
        ApiError::new(code, e.to_string())
    }
}

impl From<StoreError> for ApiError {
    fn from(e: StoreError) -> ApiError {
        ApiError::internal(e.to_string())
    }
}

impl From<PushRejection> for ApiError {
    fn from(e: PushRejection) -> ApiError {
        let code = match &e {
            PushRejection::UnknownItem(_) => Code::ItemNotFound,
            PushRejection::NotReserved(_) => Code::NotReserved,
            PushRejection::PayloadTooLarge { .. } => Code::PayloadTooLarge,
        };
        ApiError::new(code, e.to_string())
    }
}

impl From<FenceError> for ApiError {
    fn from(e: FenceError) -> ApiError {
        ApiError::new(Code::Conflict, e.to_string())
    }
}

impl From<freshindex_vector::VectorError> for ApiError {
    fn from(e: freshindex_vector::VectorError) -> ApiError {
        EngineError::from(e).into()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codes_are_unique_and_statuses_are_errors() {
        let mut names: Vec<&str> = Code::ALL.iter().map(|c| c.as_str()).collect();
        names.sort_unstable();
        names.dedup();
        assert_eq!(names.len(), Code::ALL.len());
        for c in Code::ALL {
            let s = c.status();
            assert!(s.is_client_error() || s.is_server_error(), "{c}: {s}");
            // Only failures of the server itself answer 5xx.
            assert_eq!(s.is_server_error(), !c.is_user_error(), "{c}");
        }
    }

    #[test]
    fn the_readme_documents_every_code() {
        let readme = include_str!("../../../README.md");
        let section = readme
            .split("## HTTP API")
            .nth(1)
            .expect("README has an `## HTTP API` section");
        for c in Code::ALL {
            let row = format!("| `{}` | {} |", c.as_str(), c.status().as_u16());
            assert!(
                section.contains(&row),
                "README's error table lacks the row starting `{row}`"
            );
        }
    }

    #[test]
    fn engine_errors_keep_bad_input_out_of_5xx() {
        for (e, status) in [
            (EngineError::Invalid("x".into()), 422),
            (EngineError::Conflict("x".into()), 409),
            (EngineError::NotFound("x".into()), 404),
            (EngineError::Busy("x".into()), 503),
            (EngineError::Internal("x".into()), 500),
        ] {
            assert_eq!(ApiError::from(e).code.status().as_u16(), status);
        }
    }
}
