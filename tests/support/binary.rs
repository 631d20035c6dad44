//! The one way to run the real binary. One-shot commands start from
//! [`command`]; `serve` starts from [`serve`] and runs as a [`Served`]:
//! listening on a port the system picked (`--listen 127.0.0.1:0`), read
//! from the server's own "listening" log line, so no other test's server
//! can be mistaken for it. Its stdout and stderr are read by threads and
//! kept, for tests to read and for failure messages.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::SocketAddr;
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

pub const BIN: &str = env!("CARGO_BIN_EXE_totango-destination");

/// How long a server may take to log its address.
const START_LIMIT: Duration = Duration::from_secs(60);

/// `totango-destination`, for one-shot subcommands.
pub fn command() -> Command {
    Command::new(BIN)
}

/// `totango-destination serve --listen 127.0.0.1:0`; add settings, then
/// [`Served::start`].
pub fn serve() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.args(["serve", "--listen", "127.0.0.1:0"]);
    cmd
}

/// [`serve`] on the SQLite file `db`, for service `SP-1234-01`, with
/// Totango at a local port nothing listens on (every attempt is refused).
pub fn serve_sqlite_totango_down(db: &std::path::Path) -> Command {
    let closed_port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    let mut cmd = serve();
    cmd.env("TD_STORAGE__URL", format!("sqlite://{}", db.display()))
        .env("TD_TOTANGO__SERVICE_ID", "SP-1234-01")
        .env(
            "TD_TOTANGO__ENDPOINT",
            format!("http://127.0.0.1:{closed_port}"),
        );
    cmd
}

#[derive(Default)]
struct Lines {
    stdout: Vec<String>,
    stderr: Vec<String>,
    /// Both, in the order they were read.
    all: Vec<String>,
    /// Streams at their end.
    closed: usize,
}

#[derive(Default)]
struct Output {
    lines: Mutex<Lines>,
    changed: Condvar,
    /// A file every line is also written to, when asked.
    file: Option<Mutex<std::fs::File>>,
}

/// A `serve` spawned but not yet known to listen: see [`Starting::listening`].
/// Killed when dropped.
pub struct Starting {
    child: Option<Child>,
    output: Arc<Output>,
}

impl Drop for Starting {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A running `serve`; killed when dropped.
pub struct Served {
    child: Mutex<Option<Child>>,
    pub addr: SocketAddr,
    pub port: u16,
    /// `http://<addr>`.
    pub base: String,
    output: Arc<Output>,
}

/// Reads `stream` line by line into `output`.
fn keep(stream: impl Read + Send + 'static, output: Arc<Output>, stdout: bool) {
    std::thread::spawn(move || {
        let mut reader = BufReader::new(stream);
        let mut line = Vec::new();
        loop {
            line.clear();
            let n = reader.read_until(b'\n', &mut line).unwrap_or(0);
            let mut lines = output.lines.lock().unwrap();
            if n == 0 {
                lines.closed += 1;
                output.changed.notify_all();
                return;
            }
            let text = String::from_utf8_lossy(&line)
                .trim_end_matches(['\n', '\r'])
                .to_owned();
            if stdout {
                lines.stdout.push(text.clone());
            } else {
                lines.stderr.push(text.clone());
            }
            if let Some(file) = &output.file {
                let _ = writeln!(file.lock().unwrap(), "{text}");
            }
            lines.all.push(text);
            output.changed.notify_all();
        }
    });
}

/// The address in the server's "listening" line, text or JSON.
fn listening(line: &str) -> Option<SocketAddr> {
    if line.starts_with('{') {
        let v: serde_json::Value = serde_json::from_str(line).ok()?;
        if v["message"] != "listening" {
            return None;
        }
        return v["address"].as_str()?.parse().ok();
    }
    let (_, rest) = line.split_once(" listening address=")?;
    rest.split_whitespace().next()?.parse().ok()
}

impl Served {
    /// Starts `cmd` (from [`serve`]) and waits until it logs the address it
    /// listens on; panics, with its output, when it exits first or takes
    /// longer than a minute. Its stdout and stderr are always kept. When
    /// `RUST_LOG` would hide the "listening" line, that line is let through.
    pub fn start(cmd: Command) -> Served {
        Served::spawn(cmd, None).listening()
    }

