//! A local server of the OpenAI embeddings protocol for tests: `POST /v1/embeddings` on
//! 127.0.0.1, deterministic vectors ([`embedding_of`]), faults on demand ([`Fault`]) and a
//! record of every request.
//!
//! Plain HTTP/1.1 over std's `TcpListener`, one thread per connection, one request per
//! connection (`Connection: close`).

#![allow(dead_code)]

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

/// Vector length when the request names no `dimensions`.
pub const DEFAULT_DIM: usize = 8;

/// What the server does instead of answering one request.
#[derive(Clone, Debug)]
pub enum Fault {
    /// An empty response of this status (500, 503...).
    Status(u16),
    /// 429 with this `Retry-After` value.
    Throttle(String),
    /// Sleeps this long, then answers normally (the client has usually given up by then).
    Stall(Duration),
    /// This status with `{"error":{"message":..}}`.
    Error(u16, String),
}

/// One request as received.
#[derive(Clone, Debug)]
pub struct Recorded {
    /// `POST /v1/embeddings`.
    pub request_line: String,
    /// Header names in lower case, values as sent.
    pub headers: Vec<(String, String)>,
    /// The JSON body (`Null` when it is not JSON).
    pub body: serde_json::Value,
}

impl Recorded {
    /// A header's value by lower-case name.
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    /// The texts of `input`.
    pub fn inputs(&self) -> Vec<String> {
        match &self.body["input"] {
            serde_json::Value::Array(a) => a
                .iter()
                .map(|t| t.as_str().unwrap_or_default().to_string())
                .collect(),
            serde_json::Value::String(s) => vec![s.clone()],
            _ => Vec::new(),
        }
    }
}

#[derive(Default)]
struct State {
    faults: VecDeque<Fault>,
    requests: Vec<Recorded>,
    /// Answers list `data` in reverse order.
    reverse: bool,
    /// Every answer waits this long first (to make requests overlap).
    delay: Duration,
    /// Vectors of this length whatever the request says.
    force_dim: Option<usize>,
    in_flight: usize,
    max_in_flight: usize,
}

/// The server; stops accepting when dropped.
pub struct OpenAiServer {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl OpenAiServer {
    /// Starts a server on a free port of 127.0.0.1.
    pub fn start() -> OpenAiServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let addr = listener.local_addr().expect("addr");
        let state = Arc::new(Mutex::new(State::default()));
        let stop = Arc::new(AtomicBool::new(false));
        let accept = {
            let state = state.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                for conn in listener.incoming() {
                    if stop.load(Ordering::SeqCst) {
                        break;
                    }
                    let Ok(conn) = conn else { continue };
                    let state = state.clone();
                    std::thread::spawn(move || serve(conn, &state));
                }
            })
        };
        OpenAiServer {
            addr,
            state,
            stop,
            accept: Some(accept),
        }
    }

    /// The base URL to configure (`http://127.0.0.1:PORT/v1`).
    pub fn base_url(&self) -> String {
        format!("http://{}/v1", self.addr)
    }

    /// The next `n` requests get `fault` (after any faults queued before).
    pub fn fail_next(&self, n: usize, fault: Fault) {
        let mut s = self.lock();
        for _ in 0..n {
            s.faults.push_back(fault.clone());
        }
    }

    /// Lists `data` in reverse order (clients must order by `index`).
    pub fn reverse_data(&self, on: bool) {
        self.lock().reverse = on;
    }

    /// Waits this long before every answer.
    pub fn delay(&self, d: Duration) {
        self.lock().delay = d;
    }

    /// Returns vectors of this length, whatever the request asks.
    pub fn force_dimension(&self, dim: Option<usize>) {
        self.lock().force_dim = dim;
    }

    /// Every request received so far.
    pub fn requests(&self) -> Vec<Recorded> {
        self.lock().requests.clone()
    }

    /// Forgets the requests received so far.
    pub fn clear_requests(&self) {
        self.lock().requests.clear();
    }

    /// Most requests that were being answered at once.
    pub fn max_in_flight(&self) -> usize {
        self.lock().max_in_flight
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

impl Drop for OpenAiServer {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        // Wakes the accept loop.
        let _ = TcpStream::connect(self.addr);
        if let Some(h) = self.accept.take() {
            let _ = h.join();
        }
    }
}

