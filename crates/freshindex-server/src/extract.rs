//! Request extractors that answer every rejection in the API's error shape: JSON bodies
//! (with field paths in their messages), item keys taken from the raw path, query strings.

use axum::body::Bytes;
use axum::extract::{FromRequest, FromRequestParts, Path, Request};
use axum::http::request::Parts;
use axum::http::{StatusCode, header};
use percent_encoding::percent_decode_str;
use serde::de::DeserializeOwned;

use crate::error::{ApiError, Code};

/// Largest request body the server reads.
pub const MAX_BODY_BYTES: usize = 16 * 1024 * 1024;

/// A JSON body. An empty body reads as `{}` when `T` has defaults for every field (see
/// [`OptionalJson`]); otherwise it is an `invalid_body` error.
#[derive(Debug)]
pub struct ApiJson<T>(pub T);

/// A JSON body that may be left out (an empty body is `T::default()`).
#[derive(Debug)]
pub struct OptionalJson<T>(pub T);

async fn read_body(req: Request) -> Result<(bool, Bytes), ApiError> {
    let json_type = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(is_json_type);
    let bytes = Bytes::from_request(req, &()).await.map_err(|e| {
        if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
            ApiError::new(
                Code::BodyTooLarge,
                format!("request body is over the limit of {MAX_BODY_BYTES} bytes"),
            )
        } else {
            ApiError::new(
                Code::InvalidBody,
                format!("reading the request body: {}", e.body_text()),
            )
        }
    })?;
    Ok((json_type, bytes))
}

fn is_json_type(v: &str) -> bool {
    let mime = v
        .split(';')
        .next()
        .unwrap_or("")
        .trim()
        .to_ascii_lowercase();
    mime == "application/json" || (mime.starts_with("application/") && mime.ends_with("+json"))
}

/// Parses JSON, telling syntax errors (400 `malformed_json`) from shape errors (400
/// `invalid_body`, with the path of the offending field).
pub fn parse_json<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, ApiError> {
    let mut de = serde_json::Deserializer::from_slice(bytes);
    let (path, inner) = match serde_path_to_error::deserialize::<_, T>(&mut de) {
        Ok(v) => match de.end() {
            Ok(()) => return Ok(v),
            Err(e) => (String::new(), e),
        },
        Err(e) => (e.path().to_string(), e.into_inner()),
    };
    let code = match inner.classify() {
        serde_json::error::Category::Data => Code::InvalidBody,
        serde_json::error::Category::Syntax
        | serde_json::error::Category::Eof
        | serde_json::error::Category::Io => Code::MalformedJson,
    };
    let message = if code == Code::InvalidBody && !path.is_empty() && path != "." {
        format!("{path}: {inner}")
    } else {
        format!("request body: {inner}")
    };
    Err(ApiError::new(code, message))
}

fn check_type(json_type: bool) -> Result<(), ApiError> {
    if json_type {
        Ok(())
    } else {
        Err(ApiError::new(
            Code::UnsupportedMediaType,
            "send the body with `Content-Type: application/json`",
        ))
    }
}

impl<S, T> FromRequest<S> for ApiJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        let (json_type, bytes) = read_body(req).await?;
        if bytes.is_empty() {
            return Err(ApiError::new(
                Code::InvalidBody,
                "request body: expected a JSON object, got an empty body",
            ));
        }
        check_type(json_type)?;
        parse_json(&bytes).map(ApiJson)
    }
}

impl<S, T> FromRequest<S> for OptionalJson<T>
where
    S: Send + Sync,
    T: DeserializeOwned + Default,
{
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, ApiError> {
        let (json_type, bytes) = read_body(req).await?;
        if bytes.iter().all(u8::is_ascii_whitespace) {
            return Ok(OptionalJson(T::default()));
        }
        check_type(json_type)?;
        parse_json(&bytes).map(OptionalJson)
    }
}

/// The `{flow}` of the path (percent-decoded).
#[derive(Debug)]
pub struct FlowName(pub String);

impl<S: Send + Sync> FromRequestParts<S> for FlowName {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, state: &S) -> Result<Self, ApiError> {
        let Path(params) = Path::<Vec<(String, String)>>::from_request_parts(parts, state)
            .await
            .map_err(|e| ApiError::invalid(format!("path: {}", e.body_text())))?;
        params
            .into_iter()
            .find(|(k, _)| k == "flow")
            .map(|(_, v)| FlowName(v))
            .ok_or_else(|| ApiError::internal("route without a {flow} parameter"))
    }
}

/// The part of the raw (still percent-encoded) path after `/v1/flows/{flow}/{collection}/`,
/// with its `:verb` suffix split off — keys may hold `/` (encoded or not) and `:`, so the
/// verb is the text after the last `:` of the raw path, and only the key is decoded.
#[derive(Debug, PartialEq, Eq)]
pub struct ResourcePath {
    /// The decoded resource name (an item key or a queue label).
    pub name: String,
    /// The custom verb after the last `:`, if any.
    pub verb: Option<String>,
}

