//! What runs inside a sprite and keeps it up (docs/services.md): **services**, processes the
//! runtime owns (started at boot in `needs` order, restarted with backoff when they exit,
//! stopped stickily, output logged with timestamps), and **tasks**, named leases that keep the
//! sprite from pausing for idleness until they expire. [`crate::mgmt`] serves both on
//! `/.sprite/api.sock`; the host reaches the same handlers through the runtime protocol.
//!
//! Definitions live on the sprite's disk (`<dir>/services/<name>.json`) so they survive cold
//! boots, restores and forks; process ids live under a tmpfs run directory so a restarted
//! runtime finds (and replaces) processes a previous instance started. Tasks live in memory:
//! they only matter while the sprite runs.

use crate::manager::{now_ms, write_json_atomic};
use parking_lot::{Condvar, Mutex};
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use std::collections::{BTreeMap, HashMap};
use std::io::{BufRead, Read, Write};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// First restart delay after a service exits; doubles per consecutive quick exit.
const BACKOFF_MIN: Duration = Duration::from_secs(1);
const BACKOFF_MAX: Duration = Duration::from_secs(30);
/// A run at least this long counts as healthy: the next restart waits [`BACKOFF_MIN`] again.
const HEALTHY_RUN: Duration = Duration::from_secs(10);
/// `stop` sends SIGTERM, then SIGKILL after this long.
const STOP_GRACE: Duration = Duration::from_secs(5);
/// How long a service waits for a `needs` service with an HTTP port to accept connections.
const NEEDS_PORT_WAIT: Duration = Duration::from_secs(10);
/// A service log is rotated to `<name>.log.1` past this size.
pub const LOG_ROTATE_BYTES: u64 = 8 << 20;
/// Longest task lease.
pub const MAX_TASK_SECS: u64 = 3600;
/// Longest `duration` of an event stream.
pub const MAX_STREAM: Duration = Duration::from_secs(300);
/// Longest service or task name.
const MAX_NAME: usize = 64;
/// Most services and live tasks one sprite may define.
const MAX_SERVICES: usize = 256;
const MAX_TASKS: usize = 1024;

/// An API failure: HTTP status, stable code, message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiError {
    pub status: u16,
    pub code: &'static str,
    pub message: String,
}

impl ApiError {
    pub fn new(status: u16, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
        }
    }
    pub fn bad(message: impl Into<String>) -> ApiError {
        ApiError::new(400, "invalid_argument", message)
    }
    pub fn not_found(what: &str, name: &str) -> ApiError {
        ApiError::new(404, "not_found", format!("no {what} named {name:?}"))
    }
    pub fn conflict(message: impl Into<String>) -> ApiError {
        ApiError::new(409, "conflict", message)
    }
    pub fn to_json(&self) -> Value {
        json!({"error": {"code": self.code, "message": self.message}})
    }
}

pub type ApiResult<T> = Result<T, ApiError>;

/// What a service runs (the body of `PUT /v1/services/{name}`).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ServiceDef {
    /// The program (looked up in `PATH` when it has no `/`).
    pub cmd: String,
    #[serde(default)]
    pub args: Vec<String>,
    /// Added to the default environment (PATH, HOME=/root, USER=root).
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Working directory (default `/root`, or `/` when that does not exist).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dir: Option<String>,
    /// Services started (and, with an HTTP port, listening) before this one.
    #[serde(default)]
    pub needs: Vec<String>,
    /// The port the sprite's URL routes to (at most one service has one).
    #[serde(default)]
    pub http_port: Option<u16>,
}

/// A definition as stored on disk: the definition and whether it was stopped on purpose.
#[derive(Debug, Clone, Serialize, Deserialize)]
struct Stored {
    def: ServiceDef,
    #[serde(default)]
    stopped: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Status {
    Stopped,
    Starting,
    Running,
    Stopping,
    Failed,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Stopped => "stopped",
            Status::Starting => "starting",
            Status::Running => "running",
            Status::Stopping => "stopping",
            Status::Failed => "failed",
        }
    }
}

struct Svc {
    def: ServiceDef,
    /// Sticky: set by `stop`, cleared by `start`/`restart`/an HTTP request to its port.
    stopped: bool,
    status: Status,
    pid: Option<u32>,
    started_at_ms: Option<u64>,
    restart_count: u64,
    next_restart_at_ms: Option<u64>,
    error: Option<String>,
    last_exit: Option<(Option<i32>, Option<i32>)>,
    /// Bumped whenever what should run changes (start, stop, update, delete): waiters and
    /// backoff timers of an older generation do nothing.
    generation: u64,
    backoff: Duration,
    /// Event streams following this service.
    subs: Vec<mpsc::Sender<Value>>,
    log: Arc<Mutex<LogFile>>,
}

/// A service's log: lines `<RFC 3339 time> [stdout|stderr] <text>`.
struct LogFile {
    path: PathBuf,
    file: Option<std::fs::File>,
}

impl LogFile {
    fn line(&mut self, stream: &str, text: &str) {
        if self.file.is_none() {
            // The directory may have been removed by hand: recreate it.
            if let Some(d) = self.path.parent() {
                let _ = std::fs::create_dir_all(d);
            }
            self.file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
                .ok();
        }
        let Some(f) = self.file.as_mut() else { return };
        let _ = writeln!(f, "{} [{stream}] {text}", rfc3339_ms(now_ms()));
        if f.metadata().map(|m| m.len()).unwrap_or(0) > LOG_ROTATE_BYTES {
            self.file = None;
            let mut old = self.path.clone().into_os_string();
            old.push(".1");
            let _ = std::fs::rename(&self.path, old);
        }
    }
}

#[derive(Debug, Clone, Copy)]
struct Task {
    started_at_ms: u64,
    expires_at_ms: u64,
}

