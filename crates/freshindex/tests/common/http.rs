//! Helpers for the tests of `freshindex serve`: the real binary on an OS-assigned port
//! (`--listen 127.0.0.1:0`, port read from the first stdout line) and a tiny blocking
//! HTTP/1.1 client on `std::net` — one connection per request, exact bytes on the wire, so
//! tests can send malformed requests and raw percent-encoded paths.

use std::fs;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::Path;
use std::process::{Child, ExitStatus, Stdio};
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD;
use serde_json::Value;

use super::{FlowConfig, TIMEOUT, Workspace};

/// A config with one push flow, `docs` (default steps, collection `docs`).
pub const PUSH_FLOW_TOML: &str = "[[flow]]\nname = \"docs\"\nsource = { type = \"push\" }\n";

/// How long a server may take to print its address.
const START_TIMEOUT: Duration = Duration::from_secs(60);

/// A workspace whose config declares the push flow `docs`.
pub fn push_workspace() -> Workspace {
    let ws = Workspace::new(FlowConfig::default());
    fs::write(ws.config_path(), PUSH_FLOW_TOML).expect("write push config");
    ws
}

/// Base64 (standard, padded), as the API carries bytes.
pub fn b64(bytes: &[u8]) -> String {
    STANDARD.encode(bytes)
}

/// Decodes API base64.
pub fn unb64(s: &str) -> Vec<u8> {
    STANDARD
        .decode(s)
        .unwrap_or_else(|e| panic!("not base64 ({e}): {s}"))
}

/// Percent-encodes everything but RFC 3986 unreserved characters (a key as one path
/// segment).
pub fn pct(s: &str) -> String {
    let mut out = String::new();
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-._~".contains(&b) {
            out.push(b as char);
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// An answer.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    /// Header names lower-cased.
    pub headers: Vec<(String, String)>,
    pub body: String,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_str(&self.body)
            .unwrap_or_else(|e| panic!("body is not JSON ({e}): {:?}", self.body))
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// Asserts 200 and returns the JSON body.
    pub fn ok(&self) -> Value {
        assert_eq!(
            self.status, 200,
            "expected 200, got {}: {}",
            self.status, self.body
        );
        self.json()
    }

    /// Asserts an error answer: the status, the JSON error shape, the code; returns the
    /// message.
    pub fn assert_error(&self, status: u16, code: &str) -> String {
        assert_eq!(
            self.status, status,
            "expected {status} {code}, got {}: {}",
            self.status, self.body
        );
        assert!(
            self.header("content-type")
                .is_some_and(|t| t.starts_with("application/json")),
            "error without a JSON content type: {:?}",
            self.headers
        );
        let v = self.json();
        let err = v
            .get("error")
            .and_then(Value::as_object)
            .unwrap_or_else(|| panic!("no `error` object: {v}"));
        assert_eq!(err.len(), 2, "error has exactly code and message: {v}");
        assert_eq!(err.get("code").and_then(Value::as_str), Some(code), "{v}");
        let message = err
            .get("message")
            .and_then(Value::as_str)
            .unwrap_or_else(|| panic!("no message: {v}"));
        assert!(!message.is_empty(), "empty message: {v}");
        message.to_string()
    }
}

/// Like [`http`], but `None` when the connection fails or the server dies before answering
/// (crash tests).
#[allow(dead_code)]
pub fn try_http(addr: SocketAddr, method: &str, path: &str, body: &[u8]) -> Option<Resp> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10)).ok()?;
    s.set_read_timeout(Some(TIMEOUT)).ok()?;
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).ok()?;
    s.write_all(body).ok()?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).ok()?;
    parse_response(&raw)
}

