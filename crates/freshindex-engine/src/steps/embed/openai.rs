//! `openai:MODEL`: a server of the OpenAI embeddings protocol.
//!
//! Each call of [`Embedder::embed`] is one `POST {base_url}/embeddings` request
//! (`{"model", "input": [...], "encoding_format": "float"}`, plus `dimensions` when the flow sets
//! it), sent with `Authorization: Bearer KEY` when the API key variable is set.
//!
//! - Requests in flight are bounded by `max_concurrency` across every caller of one embedder.
//! - A throttled (429, 408), failed (5xx), timed-out or broken request is tried again up to
//!   `max_retries` times, after an exponential backoff with full jitter (0.5 s doubling, at
//!   most 30 s) or after the server's `Retry-After` (seconds or an HTTP date, at most 120 s).
//!   Any other 4xx is an error at once, with the server's message.
//! - The dimension is the flow's `dimensions`, or else learned at construction by embedding
//!   one short text, so a wrong URL, key or model is an error when the flow starts. Every
//!   response is checked to have it.
//! - Empty texts are sent as a single space (some servers refuse empty inputs).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Condvar, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use freshindex_core::{DEFAULT_OPENAI_BASE_URL, EmbedSpec};
use serde::Deserialize;

use super::Embedder;

/// Environment variable of the API key when the flow names none.
pub const DEFAULT_API_KEY_ENV: &str = "OPENAI_API_KEY";
/// Seconds a request may take when the flow sets no `timeout_secs`.
pub const DEFAULT_TIMEOUT_SECS: u64 = 60;
/// Requests in flight when the flow sets no `max_concurrency`.
pub const DEFAULT_MAX_CONCURRENCY: usize = 4;
/// Retries of a request when the flow sets no `max_retries`.
pub const DEFAULT_MAX_RETRIES: u32 = 6;
/// First backoff before a retry; it doubles with each retry, up to [`BACKOFF_CAP`].
pub const BACKOFF_BASE: Duration = Duration::from_millis(500);
/// Longest computed backoff.
pub const BACKOFF_CAP: Duration = Duration::from_secs(30);
/// Longest wait a server's `Retry-After` can ask for.
pub const RETRY_AFTER_CAP: Duration = Duration::from_secs(120);
/// The text embedded at construction to learn the dimension.
pub const PROBE_TEXT: &str = "dimension probe";
/// Largest response body read (a batch of long vectors as JSON text is large).
const MAX_RESPONSE_BYTES: u64 = 1 << 30;

/// Request counts of one embedder.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct OpenAiStats {
    /// HTTP requests sent (every attempt, the dimension probe included).
    pub requests: u64,
    /// Attempts that were tried again after a failure.
    pub retries: u64,
}

/// Embeds through `POST {base_url}/embeddings`.
pub struct OpenAiEmbedder {
    model: String,
    url: String,
    api_key_env: String,
    dimensions: Option<usize>,
    dimension: usize,
    timeout: Duration,
    max_retries: u32,
    agent: ureq::Agent,
    slots: Semaphore,
    requests: AtomicU64,
    retries: AtomicU64,
}