/// The in-sprite runtime: services and tasks.
pub struct Runtime {
    dir: PathBuf,
    run_dir: PathBuf,
    services: Mutex<BTreeMap<String, Svc>>,
    changed: Condvar,
    tasks: Mutex<BTreeMap<String, Task>>,
}

impl std::fmt::Debug for Runtime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Runtime").field("dir", &self.dir).finish()
    }
}

/// Checks a service or task name: 1-64 of `A-Za-z0-9._-`, not starting with `.`.
pub fn check_name(kind: &str, name: &str) -> ApiResult<()> {
    let ok = !name.is_empty()
        && name.len() <= MAX_NAME
        && !name.starts_with('.')
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'.' || b == b'_' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad(format!(
            "bad {kind} name {name:?}: use 1-{MAX_NAME} of A-Z a-z 0-9 . _ - (not starting with .)"
        )))
    }
}

/// Milliseconds since the epoch as `YYYY-MM-DDTHH:MM:SS.mmmZ`.
pub fn rfc3339_ms(ms: u64) -> String {
    let s = rfc3339_utc(ms / 1000);
    format!("{}.{:03}Z", &s[..s.len() - 1], ms % 1000)
}

/// Seconds since the epoch as `YYYY-MM-DDTHH:MM:SSZ`.
pub fn rfc3339_utc(secs: u64) -> String {
    let days = (secs / 86_400) as i64;
    let rem = secs % 86_400;
    let (y, m, d) = civil_from_days(days);
    format!(
        "{y:04}-{m:02}-{d:02}T{:02}:{:02}:{:02}Z",
        rem / 3600,
        (rem / 60) % 60,
        rem % 60
    )
}

/// Days since 1970-01-01 to a proleptic Gregorian date (Howard Hinnant's algorithm).
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    let y = yoe + era * 400 + i64::from(m <= 2);
    (y, m, d)
}

/// Parses a duration: integer seconds (`90`), or numbers with units `ms`, `s`, `m`, `h`
/// (`500ms`, `30m`, `1h30m`).
pub fn parse_duration(s: &str) -> Option<Duration> {
    let s = s.trim();
    if s.is_empty() {
        return None;
    }
    if let Ok(n) = s.parse::<u64>() {
        return Some(Duration::from_secs(n));
    }
    let mut total = Duration::ZERO;
    let mut rest = s;
    while !rest.is_empty() {
        let digits = rest.bytes().take_while(u8::is_ascii_digit).count();
        if digits == 0 {
            return None;
        }
        let n: u64 = rest[..digits].parse().ok()?;
        rest = &rest[digits..];
        let unit_len = rest.bytes().take_while(u8::is_ascii_alphabetic).count();
        let d = match &rest[..unit_len] {
            "ms" => Duration::from_millis(n),
            "s" => Duration::from_secs(n),
            "m" => Duration::from_secs(n.checked_mul(60)?),
            "h" => Duration::from_secs(n.checked_mul(3600)?),
            _ => return None,
        };
        total = total.checked_add(d)?;
        rest = &rest[unit_len..];
    }
    Some(total)
}

/// A task's `expire`: integer seconds or a duration string; 1 s to 1 h.
pub fn parse_expire(v: &Value) -> ApiResult<Duration> {
    let d = match v {
        Value::Number(n) => n.as_u64().map(Duration::from_secs),
        Value::String(s) => parse_duration(s),
        Value::Null => return Err(ApiError::bad("expire is required")),
        _ => None,
    }
    .ok_or_else(|| {
        ApiError::bad(format!(
            "bad expire {v}: integer seconds or a duration like \"30m\", \"1h\""
        ))
    })?;
    if d < Duration::from_secs(1) {
        return Err(ApiError::bad("expire must be at least 1s"));
    }
    if d > Duration::from_secs(MAX_TASK_SECS) {
        return Err(ApiError::bad("expire must be at most 1h"));
    }
    Ok(d)
}

/// Parses a signal name (`TERM`, `SIGTERM`, `term`) or number.
pub fn parse_signal(s: &str) -> ApiResult<i32> {
    if let Ok(n) = s.parse::<i32>()
        && (1..=64).contains(&n)
    {
        return Ok(n);
    }
    let up = s.to_ascii_uppercase();
    let name = up.strip_prefix("SIG").unwrap_or(&up);
    Ok(match name {
        "HUP" => libc::SIGHUP,
        "INT" => libc::SIGINT,
        "QUIT" => libc::SIGQUIT,
        "KILL" => libc::SIGKILL,
        "USR1" => libc::SIGUSR1,
        "USR2" => libc::SIGUSR2,
        "TERM" => libc::SIGTERM,
        "CONT" => libc::SIGCONT,
        "STOP" => libc::SIGSTOP,
        "ALRM" => libc::SIGALRM,
        "WINCH" => libc::SIGWINCH,
        _ => return Err(ApiError::bad(format!("unknown signal {s:?}"))),
    })
}

fn event(kind: &str, mut extra: Value) -> Value {
    if let Value::Object(m) = &mut extra {
        m.insert("type".into(), json!(kind));
        m.insert("timestamp".into(), json!(now_ms()));
        extra
    } else {
        json!({"type": kind, "timestamp": now_ms()})
    }
}