/// Splits the raw path `/v1/flows/{flow}/{collection}/{rest}`; `with_verb` says whether a
/// `:verb` suffix is expected (POST) or part of the name (GET, DELETE).
pub fn resource_path(
    raw_path: &str,
    collection: &str,
    with_verb: bool,
) -> Result<ResourcePath, ApiError> {
    let rest = raw_path
        .strip_prefix("/v1/flows/")
        .and_then(|r| r.split_once('/'))
        .and_then(|(_, r)| r.strip_prefix(collection))
        .and_then(|r| r.strip_prefix('/'))
        .ok_or_else(|| ApiError::internal(format!("unexpected path {raw_path}")))?;
    let (name, verb) = match rest.rsplit_once(':') {
        Some((n, v)) if with_verb => (n, Some(v)),
        _ => (rest, None),
    };
    let field = if collection == "items" {
        "name"
    } else {
        "queue"
    };
    let name = percent_decode_str(name)
        .decode_utf8()
        .map_err(|_| ApiError::invalid(format!("{field}: not UTF-8 after percent-decoding")))?
        .into_owned();
    let verb = verb
        .map(|v| {
            percent_decode_str(v)
                .decode_utf8()
                .map(|v| v.into_owned())
                .map_err(|_| ApiError::new(Code::RouteNotFound, "unknown method"))
        })
        .transpose()?;
    Ok(ResourcePath { name, verb })
}

/// Parses a query string into decoded `(name, value)` pairs. Only percent-escapes are decoded;
/// `+` stays a plus (base64 versions carry it).
pub fn query_pairs(query: Option<&str>) -> Result<Vec<(String, String)>, ApiError> {
    let Some(q) = query else {
        return Ok(Vec::new());
    };
    q.split('&')
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=').unwrap_or((p, ""));
            let dec = |s: &str| {
                percent_decode_str(s)
                    .decode_utf8()
                    .map(|c| c.into_owned())
                    .map_err(|_| {
                        ApiError::invalid(format!(
                            "query: `{s}` is not UTF-8 after percent-decoding"
                        ))
                    })
            };
            Ok((dec(k)?, dec(v)?))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn item_keys_keep_slashes_and_colons() {
        let p = resource_path("/v1/flows/docs/items/a%2Fb/c%3Ad:x:index", "items", true).unwrap();
        assert_eq!(
            p,
            ResourcePath {
                name: "a/b/c:d:x".into(),
                verb: Some("index".into())
            }
        );
        let p = resource_path("/v1/flows/docs/items/a%2Fb:c", "items", false).unwrap();
        assert_eq!(p.name, "a/b:c");
        assert_eq!(p.verb, None);
        // A literal percent sign is decoded once only.
        let p = resource_path("/v1/flows/docs/items/100%2541", "items", false).unwrap();
        assert_eq!(p.name, "100%41");
        let p = resource_path("/v1/flows/d/queues/A%20B:deleteQueueItems", "queues", true).unwrap();
        assert_eq!(p.name, "A B");
        assert!(resource_path("/v1/flows/d/items/%FF", "items", false).is_err());
    }

    #[test]
    fn json_errors_tell_syntax_from_shape() {
        #[derive(serde::Deserialize, Debug)]
        #[serde(deny_unknown_fields)]
        #[allow(dead_code)]
        struct B {
            limit: Option<i64>,
        }
        assert_eq!(parse_json::<B>(b"{").unwrap_err().code, Code::MalformedJson);
        assert_eq!(
            parse_json::<B>(b"{} x").unwrap_err().code,
            Code::MalformedJson
        );
        let e = parse_json::<B>(br#"{"limit":"x"}"#).unwrap_err();
        assert_eq!(e.code, Code::InvalidBody);
        assert!(e.message.starts_with("limit:"), "{e}");
        let e = parse_json::<B>(br#"{"limt":1}"#).unwrap_err();
        assert_eq!(e.code, Code::InvalidBody);
        assert!(e.message.contains("limt"), "{e}");
    }

    #[test]
    fn query_keeps_plus_signs() {
        let q = query_pairs(Some("version=a+b%2F&status=ERROR&&x")).unwrap();
        assert_eq!(
            q,
            vec![
                ("version".into(), "a+b/".into()),
                ("status".into(), "ERROR".into()),
                ("x".into(), String::new())
            ]
        );
    }

    #[test]
    fn json_media_types() {
        assert!(is_json_type("application/json"));
        assert!(is_json_type("Application/JSON; charset=utf-8"));
        assert!(is_json_type("application/merge-patch+json"));
        assert!(!is_json_type("text/plain"));
    }
}
