//! The guest runtime (`sprite-agent`): runs inside the sprite, started by its init, and serves
//! the [`crate::proto`] protocol on the virtio-serial port. Plain threads and blocking I/O:
//! it must be small, start fast and never depend on the host being connected.
//!
//! Internal API for later features (services, tasks): [`Agent::handle`] dispatches one
//! request; [`Agent::spawn_session`] starts a process whose output goes to whoever is
//! attached; [`Agent::send`] emits an event.

use crate::manager::now_ms;
use crate::mgmt::Reply as ApiReply;
use crate::proto::{
    self, ActivityInfo, DirEntry, Event, ExecSpec, Op, Reply, Request, SCROLLBACK, SessionInfo,
    Stream,
};
use crate::services::Runtime;
use parking_lot::Mutex;
use std::collections::HashMap;
use std::io::{Read, Write};
use std::net::TcpStream;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

const FIFREEZE: libc::c_ulong = 0xC004_5877;
const FITHAW: libc::c_ulong = 0xC004_5878;
const FITRIM: libc::c_ulong = 0xC018_5879;
/// A frozen filesystem thaws by itself after this long unless the request says otherwise
/// (a host that died mid-checkpoint must not leave the guest frozen).
const DEFAULT_FREEZE_TIMEOUT: Duration = Duration::from_secs(30);
/// After a command exits, how long its output pipes may still deliver (a background child
/// holding them open must not delay the exit event forever).
const DRAIN_AFTER_EXIT: Duration = Duration::from_millis(300);

pub type Sink = Box<dyn Write + Send>;

struct SessionState {
    attached: Option<u64>,
    scrollback: Vec<u8>,
    exit: Option<(Option<i32>, Option<i32>)>,
}

struct Session {
    id: String,
    pid: u32,
    args: Vec<String>,
    tty: bool,
    detachable: bool,
    started_at_ms: u64,
    stdin: Mutex<Option<std::fs::File>>,
    pty: Option<OwnedFd>,
    state: Mutex<SessionState>,
}

pub struct Agent {
    out: Mutex<Sink>,
    sessions: Mutex<HashMap<String, Arc<Session>>>,
    tcp: Mutex<HashMap<u64, TcpStream>>,
    next_session: AtomicU64,
    last_activity: Mutex<Instant>,
    started: Instant,
    frozen: Mutex<Option<u64>>,
    freeze_epoch: AtomicU64,
    /// Filesystem that freeze/fstrim act on (`/` in a sprite).
    root: String,
    /// Services and tasks (absent in host-side tests that do not ask for them).
    runtime: std::sync::OnceLock<Arc<Runtime>>,
}

impl std::fmt::Debug for Agent {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Agent").field("root", &self.root).finish()
    }
}

fn ok(value: serde_json::Value) -> Event {
    Event::Ok { value }
}

fn err(message: impl std::fmt::Display) -> Event {
    Event::Error {
        message: message.to_string(),
        code: None,
    }
}

fn no_session(session: &str) -> Event {
    Event::Error {
        message: format!("no session {session}"),
        code: Some(proto::ERR_NOT_FOUND.into()),
    }
}

/// A failed read or listing of `path`, with the code callers act on.
fn path_err(path: &str, e: &std::io::Error) -> Event {
    let code = match e.kind() {
        std::io::ErrorKind::NotFound => Some(proto::ERR_NOT_FOUND.into()),
        std::io::ErrorKind::IsADirectory => Some(proto::ERR_IS_DIRECTORY.into()),
        _ => None,
    };
    Event::Error {
        message: format!("{path}: {e}"),
        code,
    }
}

impl Agent {
    pub fn new(out: Sink, root: &str) -> Arc<Agent> {
        Arc::new(Agent {
            out: Mutex::new(out),
            sessions: Mutex::new(HashMap::new()),
            tcp: Mutex::new(HashMap::new()),
            next_session: AtomicU64::new(1),
            last_activity: Mutex::new(Instant::now()),
            started: Instant::now(),
            frozen: Mutex::new(None),
            freeze_epoch: AtomicU64::new(0),
            root: root.to_string(),
            runtime: std::sync::OnceLock::new(),
        })
    }

