//! `sprited`: the sprite host daemon (`sprited serve`) and its command-line client.
//! docs/sprites.md documents every command, flag and endpoint.

use base64::Engine as _;
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};
use std::io::Write;
use std::path::PathBuf;
use vmm_glue::client::{Client, ClientError, enc};
use vmm_glue::serve::VmmArgs;

#[derive(Parser, Debug)]
#[command(name = "sprited", version, about = "Sprite host daemon and client")]
struct Cli {
    /// State directory (sprite records, images, VM run directories, the control socket).
    #[arg(
        long,
        env = "SPRITED_DATA_DIR",
        default_value = "/var/lib/sprites/vmm",
        global = true
    )]
    data_dir: PathBuf,
    /// Control socket (default <data-dir>/sprited.sock).
    #[arg(long, env = "SPRITED_SOCKET", global = true)]
    socket: Option<PathBuf>,
    /// Print JSON (commands that print tables otherwise).
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    cmd: Cmd,
}

#[derive(Args, Debug, Clone)]
struct SettingsArgs {
    #[arg(long)]
    vcpus: Option<u32>,
    #[arg(long)]
    memory_mib: Option<u64>,
    /// Idle seconds before a warm pause (0: never).
    #[arg(long)]
    idle_warm_secs: Option<u64>,
    /// Seconds paused warm before going cold (0: never by time).
    #[arg(long)]
    idle_cold_secs: Option<u64>,
    /// Guest port the sprite URL reaches.
    #[arg(long)]
    http_port: Option<u16>,
}