impl OpenAiEmbedder {
    /// A client for `model` with the spec's settings. Without `dimensions` in the spec, embeds
    /// [`PROBE_TEXT`] to learn the dimension; its errors are returned.
    pub fn new(model: &str, spec: &EmbedSpec) -> Result<OpenAiEmbedder, String> {
        let base = spec
            .base_url
            .as_deref()
            .unwrap_or(DEFAULT_OPENAI_BASE_URL)
            .trim()
            .trim_end_matches('/');
        let url = format!("{base}/embeddings");
        let who = format!("openai:{model} at {url}");
        if !(base.starts_with("http://") || base.starts_with("https://")) {
            return Err(format!(
                "{who}: base_url `{base}` is not an http:// or https:// URL"
            ));
        }
        if base.starts_with("https://") && !cfg!(feature = "openai-tls") {
            return Err(format!(
                "{who}: this build has no TLS for https:// URLs \
                 (build freshindex-engine with the cargo feature `openai-tls`)"
            ));
        }
        if spec.dimensions == Some(0) {
            return Err(format!("{who}: dimensions must be at least 1"));
        }
        let timeout = Duration::from_secs(spec.timeout_secs.unwrap_or(DEFAULT_TIMEOUT_SECS).max(1));
        let agent: ureq::Agent = ureq::Agent::config_builder()
            .timeout_global(Some(timeout))
            .http_status_as_error(false)
            .build()
            .into();
        let mut e = OpenAiEmbedder {
            model: model.to_string(),
            url,
            api_key_env: spec
                .api_key_env
                .clone()
                .unwrap_or_else(|| DEFAULT_API_KEY_ENV.to_string()),
            dimensions: spec.dimensions,
            dimension: spec.dimensions.unwrap_or(0),
            timeout,
            max_retries: spec.max_retries.unwrap_or(DEFAULT_MAX_RETRIES),
            agent,
            slots: Semaphore::new(spec.max_concurrency.unwrap_or(DEFAULT_MAX_CONCURRENCY)),
            requests: AtomicU64::new(0),
            retries: AtomicU64::new(0),
        };
        if e.dimensions.is_none() {
            let v = e
                .request(&[PROBE_TEXT])
                .map_err(|err| format!("{err} (learning the model's dimension)"))?;
            let d = v.first().map_or(0, Vec::len);
            if d == 0 {
                return Err(format!("{}: the model returned an empty vector", e.who()));
            }
            e.dimension = d;
        }
        Ok(e)
    }

    /// Requests sent and retried so far.
    pub fn stats(&self) -> OpenAiStats {
        OpenAiStats {
            requests: self.requests.load(Ordering::Relaxed),
            retries: self.retries.load(Ordering::Relaxed),
        }
    }

    fn who(&self) -> String {
        format!("openai:{} at {}", self.model, self.url)
    }

    /// One embedding call, with its retries. Returns one vector per text, in order, unchecked
    /// for dimension.
    fn request(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, String> {
        let input: Vec<&str> = texts
            .iter()
            .map(|t| if t.is_empty() { " " } else { *t })
            .collect();
        let mut body = serde_json::json!({
            "model": self.model,
            "input": input,
            "encoding_format": "float",
        });
        if let Some(d) = self.dimensions {
            body["dimensions"] = serde_json::json!(d);
        }
        let body = serde_json::to_vec(&body)
            .map_err(|e| format!("{}: cannot write the request: {e}", self.who()))?;
        let attempts = self.max_retries.saturating_add(1);
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let outcome = {
                let _slot = self.slots.acquire();
                self.requests.fetch_add(1, Ordering::Relaxed);
                self.attempt(&body, texts.len())
            };
            match outcome {
                Ok(v) => return Ok(v),
                Err(Failure::Fatal(msg)) => return Err(format!("{}: {msg}", self.who())),
                Err(Failure::Retry { msg, after }) => {
                    if attempt >= attempts {
                        let n = if attempt == 1 { "attempt" } else { "attempts" };
                        return Err(format!("{}: {msg} ({attempt} {n})", self.who()));
                    }
                    let wait = after.unwrap_or_else(|| backoff(attempt - 1));
                    tracing::warn!(
                        "{}: {msg}; trying again in {:.1} s (attempt {} of {attempts})",
                        self.who(),
                        wait.as_secs_f64(),
                        attempt + 1
                    );
                    self.retries.fetch_add(1, Ordering::Relaxed);
                    std::thread::sleep(wait);
                }
            }
        }
    }