impl Runtime {
    /// Opens the runtime over `dir` (definitions and logs) and `run_dir` (process ids):
    /// loads the definitions and ends processes a previous runtime left behind.
    pub fn open(dir: &Path, run_dir: &Path) -> std::io::Result<Arc<Runtime>> {
        std::fs::create_dir_all(dir.join("services"))?;
        std::fs::create_dir_all(dir.join("logs/services"))?;
        std::fs::create_dir_all(run_dir.join("services"))?;
        let rt = Arc::new(Runtime {
            dir: dir.to_path_buf(),
            run_dir: run_dir.to_path_buf(),
            services: Mutex::new(BTreeMap::new()),
            changed: Condvar::new(),
            tasks: Mutex::new(BTreeMap::new()),
        });
        let mut map = rt.services.lock();
        for e in std::fs::read_dir(dir.join("services"))?.flatten() {
            let p = e.path();
            let Some(name) = p
                .file_name()
                .and_then(|n| n.to_str())
                .and_then(|n| n.strip_suffix(".json"))
                .map(str::to_string)
            else {
                continue;
            };
            if check_name("service", &name).is_err() {
                continue;
            }
            let stored: Stored = match std::fs::read(&p)
                .ok()
                .and_then(|b| serde_json::from_slice(&b).ok())
            {
                Some(s) => s,
                None => {
                    eprintln!(
                        "sprite-agent: ignoring unreadable service file {}",
                        p.display()
                    );
                    continue;
                }
            };
            rt.kill_stale(&name);
            let log = rt.log_for(&name);
            map.insert(name, Svc::new(stored.def, stored.stopped, log));
        }
        drop(map);
        Ok(rt)
    }

    fn def_path(&self, name: &str) -> PathBuf {
        self.dir.join("services").join(format!("{name}.json"))
    }

    fn pid_path(&self, name: &str) -> PathBuf {
        self.run_dir.join("services").join(format!("{name}.pid"))
    }

    /// Where a service's output goes.
    pub fn log_path(&self, name: &str) -> PathBuf {
        self.dir.join("logs/services").join(format!("{name}.log"))
    }

    fn log_for(&self, name: &str) -> Arc<Mutex<LogFile>> {
        Arc::new(Mutex::new(LogFile {
            path: self.log_path(name),
            file: None,
        }))
    }

    /// A previous runtime's process for `name` (its pid file survives a runtime restart, not
    /// a boot): its process group is killed so the service starts exactly once.
    fn kill_stale(&self, name: &str) {
        let p = self.pid_path(name);
        if let Some(pid) = std::fs::read_to_string(&p)
            .ok()
            .and_then(|s| s.trim().parse::<i32>().ok())
            .filter(|&p| p > 1)
        {
            // SAFETY: kill(2) with plain integers.
            unsafe { libc::kill(-pid, libc::SIGKILL) };
        }
        let _ = std::fs::remove_file(p);
    }

    fn persist(&self, name: &str, svc: &Svc) -> ApiResult<()> {
        let stored = Stored {
            def: svc.def.clone(),
            stopped: svc.stopped,
        };
        write_json_atomic(&self.def_path(name), &stored)
            .map_err(|e| ApiError::new(500, "internal", format!("saving service {name}: {e}")))
    }

    /// Starts every service not stopped on purpose, each after what it `needs` (at boot).
    pub fn boot(self: &Arc<Self>) {
        let order = {
            let map = self.services.lock();
            topo_order(&map)
        };
        let me = self.clone();
        std::thread::spawn(move || {
            for name in order {
                let go = {
                    let map = me.services.lock();
                    map.get(&name)
                        .is_some_and(|s| !s.stopped && s.pid.is_none())
                };
                if go {
                    me.wait_needs(&name);
                    let mut map = me.services.lock();
                    if let Some(s) = map.get_mut(&name)
                        && !s.stopped
                        && s.pid.is_none()
                    {
                        s.generation += 1;
                        let g = s.generation;
                        me.spawn_locked(&mut map, &name, g);
                    }
                }
            }
        });
    }

