//! What the process-level tests of the `warden` binary share: starting it, reading its
//! output lines as they come with a deadline on every wait, and temporary folders. Every
//! child is killed and reaped however a test ends.
#![allow(dead_code)] // Each test file uses its own part of this.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Ipv4Addr, SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub fn warden() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_warden"));
    c.stdin(Stdio::null());
    c
}

/// Runs a warden command that must succeed within `limit`: its stdout.
pub fn stdout_of(args: &[&str], limit: Duration) -> String {
    let child = warden()
        .args(args)
        .stderr(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn warden");
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        let _ = tx.send(child.wait_with_output());
    });
    match rx.recv_timeout(limit) {
        Ok(Ok(o)) => {
            assert!(
                o.status.success(),
                "warden {args:?}: {}",
                String::from_utf8_lossy(&o.stderr)
            );
            String::from_utf8_lossy(&o.stdout).into_owned()
        }
        Ok(Err(e)) => panic!("warden {args:?}: {e}"),
        Err(_) => {
            let _ = Command::new("kill").arg("-9").arg(pid.to_string()).status();
            panic!("warden {args:?} did not finish within {limit:?}");
        }
    }
}

/// A fresh folder under the system temp dir, removed when dropped.
pub struct TempDir(pub PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        let p = std::env::temp_dir().join(format!("warden-test-{tag}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&p);
        std::fs::create_dir_all(&p).unwrap();
        TempDir(p)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// A warden process whose stdout and stderr lines are read as they come.
pub struct Proc {
    pub name: &'static str,
    pub child: Child,
    lines: mpsc::Receiver<String>,
    /// Every line read so far.
    pub log: Vec<String>,
    /// The longest any one wait lasts.
    pub limit: Duration,
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Proc {
    pub fn start<S: AsRef<std::ffi::OsStr>>(
        name: &'static str,
        args: &[S],
        limit: Duration,
    ) -> Proc {
        let mut child = warden()
            .args(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("spawn warden");
        let (tx, lines) = mpsc::channel();
        for pipe in [
            Box::new(child.stdout.take().unwrap()) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().unwrap()),
        ] {
            let tx = tx.clone();
            std::thread::spawn(move || {
                for line in BufReader::new(pipe).lines() {
                    let Ok(line) = line else { return };
                    if tx.send(line).is_err() {
                        return;
                    }
                }
            });
        }
        Proc {
            name,
            child,
            lines,
            log: Vec::new(),
            limit,
        }
    }

    /// The next line containing every one of `needles`, waiting at most `limit`.
    pub fn wait_for(&mut self, needles: &[&str]) -> String {
        let deadline = Instant::now() + self.limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.log.push(line.clone());
                    if needles.iter().all(|n| line.contains(n)) {
                        return line;
                    }
                }
                Err(_) => panic!(
                    "no line with {needles:?} from {} within {:?}; its output:\n{}",
                    self.name,
                    self.limit,
                    self.log.join("\n")
                ),
            }
        }
    }

    /// Like [`Proc::wait_for`], but a line already read counts too.
    pub fn saw(&mut self, needles: &[&str]) -> String {
        match self
            .log
            .iter()
            .find(|l| needles.iter().all(|n| l.contains(n)))
        {
            Some(l) => l.clone(),
            None => self.wait_for(needles),
        }
    }

    /// Every line until the process exits (within `limit`), and its exit code.
    pub fn finish(mut self) -> (Option<i32>, String) {
        let deadline = Instant::now() + self.limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => self.log.push(line),
                Err(mpsc::RecvTimeoutError::Disconnected) => break,
                Err(mpsc::RecvTimeoutError::Timeout) => panic!(
                    "{} did not finish within {:?}:\n{}",
                    self.name,
                    self.limit,
                    self.log.join("\n")
                ),
            }
        }
        let code = self.child.wait().ok().and_then(|s| s.code());
        (code, self.log.join("\n"))
    }

    /// SIGKILL: no chance to close streams or say goodbye.
    pub fn kill(mut self) {
        self.child.kill().unwrap();
        self.child.wait().unwrap();
    }
}

/// An HTTP/1.1 app on loopback that keeps connections alive (the proxy pools them) and answers
/// each request with `reply(head)`, where `head` is the request line and headers as received
/// (a request body, sized by `content-length`, is read and dropped).
pub fn keep_alive_app(
    limit: Duration,
    reply: impl Fn(&str) -> String + Send + Sync + 'static,
) -> SocketAddr {
    let l = TcpListener::bind((Ipv4Addr::LOCALHOST, 0)).unwrap();
    let addr = l.local_addr().unwrap();
    let reply = std::sync::Arc::new(reply);
    std::thread::spawn(move || {
        for s in l.incoming() {
            let Ok(s) = s else { return };
            let reply = reply.clone();
            std::thread::spawn(move || {
                let _ = s.set_read_timeout(Some(limit));
                let mut w = s.try_clone().unwrap();
                let mut r = BufReader::new(s);
                loop {
                    let mut head = String::new();
                    let mut length = 0usize;
                    loop {
                        let mut line = String::new();
                        if r.read_line(&mut line).unwrap_or(0) == 0 {
                            return;
                        }
                        if line.trim_end().is_empty() {
                            break;
                        }
                        if let Some((k, v)) = line.trim_end().split_once(':') {
                            if k.trim().eq_ignore_ascii_case("content-length") {
                                length = v.trim().parse().unwrap_or(0);
                            }
                        }
                        head.push_str(&line);
                    }
                    let mut body = vec![0u8; length];
                    if r.read_exact(&mut body).is_err() {
                        return;
                    }
                    if w.write_all(reply(&head).as_bytes()).is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}