    /// Attaches the services and tasks runtime ([`Op::Api`], [`Op::HttpTarget`], task
    /// counts in [`Op::Activity`]).
    pub fn set_runtime(&self, rt: Arc<Runtime>) {
        let _ = self.runtime.set(rt);
    }

    /// Emits one event (dropped when the host is gone: the host resynchronises with
    /// `sessions`/`attach`).
    pub fn send(&self, id: u64, ev: Event) {
        let frame = proto::encode(&Reply { id, ev });
        let mut out = self.out.lock();
        let _ = out.write_all(&frame).and_then(|_| out.flush());
    }

    /// Serves requests from `input` until it ends. `reopen_on_eof`: a virtio-serial port
    /// reads EOF while no host is connected; keep waiting instead of returning.
    pub fn serve<R: Read>(self: &Arc<Self>, mut input: R, reopen_on_eof: bool) {
        loop {
            match proto::read_frame_body(&mut input) {
                Ok(body) => match proto::decode::<Request>(&body) {
                    Ok(req) => self.handle(req),
                    Err(e) => {
                        // The id is unknown when the frame is malformed: report on id 0.
                        let id = serde_json::from_slice::<serde_json::Value>(&body)
                            .ok()
                            .and_then(|v| v["id"].as_u64())
                            .unwrap_or(0);
                        self.send(id, err(e));
                    }
                },
                Err(proto::FrameError::Closed) if reopen_on_eof => {
                    std::thread::sleep(Duration::from_millis(50));
                }
                Err(proto::FrameError::TooLarge(n)) => {
                    // Cannot resynchronise inside a stream of unknown framing: drop the bytes.
                    let mut sink = std::io::sink();
                    let _ = std::io::copy(&mut (&mut input).take(n as u64), &mut sink);
                    self.send(0, err(format!("frame of {n} bytes exceeds the limit")));
                }
                Err(_) if reopen_on_eof => std::thread::sleep(Duration::from_millis(50)),
                Err(_) => return,
            }
        }
    }

    fn touch(&self) {
        *self.last_activity.lock() = Instant::now();
    }