    /// Spawns `cmd` (see [`Served::start`]) without waiting; every line it
    /// writes also goes to `log` when given.
    pub fn spawn(mut cmd: Command, log: Option<&std::path::Path>) -> Starting {
        let asked = cmd
            .get_envs()
            .find(|(k, _)| *k == "RUST_LOG")
            .map(|(_, v)| v.map(|v| v.to_string_lossy().into_owned()));
        let filter = match asked {
            Some(v) => v,
            None => std::env::var("RUST_LOG").ok(),
        };
        if let Some(filter) = filter.filter(|f| !f.trim().is_empty()) {
            cmd.env(
                "RUST_LOG",
                format!("{filter},totango_destination::server=info"),
            );
        }
        let mut child = cmd
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap_or_else(|e| panic!("{BIN}: {e}"));
        let output = Arc::new(Output {
            file: log.map(|path| Mutex::new(std::fs::File::create(path).unwrap())),
            ..Output::default()
        });
        keep(child.stdout.take().unwrap(), output.clone(), true);
        keep(child.stderr.take().unwrap(), output.clone(), false);
        Starting {
            child: Some(child),
            output,
        }
    }
}

impl Starting {
    /// Waits until it logs the address it listens on (see [`Served::start`]).
    pub fn listening(mut self) -> Served {
        let mut child = self.child.take().expect("spawned");
        let output = self.output.clone();
        let deadline = Instant::now() + START_LIMIT;
        let mut lines = output.lines.lock().unwrap();
        let addr = loop {
            if let Some(addr) = lines.all.iter().find_map(|l| listening(l)) {
                break addr;
            }
            let exited = child.try_wait().unwrap();
            if exited.is_some() || lines.closed == 2 {
                drop(lines);
                let status = child.wait().unwrap();
                // What it wrote last may still be on its way.
                let text = Served::collect(&output, Duration::from_secs(5));
                panic!("{BIN} serve exited before listening ({status}):\n{text}");
            }
            if Instant::now() > deadline {
                drop(lines);
                let _ = child.kill();
                let _ = child.wait();
                let text = Served::collect(&output, Duration::from_secs(5));
                panic!("{BIN} serve did not say where it listens within {START_LIMIT:?}:\n{text}");
            }
            lines = output
                .changed
                .wait_timeout(lines, Duration::from_millis(50))
                .unwrap()
                .0;
        };
        drop(lines);
        Served {
            child: Mutex::new(Some(child)),
            addr,
            port: addr.port(),
            base: format!("http://{addr}"),
            output,
        }
    }
}

impl Served {
    /// Everything read once both streams ended (or `limit` passed).
    fn collect(output: &Output, limit: Duration) -> String {
        let deadline = Instant::now() + limit;
        let mut lines = output.lines.lock().unwrap();
        while lines.closed < 2 && Instant::now() < deadline {
            lines = output
                .changed
                .wait_timeout(lines, Duration::from_millis(50))
                .unwrap()
                .0;
        }
        lines.all.join("\n")
    }

    /// `http://<addr><path>`.
    pub fn url(&self, path: &str) -> String {
        format!("{}{path}", self.base)
    }

    pub fn pid(&self) -> u32 {
        self.child.lock().unwrap().as_ref().expect("running").id()
    }

    /// Whether it has exited, and how.
    pub fn try_wait(&self) -> Option<ExitStatus> {
        let mut child = self.child.lock().unwrap();
        child.as_mut().expect("running").try_wait().unwrap()
    }

    /// SIGKILL: no shutdown, no last commit.
    pub fn kill(&self) {
        let mut child = self.child.lock().unwrap().take().expect("running");
        child.kill().unwrap();
        child.wait().unwrap();
    }

    /// Sends SIGTERM.
    pub fn terminate(&self) {
        let sent = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(sent.success(), "kill -TERM failed");
    }

    /// Kills it and returns its whole stderr.
    pub fn kill_and_take_stderr(self) -> String {
        if let Some(mut child) = self.child.lock().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
        Served::collect(&self.output, Duration::from_secs(5));
        self.stderr()
    }

    /// Its stdout lines so far.
    pub fn stdout_lines(&self) -> Vec<String> {
        self.output.lines.lock().unwrap().stdout.clone()
    }

    /// Its stderr so far.
    pub fn stderr(&self) -> String {
        let lines = self.output.lines.lock().unwrap();
        lines.stderr.iter().map(|l| format!("{l}\n")).collect()
    }

    /// How many lines it wrote to stderr so far.
    pub fn stderr_line_count(&self) -> usize {
        self.output.lines.lock().unwrap().stderr.len()
    }

    /// Its last `n` lines (stdout and stderr), for failure messages.
    pub fn tail(&self, n: usize) -> String {
        let lines = self.output.lines.lock().unwrap();
        lines.all[lines.all.len().saturating_sub(n)..].join("\n")
    }

    /// All it wrote so far, for failure messages.
    pub fn output(&self) -> String {
        self.output.lines.lock().unwrap().all.join("\n")
    }
}

impl Drop for Served {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.get_mut().unwrap().take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}
