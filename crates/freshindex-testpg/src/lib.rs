//! A throwaway PostgreSQL server for tests, started from the installed binaries (`initdb`,
//! `pg_ctl`, `postgres`, `psql`): a fresh cluster in a temporary folder, on a free loopback
//! port, stopped and removed when the handle drops. No mocks: the tests of every backend and
//! connector that speaks PostgreSQL talk to a real server.
//!
//! `initdb` refuses to run as root, which is how CI machines often run tests: as root, the
//! server's commands run as the `postgres` system user (or `nobody`) through `setpriv`, and
//! the folder is given to that user.
//!
//! The server runs with `fsync = off` (tests need no durability against power loss, and a
//! cluster is set up in under a second).
#![allow(clippy::missing_panics_doc)]

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

/// A running test server.
#[derive(Debug)]
pub struct TestPg {
    dir: tempfile::TempDir,
    bin: PathBuf,
    port: u16,
    /// (uid, gid) the server runs as when this process is root.
    user: Option<(u32, u32)>,
}

impl TestPg {
    /// Sets up a new cluster and starts it. Panics, saying what is missing, when the binaries
    /// cannot be found or the server does not start: a test that needs PostgreSQL cannot go on.
    pub fn start() -> TestPg {
        let bin = find_bindir();
        let user = if is_root() { Some(server_user()) } else { None };
        let dir = tempfile::Builder::new()
            .prefix("freshindex-testpg-")
            .tempdir()
            .expect("temporary folder for the test PostgreSQL");
        if let Some((uid, gid)) = user {
            std::os::unix::fs::chown(dir.path(), Some(uid), Some(gid))
                .expect("give the test PostgreSQL folder to the server's user");
        }
        let mut pg = TestPg {
            dir,
            bin,
            port: 0,
            user,
        };
        let data = pg.data();
        let out = pg
            .command("initdb")
            .args(["-D"])
            .arg(&data)
            .args([
                "-A",
                "trust",
                "-U",
                "postgres",
                "-N",
                "-E",
                "UTF8",
                "--locale=C",
            ])
            .output()
            .expect("run initdb");
        check(&out, "initdb");
        // A free port may be taken between the probe and the start: try a few.
        let mut last = String::new();
        for _ in 0..5 {
            pg.port = free_port();
            match pg.try_start() {
                Ok(()) => return pg,
                Err(e) => last = e,
            }
        }
        panic!("the test PostgreSQL did not start: {last}");
    }

    /// The port the server listens on (127.0.0.1).
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A URL of the `postgres` database, as the superuser `postgres` (no password).
    pub fn url(&self) -> String {
        self.db_url("postgres")
    }

    /// The URL of database `db`.
    pub fn db_url(&self, db: &str) -> String {
        format!("postgres://postgres@127.0.0.1:{}/{db}", self.port)
    }

    /// Creates an empty database and returns its URL.
    pub fn create_database(&self, name: &str) -> String {
        self.psql("postgres", &format!("CREATE DATABASE \"{name}\""));
        self.db_url(name)
    }

    /// Runs SQL in database `db` through `psql` (unaligned, tuples only) and returns its
    /// output; panics with psql's message on an error.
    pub fn psql(&self, db: &str, sql: &str) -> String {
        let out = Command::new(self.bin.join("psql"))
            .args([
                "-X",
                "-q",
                "-A",
                "-t",
                "-v",
                "ON_ERROR_STOP=1",
                "-h",
                "127.0.0.1",
            ])
            .args([
                "-p",
                &self.port.to_string(),
                "-U",
                "postgres",
                "-d",
                db,
                "-c",
                sql,
            ])
            .output()
            .expect("run psql");
        check(&out, &format!("psql `{sql}`"));
        String::from_utf8_lossy(&out.stdout).trim_end().to_string()
    }

    /// Stops the server (fast shutdown: open sessions are ended) and starts it again on the
    /// same port with the same data.
    pub fn restart(&self) {
        self.stop();
        self.start_again();
    }

