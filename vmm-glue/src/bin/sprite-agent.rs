//! `sprite-agent`: the guest runtime. Started by the sprite's init; serves the host over the
//! virtio-serial port `sprite.agent` (see `vmm_glue::proto`).
//!
//!   sprite-agent                      find the port under /sys/class/virtio-ports
//!   sprite-agent --port /dev/vport1p1 use this character device
//!   sprite-agent --connect PATH       connect to a unix socket instead (host-side tests)
//!   --root DIR                        filesystem that freeze/fstrim act on (default /)
//!   --state-dir DIR                   services, logs and the management socket
//!                                     (default /.sprite in a sprite; with --connect only
//!                                     when given). Process ids go to DIR/run (or /run/sprite).

use std::time::{Duration, Instant};
use vmm_glue::agent::{Agent, find_port};
use vmm_glue::services::Runtime;

fn main() {
    let mut args = std::env::args().skip(1);
    let mut port: Option<String> = None;
    let mut connect: Option<String> = None;
    let mut root = "/".to_string();
    let mut state_dir: Option<String> = None;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--port" => port = args.next(),
            "--connect" => connect = args.next(),
            "--root" => root = args.next().unwrap_or(root),
            "--state-dir" => state_dir = args.next(),
            "--version" => {
                println!("sprite-agent {}", env!("CARGO_PKG_VERSION"));
                return;
            }
            other => {
                eprintln!("sprite-agent: unknown argument {other}");
                std::process::exit(2);
            }
        }
    }
    // SAFETY: ignoring SIGPIPE: writes to closed pipes/sockets become errors.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    if let Some(path) = connect {
        let s = match std::os::unix::net::UnixStream::connect(&path) {
            Ok(s) => s,
            Err(e) => {
                eprintln!("sprite-agent: connect {path}: {e}");
                std::process::exit(1);
            }
        };
        let w = s.try_clone().expect("clone socket");
        let agent = Agent::new(Box::new(w), &root);
        if let Some(dir) = &state_dir {
            let dir = std::path::Path::new(dir);
            start_runtime(&agent, dir, &dir.join("run"));
        }
        agent.serve(s, false);
        return;
    }
    let path = match port {
        Some(p) => std::path::PathBuf::from(p),
        None => {
            let deadline = Instant::now() + Duration::from_secs(30);
            loop {
                if let Some(p) = find_port() {
                    break p;
                }
                if Instant::now() > deadline {
                    eprintln!(
                        "sprite-agent: no virtio-serial port named {}",
                        vmm_glue::proto::PORT_NAME
                    );
                    std::process::exit(1);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
    };
    let open = || {
        std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
    };
    let (r, w) = match open().and_then(|r| Ok((r.try_clone()?, r))) {
        Ok(x) => x,
        Err(e) => {
            eprintln!("sprite-agent: open {}: {e}", path.display());
            std::process::exit(1);
        }
    };
    eprintln!("sprite-agent: serving on {}", path.display());
    // For operators and tests inside the guest (best effort: /run may be read-only).
    let _ = std::fs::write("/run/sprite-agent.pid", format!("{}\n", std::process::id()));
    let agent = Agent::new(Box::new(w), &root);
    let dir = state_dir.unwrap_or_else(|| "/.sprite".into());
    start_runtime(
        &agent,
        std::path::Path::new(&dir),
        std::path::Path::new("/run/sprite"),
    );
    agent.serve(r, true);
}

/// Services and tasks: loads the definitions, serves `DIR/api.sock`, starts the services.
/// A failure here is logged and the runtime protocol still serves (exec, files...).
fn start_runtime(agent: &Agent, dir: &std::path::Path, run_dir: &std::path::Path) {
    match Runtime::open(dir, run_dir) {
        Ok(rt) => {
            let sock = dir.join("api.sock");
            if let Err(e) = vmm_glue::mgmt::serve_socket(rt.clone(), &sock) {
                eprintln!("sprite-agent: management socket {}: {e}", sock.display());
            }
            rt.boot();
            agent.set_runtime(rt);
        }
        Err(e) => eprintln!("sprite-agent: services in {}: {e}", dir.display()),
    }
}