    /// Waits (bounded) until every service `name` needs runs, and listens when it has an
    /// HTTP port.
    fn wait_needs(&self, name: &str) {
        let needs: Vec<(String, Option<u16>)> = {
            let map = self.services.lock();
            let Some(s) = map.get(name) else { return };
            s.def
                .needs
                .iter()
                .map(|n| (n.clone(), map.get(n).and_then(|d| d.def.http_port)))
                .collect()
        };
        let deadline = Instant::now() + NEEDS_PORT_WAIT;
        for (dep, port) in needs {
            let mut map = self.services.lock();
            while Instant::now() < deadline {
                match map.get(&dep) {
                    Some(d) if d.status == Status::Running || d.stopped => break,
                    None => break,
                    _ => {
                        self.changed
                            .wait_for(&mut map, deadline.saturating_duration_since(Instant::now()));
                    }
                }
            }
            drop(map);
            if let Some(port) = port {
                while Instant::now() < deadline
                    && std::net::TcpStream::connect(("127.0.0.1", port)).is_err()
                {
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        }
    }

    /// Starts (and records) the process for `name` at generation `g`. Called with the map
    /// locked; a program that cannot start counts as an exit with code 127.
    fn spawn_locked(self: &Arc<Self>, map: &mut BTreeMap<String, Svc>, name: &str, g: u64) {
        let Some(s) = map.get_mut(name) else { return };
        let def = s.def.clone();
        let mut cmd = Command::new(&def.cmd);
        cmd.args(&def.args)
            .env_clear()
            .env(
                "PATH",
                "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
            )
            .env("HOME", "/root")
            .env("USER", "root")
            .env("SPRITE_SERVICE", name)
            .envs(&def.env)
            .current_dir(def.dir.clone().unwrap_or_else(|| {
                if Path::new("/root").is_dir() {
                    "/root".into()
                } else {
                    "/".into()
                }
            }))
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped());
        // SAFETY: only async-signal-safe calls between fork and exec.
        unsafe {
            cmd.pre_exec(|| {
                if libc::setsid() < 0 {
                    return Err(std::io::Error::last_os_error());
                }
                Ok(())
            });
        }
        let started = Instant::now();
        let mut child = match cmd.spawn() {
            Ok(c) => c,
            Err(e) => {
                let msg = format!("cannot start {}: {e}", def.cmd);
                s.log.lock().line("stderr", &msg);
                s.error = Some(msg.clone());
                s.status = Status::Starting;
                s.started_at_ms = Some(now_ms());
                s.notify(event("error", json!({"error": msg})));
                drop(cmd);
                self.exited_locked(map, name, g, Some(127), None, Duration::ZERO);
                return;
            }
        };
        drop(cmd);
        let pid = child.id();
        s.pid = Some(pid);
        s.status = Status::Running;
        s.started_at_ms = Some(now_ms());
        s.next_restart_at_ms = None;
        s.error = None;
        let _ = std::fs::write(self.pid_path(name), format!("{pid}\n"));
        s.log
            .lock()
            .line("system", &format!("started pid {pid}: {}", def.cmd));
        s.notify(event("started", json!({"pid": pid})));
        self.changed.notify_all();

        let (done_tx, done_rx) = mpsc::channel::<()>();
        let mut readers = 0;
        let pipes: Vec<(&'static str, Option<Box<dyn std::io::Read + Send>>)> = vec![
            (
                "stdout",
                child
                    .stdout
                    .take()
                    .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            ),
            (
                "stderr",
                child
                    .stderr
                    .take()
                    .map(|p| Box::new(p) as Box<dyn std::io::Read + Send>),
            ),
        ];
        for (stream, pipe) in pipes {
            let Some(pipe) = pipe else { continue };
            readers += 1;
            let me = self.clone();
            let log = s.log.clone();
            let name = name.to_string();
            let done = done_tx.clone();
            std::thread::spawn(move || {
                let mut r = std::io::BufReader::with_capacity(64 << 10, pipe);
                let mut line = Vec::new();
                loop {
                    line.clear();
                    match (&mut r).take(64 << 10).read_until(b'\n', &mut line) {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {
                            let text = String::from_utf8_lossy(&line);
                            let text = text.trim_end_matches(['\n', '\r']);
                            log.lock().line(stream, text);
                            let mut map = me.services.lock();
                            if let Some(s) = map.get_mut(&name) {
                                s.notify(event(stream, json!({"data": text})));
                            }
                        }
                    }
                }
                let _ = done.send(());
            });
        }
        drop(done_tx);
        let me = self.clone();
        let name = name.to_string();
        std::thread::spawn(move || {
            let status = child.wait();
            // Output still in the pipes belongs before the exit (bounded: a background child
            // may hold them open).
            let deadline = Instant::now() + Duration::from_millis(300);
            for _ in 0..readers {
                if done_rx
                    .recv_timeout(deadline.saturating_duration_since(Instant::now()))
                    .is_err()
                {
                    break;
                }
            }
            let (code, signal) = match status {
                Ok(st) => (st.code(), st.signal()),
                Err(_) => (None, None),
            };
            let mut map = me.services.lock();
            if map.get(&name).is_some_and(|s| s.pid == Some(pid)) {
                let _ = std::fs::remove_file(me.pid_path(&name));
                me.exited_locked(&mut map, &name, g, code, signal, started.elapsed());
            }
        });
    }

    /// Records an exit of generation `g` and schedules the restart when it should run.
    fn exited_locked(
        self: &Arc<Self>,
        map: &mut BTreeMap<String, Svc>,
        name: &str,
        g: u64,
        code: Option<i32>,
        signal: Option<i32>,
        ran: Duration,
    ) {
        let Some(s) = map.get_mut(name) else { return };
        s.pid = None;
        s.last_exit = Some((code, signal));
        let what = match (code, signal) {
            (Some(c), _) => format!("exited with code {c}"),
            (None, Some(sig)) => format!("killed by signal {sig}"),
            _ => "exited".to_string(),
        };
        s.log.lock().line("system", &what);
        s.notify(event("exit", json!({"exit_code": code, "signal": signal})));
        if s.generation != g || s.stopped {
            s.status = Status::Stopped;
            self.changed.notify_all();
            return;
        }
        if ran >= HEALTHY_RUN {
            s.backoff = BACKOFF_MIN;
        }
        let wait = s.backoff;
        s.backoff = (s.backoff * 2).min(BACKOFF_MAX);
        s.status = if code == Some(0) || ran >= HEALTHY_RUN {
            Status::Starting
        } else {
            Status::Failed
        };
        if s.error.is_none() {
            s.error = Some(what);
        }
        s.next_restart_at_ms = Some(now_ms() + wait.as_millis() as u64);
        self.changed.notify_all();
        let me = self.clone();
        let name = name.to_string();
        std::thread::spawn(move || {
            std::thread::sleep(wait);
            let mut map = me.services.lock();
            let Some(s) = map.get_mut(&name) else { return };
            if s.generation == g && !s.stopped && s.pid.is_none() {
                s.restart_count += 1;
                s.status = Status::Starting;
                me.spawn_locked(&mut map, &name, g);
            }
        });
    }

    /// Starts `name` now (after what it needs) unless it runs; clears a sticky stop.
    fn start_inner(self: &Arc<Self>, name: &str, seen: &mut Vec<String>) -> ApiResult<()> {
        if seen.iter().any(|n| n == name) {
            return Ok(());
        }
        seen.push(name.to_string());
        let needs = {
            let map = self.services.lock();
            let s = map
                .get(name)
                .ok_or_else(|| ApiError::not_found("service", name))?;
            s.def.needs.clone()
        };
        for n in &needs {
            let runs = self.services.lock().get(n).is_some_and(|s| s.pid.is_some());
            if !runs {
                self.start_inner(n, seen)?;
            }
        }
        if !needs.is_empty() {
            self.wait_needs(name);
        }
        let mut map = self.services.lock();
        let s = map
            .get_mut(name)
            .ok_or_else(|| ApiError::not_found("service", name))?;
        let was_stopped = s.stopped;
        s.stopped = false;
        if was_stopped {
            let snapshot = Svc::copy_def(s);
            self.persist(name, &snapshot)?;
        }
        if s.pid.is_none() {
            s.generation += 1;
            s.backoff = BACKOFF_MIN;
            let g = s.generation;
            self.spawn_locked(&mut map, name, g);
        }
        Ok(())
    }

    pub fn start(self: &Arc<Self>, name: &str) -> ApiResult<()> {
        self.start_inner(name, &mut Vec::new())
    }

    /// Stops `name` (SIGTERM to its process group, SIGKILL after 5 s) and waits for the exit.
    /// `sticky`: it stays stopped across wakes and boots until started again.
    fn stop_inner(&self, name: &str, sticky: bool) -> ApiResult<()> {
        let mut map = self.services.lock();
        let s = map
            .get_mut(name)
            .ok_or_else(|| ApiError::not_found("service", name))?;
        s.generation += 1;
        if sticky && !s.stopped {
            s.stopped = true;
            let snapshot = Svc::copy_def(s);
            self.persist(name, &snapshot)?;
        }
        let Some(pid) = s.pid else {
            s.status = Status::Stopped;
            s.next_restart_at_ms = None;
            return Ok(());
        };
        s.status = Status::Stopping;
        signal_group(pid, libc::SIGTERM);
        let deadline = Instant::now() + STOP_GRACE;
        let mut killed = false;
        loop {
            let Some(s) = map.get(name) else {
                return Ok(());
            };
            if s.pid != Some(pid) {
                return Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                if killed {
                    return Err(ApiError::new(
                        500,
                        "internal",
                        format!("service {name} (pid {pid}) did not exit after SIGKILL"),
                    ));
                }
                signal_group(pid, libc::SIGKILL);
                killed = true;
                let _ = self.changed.wait_for(&mut map, STOP_GRACE);
                continue;
            }
            self.changed.wait_for(&mut map, deadline - now);
        }
    }

    pub fn stop(&self, name: &str) -> ApiResult<()> {
        self.stop_inner(name, true)
    }

    pub fn restart(self: &Arc<Self>, name: &str) -> ApiResult<()> {
        self.stop_inner(name, false)?;
        self.start(name)
    }

    /// Sends `sig` to the service's process group (a process it ends is restarted).
    pub fn signal(&self, name: &str, sig: i32) -> ApiResult<()> {
        let map = self.services.lock();
        let s = map
            .get(name)
            .ok_or_else(|| ApiError::not_found("service", name))?;
        match s.pid {
            Some(pid) => {
                signal_group(pid, sig);
                Ok(())
            }
            None => Err(ApiError::conflict(format!("service {name} is not running"))),
        }
    }

    /// Creates or replaces a definition and (re)starts it. Returns whether it is new.
    pub fn put(self: &Arc<Self>, name: &str, def: ServiceDef) -> ApiResult<bool> {
        self.put_following(name, def, false).map(|(c, _)| c)
    }

    /// [`Runtime::put`], and with `follow` a stream of the service's events from before
    /// it starts.
    pub fn put_following(
        self: &Arc<Self>,
        name: &str,
        def: ServiceDef,
        follow: bool,
    ) -> ApiResult<(bool, Option<mpsc::Receiver<Value>>)> {
        check_name("service", name)?;
        if def.cmd.trim().is_empty() {
            return Err(ApiError::bad("cmd is required"));
        }
        if def.http_port == Some(0) {
            return Err(ApiError::bad("http_port must be 1-65535"));
        }
        for n in &def.needs {
            check_name("service", n)?;
        }
        let created = {
            let mut map = self.services.lock();
            if !map.contains_key(name) && map.len() >= MAX_SERVICES {
                return Err(ApiError::conflict(format!(
                    "a sprite holds at most {MAX_SERVICES} services"
                )));
            }
            if def.http_port.is_some()
                && let Some((other, port)) = map
                    .iter()
                    .find(|(n, s)| n.as_str() != name && s.def.http_port.is_some())
                    .map(|(n, s)| (n.clone(), s.def.http_port))
            {
                return Err(ApiError::conflict(format!(
                    "service {other} already has http_port {}: only one service may",
                    port.unwrap_or(0)
                )));
            }
            for n in &def.needs {
                if n == name {
                    return Err(ApiError::bad(format!("service {name} cannot need itself")));
                }
                if !map.contains_key(n) {
                    return Err(ApiError::bad(format!(
                        "needs: no service named {n:?} (create it first)"
                    )));
                }
            }
            if map.contains_key(name) && needs_cycle(&map, name, &def.needs) {
                return Err(ApiError::bad(format!("needs of {name} would form a cycle")));
            }
            let created = !map.contains_key(name);
            if created {
                let log = self.log_for(name);
                let svc = Svc::new(def.clone(), false, log);
                self.persist(name, &svc)?;
                map.insert(name.to_string(), svc);
            } else if let Some(s) = map.get_mut(name) {
                s.def = def.clone();
                s.stopped = false;
                let snapshot = Svc::copy_def(s);
                self.persist(name, &snapshot)?;
            }
            let rx = follow.then(|| {
                let (tx, rx) = mpsc::channel();
                if let Some(s) = map.get_mut(name) {
                    s.subs.push(tx);
                }
                rx
            });
            (created, rx)
        };
        let (created, rx) = created;
        if !created {
            // The new definition takes effect now.
            self.stop_inner(name, false)?;
        }
        self.start(name)?;
        Ok((created, rx))
    }

    /// Stops and forgets `name`; its log stays.
    pub fn delete(&self, name: &str) -> ApiResult<()> {
        {
            let map = self.services.lock();
            if !map.contains_key(name) {
                return Err(ApiError::not_found("service", name));
            }
            if let Some(user) = map
                .iter()
                .find(|(n, s)| n.as_str() != name && s.def.needs.iter().any(|x| x == name))
                .map(|(n, _)| n.clone())
            {
                return Err(ApiError::conflict(format!(
                    "service {user} needs {name}: change or delete it first"
                )));
            }
        }
        self.stop_inner(name, false)?;
        let mut map = self.services.lock();
        if let Some(s) = map.remove(name) {
            s.log.lock().line("system", "service deleted");
        }
        match std::fs::remove_file(self.def_path(name)) {
            Ok(()) => Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
            Err(e) => Err(ApiError::new(500, "internal", format!("{e}"))),
        }
    }

    /// A service's definition with its live state.
    pub fn get(&self, name: &str) -> ApiResult<Value> {
        let map = self.services.lock();
        let s = map
            .get(name)
            .ok_or_else(|| ApiError::not_found("service", name))?;
        Ok(s.view(name))
    }

    pub fn list(&self) -> Value {
        let map = self.services.lock();
        Value::Array(map.iter().map(|(n, s)| s.view(n)).collect())
    }

    /// Follows `name`'s events (subscribe before acting so nothing is missed).
    pub fn subscribe(&self, name: &str) -> ApiResult<mpsc::Receiver<Value>> {
        let mut map = self.services.lock();
        let s = map
            .get_mut(name)
            .ok_or_else(|| ApiError::not_found("service", name))?;
        let (tx, rx) = mpsc::channel();
        s.subs.push(tx);
        Ok(rx)
    }

    /// The port the sprite's URL routes to: the service with an `http_port` (started first
    /// when it does not run), else `None` (the sprite's default port).
    pub fn http_target(self: &Arc<Self>) -> Option<u16> {
        let (name, port, runs) = {
            let map = self.services.lock();
            map.iter()
                .find(|(_, s)| s.def.http_port.is_some())
                .map(|(n, s)| (n.clone(), s.def.http_port, s.pid.is_some()))?
        };
        if !runs && let Err(e) = self.start(&name) {
            eprintln!(
                "sprite-agent: starting {name} for an HTTP request: {}",
                e.message
            );
        }
        port
    }

    // ---- tasks ----------------------------------------------------------------------------

    fn live_tasks(&self) -> parking_lot::MutexGuard<'_, BTreeMap<String, Task>> {
        let mut t = self.tasks.lock();
        let now = now_ms();
        t.retain(|_, task| task.expires_at_ms > now);
        t
    }