    /// Handles one request (replies are sent from here or from the threads it starts).
    pub fn handle(self: &Arc<Self>, req: Request) {
        let id = req.id;
        if !matches!(req.op, Op::Activity | Op::Ping) {
            self.touch();
        }
        let ev = match req.op {
            Op::Ping => ok(serde_json::json!({
                "version": proto::VERSION,
                "uptime_ms": self.started.elapsed().as_millis() as u64,
            })),
            Op::Exec(spec) => match self.spawn_session(id, spec) {
                Ok(()) => return,
                Err(e) => err(e),
            },
            Op::Attach { session } => match self.session(&session) {
                Some(s) => {
                    let mut st = s.state.lock();
                    st.attached = Some(id);
                    if !st.scrollback.is_empty() {
                        self.send(
                            id,
                            Event::Output {
                                stream: Stream::Stdout,
                                data: st.scrollback.clone(),
                            },
                        );
                    }
                    if let Some((code, signal)) = st.exit {
                        self.send(id, Event::Exit { code, signal });
                        drop(st);
                        self.sessions.lock().remove(&session);
                    }
                    return;
                }
                None => no_session(&session),
            },
            Op::Detach { session } => match self.session(&session) {
                Some(s) => {
                    s.state.lock().attached = None;
                    ok(serde_json::Value::Null)
                }
                None => no_session(&session),
            },
            Op::Stdin { session, data } => match self.session(&session) {
                Some(s) => match s.stdin.lock().as_mut() {
                    Some(w) => match w.write_all(&data) {
                        Ok(()) => return,
                        Err(e) => err(format!("stdin of {session}: {e}")),
                    },
                    None => err(format!("stdin of {session} is closed")),
                },
                None => no_session(&session),
            },
            Op::CloseStdin { session } => match self.session(&session) {
                Some(s) => {
                    // A terminal has no half-close: send EOF (^D) instead.
                    if s.tty {
                        if let Some(w) = s.stdin.lock().as_mut() {
                            let _ = w.write_all(&[4]);
                        }
                    } else {
                        s.stdin.lock().take();
                    }
                    return;
                }
                None => no_session(&session),
            },
            Op::Resize {
                session,
                rows,
                cols,
            } => match self.session(&session).and_then(|s| {
                s.pty
                    .as_ref()
                    .map(|p| set_winsize(p.as_raw_fd(), rows, cols))
            }) {
                Some(Ok(())) => ok(serde_json::Value::Null),
                Some(Err(e)) => err(e),
                None => Event::Error {
                    message: format!("no terminal session {session}"),
                    code: Some(proto::ERR_NOT_FOUND.into()),
                },
            },
            Op::Kill { session, signal } => match self.session(&session) {
                Some(s) => {
                    let pid = s.pid as i32;
                    // The session leads its own process group (setsid).
                    // SAFETY: kill(2) with plain integers.
                    let r = unsafe { libc::kill(-pid, signal) };
                    if r != 0 {
                        // SAFETY: as above.
                        unsafe { libc::kill(pid, signal) };
                    }
                    if s.state.lock().exit.is_some() {
                        self.sessions.lock().remove(&session);
                    }
                    ok(serde_json::Value::Null)
                }
                None => no_session(&session),
            },
            Op::Sessions => ok(serde_json::to_value(self.session_infos()).unwrap_or_default()),
            Op::WriteFile {
                path,
                data,
                mode,
                append,
            } => match write_file(&path, &data, mode, append) {
                Ok(()) => ok(serde_json::Value::Null),
                Err(e) => err(format!("{path}: {e}")),
            },
            Op::ReadFile { path, offset, len } => match read_file(&path, offset, len) {
                Ok(v) => ok(v),
                Err(e) => path_err(&path, &e),
            },
            Op::ListDir { path } => match list_dir(&path) {
                Ok(v) => ok(serde_json::to_value(v).unwrap_or_default()),
                Err(e) => path_err(&path, &e),
            },
            Op::Freeze { timeout_ms } => match self.freeze(timeout_ms) {
                Ok(()) => ok(serde_json::Value::Null),
                Err(e) => err(format!("freeze {}: {e}", self.root)),
            },
            Op::Thaw => match self.thaw() {
                Ok(()) => ok(serde_json::Value::Null),
                Err(e) => err(format!("thaw {}: {e}", self.root)),
            },
            Op::Sync => {
                // SAFETY: sync(2) takes no arguments.
                unsafe { libc::sync() };
                ok(serde_json::Value::Null)
            }
            Op::Fstrim => match fstrim(&self.root) {
                Ok(n) => ok(serde_json::json!({ "trimmed_bytes": n })),
                Err(e) => err(format!("fstrim {}: {e}", self.root)),
            },
            Op::Activity => ok(serde_json::to_value(self.activity()).unwrap_or_default()),
            Op::TcpOpen { port } => match TcpStream::connect(("127.0.0.1", port)) {
                Ok(s) => {
                    let _ = s.set_nodelay(true);
                    match s.try_clone() {
                        Ok(reader) => {
                            self.tcp.lock().insert(id, s);
                            self.send(id, ok(serde_json::Value::Null));
                            let me = self.clone();
                            std::thread::spawn(move || me.pump_tcp(id, reader));
                            return;
                        }
                        Err(e) => err(e),
                    }
                }
                Err(e) => err(format!("connect to port {port}: {e}")),
            },
            Op::TcpSend { conn, data } => {
                let mut tcp = self.tcp.lock();
                if let Some(s) = tcp.get_mut(&conn)
                    && s.write_all(&data).is_err()
                {
                    let _ = s.shutdown(std::net::Shutdown::Both);
                    tcp.remove(&conn);
                }
                return;
            }
            Op::Api { method, path, body } => {
                let Some(rt) = self.runtime.get().cloned() else {
                    self.send(id, err("this runtime has no services API"));
                    return;
                };
                let me = self.clone();
                // Streams and stops take seconds: off the request loop.
                std::thread::spawn(move || me.api(id, &rt, &method, &path, body.as_bytes()));
                return;
            }
            Op::HttpTarget => {
                let me = self.clone();
                let rt = self.runtime.get().cloned();
                std::thread::spawn(move || {
                    let port = rt.and_then(|rt| rt.http_target());
                    me.send(id, ok(serde_json::json!({ "port": port })));
                });
                return;
            }
            Op::TcpClose { conn } => {
                if let Some(s) = self.tcp.lock().remove(&conn) {
                    let _ = s.shutdown(std::net::Shutdown::Write);
                }
                return;
            }
        };
        self.send(id, ev);
    }