    /// One HTTP exchange.
    fn attempt(&self, body: &[u8], n: usize) -> Result<Vec<Vec<f32>>, Failure> {
        let mut req = self
            .agent
            .post(&self.url)
            .header("Content-Type", "application/json");
        let key = std::env::var(&self.api_key_env)
            .ok()
            .filter(|k| !k.is_empty());
        if let Some(k) = &key {
            req = req.header("Authorization", format!("Bearer {k}"));
        }
        let mut resp = req.send(body).map_err(|e| self.transport_failure(e))?;
        let status = resp.status().as_u16();
        let after = resp
            .headers()
            .get("retry-after")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| parse_retry_after(v, SystemTime::now()));
        let bytes = resp
            .body_mut()
            .with_config()
            .limit(MAX_RESPONSE_BYTES)
            .read_to_vec()
            .map_err(|e| match self.transport_failure(e) {
                Failure::Retry { msg, after } => Failure::Retry {
                    msg: format!("reading the response: {msg}"),
                    after,
                },
                Failure::Fatal(msg) => Failure::Fatal(format!("reading the response: {msg}")),
            })?;
        if (200..300).contains(&status) {
            return parse_embeddings(&bytes, n).map_err(Failure::Fatal);
        }
        let mut msg = format!("HTTP {status}");
        if let Some(m) = server_message(&bytes) {
            msg.push_str(": ");
            msg.push_str(&m);
        }
        match status {
            408 | 429 | 500..=599 => Err(Failure::Retry { msg, after }),
            401 | 403 => {
                let hint = if key.is_some() {
                    format!("check the API key in ${}", self.api_key_env)
                } else {
                    format!("no API key was sent: ${} is not set", self.api_key_env)
                };
                Err(Failure::Fatal(format!("{msg} ({hint})")))
            }
            _ => Err(Failure::Fatal(msg)),
        }
    }

    fn transport_failure(&self, e: ureq::Error) -> Failure {
        use ureq::Error as E;
        match e {
            E::Timeout(_) => Failure::Retry {
                msg: format!("timed out after {} s", self.timeout.as_secs()),
                after: None,
            },
            E::Io(_) | E::ConnectionFailed | E::Protocol(_) | E::BodyStalled => Failure::Retry {
                msg: format!("connection failed: {e}"),
                after: None,
            },
            E::HostNotFound => Failure::Fatal("host not found".into()),
            E::BodyExceedsLimit(n) => {
                Failure::Fatal(format!("the response is too large (over {n} bytes)"))
            }
            other => Failure::Fatal(other.to_string()),
        }
    }
}

impl Embedder for OpenAiEmbedder {
    fn dimension(&self) -> usize {
        self.dimension
    }

    fn embed(&self, texts: &[&str]) -> Result<Vec<Vec<f32>>, String> {
        if texts.is_empty() {
            return Ok(Vec::new());
        }
        let vectors = self.request(texts)?;
        if let Some(v) = vectors.iter().find(|v| v.len() != self.dimension) {
            return Err(format!(
                "{}: the model returned a vector of {} dimensions, expected {}",
                self.who(),
                v.len(),
                self.dimension
            ));
        }
        Ok(vectors)
    }
}

/// How one attempt failed.
enum Failure {
    /// Worth trying again, after `after` when the server said so.
    Retry {
        msg: String,
        after: Option<Duration>,
    },
    /// An error as it is.
    Fatal(String),
}

#[derive(Deserialize)]
struct EmbeddingsResponse {
    data: Vec<Datum>,
}

#[derive(Deserialize)]
struct Datum {
    #[serde(default)]
    index: Option<usize>,
    embedding: Vec<f32>,
}

/// The vectors of a response body, ordered by `index`; `n` texts were sent.
fn parse_embeddings(bytes: &[u8], n: usize) -> Result<Vec<Vec<f32>>, String> {
    let resp: EmbeddingsResponse = serde_json::from_slice(bytes).map_err(|e| {
        format!(
            "the response is not an embeddings response ({e}): {}",
            head(bytes)
        )
    })?;
    if resp.data.len() != n {
        return Err(format!(
            "the response has {} embeddings for {n} texts",
            resp.data.len()
        ));
    }
    let mut out: Vec<Option<Vec<f32>>> = vec![None; n];
    for (pos, d) in resp.data.into_iter().enumerate() {
        let i = d.index.unwrap_or(pos);
        match out.get_mut(i) {
            Some(slot @ None) => *slot = Some(d.embedding),
            Some(Some(_)) => return Err(format!("the response repeats the index {i}")),
            None => {
                return Err(format!(
                    "the response has the index {i}, out of range for {n} texts"
                ));
            }
        }
    }
    // Every slot is filled: n distinct indexes below n.
    Ok(out.into_iter().flatten().collect())
}