    /// Tasks not yet expired (each keeps the sprite from pausing for idleness).
    pub fn live_task_count(&self) -> usize {
        self.live_tasks().len()
    }

    fn task_json(name: &str, t: &Task) -> Value {
        json!({
            "name": name,
            "started_at": rfc3339_ms(t.started_at_ms),
            "expires_at": rfc3339_ms(t.expires_at_ms),
        })
    }

    /// `POST /v1/tasks`: a new lease; 409 when a live task has the name.
    pub fn task_create(&self, name: &str, expire: Duration) -> ApiResult<Value> {
        check_name("task", name)?;
        let mut t = self.live_tasks();
        if t.contains_key(name) {
            return Err(ApiError::conflict(format!("task {name:?} exists")));
        }
        if t.len() >= MAX_TASKS {
            return Err(ApiError::conflict(format!(
                "a sprite holds at most {MAX_TASKS} tasks"
            )));
        }
        let now = now_ms();
        let task = Task {
            started_at_ms: now,
            expires_at_ms: now + expire.as_millis() as u64,
        };
        t.insert(name.to_string(), task);
        Ok(Self::task_json(name, &task))
    }

    /// `PUT`: creates or extends (a new expiry from now; `started_at` kept).
    pub fn task_upsert(&self, name: &str, expire: Duration) -> ApiResult<Value> {
        check_name("task", name)?;
        let mut t = self.live_tasks();
        if !t.contains_key(name) && t.len() >= MAX_TASKS {
            return Err(ApiError::conflict(format!(
                "a sprite holds at most {MAX_TASKS} tasks"
            )));
        }
        let now = now_ms();
        let task = t.entry(name.to_string()).or_insert(Task {
            started_at_ms: now,
            expires_at_ms: now,
        });
        task.expires_at_ms = now + expire.as_millis() as u64;
        let v = Self::task_json(name, task);
        Ok(v)
    }