    /// Answers [`Op::Api`] from the management API's router.
    fn api(&self, id: u64, rt: &Arc<Runtime>, method: &str, path: &str, body: &[u8]) {
        match crate::mgmt::route(rt, method, path, body) {
            ApiReply::Json(status, v) => {
                self.send(id, ok(serde_json::json!({"status": status, "body": v})))
            }
            ApiReply::NoContent => self.send(id, ok(serde_json::json!({"status": 204}))),
            ApiReply::Stream(status, events) => {
                self.send(
                    id,
                    ok(serde_json::json!({"status": status, "stream": true})),
                );
                for ev in events {
                    self.send(
                        id,
                        Event::Output {
                            stream: Stream::Stdout,
                            data: format!("{ev}\n").into_bytes(),
                        },
                    );
                }
                self.send(
                    id,
                    Event::Exit {
                        code: Some(0),
                        signal: None,
                    },
                );
            }
        }
    }

    fn session(&self, id: &str) -> Option<Arc<Session>> {
        self.sessions.lock().get(id).cloned()
    }

    pub fn session_infos(&self) -> Vec<SessionInfo> {
        let mut v: Vec<SessionInfo> = self
            .sessions
            .lock()
            .values()
            .map(|s| {
                let st = s.state.lock();
                SessionInfo {
                    id: s.id.clone(),
                    pid: s.pid,
                    args: s.args.clone(),
                    tty: s.tty,
                    detachable: s.detachable,
                    attached: st.attached.is_some(),
                    started_at_ms: s.started_at_ms,
                    exit_code: st.exit.and_then(|e| e.0),
                    exit_signal: st.exit.and_then(|e| e.1),
                }
            })
            .collect();
        v.sort_by(|a, b| a.started_at_ms.cmp(&b.started_at_ms).then(a.id.cmp(&b.id)));
        v
    }

    pub fn activity(&self) -> ActivityInfo {
        let sessions = self.sessions.lock();
        let running: Vec<&Arc<Session>> = sessions
            .values()
            .filter(|s| s.state.lock().exit.is_none())
            .collect();
        ActivityInfo {
            running: running.len(),
            running_sessions: running.iter().filter(|s| s.detachable).count(),
            tcp_connections: self.tcp.lock().len(),
            tasks: self.runtime.get().map_or(0, |rt| rt.live_task_count()),
            idle_ms: self.last_activity.lock().elapsed().as_millis() as u64,
        }
    }