/// The server's vector of a text: a deterministic function of the text, of length `dim`.
pub fn embedding_of(text: &str, dim: usize) -> Vec<f32> {
    (0..dim)
        .map(|i| {
            let mut h: u64 = 0xcbf2_9ce4_8422_2325 ^ (i as u64);
            for b in text.bytes() {
                h = (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3);
            }
            h ^= h >> 29;
            ((h % 2001) as f32 - 1000.0) / 1000.0
        })
        .collect()
}

fn serve(conn: TcpStream, state: &Mutex<State>) {
    let lock = || state.lock().unwrap_or_else(|p| p.into_inner());
    let Some(req) = read_request(&conn) else {
        return;
    };
    let (fault, reverse, delay, force_dim) = {
        let mut s = lock();
        s.requests.push(req.clone());
        s.in_flight += 1;
        s.max_in_flight = s.max_in_flight.max(s.in_flight);
        (s.faults.pop_front(), s.reverse, s.delay, s.force_dim)
    };
    std::thread::sleep(delay);
    let (status, extra, body) = match fault {
        Some(Fault::Status(code)) => (code, String::new(), String::new()),
        Some(Fault::Throttle(after)) => (
            429,
            format!("Retry-After: {after}\r\n"),
            error_json("Rate limit reached"),
        ),
        Some(Fault::Error(code, message)) => (code, String::new(), error_json(&message)),
        Some(Fault::Stall(d)) => {
            std::thread::sleep(d);
            answer(&req, reverse, force_dim)
        }
        None => answer(&req, reverse, force_dim),
    };
    lock().in_flight -= 1;
    let mut conn = conn;
    let head = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\
         Connection: close\r\n{extra}\r\n",
        reason(status),
        body.len()
    );
    let _ = conn.write_all(head.as_bytes());
    let _ = conn.write_all(body.as_bytes());
    let _ = conn.flush();
}

/// The normal answer to a request.
fn answer(req: &Recorded, reverse: bool, force_dim: Option<usize>) -> (u16, String, String) {
    if !req.request_line.starts_with("POST /v1/embeddings ") {
        return (404, String::new(), error_json("no such route"));
    }
    let Some(model) = req.body["model"].as_str() else {
        return (400, String::new(), error_json("model is required"));
    };
    let inputs = req.inputs();
    if inputs.is_empty() || inputs.iter().any(String::is_empty) {
        return (
            400,
            String::new(),
            error_json("input must be non-empty strings"),
        );
    }
    let dim = force_dim
        .or_else(|| req.body["dimensions"].as_u64().map(|d| d as usize))
        .unwrap_or(DEFAULT_DIM);
    let mut data: Vec<serde_json::Value> = inputs
        .iter()
        .enumerate()
        .map(|(i, t)| {
            serde_json::json!({
                "object": "embedding",
                "index": i,
                "embedding": embedding_of(t, dim),
            })
        })
        .collect();
    if reverse {
        data.reverse();
    }
    let body = serde_json::json!({
        "object": "list",
        "data": data,
        "model": model,
        "usage": { "prompt_tokens": 0, "total_tokens": 0 },
    });
    (200, String::new(), body.to_string())
}

fn error_json(message: &str) -> String {
    serde_json::json!({ "error": { "message": message, "type": "test_error" } }).to_string()
}

fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        429 => "Too Many Requests",
        500 => "Internal Server Error",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        _ => "Status",
    }
}

/// Reads one request: request line, headers and a `Content-Length` body.
fn read_request(conn: &TcpStream) -> Option<Recorded> {
    conn.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let mut r = BufReader::new(conn);
    let mut request_line = String::new();
    r.read_line(&mut request_line).ok()?;
    let request_line = request_line.trim_end().to_string();
    if request_line.is_empty() {
        return None;
    }
    let mut headers = Vec::new();
    loop {
        let mut line = String::new();
        if r.read_line(&mut line).ok()? == 0 {
            return None;
        }
        let line = line.trim_end();
        if line.is_empty() {
            break;
        }
        let (name, value) = line.split_once(':')?;
        headers.push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
    }
    let len: usize = headers
        .iter()
        .find(|(n, _)| n == "content-length")
        .and_then(|(_, v)| v.parse().ok())
        .unwrap_or(0);
    let mut body = vec![0u8; len];
    r.read_exact(&mut body).ok()?;
    Some(Recorded {
        request_line,
        headers,
        body: serde_json::from_slice(&body).unwrap_or(serde_json::Value::Null),
    })
}
