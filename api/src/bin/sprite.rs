//! `sprite`: the command-line client of the sprites API (built on `api::sdk`).
//! docs/api.md documents every command and exit code.

use api::sdk::{Client, ExecEvent, SdkError, SpriteSettings};
use clap::{CommandFactory, Parser, Subcommand};
use serde_json::{Value, json};
use std::io::{IsTerminal, Write};
use std::path::PathBuf;

#[derive(Parser, Debug)]
#[command(
    name = "sprite",
    version,
    about = "Persistent Linux VMs that hibernate when idle"
)]
struct Cli {
    /// Print JSON instead of tables and messages.
    #[arg(long, global = true)]
    json: bool,
    /// Config file (default $SPRITE_CONFIG or ~/.config/sprite/config.json).
    #[arg(long, global = true, env = "SPRITE_CONFIG")]
    config: Option<PathBuf>,
    /// Sprite to act on (default: the one chosen with `sprite use`).
    #[arg(short = 's', long, global = true)]
    sprite: Option<String>,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(clap::Args, Debug, Clone)]
struct Settings {
    #[arg(long)]
    vcpus: Option<u32>,
    #[arg(long)]
    memory_mib: Option<u64>,
    #[arg(long)]
    idle_warm_secs: Option<u64>,
    #[arg(long)]
    idle_cold_secs: Option<u64>,
    #[arg(long)]
    http_port: Option<u16>,
}