impl SettingsArgs {
    fn json(&self) -> Value {
        let mut v = serde_json::Map::new();
        if let Some(x) = self.vcpus {
            v.insert("vcpus".into(), x.into());
        }
        if let Some(x) = self.memory_mib {
            v.insert("memory_mib".into(), x.into());
        }
        if let Some(x) = self.idle_warm_secs {
            v.insert("idle_warm_secs".into(), x.into());
        }
        if let Some(x) = self.idle_cold_secs {
            v.insert("idle_cold_secs".into(), x.into());
        }
        if let Some(x) = self.http_port {
            v.insert("http_port".into(), x.into());
        }
        Value::Object(v)
    }
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Run the daemon.
    Serve(VmmArgs),
    /// Base images.
    #[command(subcommand)]
    Image(ImageCmd),
    /// Create a sprite (an O(1) clone of the image) and boot it.
    Create {
        name: String,
        #[arg(long)]
        image: Option<String>,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    List,
    /// State, transitions, usage and storage of a sprite.
    Get {
        name: String,
    },
    /// Change settings (idle timeouts apply at once; CPU/memory at the next boot).
    Set {
        name: String,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    Destroy {
        name: String,
    },
    /// Run a command; its output streams here and its exit status becomes ours.
    Exec {
        name: String,
        #[arg(long)]
        tty: bool,
        /// Keep running after this client goes; reattach with `attach`.
        #[arg(long)]
        detachable: bool,
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
    /// Services of a sprite (processes its runtime keeps running; docs/services.md).
    Services {
        name: String,
        #[command(subcommand)]
        cmd: vmm_glue::mgmt::ServicesCmd,
    },
    /// Detachable sessions of a sprite.
    Sessions {
        name: String,
    },
    /// Follow a detachable session's output (scrollback first) until it exits or Ctrl-C.
    Attach {
        name: String,
        session: String,
    },
    /// Write to a session's stdin (our stdin; --close closes it after).
    Send {
        name: String,
        session: String,
        #[arg(long)]
        close: bool,
    },
    KillSession {
        name: String,
        session: String,
        #[arg(long, default_value_t = 9)]
        signal: i32,
    },
    /// Pause now: warm (memory kept) or --cold (VM stopped, volume synced).
    Hibernate {
        name: String,
        #[arg(long)]
        cold: bool,
    },
    Wake {
        name: String,
    },
    /// Copy a local file into the sprite.
    Put {
        name: String,
        local: PathBuf,
        remote: String,
        /// Octal mode, e.g. 755.
        #[arg(long)]
        mode: Option<String>,
    },
    /// Copy a file out of the sprite (to stdout without LOCAL).
    Fetch {
        name: String,
        remote: String,
        local: Option<PathBuf>,
    },
    Ls {
        name: String,
        path: String,
    },
    #[command(subcommand)]
    Checkpoint(CheckpointCmd),
    /// A new sprite from a checkpoint (no data copied).
    Fork {
        name: String,
        checkpoint: String,
        new_name: String,
        #[command(flatten)]
        settings: SettingsArgs,
    },
    /// CPU/memory seconds and stored bytes.
    Usage {
        name: String,
    },
    /// Kill the VMM process (fault testing; the sprite goes to `error` or restarts).
    KillVm {
        name: String,
    },
    /// Daemon status.
    Status,
}

#[derive(Subcommand, Debug)]
enum ImageCmd {
    /// Build a base image (busybox root filesystem + sprite-agent + the host's kernel).
    Build {
        #[arg(long, default_value = "base")]
        name: String,
        #[arg(long, default_value_t = 1024)]
        size_mib: u64,
    },
    List,
}

#[derive(Subcommand, Debug)]
enum CheckpointCmd {
    Create {
        name: String,
        #[arg(long)]
        comment: Option<String>,
    },
    List {
        name: String,
    },
    Restore {
        name: String,
        checkpoint: String,
    },
    Delete {
        name: String,
        checkpoint: String,
    },
}

fn main() {
    let cli = Cli::parse();
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime");
    let code = rt.block_on(run(cli));
    std::process::exit(code);
}

async fn run(cli: Cli) -> i32 {
    let socket = cli
        .socket
        .clone()
        .unwrap_or_else(|| cli.data_dir.join("sprited.sock"));
    if let Cmd::Serve(a) = &cli.cmd {
        return match serve(&cli.data_dir, &socket, a).await {
            Ok(()) => 0,
            Err(e) => {
                eprintln!("sprited: {e:#}");
                1
            }
        };
    }
    let c = Client::new(&socket);
    match client(&cli, &c).await {
        Ok(code) => code,
        Err(e) => {
            eprintln!("sprited: {e}");
            e.exit_code()
        }
    }
}

async fn serve(
    data_dir: &std::path::Path,
    socket: &std::path::Path,
    a: &VmmArgs,
) -> anyhow::Result<()> {
    vmm_glue::serve::init_tracing("SPRITED_LOG");
    let mut host = vmm_glue::serve::Host::start(data_dir, a, a.proxy_authorizer_none()).await?;
    host.serve_control(socket).await?;
    tracing::info!(socket = %socket.display(), proxy = ?host.manager.config().proxy_url, vmm = %host.manager.launcher_name(), "sprited ready");
    vmm_glue::serve::wait_for_signal().await?;
    host.shutdown().await;
    let _ = std::fs::remove_file(socket);
    Ok(())
}

fn print_json(v: &Value) {
    println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
}

/// After hibernate/wake: the JSON, or `NAME: STATE (N ms)`.
fn print_state_change(json: bool, name: &str, v: &Value) {
    if json {
        print_json(v);
    } else {
        println!(
            "{name}: {} ({:.0} ms)",
            state_of(v),
            v["timings"]["total_ms"].as_f64().unwrap_or(0.0)
        );
    }
}

/// Checkpoint ids as users write them (`v3`; blockd reports the number).
fn ck_id(v: &Value) -> String {
    match v {
        Value::Object(o) => ck_id(o.get("id").unwrap_or(&Value::Null)),
        Value::Number(n) => format!("v{n}"),
        Value::String(s) => s.clone(),
        _ => "?".into(),
    }
}

fn state_of(v: &Value) -> String {
    match v["pause"].as_str() {
        Some(p) => format!("{} ({p})", v["state"].as_str().unwrap_or("?")),
        None => v["state"].as_str().unwrap_or("?").to_string(),
    }
}

async fn client(cli: &Cli, c: &Client) -> Result<i32, ClientError> {
    let sp = |n: &str| format!("/v1/sprites/{n}");
    match &cli.cmd {
        Cmd::Serve(_) => unreachable!("handled by run"),
        Cmd::Status => print_json(&c.call("GET", "/v1/status", None).await?),
        Cmd::Image(ImageCmd::Build { name, size_mib }) => {
            if !cli.json {
                eprintln!("building image {name} ({size_mib} MiB)...");
            }
            let v = c
                .call(
                    "POST",
                    "/v1/images",
                    Some(json!({"name": name, "size_mib": size_mib})),
                )
                .await?;
            print_json(&v);
        }
        Cmd::Image(ImageCmd::List) => print_json(&c.call("GET", "/v1/images", None).await?),
        Cmd::Create {
            name,
            image,
            settings,
        } => {
            let mut body = json!({"name": name, "settings": settings.json()});
            if let Some(i) = image {
                body["image"] = json!(i);
            }
            let v = c.call("POST", "/v1/sprites", Some(body)).await?;
            if cli.json {
                print_json(&v);
            } else {
                println!(
                    "created {name}: {} in {:.0} ms (storage {:.1} ms); url {}",
                    state_of(&v),
                    v["timings"]["total_ms"].as_f64().unwrap_or(0.0),
                    v["timings"]["storage_ms"].as_f64().unwrap_or(0.0),
                    v["url"].as_str().unwrap_or("-")
                );
            }
        }
        Cmd::List => {
            let v = c.call("GET", "/v1/sprites", None).await?;
            if cli.json {
                print_json(&v);
            } else {
                let mut rows = vec![vec![
                    "NAME".into(),
                    "STATE".into(),
                    "IMAGE".into(),
                    "CPU-S".into(),
                    "REASON".into(),
                ]];
                for s in v["sprites"].as_array().into_iter().flatten() {
                    rows.push(vec![
                        s["name"].as_str().unwrap_or("").into(),
                        state_of(s),
                        s["image"].as_str().unwrap_or("").into(),
                        format!("{:.1}", s["usage"]["cpu_seconds"].as_f64().unwrap_or(0.0)),
                        s["reason"].as_str().unwrap_or("").into(),
                    ]);
                }
                vmm_glue::client::print_table(&rows);
            }
        }
        Cmd::Get { name } => print_json(&c.call("GET", &sp(name), None).await?),
        Cmd::Set { name, settings } => {
            print_json(&c.call("PATCH", &sp(name), Some(settings.json())).await?)
        }
        Cmd::Destroy { name } => {
            c.call("DELETE", &sp(name), None).await?;
            if !cli.json {
                println!("destroyed {name}");
            }
        }
        Cmd::Exec {
            name,
            tty,
            detachable,
            stdin,
            env,
            cwd,
            args,
        } => {
            let body = match vmm_glue::client::exec_body(
                args,
                env,
                cwd.as_deref(),
                *tty,
                *detachable,
                *stdin,
            ) {
                Ok(b) => b,
                Err(e) => {
                    eprintln!("sprited: {e}");
                    return Ok(2);
                }
            };
            return follow(
                c,
                "POST",
                &format!("{}/exec", sp(name)),
                Some(body),
                cli.json,
                *detachable,
            )
            .await;
        }
        Cmd::Services { name, cmd } => {
            let req = match cmd.request() {
                Ok(r) => r,
                Err(e) => {
                    eprintln!("sprited: {e}");
                    return Ok(2);
                }
            };
            let body = req
                .body
                .map(|v| bytes::Bytes::from(v.to_string()))
                .unwrap_or_default();
            let path = format!("{}/services{}", sp(name), req.path);
            let mut resp = c.send(req.method, &path, body).await?.into_body();
            let mut printer = vmm_glue::mgmt::BodyPrinter::default();
            let mut stdout = std::io::stdout();
            while let Some(frame) = http_body_util::BodyExt::frame(&mut resp).await {
                match frame {
                    Ok(f) => {
                        if let Some(d) = f.data_ref() {
                            printer.feed(d, &mut stdout);
                        }
                    }
                    Err(e) => return Err(ClientError::Protocol(e.to_string())),
                }
            }
            printer.finish(cli.json, &mut stdout);
        }
        Cmd::Sessions { name } => {
            let v = c
                .call("GET", &format!("{}/sessions", sp(name)), None)
                .await?;
            if cli.json {
                print_json(&v);
            } else {
                let mut rows = vec![vec![
                    "ID".into(),
                    "PID".into(),
                    "STATUS".into(),
                    "COMMAND".into(),
                ]];
                for s in v["sessions"].as_array().into_iter().flatten() {
                    let status = match (s["exit_code"].as_i64(), s["exit_signal"].as_i64()) {
                        (Some(c), _) => format!("exited {c}"),
                        (_, Some(sig)) => format!("killed by {sig}"),
                        _ if s["attached"].as_bool() == Some(true) => "running, attached".into(),
                        _ => "running".into(),
                    };
                    let cmd: Vec<&str> = s["args"]
                        .as_array()
                        .into_iter()
                        .flatten()
                        .filter_map(|a| a.as_str())
                        .collect();
                    rows.push(vec![
                        s["id"].as_str().unwrap_or("").into(),
                        s["pid"].to_string(),
                        status,
                        cmd.join(" "),
                    ]);
                }
                vmm_glue::client::print_table(&rows);
            }
        }
        Cmd::Attach { name, session } => {
            return follow(
                c,
                "GET",
                &format!("{}/sessions/{session}/attach", sp(name)),
                None,
                cli.json,
                false,
            )
            .await;
        }
        Cmd::Send {
            name,
            session,
            close,
        } => {
            let mut data = Vec::new();
            let _ = std::io::Read::read_to_end(&mut std::io::stdin(), &mut data);
            let q = if *close { "?close=true" } else { "" };
            c.bytes(
                "POST",
                &format!("{}/sessions/{session}/stdin{q}", sp(name)),
                data.into(),
            )
            .await?;
        }
        Cmd::KillSession {
            name,
            session,
            signal,
        } => {
            c.call(
                "DELETE",
                &format!("{}/sessions/{session}?signal={signal}", sp(name)),
                None,
            )
            .await?;
        }
        Cmd::Hibernate { name, cold } => {
            let mode = if *cold { "cold" } else { "warm" };
            let v = c
                .call(
                    "POST",
                    &format!("{}/hibernate", sp(name)),
                    Some(json!({"mode": mode})),
                )
                .await?;
            print_state_change(cli.json, name, &v);
        }
        Cmd::Wake { name } => {
            let v = c.call("POST", &format!("{}/wake", sp(name)), None).await?;
            print_state_change(cli.json, name, &v);
        }
        Cmd::Put {
            name,
            local,
            remote,
            mode,
        } => {
            let data = match std::fs::read(local) {
                Ok(d) => d,
                Err(e) => {
                    eprintln!("sprited: {}: {e}", local.display());
                    return Ok(1);
                }
            };
            let mut q = format!("{}/fs?path={}", sp(name), enc(remote));
            if let Some(m) = mode {
                q.push_str(&format!("&mode={m}"));
            }
            let v = c.bytes("PUT", &q, data.into()).await?;
            if cli.json {
                println!("{}", String::from_utf8_lossy(&v));
            }
        }
        Cmd::Fetch {
            name,
            remote,
            local,
        } => {
            let data = c
                .bytes(
                    "GET",
                    &format!("{}/fs?path={}", sp(name), enc(remote)),
                    Default::default(),
                )
                .await?;
            match local {
                Some(p) => {
                    if let Err(e) = std::fs::write(p, &data) {
                        eprintln!("sprited: {}: {e}", p.display());
                        return Ok(1);
                    }
                }
                None => {
                    let _ = std::io::stdout().write_all(&data);
                }
            }
        }
        Cmd::Ls { name, path } => {
            let v = c
                .call("GET", &format!("{}/ls?path={}", sp(name), enc(path)), None)
                .await?;
            if cli.json {
                print_json(&v);
            } else {
                let mut rows = vec![vec!["MODE".into(), "SIZE".into(), "NAME".into()]];
                for e in v["entries"].as_array().into_iter().flatten() {
                    let kind = match e["kind"].as_str() {
                        Some("dir") => "d",
                        Some("symlink") => "l",
                        _ => "-",
                    };
                    rows.push(vec![
                        format!("{kind}{:04o}", e["mode"].as_u64().unwrap_or(0)),
                        e["size"].to_string(),
                        e["name"].as_str().unwrap_or("").into(),
                    ]);
                }
                vmm_glue::client::print_table(&rows);
            }
        }
        Cmd::Checkpoint(cc) => match cc {
            CheckpointCmd::Create { name, comment } => {
                let v = c
                    .call(
                        "POST",
                        &format!("{}/checkpoints", sp(name)),
                        Some(json!({"comment": comment})),
                    )
                    .await?;
                if cli.json {
                    print_json(&v);
                } else {
                    println!(
                        "{name}: checkpoint {} (storage {:.1} ms, guest freeze/thaw {:.0} ms)",
                        ck_id(&v["id"]),
                        v["timings"]["storage_ms"].as_f64().unwrap_or(0.0),
                        v["timings"]["vmm_ms"].as_f64().unwrap_or(0.0)
                    );
                }
            }
            CheckpointCmd::List { name } => {
                let v = c
                    .call("GET", &format!("{}/checkpoints", sp(name)), None)
                    .await?;
                if cli.json {
                    print_json(&v);
                } else {
                    let mut rows = vec![vec!["ID".into(), "CREATED".into(), "COMMENT".into()]];
                    for ck in v["checkpoints"].as_array().into_iter().flatten() {
                        rows.push(vec![
                            ck_id(&ck["id"]),
                            ck["created_unix_ms"].to_string(),
                            ck["comment"].as_str().unwrap_or("").into(),
                        ]);
                    }
                    vmm_glue::client::print_table(&rows);
                }
            }
            CheckpointCmd::Restore { name, checkpoint } => {
                let v = c
                    .call(
                        "POST",
                        &format!("{}/checkpoints/{checkpoint}/restore", sp(name)),
                        None,
                    )
                    .await?;
                if cli.json {
                    print_json(&v);
                } else {
                    println!(
                        "{name}: restored {checkpoint} in {:.0} ms (storage {:.1} ms); the replaced state is checkpoint {}",
                        v["timings"]["total_ms"].as_f64().unwrap_or(0.0),
                        v["timings"]["storage_ms"].as_f64().unwrap_or(0.0),
                        ck_id(&v["previous_head"])
                    );
                }
            }
            CheckpointCmd::Delete { name, checkpoint } => {
                c.call(
                    "DELETE",
                    &format!("{}/checkpoints/{checkpoint}", sp(name)),
                    None,
                )
                .await?;
            }
        },
        Cmd::Fork {
            name,
            checkpoint,
            new_name,
            settings,
        } => {
            let v = c
                .call(
                    "POST",
                    &format!("{}/fork", sp(name)),
                    Some(json!({"checkpoint": checkpoint, "name": new_name, "settings": settings.json()})),
                )
                .await?;
            if cli.json {
                print_json(&v);
            } else {
                println!(
                    "forked {name}@{checkpoint} -> {new_name}: {} in {:.0} ms (storage {:.1} ms)",
                    state_of(&v),
                    v["timings"]["total_ms"].as_f64().unwrap_or(0.0),
                    v["timings"]["storage_ms"].as_f64().unwrap_or(0.0)
                );
            }
        }
        Cmd::Usage { name } => {
            print_json(&c.call("GET", &format!("{}/usage", sp(name)), None).await?)
        }
        Cmd::KillVm { name } => {
            c.call("POST", &format!("{}/kill-vm", sp(name)), None)
                .await?;
        }
    }
    Ok(0)
}

/// Prints a command's output stream; returns its exit status (128+signal when killed).
async fn follow(
    c: &Client,
    method: &str,
    path: &str,
    body: Option<Value>,
    json: bool,
    announce: bool,
) -> Result<i32, ClientError> {
    let mut code = None;
    let mut err = None;
    c.stream(method, path, body, |v| {
        if json {
            println!("{v}");
        }
        match v["event"].as_str() {
            Some("output") => {
                if json {
                    return;
                }
                let data = base64::engine::general_purpose::STANDARD
                    .decode(v["data"].as_str().unwrap_or("").as_bytes())
                    .unwrap_or_default();
                if v["stream"] == "stderr" {
                    let _ = std::io::stderr().write_all(&data);
                } else {
                    let mut o = std::io::stdout();
                    let _ = o.write_all(&data);
                    let _ = o.flush();
                }
            }
            Some("started") if !json && announce => {
                if let Some(s) = v["session"].as_str() {
                    eprintln!("[session {s}]");
                }
            }
            Some("exit") => {
                code = Some(match (v["code"].as_i64(), v["signal"].as_i64()) {
                    (Some(c), _) => c as i32,
                    (_, Some(s)) => 128 + s as i32,
                    _ => 1,
                });
            }
            Some("error") => err = Some(v["message"].as_str().unwrap_or("error").to_string()),
            _ => {}
        }
    })
    .await?;
    if let Some(e) = err {
        eprintln!("sprited: {e}");
        return Ok(6);
    }
    Ok(code.unwrap_or(0))
}