    /// Starts a command for request `id`: `started`, `output`... and `exit` go to `id`
    /// while it is attached.
    pub fn spawn_session(self: &Arc<Self>, id: u64, spec: ExecSpec) -> std::io::Result<()> {
        let Some(program) = spec.args.first() else {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                "empty command",
            ));
        };
        let mut cmd = Command::new(program);
        cmd.args(&spec.args[1..]);
        cmd.env_clear();
        cmd.env(
            "PATH",
            "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
        );
        cmd.env("HOME", "/root");
        cmd.env("USER", "root");
        if spec.tty {
            cmd.env("TERM", "xterm-256color");
        }
        cmd.envs(&spec.env);
        let cwd = spec.cwd.clone().unwrap_or_else(|| {
            if std::path::Path::new("/root").is_dir() {
                "/root".into()
            } else {
                "/".into()
            }
        });
        cmd.current_dir(&cwd);

        let mut readers: Vec<(Stream, std::fs::File)> = Vec::new();
        let stdin_writer: std::fs::File;
        let mut pty_master: Option<OwnedFd> = None;
        if spec.tty {
            let (master, slave) = open_pty(spec.rows.unwrap_or(24), spec.cols.unwrap_or(80))?;
            let slave_fd = slave.as_raw_fd();
            cmd.stdin(Stdio::from(slave.try_clone()?))
                .stdout(Stdio::from(slave.try_clone()?))
                .stderr(Stdio::from(slave));
            // SAFETY: only async-signal-safe calls between fork and exec.
            unsafe {
                cmd.pre_exec(move || {
                    if libc::setsid() < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    if libc::ioctl(0, libc::TIOCSCTTY as _, 0) < 0 {
                        return Err(std::io::Error::last_os_error());
                    }
                    let _ = slave_fd;
                    Ok(())
                });
            }
            let m = std::fs::File::from(master.try_clone()?);
            readers.push((Stream::Stdout, m.try_clone()?));
            stdin_writer = m;
            pty_master = Some(master);
        } else {
            cmd.stdin(Stdio::piped())
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
            // Replaced below once the child exists.
            stdin_writer = std::fs::File::open("/dev/null")?;
        }
        let mut child = cmd
            .spawn()
            .map_err(|e| std::io::Error::new(e.kind(), format!("{program}: {e}")))?;
        drop(cmd); // closes the parent's copies of the terminal's slave side
        let stdin_writer = if spec.tty {
            stdin_writer
        } else {
            let stdin = child.stdin.take().map(OwnedFd::from);
            let out = child.stdout.take().map(OwnedFd::from);
            let errp = child.stderr.take().map(OwnedFd::from);
            if let Some(o) = out {
                readers.push((Stream::Stdout, std::fs::File::from(o)));
            }
            if let Some(e) = errp {
                readers.push((Stream::Stderr, std::fs::File::from(e)));
            }
            match stdin {
                Some(fd) => std::fs::File::from(fd),
                None => stdin_writer,
            }
        };
        let sid = format!("s{}", self.next_session.fetch_add(1, Ordering::Relaxed));
        let session = Arc::new(Session {
            id: sid.clone(),
            pid: child.id(),
            args: spec.args.clone(),
            tty: spec.tty,
            detachable: spec.detachable,
            started_at_ms: now_ms(),
            stdin: Mutex::new(Some(stdin_writer)),
            pty: pty_master,
            state: Mutex::new(SessionState {
                attached: Some(id),
                scrollback: Vec::new(),
                exit: None,
            }),
        });
        self.sessions.lock().insert(sid.clone(), session.clone());
        self.send(
            id,
            Event::Started {
                session: sid,
                pid: child.id(),
            },
        );

        let (done_tx, done_rx) = std::sync::mpsc::channel::<()>();
        let n_readers = readers.len();
        for (stream, mut r) in readers {
            let me = self.clone();
            let s = session.clone();
            let done = done_tx.clone();
            std::thread::spawn(move || {
                let mut buf = vec![0u8; 64 << 10];
                loop {
                    match r.read(&mut buf) {
                        Ok(0) => break,
                        Ok(n) => me.output(&s, stream, &buf[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        // EIO: the terminal's last holder closed it.
                        Err(_) => break,
                    }
                }
                let _ = done.send(());
            });
        }
        drop(done_tx);
        let me = self.clone();
        std::thread::spawn(move || {
            let status = child.wait();
            let deadline = Instant::now() + DRAIN_AFTER_EXIT;
            for _ in 0..n_readers {
                let left = deadline.saturating_duration_since(Instant::now());
                if done_rx.recv_timeout(left).is_err() {
                    break;
                }
            }
            let (code, signal) = match status {
                Ok(st) => (st.code(), st.signal()),
                Err(_) => (None, None),
            };
            let mut st = session.state.lock();
            st.exit = Some((code, signal));
            session.stdin.lock().take();
            let attached = st.attached;
            if let Some(to) = attached {
                me.send(to, Event::Exit { code, signal });
            }
            // A finished command is forgotten once someone has seen its exit; a detached
            // session's exit waits for its next attachment (or kill).
            if attached.is_some() || !session.detachable {
                drop(st);
                me.sessions.lock().remove(&session.id);
            }
            me.touch();
        });
        Ok(())
    }

    fn output(&self, s: &Session, stream: Stream, data: &[u8]) {
        let mut st = s.state.lock();
        if s.detachable {
            st.scrollback.extend_from_slice(data);
            if st.scrollback.len() > SCROLLBACK {
                let cut = st.scrollback.len() - SCROLLBACK;
                st.scrollback.drain(..cut);
            }
        }
        if let Some(to) = st.attached {
            self.send(
                to,
                Event::Output {
                    stream,
                    data: data.to_vec(),
                },
            );
        }
    }

    fn pump_tcp(self: Arc<Self>, conn: u64, mut s: TcpStream) {
        let mut buf = vec![0u8; 64 << 10];
        loop {
            match s.read(&mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    self.touch();
                    self.send(
                        conn,
                        Event::TcpData {
                            data: buf[..n].to_vec(),
                        },
                    )
                }
            }
        }
        self.tcp.lock().remove(&conn);
        self.send(conn, Event::TcpClosed);
    }

    fn root_fd(&self) -> std::io::Result<std::fs::File> {
        std::fs::File::open(&self.root)
    }

    fn freeze(self: &Arc<Self>, timeout_ms: Option<u64>) -> std::io::Result<()> {
        let mut frozen = self.frozen.lock();
        if frozen.is_none() {
            let f = self.root_fd()?;
            // SAFETY: ioctl on an fd we own with an int argument.
            let r = unsafe { libc::ioctl(f.as_raw_fd(), FIFREEZE as _, 0) };
            if r != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        let epoch = self.freeze_epoch.fetch_add(1, Ordering::Relaxed) + 1;
        *frozen = Some(epoch);
        let timeout = timeout_ms
            .map(Duration::from_millis)
            .unwrap_or(DEFAULT_FREEZE_TIMEOUT);
        let me = self.clone();
        std::thread::spawn(move || {
            std::thread::sleep(timeout);
            if *me.frozen.lock() == Some(epoch) {
                let _ = me.thaw();
            }
        });
        Ok(())
    }

    fn thaw(&self) -> std::io::Result<()> {
        let mut frozen = self.frozen.lock();
        if frozen.take().is_none() {
            return Ok(());
        }
        let f = self.root_fd()?;
        // SAFETY: ioctl on an fd we own with an int argument.
        let r = unsafe { libc::ioctl(f.as_raw_fd(), FITHAW as _, 0) };
        if r != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

fn open_pty(rows: u16, cols: u16) -> std::io::Result<(OwnedFd, OwnedFd)> {
    let mut master: libc::c_int = -1;
    let mut slave: libc::c_int = -1;
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: openpty writes two fds into the provided ints; name and termios are null.
    let r = unsafe {
        libc::openpty(
            &mut master,
            &mut slave,
            std::ptr::null_mut(),
            std::ptr::null(),
            &ws,
        )
    };
    if r != 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: openpty succeeded: both are fresh fds we own.
    let (m, s) = unsafe { (OwnedFd::from_raw_fd(master), OwnedFd::from_raw_fd(slave)) };
    // SAFETY: fcntl on owned fds.
    unsafe {
        libc::fcntl(m.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC);
    }
    Ok((m, s))
}

fn set_winsize(fd: i32, rows: u16, cols: u16) -> std::io::Result<()> {
    let ws = libc::winsize {
        ws_row: rows,
        ws_col: cols,
        ws_xpixel: 0,
        ws_ypixel: 0,
    };
    // SAFETY: TIOCSWINSZ reads a winsize from the pointer.
    if unsafe { libc::ioctl(fd, libc::TIOCSWINSZ, &ws) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn write_file(path: &str, data: &[u8], mode: Option<u32>, append: bool) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let p = std::path::Path::new(path);
    if !p.is_absolute() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "path must be absolute",
        ));
    }
    if let Some(parent) = p.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .append(append)
        .truncate(!append)
        .mode(mode.unwrap_or(0o644))
        .open(p)?;
    f.write_all(data)?;
    if let Some(m) = mode {
        use std::os::unix::fs::PermissionsExt;
        f.set_permissions(std::fs::Permissions::from_mode(m))?;
    }
    Ok(())
}