/// The server's error message of an error body: `{"error":{"message":..}}`, or the shapes
/// other servers use (`{"error":".."}`, `{"message":..}`, `{"detail":..}`), or the body's
/// start.
fn server_message(bytes: &[u8]) -> Option<String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return None;
    }
    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(bytes) {
        let candidates = [
            v.pointer("/error/message"),
            v.get("error"),
            v.get("message"),
            v.get("detail"),
        ];
        for c in candidates.into_iter().flatten() {
            match c {
                serde_json::Value::String(s) => return Some(s.clone()),
                serde_json::Value::Null | serde_json::Value::Object(_) => {}
                other => return Some(other.to_string()),
            }
        }
    }
    Some(head(bytes))
}

/// The start of a body, for messages.
fn head(bytes: &[u8]) -> String {
    let s = String::from_utf8_lossy(bytes);
    let s = s.trim();
    let mut h: String = s.chars().take(300).collect();
    if h.len() < s.len() {
        h.push('…');
    }
    h
}

/// Backoff before retry number `retry` (0 first): full jitter, a random wait up to
/// `BACKOFF_BASE * 2^retry`, at most [`BACKOFF_CAP`].
fn backoff(retry: u32) -> Duration {
    let ceiling = BACKOFF_BASE
        .saturating_mul(1u32.checked_shl(retry.min(16)).unwrap_or(u32::MAX))
        .min(BACKOFF_CAP);
    let r = random_u64() as f64 / u64::MAX as f64;
    ceiling.mul_f64(r)
}

fn random_u64() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u128(
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.finish()
}

/// A `Retry-After` value: seconds, or an HTTP date (IMF-fixdate, `Sun, 06 Nov 1994 08:49:37
/// GMT`), as a wait from `now`, at most [`RETRY_AFTER_CAP`].
pub fn parse_retry_after(value: &str, now: SystemTime) -> Option<Duration> {
    let value = value.trim();
    let wait = if let Ok(secs) = value.parse::<u64>() {
        Duration::from_secs(secs)
    } else if let Ok(secs) = value.parse::<f64>() {
        if !secs.is_finite() || secs < 0.0 {
            return None;
        }
        Duration::from_secs_f64(secs.min(RETRY_AFTER_CAP.as_secs_f64()))
    } else {
        let at = parse_http_date(value)?;
        let now = now.duration_since(UNIX_EPOCH).ok()?.as_secs();
        Duration::from_secs(at.saturating_sub(now))
    };
    Some(wait.min(RETRY_AFTER_CAP))
}

