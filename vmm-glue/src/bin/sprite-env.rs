//! `sprite-env`: the management API from inside a sprite (docs/services.md). Talks HTTP to
//! `/.sprite/api.sock` (`SPRITE_API_SOCK` overrides).
//!
//!   sprite-env services create NAME --cmd BIN [--args a,b] [--env K=V,..] [--dir DIR]
//!                              [--needs svc,..] [--http-port N] [--duration 5s] [--no-stream]
//!   sprite-env services list | get NAME | start NAME | stop NAME | restart NAME
//!                     | signal NAME SIG | delete NAME
//!   sprite-env tasks create NAME --expire 30m | extend NAME --expire 1h | list | get NAME
//!                  | delete NAME
//!   sprite-env curl [curl args] PATH     curl against the socket (virtual host `sprite`)

use clap::{Parser, Subcommand};
use serde_json::{Value, json};
use std::path::PathBuf;
use vmm_glue::mgmt::{self, ServicesCmd};

#[derive(Parser)]
#[command(
    name = "sprite-env",
    version,
    about = "The sprite's management API, from inside"
)]
struct Cli {
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Processes the runtime keeps running (started at boot, restarted when they exit)
    Services {
        #[command(subcommand)]
        cmd: ServicesCmd,
    },
    /// Leases that keep the sprite from pausing for idleness until they expire (max 1h)
    Tasks {
        #[command(subcommand)]
        cmd: TasksCmd,
    },
    /// curl against the management socket: sprite-env curl -X PUT /v1/tasks/x -d '{"expire":60}'
    #[command(disable_help_flag = true)]
    Curl {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<String>,
    },
}

#[derive(Subcommand)]
enum TasksCmd {
    /// A new task (fails if one with the name is live)
    Create {
        name: String,
        /// Seconds, or 30s / 30m / 1h (at most 1h)
        #[arg(long)]
        expire: String,
    },
    /// Create or push back the expiry of a task
    Extend {
        name: String,
        #[arg(long)]
        expire: String,
    },
    List,
    Get {
        name: String,
    },
    Delete {
        name: String,
    },
}

fn socket() -> PathBuf {
    std::env::var_os("SPRITE_API_SOCK")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(mgmt::SOCKET))
}

/// Sends a request; prints the body (streams line by line); exit status 0 on success.
fn send(method: &str, path: &str, body: Option<Value>) -> i32 {
    let body = body.map(|b| b.to_string());
    let mut stdout = std::io::stdout();
    let mut printer = mgmt::BodyPrinter::default();
    let res = mgmt::call(
        &socket(),
        method,
        path,
        body.as_deref().map(str::as_bytes),
        &mut |chunk| printer.feed(chunk, &mut stdout),
    );
    let status = match res {
        Ok(s) => s,
        Err(e) => {
            eprintln!("sprite-env: {e}");
            return 7;
        }
    };
    if (200..300).contains(&status) {
        printer.finish(false, &mut stdout);
        0
    } else {
        let text = printer.text();
        let msg = serde_json::from_str::<Value>(&text)
            .ok()
            .and_then(|v| v["error"]["message"].as_str().map(str::to_string))
            .unwrap_or_else(|| text.trim().to_string());
        eprintln!("sprite-env: {msg} (HTTP {status})");
        1
    }
}

/// `sprite-env curl [args] PATH`: the real curl with `--unix-socket` when the sprite has it.
fn curl(mut args: Vec<String>) -> i32 {
    let Some(at) = args.iter().rposition(|a| a.starts_with('/')) else {
        eprintln!("sprite-env curl: give the API path last, e.g. sprite-env curl /v1/services");
        return 2;
    };
    args[at] = format!("http://sprite{}", args[at]);
    let sock = socket();
    let mut cmd = std::process::Command::new("curl");
    cmd.arg("--silent")
        .arg("--show-error")
        .arg("--unix-socket")
        .arg(&sock)
        .args(&args);
    use std::os::unix::process::CommandExt;
    let e = cmd.exec();
    eprintln!("sprite-env curl: cannot run curl ({e}); use `sprite-env services`/`tasks`");
    127
}

fn main() {
    let cli = Cli::parse();
    let code = match cli.cmd {
        Cmd::Services { cmd } => match cmd.request() {
            Ok(r) => send(r.method, &format!("/v1/services{}", r.path), r.body),
            Err(e) => {
                eprintln!("sprite-env: {e}");
                2
            }
        },
        Cmd::Tasks { cmd } => {
            let expire = |e: &str| match e.parse::<u64>() {
                Ok(n) => json!(n),
                Err(_) => json!(e),
            };
            match cmd {
                TasksCmd::Create { name, expire: e } => send(
                    "POST",
                    "/v1/tasks",
                    Some(json!({"name": name, "expire": expire(&e)})),
                ),
                TasksCmd::Extend { name, expire: e } => send(
                    "PUT",
                    &format!("/v1/tasks/{name}"),
                    Some(json!({"expire": expire(&e)})),
                ),
                TasksCmd::List => send("GET", "/v1/tasks", None),
                TasksCmd::Get { name } => send("GET", &format!("/v1/tasks/{name}"), None),
                TasksCmd::Delete { name } => send("DELETE", &format!("/v1/tasks/{name}"), None),
            }
        }
        Cmd::Curl { args } => curl(args),
    };
    std::process::exit(code);
}