/// Sends one request on a fresh connection and reads the whole answer.
pub fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Resp {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(10))
        .unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(TIMEOUT)).expect("read timeout");
    let mut head = format!("{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n");
    for (k, v) in headers {
        head.push_str(&format!("{k}: {v}\r\n"));
    }
    if !body.is_empty() || method != "GET" {
        head.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    head.push_str("\r\n");
    s.write_all(head.as_bytes()).expect("write request head");
    s.write_all(body).expect("write request body");
    let mut raw = Vec::new();
    s.read_to_end(&mut raw)
        .unwrap_or_else(|e| panic!("read answer to {method} {path}: {e}"));
    parse_response(&raw).unwrap_or_else(|| {
        panic!(
            "malformed answer to {method} {path}: {:?}",
            String::from_utf8_lossy(&raw)
        )
    })
}

fn parse_response(raw: &[u8]) -> Option<Resp> {
    let split = raw.windows(4).position(|w| w == b"\r\n\r\n")?;
    let head = std::str::from_utf8(&raw[..split]).ok()?;
    let mut lines = head.split("\r\n");
    let status = lines.next()?.split(' ').nth(1)?.parse().ok()?;
    let headers: Vec<(String, String)> = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(k, v)| (k.trim().to_ascii_lowercase(), v.trim().to_string()))
        .collect();
    let mut body = raw[split + 4..].to_vec();
    let chunked = headers
        .iter()
        .any(|(k, v)| k == "transfer-encoding" && v.contains("chunked"));
    if chunked {
        let mut out = Vec::new();
        let mut rest = &body[..];
        loop {
            let eol = rest.windows(2).position(|w| w == b"\r\n")?;
            let size_line = std::str::from_utf8(&rest[..eol]).ok()?;
            let size = usize::from_str_radix(size_line.split(';').next()?.trim(), 16).ok()?;
            rest = &rest[eol + 2..];
            if size == 0 {
                break;
            }
            out.extend_from_slice(rest.get(..size)?);
            rest = rest.get(size + 2..)?;
        }
        body = out;
    }
    Some(Resp {
        status,
        headers,
        body: String::from_utf8(body).ok()?,
    })
}

/// A running `freshindex serve`.
pub struct Server {
    child: Option<Child>,
    pub addr: SocketAddr,
    /// Sent as `Authorization: Bearer` by the convenience methods.
    pub token: Option<String>,
    stderr: Arc<Mutex<Vec<String>>>,
    pub desc: String,
}

/// Why a server did not start: its exit and stderr.
#[derive(Debug)]
pub struct StartFailure {
    pub status: ExitStatus,
    pub stdout: String,
    pub stderr: String,
}

impl Server {
    /// `serve --listen 127.0.0.1:0` in the workspace's data dir; panics if it does not start.
    pub fn start(ws: &Workspace) -> Server {
        Server::start_with(ws, &ws.data(), &["--listen", "127.0.0.1:0"], &[])
            .unwrap_or_else(|f| panic!("server did not start: {f:?}"))
    }