/// Seconds since the epoch of an IMF-fixdate.
fn parse_http_date(s: &str) -> Option<u64> {
    // "Sun, 06 Nov 1994 08:49:37 GMT"
    let (_, rest) = s.split_once(", ")?;
    let parts: Vec<&str> = rest.split_whitespace().collect();
    let [day, month, year, time, "GMT"] = parts.as_slice() else {
        return None;
    };
    let day: u64 = day.parse().ok()?;
    let month = [
        "Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec",
    ]
    .iter()
    .position(|m| m == month)? as u64
        + 1;
    let year: u64 = year.parse().ok()?;
    let hms: Vec<u64> = time
        .split(':')
        .map(|p| p.parse().ok())
        .collect::<Option<_>>()?;
    let [h, m, sec] = hms.as_slice() else {
        return None;
    };
    if !(1..=31).contains(&day) || year < 1970 || *h > 23 || *m > 59 || *sec > 60 {
        return None;
    }
    // Days from the civil date (H. Hinnant's algorithm), for years from 1970.
    let y = if month <= 2 { year - 1 } else { year };
    let era = y / 400;
    let yoe = y - era * 400;
    let mp = (month + 9) % 12;
    let doy = (153 * mp + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = (era * 146_097 + doe).checked_sub(719_468)?;
    Some(days * 86_400 + h * 3600 + m * 60 + sec)
}

/// A counting semaphore: requests in flight.
struct Semaphore {
    free: Mutex<usize>,
    freed: Condvar,
}

impl Semaphore {
    fn new(n: usize) -> Semaphore {
        Semaphore {
            free: Mutex::new(n.max(1)),
            freed: Condvar::new(),
        }
    }

    fn acquire(&self) -> Slot<'_> {
        let mut free = self.free.lock().unwrap_or_else(|p| p.into_inner());
        while *free == 0 {
            free = self.freed.wait(free).unwrap_or_else(|p| p.into_inner());
        }
        *free -= 1;
        Slot(self)
    }
}

/// A held place of a [`Semaphore`], given back on drop.
struct Slot<'a>(&'a Semaphore);

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        *self.0.free.lock().unwrap_or_else(|p| p.into_inner()) += 1;
        self.0.freed.notify_one();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_takes_seconds_and_http_dates() {
        let now = UNIX_EPOCH + Duration::from_secs(784_111_777); // Sun, 06 Nov 1994 08:49:37 GMT
        assert_eq!(parse_retry_after("1", now), Some(Duration::from_secs(1)));
        assert_eq!(parse_retry_after(" 3 ", now), Some(Duration::from_secs(3)));
        assert_eq!(parse_retry_after("100000", now), Some(RETRY_AFTER_CAP));
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:47 GMT", now),
            Some(Duration::from_secs(10))
        );
        assert_eq!(
            parse_retry_after("Sun, 06 Nov 1994 08:49:00 GMT", now),
            Some(Duration::ZERO),
            "a date in the past is no wait"
        );
        assert_eq!(parse_retry_after("soon", now), None);
        assert_eq!(parse_retry_after("-1", now), None);
    }

    #[test]
    fn backoff_grows_and_stays_under_the_cap() {
        for retry in 0..40 {
            let ceiling = BACKOFF_BASE
                .saturating_mul(1u32 << retry.min(16))
                .min(BACKOFF_CAP);
            for _ in 0..20 {
                assert!(backoff(retry) <= ceiling);
            }
        }
    }

    #[test]
    fn responses_are_ordered_by_index_and_checked() {
        let body = br#"{"data":[{"index":1,"embedding":[2.0]},{"index":0,"embedding":[1.0]}]}"#;
        assert_eq!(
            parse_embeddings(body, 2).expect("parse"),
            vec![vec![1.0], vec![2.0]]
        );
        assert!(parse_embeddings(body, 3).is_err());
        let dup = br#"{"data":[{"index":0,"embedding":[2.0]},{"index":0,"embedding":[1.0]}]}"#;
        assert!(parse_embeddings(dup, 2).is_err());
        let far = br#"{"data":[{"index":5,"embedding":[2.0]}]}"#;
        assert!(parse_embeddings(far, 1).is_err());
        assert!(parse_embeddings(b"<html>", 1).is_err());
    }

    #[test]
    fn server_messages_are_found_in_the_usual_shapes() {
        let m = |b: &str| server_message(b.as_bytes());
        assert_eq!(
            m(r#"{"error":{"message":"bad key"}}"#).as_deref(),
            Some("bad key")
        );
        assert_eq!(m(r#"{"error":"nope"}"#).as_deref(), Some("nope"));
        assert_eq!(m(r#"{"detail":"missing"}"#).as_deref(), Some("missing"));
        assert_eq!(m("Bad Gateway").as_deref(), Some("Bad Gateway"));
        assert_eq!(m(""), None);
    }
}