    pub fn task_get(&self, name: &str) -> ApiResult<Value> {
        self.live_tasks()
            .get(name)
            .map(|t| Self::task_json(name, t))
            .ok_or_else(|| ApiError::not_found("task", name))
    }

    pub fn task_list(&self) -> Value {
        let t = self.live_tasks();
        json!({"tasks": t.iter().map(|(n, t)| Self::task_json(n, t)).collect::<Vec<_>>()})
    }

    pub fn task_delete(&self, name: &str) -> ApiResult<()> {
        self.live_tasks()
            .remove(name)
            .map(|_| ())
            .ok_or_else(|| ApiError::not_found("task", name))
    }
}

impl Svc {
    fn new(def: ServiceDef, stopped: bool, log: Arc<Mutex<LogFile>>) -> Svc {
        Svc {
            def,
            stopped,
            status: Status::Stopped,
            pid: None,
            started_at_ms: None,
            restart_count: 0,
            next_restart_at_ms: None,
            error: None,
            last_exit: None,
            generation: 0,
            backoff: BACKOFF_MIN,
            subs: Vec::new(),
            log,
        }
    }

    /// What [`Runtime::persist`] needs (the definition and the sticky flag).
    fn copy_def(&self) -> Svc {
        Svc::new(self.def.clone(), self.stopped, self.log.clone())
    }

    fn notify(&mut self, ev: Value) {
        self.subs.retain(|tx| tx.send(ev.clone()).is_ok());
    }

    fn view(&self, name: &str) -> Value {
        let mut state = json!({
            "name": name,
            "status": self.status.as_str(),
            "pid": self.pid,
            "started_at": self.started_at_ms.map(rfc3339_ms),
            "restart_count": self.restart_count,
            "next_restart_at": self.next_restart_at_ms.map(rfc3339_ms),
            "error": self.error,
            "stopped_by_user": self.stopped,
        });
        if let Some((code, signal)) = self.last_exit {
            state["last_exit"] = json!({"exit_code": code, "signal": signal});
        }
        json!({
            "name": name,
            "cmd": self.def.cmd,
            "args": self.def.args,
            "env": self.def.env,
            "dir": self.def.dir,
            "needs": self.def.needs,
            "http_port": self.def.http_port,
            "state": state,
        })
    }
}