    /// `serve` with these arguments and environment, on `data`.
    pub fn start_with(
        ws: &Workspace,
        data: &Path,
        args: &[&str],
        env: &[(&str, &str)],
    ) -> Result<Server, StartFailure> {
        let mut fi = ws.fi_with_data(data).arg("serve").args(args);
        for (k, v) in env {
            fi = fi.env(k, v);
        }
        let (mut cmd, desc) = fi.into_command();
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("spawn `{desc}`: {e}"));
        let (tx, rx) = mpsc::channel();
        let out = child.stdout.take().expect("piped stdout");
        thread::spawn(move || {
            for line in BufReader::new(out).lines() {
                let Ok(line) = line else { break };
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let err = child.stderr.take().expect("piped stderr");
        let sink = Arc::clone(&stderr);
        thread::spawn(move || {
            for line in BufReader::new(err).lines() {
                let Ok(line) = line else { break };
                sink.lock().expect("stderr lines").push(line);
            }
        });
        let first = match rx.recv_timeout(START_TIMEOUT) {
            Ok(line) => line,
            Err(RecvTimeoutError::Disconnected) => {
                let status = wait_timeout(&mut child, TIMEOUT)
                    .unwrap_or_else(|| panic!("`{desc}` closed stdout but did not exit"));
                // Let the stderr reader catch up with a process that has exited.
                thread::sleep(Duration::from_millis(100));
                let stderr = stderr.lock().expect("stderr lines").join("\n");
                return Err(StartFailure {
                    status,
                    stdout: String::new(),
                    stderr,
                });
            }
            Err(RecvTimeoutError::Timeout) => {
                let _ = child.kill();
                let _ = child.wait();
                panic!(
                    "`{desc}` printed no address within {START_TIMEOUT:?}; stderr:\n{}",
                    stderr.lock().expect("stderr lines").join("\n")
                );
            }
        };
        let addr = first
            .strip_prefix("listening on http://")
            .and_then(|a| a.parse().ok())
            .unwrap_or_else(|| {
                panic!("first stdout line of `{desc}` is not the address: {first:?}")
            });
        let token = env
            .iter()
            .find(|(k, _)| *k == "FRESHINDEX_TOKEN")
            .map(|(_, v)| v.to_string())
            .or_else(|| {
                args.iter()
                    .position(|a| *a == "--token")
                    .map(|i| args[i + 1].to_string())
            });
        Ok(Server {
            child: Some(child),
            addr,
            token,
            stderr,
            desc,
        })
    }

    fn auth(&self) -> Vec<(&str, String)> {
        self.token
            .iter()
            .map(|t| ("Authorization", format!("Bearer {t}")))
            .collect()
    }

    /// A request with the server's token and the given headers.
    pub fn send(&self, method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Resp {
        let auth = self.auth();
        let mut all: Vec<(&str, &str)> = auth.iter().map(|(k, v)| (*k, v.as_str())).collect();
        all.extend_from_slice(headers);
        http(self.addr, method, path, &all, body)
    }

    /// POST a JSON body.
    pub fn post(&self, path: &str, body: &Value) -> Resp {
        self.send(
            "POST",
            path,
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        )
    }

    /// PUT a JSON body.
    pub fn put(&self, path: &str, body: &Value) -> Resp {
        self.send(
            "PUT",
            path,
            &[("Content-Type", "application/json")],
            body.to_string().as_bytes(),
        )
    }

    pub fn get(&self, path: &str) -> Resp {
        self.send("GET", path, &[], b"")
    }

    pub fn delete(&self, path: &str) -> Resp {
        self.send("DELETE", path, &[], b"")
    }

    pub fn pid(&self) -> i32 {
        self.child.as_ref().expect("running server").id() as i32
    }

    pub fn stderr(&self) -> String {
        self.stderr.lock().expect("stderr lines").join("\n")
    }

    /// Sends SIGTERM and waits for the exit; returns it with stderr.
    pub fn stop(mut self) -> (ExitStatus, String) {
        use nix::sys::signal::{Signal, kill};
        use nix::unistd::Pid;
        let mut child = self.child.take().expect("running server");
        kill(Pid::from_raw(child.id() as i32), Signal::SIGTERM).expect("send SIGTERM");
        let status = wait_timeout(&mut child, TIMEOUT).unwrap_or_else(|| {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "`{}` did not stop within {TIMEOUT:?} of SIGTERM; stderr:\n{}",
                self.desc,
                self.stderr()
            )
        });
        // The stderr reader ends when the pipe closes; give it a moment to drain.
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && !self.stderr().contains("stopped") && status.success() {
            thread::sleep(Duration::from_millis(10));
        }
        (status, self.stderr())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn wait_timeout(child: &mut Child, timeout: Duration) -> Option<ExitStatus> {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(s) = child.try_wait().expect("try_wait") {
            return Some(s);
        }
        if Instant::now() >= deadline {
            return None;
        }
        thread::sleep(Duration::from_millis(10));
    }
}
