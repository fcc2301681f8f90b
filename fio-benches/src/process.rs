//! Child processes that never outlive the harness.
//!
//! Three layers make sure no fio or server process is left behind:
//! - [`Child`] kills (SIGTERM, then SIGKILL after a grace period) and reaps its process
//!   when dropped, so an error anywhere unwinds into a clean shutdown;
//! - SIGINT/SIGTERM/SIGHUP are caught: the handler forwards SIGTERM to every live child,
//!   which makes the blocking `wait` on fio return, and the run then fails with
//!   "interrupted" through the normal error path (a second signal SIGKILLs the children
//!   and exits at once);
//! - every child gets `PR_SET_PDEATHSIG(SIGTERM)`, so even a SIGKILLed harness takes its
//!   children with it.

use anyhow::{Context, Result, bail};
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitStatus};
use std::sync::atomic::{AtomicI32, Ordering};
use std::time::{Duration, Instant};

const SLOTS: usize = 16;
static PIDS: [AtomicI32; SLOTS] = [const { AtomicI32::new(0) }; SLOTS];
static SIGNALLED: AtomicI32 = AtomicI32::new(0);

extern "C" fn on_signal(sig: libc::c_int) {
    // Only async-signal-safe operations here: atomics, kill(2), _exit(2).
    let first = SIGNALLED.swap(sig, Ordering::SeqCst) == 0;
    let forward = if first { libc::SIGTERM } else { libc::SIGKILL };
    for slot in &PIDS {
        let pid = slot.load(Ordering::SeqCst);
        if pid > 0 {
            // SAFETY: kill(2) is async-signal-safe; a stale pid is at worst ESRCH.
            unsafe { libc::kill(pid, forward) };
        }
    }
    if !first {
        // SAFETY: _exit(2) is async-signal-safe.
        unsafe { libc::_exit(128 + sig) };
    }
}

/// Installs the SIGINT/SIGTERM/SIGHUP handler (see the module docs).
pub fn install_signal_handlers() -> Result<()> {
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: a zeroed sigaction is valid; the handler only does async-signal-safe work.
        let rc = unsafe {
            let mut sa: libc::sigaction = std::mem::zeroed();
            sa.sa_sigaction = on_signal as extern "C" fn(libc::c_int) as libc::sighandler_t;
            sa.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut sa.sa_mask);
            libc::sigaction(sig, &sa, std::ptr::null_mut())
        };
        if rc != 0 {
            return Err(std::io::Error::last_os_error()).context("installing signal handler");
        }
    }
    Ok(())
}

/// Fails if a signal asked us to stop.
pub fn check_interrupted() -> Result<()> {
    match SIGNALLED.load(Ordering::SeqCst) {
        0 => Ok(()),
        sig => bail!("interrupted by signal {sig}"),
    }
}

fn register(pid: i32) {
    for slot in &PIDS {
        if slot
            .compare_exchange(0, pid, Ordering::SeqCst, Ordering::SeqCst)
            .is_ok()
        {
            return;
        }
    }
    // More than SLOTS live children never happens here; the Drop guard still covers it.
}

fn unregister(pid: i32) {
    for slot in &PIDS {
        let _ = slot.compare_exchange(pid, 0, Ordering::SeqCst, Ordering::SeqCst);
    }
}

/// A child process that is terminated and reaped when dropped.
#[derive(Debug)]
pub struct Child {
    inner: std::process::Child,
    name: String,
    reaped: Option<ExitStatus>,
}