fn signal_group(pid: u32, sig: i32) {
    let pid = pid as i32;
    // SAFETY: kill(2) with plain integers; the service leads its own process group.
    if unsafe { libc::kill(-pid, sig) } != 0 {
        // SAFETY: as above.
        unsafe { libc::kill(pid, sig) };
    }
}

/// Service names in an order where each comes after what it needs (ties by name).
fn topo_order(map: &BTreeMap<String, Svc>) -> Vec<String> {
    fn visit(
        n: &str,
        map: &BTreeMap<String, Svc>,
        mark: &mut HashMap<String, bool>,
        out: &mut Vec<String>,
    ) {
        match mark.get(n) {
            Some(_) => return, // done, or on the stack (a cycle: break it here)
            None => {
                mark.insert(n.to_string(), false);
            }
        }
        if let Some(s) = map.get(n) {
            for d in &s.def.needs {
                visit(d, map, mark, out);
            }
            out.push(n.to_string());
        }
        mark.insert(n.to_string(), true);
    }
    let mut mark = HashMap::new();
    let mut out = Vec::new();
    for n in map.keys() {
        visit(n, map, &mut mark, &mut out);
    }
    out
}

/// Whether giving `name` the dependencies `needs` makes it reachable from itself.
fn needs_cycle(map: &BTreeMap<String, Svc>, name: &str, needs: &[String]) -> bool {
    let mut stack: Vec<String> = needs.to_vec();
    let mut seen = std::collections::HashSet::new();
    while let Some(n) = stack.pop() {
        if n == name {
            return true;
        }
        if seen.insert(n.clone())
            && let Some(s) = map.get(&n)
        {
            stack.extend(s.def.needs.iter().cloned());
        }
    }
    false
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn durations_and_expiry() {
        assert_eq!(parse_duration("90"), Some(Duration::from_secs(90)));
        assert_eq!(parse_duration("30m"), Some(Duration::from_secs(1800)));
        assert_eq!(parse_duration("1h30m"), Some(Duration::from_secs(5400)));
        assert_eq!(parse_duration("500ms"), Some(Duration::from_millis(500)));
        assert_eq!(parse_duration("5x"), None);
        assert_eq!(parse_duration("m"), None);
        assert_eq!(parse_duration(""), None);
        assert!(parse_expire(&json!(60)).is_ok());
        assert!(parse_expire(&json!("1h")).is_ok());
        assert_eq!(parse_expire(&json!("2h")).unwrap_err().status, 400);
        assert_eq!(parse_expire(&json!(0)).unwrap_err().status, 400);
        assert_eq!(parse_expire(&json!(-5)).unwrap_err().status, 400);
        assert_eq!(parse_expire(&json!(true)).unwrap_err().status, 400);
        assert_eq!(parse_expire(&Value::Null).unwrap_err().status, 400);
    }

    #[test]
    fn names_signals_and_times() {
        assert!(check_name("service", "web-1.a_b").is_ok());
        for bad in ["", ".x", "a/b", "a b", &"x".repeat(65)] {
            assert!(check_name("service", bad).is_err(), "{bad}");
        }
        assert_eq!(parse_signal("TERM").unwrap(), libc::SIGTERM);
        assert_eq!(parse_signal("sigkill").unwrap(), libc::SIGKILL);
        assert_eq!(parse_signal("9").unwrap(), 9);
        assert!(parse_signal("NOPE").is_err());
        assert!(parse_signal("0").is_err());
        assert_eq!(rfc3339_utc(0), "1970-01-01T00:00:00Z");
        assert_eq!(rfc3339_utc(951_782_400), "2000-02-29T00:00:00Z");
        assert_eq!(rfc3339_ms(1_795_436_043_007), "2026-11-23T12:14:03.007Z");
    }

    fn rt() -> (tempfile::TempDir, Arc<Runtime>) {
        let d = tempfile::tempdir().unwrap();
        let rt = Runtime::open(&d.path().join("sprite"), &d.path().join("run")).unwrap();
        (d, rt)
    }

    fn def(cmd: &str, args: &[&str]) -> ServiceDef {
        ServiceDef {
            cmd: cmd.into(),
            args: args.iter().map(|s| s.to_string()).collect(),
            ..Default::default()
        }
    }

    /// Polls `probe` until it returns `Ok`; after 20 s fails with its last `Err` message.
    fn eventually<T>(mut probe: impl FnMut() -> Result<T, String>) -> T {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            match probe() {
                Ok(v) => return v,
                Err(last) => assert!(Instant::now() < deadline, "timed out; {last}"),
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn wait_for(rt: &Runtime, name: &str, f: impl Fn(&Value) -> bool) -> Value {
        eventually(|| {
            let v = rt.get(name).unwrap();
            if f(&v) {
                Ok(v)
            } else {
                Err(format!("last state {v}"))
            }
        })
    }

    /// Waits until the service's log holds `needle` ("running" only means the process was
    /// spawned: a signal sent right after can land before its first `echo`).
    fn wait_log(rt: &Runtime, name: &str, needle: &str) {
        eventually(|| {
            let log = std::fs::read_to_string(rt.log_path(name)).unwrap_or_default();
            if log.contains(needle) {
                Ok(())
            } else {
                Err(format!("waiting for {needle:?}; log {log}"))
            }
        })
    }

    #[test]
    fn services_run_restart_stop_and_log() {
        let (d, rt) = rt();
        assert!(
            rt.put(
                "echo",
                def("sh", &["-c", "echo hello; echo oops >&2; sleep 60"])
            )
            .unwrap()
        );
        let v = wait_for(&rt, "echo", |v| v["state"]["status"] == "running");
        let pid = v["state"]["pid"].as_u64().unwrap();
        wait_log(&rt, "echo", "[stderr] oops");
        // An update replaces the process.
        assert!(
            !rt.put("echo", def("sh", &["-c", "echo again; sleep 60"]))
                .unwrap()
        );
        let v = wait_for(&rt, "echo", |v| v["state"]["status"] == "running");
        assert_ne!(v["state"]["pid"].as_u64().unwrap(), pid);
        wait_log(&rt, "echo", "[stdout] again");
        // A kill by signal is a crash: restarted, restart_count rises.
        rt.signal("echo", libc::SIGKILL).unwrap();
        wait_for(&rt, "echo", |v| {
            v["state"]["restart_count"].as_u64() == Some(1) && v["state"]["status"] == "running"
        });
        rt.stop("echo").unwrap();
        let v = rt.get("echo").unwrap();
        assert_eq!(v["state"]["status"], "stopped");
        assert_eq!(rt.signal("echo", libc::SIGTERM).unwrap_err().status, 409);
        // Sticky: a new runtime (a boot) does not start it.
        drop(rt);
        let rt = Runtime::open(&d.path().join("sprite"), &d.path().join("run")).unwrap();
        rt.boot();
        std::thread::sleep(Duration::from_millis(300));
        assert_eq!(rt.get("echo").unwrap()["state"]["status"], "stopped");
        let log = std::fs::read_to_string(rt.log_path("echo")).unwrap();
        assert!(log.contains("[stdout] hello"), "{log}");
        assert!(log.contains("[stderr] oops"), "{log}");
        assert!(log.contains("[stdout] again"), "{log}");
        rt.delete("echo").unwrap();
        assert_eq!(rt.get("echo").unwrap_err().status, 404);
        assert!(rt.log_path("echo").exists(), "delete keeps the log");
    }

    #[test]
    fn crash_loops_back_off_and_bad_commands_exit() {
        let (_d, rt) = rt();
        let rx_ok = {
            rt.put("bad", def("/nonexistent/program", &[])).unwrap();
            rt.subscribe("bad").unwrap()
        };
        let v = wait_for(&rt, "bad", |v| {
            v["state"]["restart_count"].as_u64() >= Some(1)
        });
        assert!(
            v["state"]["error"]
                .as_str()
                .unwrap()
                .contains("cannot start")
        );
        let ev = rx_ok.recv_timeout(Duration::from_secs(5)).unwrap();
        assert!(
            ["error", "exit"].contains(&ev["type"].as_str().unwrap()),
            "{ev}"
        );
        rt.put("crash", def("sh", &["-c", "exit 3"])).unwrap();
        let v = wait_for(&rt, "crash", |v| {
            v["state"]["restart_count"].as_u64() >= Some(2)
        });
        assert_eq!(v["state"]["last_exit"]["exit_code"], 3);
        rt.stop("crash").unwrap();
        rt.stop("bad").unwrap();
    }

    #[test]
    fn needs_ports_and_conflicts() {
        let (d, rt) = rt();
        let mut web = def("sleep", &["60"]);
        web.http_port = Some(18099);
        assert_eq!(
            rt.put(
                "web",
                ServiceDef {
                    needs: vec!["db".into()],
                    ..web.clone()
                }
            )
            .unwrap_err()
            .status,
            400
        );
        rt.put("db", def("sleep", &["60"])).unwrap();
        rt.put(
            "web",
            ServiceDef {
                needs: vec!["db".into()],
                ..web.clone()
            },
        )
        .unwrap();
        let mut other = def("sleep", &["60"]);
        other.http_port = Some(18100);
        assert_eq!(rt.put("api", other).unwrap_err().status, 409);
        assert_eq!(
            rt.put(
                "db",
                ServiceDef {
                    needs: vec!["web".into()],
                    ..def("sleep", &["60"])
                }
            )
            .unwrap_err()
            .status,
            400
        );
        assert_eq!(rt.delete("db").unwrap_err().status, 409);
        assert_eq!(rt.http_target(), Some(18099));
        // Boot order: db before web.
        rt.stop("web").unwrap();
        rt.stop("db").unwrap();
        let mut m = rt.services.lock();
        for s in m.values_mut() {
            s.stopped = false;
        }
        drop(m);
        rt.boot();
        let w = wait_for(&rt, "web", |v| v["state"]["status"] == "running");
        let db = rt.get("db").unwrap();
        assert!(db["state"]["started_at"].as_str() <= w["state"]["started_at"].as_str());
        // The HTTP service starts on a request even when stopped.
        rt.stop("web").unwrap();
        assert_eq!(rt.http_target(), Some(18099));
        wait_for(&rt, "web", |v| v["state"]["status"] == "running");
        rt.stop("web").unwrap();
        rt.stop("db").unwrap();
        drop(d);
    }

    #[test]
    fn tasks_expire() {
        let (_d, rt) = rt();
        rt.task_create("a", Duration::from_secs(60)).unwrap();
        assert_eq!(
            rt.task_create("a", Duration::from_secs(60))
                .unwrap_err()
                .status,
            409
        );
        rt.task_upsert("b", Duration::from_secs(1)).unwrap();
        assert_eq!(rt.live_task_count(), 2);
        assert_eq!(rt.task_list()["tasks"].as_array().unwrap().len(), 2);
        std::thread::sleep(Duration::from_millis(1100));
        assert_eq!(rt.live_task_count(), 1);
        assert_eq!(rt.task_get("b").unwrap_err().status, 404);
        rt.task_delete("a").unwrap();
        assert_eq!(rt.task_delete("a").unwrap_err().status, 404);
        assert_eq!(rt.live_task_count(), 0);
    }
}