    /// Stops the server (fast shutdown).
    pub fn stop(&self) {
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "fast", "-w", "stop"])
            .output()
            .expect("run pg_ctl stop");
        check(&out, "pg_ctl stop");
    }

    /// Starts a stopped server again on the same port (retrying while the port is released).
    pub fn start_again(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.try_start() {
                Ok(()) => return,
                Err(e) if Instant::now() > deadline => {
                    panic!("restarting the test PostgreSQL: {e}")
                }
                Err(_) => std::thread::sleep(Duration::from_millis(200)),
            }
        }
    }

    fn try_start(&self) -> Result<(), String> {
        let opts = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1 -c fsync=off -c synchronous_commit=off \
             -c full_page_writes=off -c max_connections=300",
            self.port,
            self.dir.path().display()
        );
        let out = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .arg("-l")
            .arg(self.dir.path().join("server.log"))
            .args(["-o", &opts, "-w", "-t", "60", "start"])
            .output()
            .map_err(|e| format!("run pg_ctl: {e}"))?;
        if out.status.success() {
            Ok(())
        } else {
            let log =
                std::fs::read_to_string(self.dir.path().join("server.log")).unwrap_or_default();
            Err(format!(
                "pg_ctl start: {}{}\nserver log:\n{log}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ))
        }
    }

    fn data(&self) -> PathBuf {
        self.dir.path().join("data")
    }

    /// A command of the server's binaries, run as the server's user when this process is root.
    fn command(&self, name: &str) -> Command {
        let program = self.bin.join(name);
        match self.user {
            Some((uid, gid)) => {
                let mut c = Command::new("setpriv");
                c.arg(format!("--reuid={uid}"))
                    .arg(format!("--regid={gid}"))
                    .arg("--clear-groups")
                    .arg(program);
                c
            }
            None => Command::new(program),
        }
    }
}

impl Drop for TestPg {
    fn drop(&mut self) {
        let _ = self
            .command("pg_ctl")
            .arg("-D")
            .arg(self.data())
            .args(["-m", "immediate", "-w", "stop"])
            .output();
    }
}

fn check(out: &Output, what: &str) {
    assert!(
        out.status.success(),
        "{what} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// The folder of the PostgreSQL binaries: where `initdb` is on PATH, else the newest
/// `/usr/lib/postgresql/*/bin`.
fn find_bindir() -> PathBuf {
    let on_path = std::env::var_os("PATH").and_then(|p| {
        std::env::split_paths(&p).find(|d| d.join("initdb").is_file() && d.join("psql").is_file())
    });
    if let Some(d) = on_path {
        // Symlinks (Debian's wrappers) resolve to the real folder, where every binary is.
        return std::fs::canonicalize(d.join("initdb"))
            .ok()
            .and_then(|p| p.parent().map(Path::to_path_buf))
            .filter(|d| d.join("postgres").is_file() && d.join("psql").is_file())
            .unwrap_or(d);
    }
    let mut found: Vec<PathBuf> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path().join("bin"))
        .filter(|d| d.join("initdb").is_file())
        .collect();
    found.sort();
    found.pop().unwrap_or_else(|| {
        panic!("PostgreSQL's binaries (initdb, pg_ctl, postgres, psql) are not installed: tests of the PostgreSQL backend need them on PATH or in /usr/lib/postgresql/VERSION/bin")
    })
}

fn is_root() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("Uid:"))
                .and_then(|l| l.split_whitespace().nth(2).map(|u| u == "0"))
        })
        .unwrap_or(false)
}

/// The (uid, gid) of the `postgres` user, else of `nobody`.
fn server_user() -> (u32, u32) {
    let passwd = std::fs::read_to_string("/etc/passwd").unwrap_or_default();
    for name in ["postgres", "nobody"] {
        for line in passwd.lines() {
            let f: Vec<&str> = line.split(':').collect();
            if f.len() > 3
                && f[0] == name
                && let (Ok(uid), Ok(gid)) = (f[2].parse(), f[3].parse())
            {
                return (uid, gid);
            }
        }
    }
    panic!("running as root, and no `postgres` or `nobody` user to run the test PostgreSQL as")
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn starts_creates_restarts_and_stops() {
        let pg = TestPg::start();
        let url = pg.create_database("t1");
        assert!(url.ends_with("/t1"), "{url}");
        pg.psql("t1", "CREATE TABLE x (a int); INSERT INTO x VALUES (7)");
        pg.restart();
        assert_eq!(pg.psql("t1", "SELECT a FROM x"), "7");
        let dir = pg.dir.path().to_path_buf();
        drop(pg);
        assert!(!dir.exists(), "the folder is removed");
    }
}
