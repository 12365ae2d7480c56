//! A minimal HTTP/1.1 client over one keep-alive connection, and `freshindex serve` as a
//! child process on an OS-assigned port.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command, Stdio};

use anyhow::{Context, Result};

/// One keep-alive connection.
pub struct Http {
    stream: BufReader<TcpStream>,
    host: String,
}

impl Http {
    /// Connects to `addr` (`host:port`).
    pub fn connect(addr: &str) -> Result<Http> {
        let s = TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        Ok(Http {
            stream: BufReader::new(s),
            host: addr.to_string(),
        })
    }

    /// `POST path` with a JSON body; the status and the body.
    pub fn post(&mut self, path: &str, body: &str) -> Result<(u16, String)> {
        self.request("POST", path, body)
    }

    /// `GET path`; the status and the body.
    pub fn get(&mut self, path: &str) -> Result<(u16, String)> {
        self.request("GET", path, "")
    }

    fn request(&mut self, method: &str, path: &str, body: &str) -> Result<(u16, String)> {
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: {}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            self.host,
            body.len()
        );
        self.stream.get_mut().write_all(req.as_bytes())?;
        let mut status_line = String::new();
        self.stream.read_line(&mut status_line)?;
        let status: u16 = status_line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .with_context(|| format!("bad status line `{status_line}`"))?;
        let mut len = 0usize;
        loop {
            let mut h = String::new();
            self.stream.read_line(&mut h)?;
            let h = h.trim_end();
            if h.is_empty() {
                break;
            }
            if let Some((k, v)) = h.split_once(':')
                && k.eq_ignore_ascii_case("content-length")
            {
                len = v.trim().parse().context("content-length")?;
            }
        }
        let mut body = vec![0u8; len];
        self.stream.read_exact(&mut body)?;
        Ok((status, String::from_utf8_lossy(&body).into_owned()))
    }
}

/// A running `freshindex serve`, killed on drop.
pub struct Server {
    /// The process.
    pub child: Child,
    /// `host:port` it listens on.
    pub addr: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Server {
    /// Starts `bin --data-dir DATA --config CONFIG serve --listen 127.0.0.1:0` and reads the
    /// address from its first stdout line. Its stderr goes to `stderr`.
    pub fn start(bin: &Path, data: &Path, config: &Path, stderr: Stdio) -> Result<Server> {
        Server::start_with(bin, data, config, &[], stderr)
    }

    /// [`Server::start`] with more arguments of `serve`.
    pub fn start_with(
        bin: &Path,
        data: &Path,
        config: &Path,
        args: &[&str],
        stderr: Stdio,
    ) -> Result<Server> {
        let mut child = Command::new(bin)
            .arg("--data-dir")
            .arg(data)
            .arg("--config")
            .arg(config)
            .args(["serve", "--listen", "127.0.0.1:0"])
            .args(args)
            .stdout(Stdio::piped())
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("starting {}", bin.display()))?;
        let stdout = child.stdout.take().context("no stdout")?;
        let mut first = String::new();
        BufReader::new(stdout).read_line(&mut first)?;
        let addr = first
            .trim()
            .rsplit("http://")
            .next()
            .filter(|a| a.contains(':'))
            .with_context(|| format!("unexpected first line `{first}`"))?
            .to_string();
        Ok(Server { child, addr })
    }
}