impl Settings {
    fn sdk(&self) -> SpriteSettings {
        SpriteSettings {
            vcpus: self.vcpus,
            memory_mib: self.memory_mib,
            idle_warm_secs: self.idle_warm_secs,
            idle_cold_secs: self.idle_cold_secs,
            http_port: self.http_port,
        }
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Save the API URL and a token.
    Login {
        #[arg(long, default_value = "http://127.0.0.1:8400")]
        url: String,
        /// The token (default: read from stdin).
        #[arg(long)]
        token: Option<String>,
    },
    /// Create a sprite (and make it the current one).
    Create {
        name: String,
        #[command(flatten)]
        settings: Settings,
    },
    List,
    /// Choose the sprite later commands act on.
    Use {
        name: String,
    },
    /// State, URL, settings and usage of a sprite.
    Info,
    Destroy {
        name: String,
    },
    /// Run a command; its exit status becomes ours.
    Exec {
        /// Keep running after this client goes; `sprite attach` follows it again.
        #[arg(long)]
        detachable: bool,
        #[arg(long)]
        tty: bool,
        /// Send our stdin to the command.
        #[arg(short = 'i', long)]
        stdin: bool,
        #[arg(long = "env", value_name = "K=V")]
        env: Vec<String>,
        #[arg(long)]
        cwd: Option<String>,
        #[arg(trailing_var_arg = true, required = true)]
        args: Vec<String>,
    },
    /// Services of the current sprite (processes its runtime keeps running; docs/services.md).
    #[command(subcommand)]
    Services(vmm_glue::mgmt::ServicesCmd),
    /// Detachable sessions.
    Sessions,
    Attach {
        session: String,
    },
    /// An interactive shell: a detachable session on a terminal; our stdin goes to it line by
    /// line (Ctrl-D detaches; `sprite attach` resumes).
    Console,
    Hibernate {
        #[arg(long)]
        cold: bool,
    },
    /// The sprite's URL.
    Url {
        /// public or private (default: show only).
        #[arg(long)]
        auth: Option<String>,
    },
    /// Copy files: `sprite cp LOCAL :/remote` or `sprite cp :/remote LOCAL`.
    Cp {
        from: String,
        to: String,
    },
    #[command(subcommand)]
    Checkpoint(CheckpointCmd),
    /// A new sprite from a checkpoint of the current one.
    Fork {
        checkpoint: String,
        new_name: String,
    },
    /// Usage of the sprite (or --org) over a range.
    Usage {
        #[arg(long)]
        org: bool,
        /// Unix milliseconds.
        #[arg(long)]
        from: Option<i64>,
        #[arg(long)]
        to: Option<i64>,
    },
    /// Create an API token of your organization.
    Token {
        name: String,
    },
    /// Shell completions: bash, zsh, fish, elvish, powershell.
    Completions {
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Debug)]
enum CheckpointCmd {
    Create {
        #[arg(long)]
        comment: Option<String>,
    },
    List,
    Restore {
        id: String,
    },
    Delete {
        id: String,
    },
}

fn config_path(cli: &Cli) -> PathBuf {
    cli.config.clone().unwrap_or_else(|| {
        let home = std::env::var("HOME").unwrap_or_else(|_| "/root".into());
        PathBuf::from(home).join(".config/sprite/config.json")
    })
}

fn load_config(cli: &Cli) -> Value {
    std::fs::read(config_path(cli))
        .ok()
        .and_then(|b| serde_json::from_slice(&b).ok())
        .unwrap_or_else(|| json!({}))
}

fn save_config(cli: &Cli, v: &Value) -> std::io::Result<()> {
    use std::os::unix::fs::OpenOptionsExt;
    let p = config_path(cli);
    if let Some(d) = p.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = p.with_extension("tmp");
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(
        serde_json::to_string_pretty(v)
            .unwrap_or_default()
            .as_bytes(),
    )?;
    std::fs::rename(tmp, p)
}

fn fail(msg: &str, code: i32) -> i32 {
    eprintln!("sprite: {msg}");
    code
}

/// A spinner on stderr while a long operation runs (only on a terminal, not with --json).
struct Spinner(Option<tokio::task::JoinHandle<()>>);

impl Spinner {
    fn start(msg: &str, json: bool) -> Spinner {
        if json || !std::io::stderr().is_terminal() {
            return Spinner(None);
        }
        let msg = msg.to_string();
        Spinner(Some(tokio::spawn(async move {
            let frames = ['|', '/', '-', '\\'];
            let t0 = std::time::Instant::now();
            for i in 0.. {
                eprint!(
                    "\r{} {msg} {:.1}s",
                    frames[i % 4],
                    t0.elapsed().as_secs_f64()
                );
                tokio::time::sleep(std::time::Duration::from_millis(100)).await;
            }
        })))
    }
}

impl Drop for Spinner {
    fn drop(&mut self) {
        if let Some(h) = self.0.take() {
            h.abort();
            eprint!("\r\x1b[K");
        }
    }
}

fn state(s: &api::sdk::Sprite) -> String {
    match &s.pause {
        Some(p) => format!("{} ({p})", s.state),
        None => s.state.clone(),
    }
}

#[tokio::main]
async fn main() {
    let cli = Cli::parse();
    let code = run(&cli).await;
    std::process::exit(code);
}

async fn run(cli: &Cli) -> i32 {
    if let Cmd::Completions { shell } = &cli.cmd {
        clap_complete::generate(
            *shell,
            &mut Cli::command(),
            "sprite",
            &mut std::io::stdout(),
        );
        return 0;
    }
    let mut cfg = load_config(cli);
    if let Cmd::Login { url, token } = &cli.cmd {
        let token = match token {
            Some(t) => t.clone(),
            None => {
                let mut s = String::new();
                let _ = std::io::stdin().read_line(&mut s);
                s.trim().to_string()
            }
        };
        let c = Client::new(url, &token);
        // Check the token before saving it.
        if let Err(e) = c.call("GET", "/v1/sprites?limit=1", None).await {
            return fail(&format!("login failed: {e}"), e.exit_code());
        }
        cfg["url"] = json!(url);
        cfg["token"] = json!(token);
        if let Err(e) = save_config(cli, &cfg) {
            return fail(
                &format!("cannot save {}: {e}", config_path(cli).display()),
                1,
            );
        }
        if !cli.json {
            println!("logged in to {url}");
        }
        return 0;
    }
    let (Some(url), Some(token)) = (cfg["url"].as_str(), cfg["token"].as_str()) else {
        return fail(
            "not logged in: run `sprite login --url URL --token TOKEN`",
            2,
        );
    };
    let c = Client::new(url, token);
    match command(cli, &c, &mut cfg).await {
        Ok(code) => code,
        Err(e) => fail(&e.to_string(), e.exit_code()),
    }
}

fn current(cli: &Cli, cfg: &Value) -> Result<String, SdkError> {
    cli.sprite
        .clone()
        .or_else(|| cfg["current"].as_str().map(str::to_string))
        .ok_or_else(|| SdkError::Api {
            status: 400,
            code: "no_sprite".into(),
            message: "no sprite chosen: pass -s NAME or run `sprite use NAME`".into(),
        })
}

async fn command(cli: &Cli, c: &Client, cfg: &mut Value) -> Result<i32, SdkError> {
    let out = |v: &Value| println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
    match &cli.cmd {
        Cmd::Login { .. } | Cmd::Completions { .. } => unreachable!("handled before"),
        Cmd::Create { name, settings } => {
            let s = {
                let _sp = Spinner::start(&format!("creating {name}"), cli.json);
                c.create_sprite(name, settings.sdk()).await?
            };
            cfg["current"] = json!(name);
            let _ = save_config(cli, cfg);
            if cli.json {
                out(&s.to_json());
            } else {
                println!(
                    "{} is {}; url {}",
                    s.name,
                    state(&s),
                    s.url.as_deref().unwrap_or("-")
                );
            }
        }
        Cmd::List => {
            let list = c.list_sprites().await?;
            if cli.json {
                out(&json!(list.iter().map(|s| s.to_json()).collect::<Vec<_>>()));
            } else {
                let mut rows = vec![vec!["NAME".into(), "STATE".into(), "URL".into()]];
                for s in &list {
                    rows.push(vec![
                        s.name.clone(),
                        state(s),
                        s.url.clone().unwrap_or_default(),
                    ]);
                }
                vmm_glue::client::print_table(&rows);
            }
        }
        Cmd::Use { name } => {
            c.get_sprite(name).await?;
            cfg["current"] = json!(name);
            let _ = save_config(cli, cfg);
            if !cli.json {
                println!("using {name}");
            }
        }
        Cmd::Info => {
            let n = current(cli, cfg)?;
            out(&c.call("GET", &format!("/v1/sprites/{n}"), None).await?);
        }
        Cmd::Destroy { name } => {
            c.delete_sprite(name).await?;
            if cfg["current"] == name.as_str() {
                cfg["current"] = Value::Null;
                let _ = save_config(cli, cfg);
            }
            if !cli.json {
                println!("destroyed {name}");
            }
        }
        Cmd::Exec {
            detachable,
            tty,
            stdin,
            env,
            cwd,
            args,
        } => {
            let n = current(cli, cfg)?;
            let body = match vmm_glue::client::exec_body(
                args,
                env,
                cwd.as_deref(),
                *tty,
                *detachable,
                *stdin,
            ) {
                Ok(b) => b,
                Err(e) => return Ok(fail(&e, 2)),
            };
            return follow(c.exec(&n, body, print_event(cli.json, *detachable)).await);
        }
        Cmd::Services(cmd) => {
            let n = current(cli, cfg)?;
            let req = match cmd.request() {
                Ok(r) => r,
                Err(e) => return Ok(fail(&e, 2)),
            };
            let mut printer = vmm_glue::mgmt::BodyPrinter::default();
            let mut stdout = std::io::stdout();
            c.services(&n, &req, &mut |d| printer.feed(d, &mut stdout))
                .await?;
            printer.finish(cli.json, &mut stdout);
        }
        Cmd::Sessions => {
            let n = current(cli, cfg)?;
            out(&c
                .call("GET", &format!("/v1/sprites/{n}/sessions"), None)
                .await?);
        }
        Cmd::Attach { session } => {
            let n = current(cli, cfg)?;
            return follow(c.attach(&n, session, print_event(cli.json, false)).await);
        }
        Cmd::Console => {
            let n = current(cli, cfg)?;
            return console(c, &n).await;
        }
        Cmd::Hibernate { cold } => {
            let n = current(cli, cfg)?;
            let s = c.hibernate(&n, *cold).await?;
            if cli.json {
                out(&s.to_json());
            } else {
                println!("{n} is {}", state(&s));
            }
        }
        Cmd::Url { auth } => {
            let n = current(cli, cfg)?;
            let s = match auth {
                Some(a) => c.update_sprite(&n, json!({"url_auth": a})).await?,
                None => c.get_sprite(&n).await?,
            };
            if cli.json {
                out(&json!({"url": s.url, "url_auth": s.raw.get("url_auth")}));
            } else {
                println!(
                    "{} ({})",
                    s.url.as_deref().unwrap_or("-"),
                    s.raw
                        .get("url_auth")
                        .and_then(|v| v.as_str())
                        .unwrap_or("?")
                );
            }
        }
        Cmd::Cp { from, to } => {
            let n = current(cli, cfg)?;
            match (from.strip_prefix(':'), to.strip_prefix(':')) {
                (None, Some(remote)) => {
                    let data = std::fs::read(from)
                        .map_err(|e| SdkError::Protocol(format!("{from}: {e}")))?;
                    let len = data.len();
                    {
                        let _sp = Spinner::start(&format!("uploading {len} bytes"), cli.json);
                        c.write_file(&n, remote, data, None).await?;
                    }
                    if !cli.json {
                        println!("{from} -> {n}:{remote} ({len} bytes)");
                    }
                }
                (Some(remote), None) => {
                    let data = c.read_file(&n, remote).await?;
                    std::fs::write(to, &data)
                        .map_err(|e| SdkError::Protocol(format!("{to}: {e}")))?;
                    if !cli.json {
                        println!("{n}:{remote} -> {to} ({} bytes)", data.len());
                    }
                }
                _ => return Ok(fail("cp wants one local path and one :/remote path", 2)),
            }
        }
        Cmd::Checkpoint(cc) => {
            let n = current(cli, cfg)?;
            match cc {
                CheckpointCmd::Create { comment } => {
                    let ck = c.create_checkpoint(&n, comment.as_deref()).await?;
                    if cli.json {
                        out(&ck.to_json());
                    } else {
                        println!("{n}: checkpoint {}", ck.id);
                    }
                }
                CheckpointCmd::List => {
                    let l = c.list_checkpoints(&n).await?;
                    if cli.json {
                        out(&json!(l.iter().map(|ck| ck.to_json()).collect::<Vec<_>>()));
                    } else {
                        let mut rows = vec![vec!["ID".into(), "COMMENT".into()]];
                        for ck in l {
                            rows.push(vec![ck.id, ck.comment]);
                        }
                        vmm_glue::client::print_table(&rows);
                    }
                }
                CheckpointCmd::Restore { id } => {
                    let v = {
                        let _sp = Spinner::start(&format!("restoring {id}"), cli.json);
                        c.restore_checkpoint(&n, id).await?
                    };
                    if cli.json {
                        out(&v);
                    } else {
                        println!(
                            "{n}: restored {id}; the replaced state is {}",
                            v["previous_head"].as_str().unwrap_or("?")
                        );
                    }
                }
                CheckpointCmd::Delete { id } => c.delete_checkpoint(&n, id).await?,
            }
        }
        Cmd::Fork {
            checkpoint,
            new_name,
        } => {
            let n = current(cli, cfg)?;
            let s = {
                let _sp = Spinner::start(&format!("forking {n}@{checkpoint}"), cli.json);
                c.fork(&n, checkpoint, new_name).await?
            };
            if cli.json {
                out(&s.to_json());
            } else {
                println!("{} is {} (from {n}@{checkpoint})", s.name, state(&s));
            }
        }
        Cmd::Usage { org, from, to } => {
            let v = if *org {
                c.usage(None, *from, *to).await?
            } else {
                let n = current(cli, cfg)?;
                c.usage(Some(&n), *from, *to).await?
            };
            out(&v);
        }
        Cmd::Token { name } => {
            let t = c.create_token(name).await?;
            if cli.json {
                out(&json!({"token": t}));
            } else {
                println!("{t}");
            }
        }
    }
    Ok(0)
}

fn print_event(json: bool, announce: bool) -> impl FnMut(ExecEvent) {
    move |e| {
        if json {
            let v = match &e {
                ExecEvent::Started { session } => json!({"event": "started", "session": session}),
                ExecEvent::Stdout(d) => {
                    json!({"event": "stdout", "data": String::from_utf8_lossy(d)})
                }
                ExecEvent::Stderr(d) => {
                    json!({"event": "stderr", "data": String::from_utf8_lossy(d)})
                }
                ExecEvent::Exit { code, signal } => {
                    json!({"event": "exit", "code": code, "signal": signal})
                }
                ExecEvent::Error(m) => json!({"event": "error", "message": m}),
            };
            println!("{v}");
            return;
        }
        match e {
            ExecEvent::Started { session } if announce => eprintln!("[session {session}]"),
            ExecEvent::Stdout(d) => {
                let mut o = std::io::stdout();
                let _ = o.write_all(&d);
                let _ = o.flush();
            }
            ExecEvent::Stderr(d) => {
                let _ = std::io::stderr().write_all(&d);
            }
            ExecEvent::Error(m) => eprintln!("sprite: {m}"),
            _ => {}
        }
    }
}

/// Runs a detachable shell on a terminal and forwards our stdin to it until EOF (the session
/// keeps running after; `exit` in the shell ends it).
async fn console(c: &Client, name: &str) -> Result<i32, SdkError> {
    let (sid_tx, sid_rx) = tokio::sync::oneshot::channel::<String>();
    let mut sid_tx = Some(sid_tx);
    let body = json!({"args": ["sh", "-l"], "tty": true, "detachable": true});
    let mut print = print_event(false, true);
    let output = c.exec(name, body, move |e| {
        if let ExecEvent::Started { session } = &e
            && let Some(tx) = sid_tx.take()
        {
            let _ = tx.send(session.clone());
        }
        print(e)
    });
    let input = async {
        let Ok(session) = sid_rx.await else {
            return Ok::<(), SdkError>(());
        };
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<Vec<u8>>();
        std::thread::spawn(move || {
            let mut line = String::new();
            while std::io::stdin().read_line(&mut line).is_ok_and(|n| n > 0) {
                if tx.send(std::mem::take(&mut line).into_bytes()).is_err() {
                    break;
                }
            }
        });
        while let Some(data) = rx.recv().await {
            c.send_stdin(name, &session, data, false).await?;
        }
        eprintln!("[detached: sprite attach {session}]");
        Ok(())
    };
    tokio::select! {
        r = output => follow(r),
        r = input => r.map(|_| 0),
    }
}

fn follow(r: Result<i32, SdkError>) -> Result<i32, SdkError> {
    match r {
        // The stream ended without an exit: the sprite went away.
        Ok(-1) => Ok(6),
        other => other,
    }
}