fn read_file(path: &str, offset: u64, len: u64) -> std::io::Result<serde_json::Value> {
    use base64::Engine as _;
    use std::io::Seek;
    let mut f = std::fs::File::open(path)?;
    let meta = f.metadata()?;
    if meta.is_dir() {
        return Err(std::io::Error::new(
            std::io::ErrorKind::IsADirectory,
            "is a directory",
        ));
    }
    let size = meta.len();
    f.seek(std::io::SeekFrom::Start(offset))?;
    let want = len.min(proto::MAX_CHUNK as u64) as usize;
    let mut data = Vec::with_capacity(want);
    (&mut f).take(want as u64).read_to_end(&mut data)?;
    let eof = offset + data.len() as u64 >= size;
    Ok(serde_json::json!({
        "data": base64::engine::general_purpose::STANDARD.encode(&data),
        "size": size,
        "eof": eof,
    }))
}

fn list_dir(path: &str) -> std::io::Result<Vec<DirEntry>> {
    use std::os::unix::fs::MetadataExt;
    let mut v = Vec::new();
    for e in std::fs::read_dir(path)? {
        let e = e?;
        let Ok(m) = std::fs::symlink_metadata(e.path()) else {
            continue;
        };
        let ft = m.file_type();
        v.push(DirEntry {
            name: e.file_name().to_string_lossy().into_owned(),
            kind: if ft.is_dir() {
                "dir"
            } else if ft.is_symlink() {
                "symlink"
            } else if ft.is_file() {
                "file"
            } else {
                "other"
            }
            .into(),
            size: m.len(),
            mode: m.mode() & 0o7777,
            mtime: m.mtime(),
        });
    }
    v.sort_by(|a, b| a.name.cmp(&b.name));
    Ok(v)
}

#[repr(C)]
struct FstrimRange {
    start: u64,
    len: u64,
    minlen: u64,
}

fn fstrim(root: &str) -> std::io::Result<u64> {
    let f = std::fs::File::open(root)?;
    let mut r = FstrimRange {
        start: 0,
        len: u64::MAX,
        minlen: 0,
    };
    // SAFETY: FITRIM reads and updates the struct through the pointer.
    if unsafe { libc::ioctl(f.as_raw_fd(), FITRIM as _, &mut r) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(r.len)
}

/// Finds the guest's end of the agent port: `/dev/<vportNpM>` whose
/// `/sys/class/virtio-ports/*/name` is [`proto::PORT_NAME`].
pub fn find_port() -> Option<std::path::PathBuf> {
    let rd = std::fs::read_dir("/sys/class/virtio-ports").ok()?;
    for e in rd.flatten() {
        let name = std::fs::read_to_string(e.path().join("name")).unwrap_or_default();
        if name.trim() == proto::PORT_NAME {
            return Some(std::path::Path::new("/dev").join(e.file_name()));
        }
    }
    None
}