impl Child {
    /// Spawns `cmd`; `name` is used in messages.
    pub fn spawn(mut cmd: Command, name: &str) -> Result<Child> {
        check_interrupted()?;
        // SAFETY: the closure runs between fork and exec and only calls prctl(2), which
        // is async-signal-safe.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0);
                Ok(())
            });
        }
        let program = cmd.get_program().to_string_lossy().to_string();
        let inner = cmd.spawn().map_err(|e| {
            if e.kind() == std::io::ErrorKind::NotFound {
                anyhow::anyhow!("{name}: `{program}` not found (is it installed and in PATH?)")
            } else {
                anyhow::Error::new(e).context(format!("starting {name} ({program})"))
            }
        })?;
        register(inner.id() as i32);
        Ok(Child {
            inner,
            name: name.to_string(),
            reaped: None,
        })
    }

    pub fn pid(&self) -> u32 {
        self.inner.id()
    }

    fn reaped(&mut self, st: ExitStatus) -> ExitStatus {
        unregister(self.inner.id() as i32);
        self.reaped = Some(st);
        st
    }

    /// Waits for the process to exit.
    pub fn wait(&mut self) -> Result<ExitStatus> {
        if let Some(st) = self.reaped {
            return Ok(st);
        }
        let st = self
            .inner
            .wait()
            .with_context(|| format!("waiting for {}", self.name))?;
        Ok(self.reaped(st))
    }

    /// The exit status if the process has exited.
    pub fn try_wait(&mut self) -> Result<Option<ExitStatus>> {
        if let Some(st) = self.reaped {
            return Ok(Some(st));
        }
        match self
            .inner
            .try_wait()
            .with_context(|| format!("checking {}", self.name))?
        {
            Some(st) => Ok(Some(self.reaped(st))),
            None => Ok(None),
        }
    }

    fn signal(&self, sig: libc::c_int) {
        if self.reaped.is_none() {
            // SAFETY: plain kill(2) on our own unreaped child (so the pid is not reused).
            unsafe { libc::kill(self.inner.id() as i32, sig) };
        }
    }

    /// Sends SIGTERM and waits up to `grace` for the exit, then SIGKILLs. Returns the exit
    /// status and whether SIGKILL was needed.
    pub fn terminate(&mut self, grace: Duration) -> Result<(ExitStatus, bool)> {
        self.terminate_with(grace, || {})
    }

    /// Like [`Child::terminate`], calling `poll` before every check for the exit (while
    /// the process is still there to be looked at).
    pub fn terminate_with(
        &mut self,
        grace: Duration,
        mut poll: impl FnMut(),
    ) -> Result<(ExitStatus, bool)> {
        if let Some(st) = self.try_wait()? {
            return Ok((st, false));
        }
        self.signal(libc::SIGTERM);
        let deadline = Instant::now() + grace;
        while Instant::now() < deadline {
            poll();
            if let Some(st) = self.try_wait()? {
                return Ok((st, false));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.signal(libc::SIGKILL);
        Ok((self.wait()?, true))
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.reaped.is_none() {
            let _ = self.terminate(Duration::from_secs(20));
        }
    }
}

/// Finds `program` (a name searched in PATH, or a path) or explains what is missing.
pub fn find_program(program: &Path, what: &str, hint: &str) -> Result<PathBuf> {
    if program.components().count() > 1 {
        if is_executable(program) {
            return Ok(program.to_path_buf());
        }
        bail!("{what} not found at {} ({hint})", program.display());
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    for dir in std::env::split_paths(&path) {
        let p = dir.join(program);
        if is_executable(&p) {
            return Ok(p);
        }
    }
    bail!(
        "{what} (`{}`) not found in PATH ({hint})",
        program.display()
    )
}

fn is_executable(p: &Path) -> bool {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(p)
        .map(|m| m.is_file() && m.permissions().mode() & 0o111 != 0)
        .unwrap_or(false)
}

/// The last `lines` lines of a log file, indented, for error messages.
pub fn tail(path: &Path, lines: usize) -> String {
    match std::fs::read_to_string(path) {
        Ok(s) => {
            let all: Vec<&str> = s.lines().collect();
            let start = all.len().saturating_sub(lines);
            let body: Vec<String> = all[start..].iter().map(|l| format!("  | {l}")).collect();
            format!(
                "--- last lines of {} ---\n{}",
                path.display(),
                body.join("\n")
            )
        }
        Err(e) => format!("(cannot read {}: {e})", path.display()),
    }
}

/// CPU time (user + system) a process has used so far, from /proc/PID/stat.
pub fn cpu_time(pid: u32) -> Option<Duration> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let ticks = parse_stat_ticks(&stat)?;
    // SAFETY: sysconf has no preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    let hz = if hz > 0 { hz as f64 } else { 100.0 };
    Some(Duration::from_secs_f64(ticks as f64 / hz))
}

/// utime + stime (clock ticks) from the text of /proc/PID/stat. The command name (field 2)
/// may contain spaces and parentheses, so fields are counted after the last ')'.
fn parse_stat_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 1..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest starts at field 3 (state); utime is field 14, stime field 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_ticks() {
        let s =
            "1234 (tokio (rt) x) S 1 1234 1234 0 -1 4194560 1000 0 0 0 250 75 0 0 20 0 9 0 100 0 0";
        assert_eq!(parse_stat_ticks(s), Some(325));
        assert_eq!(parse_stat_ticks("garbage"), None);
        assert!(cpu_time(std::process::id()).is_some());
    }

    #[test]
    fn child_is_killed_on_drop() {
        let mut cmd = Command::new("sleep");
        cmd.arg("60");
        let child = Child::spawn(cmd, "sleep").unwrap();
        let pid = child.pid() as i32;
        let started = Instant::now();
        drop(child);
        assert!(started.elapsed() < Duration::from_secs(10));
        // Reaped: the pid no longer names our child.
        assert!(!PIDS.iter().any(|s| s.load(Ordering::SeqCst) == pid));
        assert!(
            !Path::new(&format!("/proc/{pid}")).exists() || {
                let st = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
                !st.contains("(sleep)")
            }
        );
    }

    #[test]
    fn missing_program_is_a_clear_error() {
        let e = find_program(
            Path::new("no-such-tool-xyz"),
            "frobnicator",
            "apt install frob",
        )
        .unwrap_err()
        .to_string();
        assert!(
            e.contains("no-such-tool-xyz") && e.contains("apt install frob"),
            "{e}"
        );
        let mut cmd = Command::new("/nonexistent/tool");
        cmd.arg("x");
        let e = Child::spawn(cmd, "tool").unwrap_err().to_string();
        assert!(e.contains("not found"), "{e}");
    }
}
