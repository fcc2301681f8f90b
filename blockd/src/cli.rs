//! The operator CLI: `blockd serve` and the admin commands that talk to a running daemon.
//! Every admin command takes `--json`; exit codes are documented in docs/blockd.md.

use crate::client::{AdminClient, ClientError};
use crate::config::Config;
use crate::size::{format_size, parse_size};
use clap::{Args, Parser, Subcommand};
use serde_json::{Value, json};
use std::net::SocketAddr;
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(
    name = "blockd",
    version,
    about = "Block daemon for sprites: volumes with O(1) checkpoints, served over NBD and vhost-user-blk"
)]
pub struct Cli {
    /// Admin socket of the daemon (default: <data-dir>/admin.sock).
    #[arg(long, global = true, env = "BLOCKD_ADMIN_SOCKET")]
    pub admin_socket: Option<PathBuf>,
    /// Data directory (default /var/lib/sprites/blockd).
    #[arg(long, global = true, env = "BLOCKD_DATA_DIR")]
    pub data_dir: Option<PathBuf>,
    /// Print machine-readable JSON.
    #[arg(long, global = true)]
    pub json: bool,
    #[command(subcommand)]
    pub cmd: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the daemon.
    Serve(ServeArgs),
    /// Show the running daemon's status.
    Status,
    /// Manage volumes.
    #[command(subcommand)]
    Volume(VolumeCmd),
    /// Manage checkpoints.
    #[command(subcommand)]
    Checkpoint(CheckpointCmd),
}

#[derive(Debug, Args)]
pub struct ServeArgs {
    /// TOML config file (see docs/blockd.md); flags override it.
    #[arg(long, short)]
    pub config: Option<PathBuf>,
    /// NBD unix socket (default <data-dir>/nbd.sock).
    #[arg(long)]
    pub nbd_socket: Option<PathBuf>,
    /// Also serve NBD on this TCP address (no authentication or TLS: loopback or trusted networks only).
    #[arg(long)]
    pub nbd_tcp: Option<SocketAddr>,
    /// Prometheus /metrics address ("" disables; default 127.0.0.1:9490).
    #[arg(long)]
    pub metrics_addr: Option<String>,
    /// Log filter (e.g. info, blockd=debug). RUST_LOG wins when set.
    #[arg(long)]
    pub log: Option<String>,
    /// Local segment file size (e.g. 64M).
    #[arg(long, value_parser = parse_size)]
    pub segment_size: Option<u64>,
    /// Disable O_DIRECT for segment I/O.
    #[arg(long)]
    pub no_direct_io: bool,
    /// Async worker threads (0 = half the CPUs).
    #[arg(long)]
    pub worker_threads: Option<usize>,
    /// Directory of the per-volume vhost-user-blk sockets (default <data-dir>/vhost).
    #[arg(long)]
    pub vhost_dir: Option<PathBuf>,
    /// Do not serve volumes over vhost-user-blk.
    #[arg(long)]
    pub no_vhost: bool,
}

#[derive(Debug, Subcommand)]
pub enum VolumeCmd {
    /// Create a volume.
    Create {
        name: String,
        /// Logical size (e.g. 10G, 512M; a multiple of 4K).
        #[arg(long, value_parser = parse_size)]
        size: u64,
    },
    /// List volumes.
    List,
    /// Show a volume's sizes and accounting.
    Stat { name: String },
    /// Create a new volume from a checkpoint: NAME@CHECKPOINT NEW (copies no data).
    Clone { source: String, new_name: String },
    /// Delete a volume and its checkpoints.
    Delete {
        name: String,
        /// Disconnect attached clients first.
        #[arg(long)]
        force: bool,
    },
    /// Make every acknowledged write durable now.
    Flush { name: String },
    /// Upload the volume's data and a manifest to the object store (a barrier: when it
    /// returns, a fresh host can open the volume from the bucket alone).
    Sync { name: String },
    /// Take a local volume's lease in the object store (--force: from the daemon holding it),
    /// so this daemon may write it again.
    Claim {
        name: String,
        #[arg(long)]
        force: bool,
    },
    /// Open a volume from the object store (cold open: metadata only; data on demand).
    Import {
        /// Name of the volume in the object store.
        name: String,
        /// Local name (default: the same).
        #[arg(long = "as")]
        as_name: Option<String>,
        /// Take the volume over from the daemon holding it (that daemon's writes stop).
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Subcommand)]
pub enum CheckpointCmd {
    /// Checkpoint a volume's current content (O(1), no data copied).
    Create {
        name: String,
        #[arg(long, default_value = "")]
        comment: String,
    },
    /// List a volume's checkpoints.
    List { name: String },
    /// Show one checkpoint.
    Show { name: String, checkpoint: String },
    /// Restore a checkpoint; the replaced head is kept as an automatic checkpoint.
    Restore {
        name: String,
        checkpoint: String,
        /// Disconnect attached clients first (otherwise refused while any are attached).
        #[arg(long)]
        force: bool,
    },
    /// Delete a checkpoint (space only it held is released in the background).
    Delete { name: String, checkpoint: String },
}

impl Cli {
    pub fn config_for_serve(&self, a: &ServeArgs) -> Result<Config, String> {
        let mut cfg = match &a.config {
            Some(p) => Config::load(p)?,
            None => Config::default(),
        };
        if let Some(d) = &self.data_dir {
            cfg.data_dir = d.clone();
        }
        if let Some(s) = &self.admin_socket {
            cfg.admin_socket = Some(s.clone());
        }
        if let Some(s) = &a.nbd_socket {
            cfg.nbd.socket = Some(s.clone());
        }
        if let Some(t) = a.nbd_tcp {
            cfg.nbd.tcp = Some(t);
        }
        if let Some(m) = &a.metrics_addr {
            cfg.metrics.addr = m.clone();
        }
        if let Some(l) = &a.log {
            cfg.log = l.clone();
        }
        if let Some(s) = a.segment_size {
            cfg.storage.segment_size = s;
        }
        if a.no_direct_io {
            cfg.storage.direct_io = false;
        }
        if let Some(n) = a.worker_threads {
            cfg.runtime.worker_threads = n;
        }
        if let Some(d) = &a.vhost_dir {
            cfg.vhost.dir = Some(d.clone());
        }
        if a.no_vhost {
            cfg.vhost.enabled = false;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    fn client(&self) -> AdminClient {
        let socket = match (&self.admin_socket, &self.data_dir) {
            (Some(s), _) => s.clone(),
            (None, Some(d)) => d.join("admin.sock"),
            (None, None) => Config::default().admin_socket(),
        };
        AdminClient::new(&socket)
    }

    /// Runs an admin command; returns the process exit code.
    pub async fn run_admin(&self) -> i32 {
        match self.admin().await {
            Ok(()) => 0,
            Err(e) => {
                if self.json {
                    let code = match &e {
                        ClientError::Api { code, .. } => json!(code),
                        ClientError::Unreachable { .. } => json!("unreachable"),
                        ClientError::Protocol(_) => json!("internal"),
                    };
                    println!(
                        "{}",
                        json!({"error": {"code": code, "message": e.to_string()}})
                    );
                } else {
                    eprintln!("error: {e}");
                }
                e.exit_code()
            }
        }
    }

    async fn admin(&self) -> Result<(), ClientError> {
        let c = self.client();
        let esc = |s: &str| -> String {
            s.bytes()
                .map(|b| match b {
                    b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'.' | b'_' | b'~' => {
                        (b as char).to_string()
                    }
                    _ => format!("%{b:02X}"),
                })
                .collect()
        };
        match &self.cmd {
            Command::Serve(_) => unreachable_serve(),
            Command::Status => {
                let v = c.call("GET", "/v1/status", None).await?;
                self.print(&v, || print_kv(&v));
            }
            Command::Volume(cmd) => match cmd {
                VolumeCmd::Create { name, size } => {
                    let v = c
                        .call(
                            "POST",
                            "/v1/volumes",
                            Some(json!({"name": name, "size_bytes": size})),
                        )
                        .await?;
                    self.print(&v, || {
                        println!("created volume {name} ({})", format_size(*size))
                    });
                }
                VolumeCmd::List => {
                    let v = c.call("GET", "/v1/volumes", None).await?;
                    self.print(&v, || print_volume_table(&v["volumes"]));
                }
                VolumeCmd::Stat { name } => {
                    let v = c
                        .call("GET", &format!("/v1/volumes/{}", esc(name)), None)
                        .await?;
                    self.print(&v, || print_stat(&v));
                }
                VolumeCmd::Clone { source, new_name } => {
                    let Some((src, cp)) = source.rsplit_once('@') else {
                        return Err(ClientError::Api {
                            status: 400,
                            code: crate::ErrorCode::InvalidArgument,
                            message: format!(
                                "expected NAME@CHECKPOINT (e.g. base@v1), got {source:?}"
                            ),
                        });
                    };
                    let v = c
                        .call(
                            "POST",
                            &format!("/v1/volumes/{}/clone", esc(src)),
                            Some(json!({"checkpoint": cp, "name": new_name})),
                        )
                        .await?;
                    self.print(&v, || println!("created volume {new_name} from {src}@{cp}"));
                }
                VolumeCmd::Delete { name, force } => {
                    c.call(
                        "DELETE",
                        &format!("/v1/volumes/{}?force={force}", esc(name)),
                        None,
                    )
                    .await?;
                    self.print(&json!({"deleted": name}), || {
                        println!("deleted volume {name}")
                    });
                }
                VolumeCmd::Sync { name } => {
                    let v = c
                        .call("POST", &format!("/v1/volumes/{}/sync", esc(name)), None)
                        .await?;
                    self.print(&v, || {
                        println!(
                            "synced {name}: {} segment(s) uploaded, {} of {} map page(s) new, {} ms",
                            v["segments_uploaded"], v["pages_uploaded"], v["pages"], v["duration_ms"]
                        )
                    });
                }
                VolumeCmd::Claim { name, force } => {
                    let v = c
                        .call(
                            "POST",
                            &format!("/v1/volumes/{}/claim", esc(name)),
                            Some(json!({"force": force})),
                        )
                        .await?;
                    self.print(&v, || {
                        println!("{name}: lease generation {}", v["lease_generation"])
                    });
                }
                VolumeCmd::Import {
                    name,
                    as_name,
                    force,
                } => {
                    let v = c
                        .call(
                            "POST",
                            "/v1/import",
                            Some(json!({"name": name, "as": as_name, "force": force})),
                        )
                        .await?;
                    self.print(&v, || {
                        println!(
                            "imported {} as {}: {} map entries, {} of metadata, {} ms",
                            name,
                            v["name"].as_str().unwrap_or(name),
                            v["entries"],
                            bytes(&v["metadata_bytes"]),
                            v["duration_ms"]
                        )
                    });
                }
                VolumeCmd::Flush { name } => {
                    c.call("POST", &format!("/v1/volumes/{}/flush", esc(name)), None)
                        .await?;
                    self.print(&json!({"flushed": name}), || println!("flushed {name}"));
                }
            },
            Command::Checkpoint(cmd) => match cmd {
                CheckpointCmd::Create { name, comment } => {
                    let v = c
                        .call(
                            "POST",
                            &format!("/v1/volumes/{}/checkpoints", esc(name)),
                            Some(json!({"comment": comment})),
                        )
                        .await?;
                    self.print(&v, || {
                        println!(
                            "created checkpoint {} of {name}",
                            v["id"]
                                .as_u64()
                                .map(|n| format!("v{n}"))
                                .unwrap_or_default()
                        )
                    });
                }
                CheckpointCmd::List { name } => {
                    let v = c
                        .call(
                            "GET",
                            &format!("/v1/volumes/{}/checkpoints", esc(name)),
                            None,
                        )
                        .await?;
                    self.print(&v, || print_checkpoint_table(&v["checkpoints"]));
                }
                CheckpointCmd::Show { name, checkpoint } => {
                    let v = c
                        .call(
                            "GET",
                            &format!("/v1/volumes/{}/checkpoints/{}", esc(name), esc(checkpoint)),
                            None,
                        )
                        .await?;
                    self.print(&v, || print_kv(&v));
                }
                CheckpointCmd::Restore {
                    name,
                    checkpoint,
                    force,
                } => {
                    let v = c
                        .call(
                            "POST",
                            &format!(
                                "/v1/volumes/{}/checkpoints/{}/restore",
                                esc(name),
                                esc(checkpoint)
                            ),
                            Some(json!({"force": force})),
                        )
                        .await?;
                    self.print(&v, || {
                        let prev = v["previous_head"]["id"].as_u64().unwrap_or(0);
                        println!("restored {name} to {checkpoint}; the previous head is checkpoint v{prev}");
                    });
                }
                CheckpointCmd::Delete { name, checkpoint } => {
                    c.call(
                        "DELETE",
                        &format!("/v1/volumes/{}/checkpoints/{}", esc(name), esc(checkpoint)),
                        None,
                    )
                    .await?;
                    self.print(&json!({"deleted": checkpoint, "volume": name}), || {
                        println!("deleted checkpoint {checkpoint} of {name}")
                    });
                }
            },
        }
        Ok(())
    }

    fn print(&self, v: &Value, human: impl FnOnce()) {
        if self.json {
            println!("{}", serde_json::to_string_pretty(v).unwrap_or_default());
        } else {
            human();
        }
    }
}

fn unreachable_serve() -> ! {
    // `serve` is dispatched before admin commands.
    std::process::exit(2)
}

fn bytes(v: &Value) -> String {
    v.as_u64().map(format_size).unwrap_or_else(|| "-".into())
}

fn print_kv(v: &Value) {
    if let Some(o) = v.as_object() {
        let w = o.keys().map(|k| k.len()).max().unwrap_or(0);
        for (k, val) in o {
            let s = match val {
                Value::String(s) => s.clone(),
                Value::Null => "-".into(),
                other => other.to_string(),
            };
            println!("{k:<w$}  {s}");
        }
    }
}

fn print_stat(v: &Value) {
    println!(
        "name                   {}",
        v["name"].as_str().unwrap_or("-")
    );
    println!("size                   {}", bytes(&v["size_bytes"]));
    println!("head (written)         {}", bytes(&v["head_bytes"]));
    println!("  shared with source   {}", bytes(&v["head_shared_bytes"]));
    println!(
        "checkpoint-only        {}",
        bytes(&v["checkpoint_only_bytes"])
    );
    println!("held (owned)           {}", bytes(&v["owned_bytes"]));
    println!("local on disk          {}", bytes(&v["local_bytes"]));
    println!("object store (stored)  {}", bytes(&v["stored_bytes"]));
    println!(
        "  head / checkpoints   {} / {}",
        bytes(&v["stored_head_bytes"]),
        bytes(&v["stored_checkpoint_only_bytes"])
    );
    println!("checkpoints            {}", v["checkpoints"]);
    println!("attached clients       {}", v["attached_clients"]);
    if let Some(src) = v["cloned_from"].as_str() {
        println!("cloned from            {src}");
    }
}

fn table(headers: &[&str], rows: Vec<Vec<String>>) {
    let mut w: Vec<usize> = headers.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (i, c) in r.iter().enumerate() {
            w[i] = w[i].max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .enumerate()
            .map(|(i, c)| format!("{c:<width$}", width = w[i]))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(headers.iter().map(|h| h.to_string()).collect());
    for r in rows {
        line(r);
    }
}

fn print_volume_table(vols: &Value) {
    let rows = vols
        .as_array()
        .map(|a| {
            a.iter()
                .map(|v| {
                    vec![
                        v["name"].as_str().unwrap_or("-").to_string(),
                        bytes(&v["size_bytes"]),
                        bytes(&v["head_bytes"]),
                        bytes(&v["checkpoint_only_bytes"]),
                        v["checkpoints"].to_string(),
                        v["attached_clients"].to_string(),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(
        &[
            "NAME",
            "SIZE",
            "HEAD",
            "CHECKPOINT-ONLY",
            "CHECKPOINTS",
            "CLIENTS",
        ],
        rows,
    );
}

fn print_checkpoint_table(cps: &Value) {
    let rows = cps
        .as_array()
        .map(|a| {
            a.iter()
                .map(|c| {
                    let ms = c["created_unix_ms"].as_u64().unwrap_or(0);
                    vec![
                        format!("v{}", c["id"].as_u64().unwrap_or(0)),
                        c["kind"].as_str().unwrap_or("-").to_string(),
                        format_unix_ms(ms),
                        bytes(&json!(
                            c["head_blocks"].as_i64().unwrap_or(0).max(0) as u64 * 4096
                        )),
                        c["comment"].as_str().unwrap_or("").to_string(),
                    ]
                })
                .collect()
        })
        .unwrap_or_default();
    table(&["ID", "KIND", "CREATED (UTC)", "HEAD", "COMMENT"], rows);
}

/// `YYYY-MM-DD HH:MM:SS` from unix milliseconds (UTC), without a date library.
fn format_unix_ms(ms: u64) -> String {
    let secs = ms / 1000;
    let (days, rem) = (secs / 86400, secs % 86400);
    // Civil-from-days (Howard Hinnant's algorithm).
    let z = days as i64 + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36524 - doe / 146_096) / 365;
    let y = yoe + era * 400;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = if m <= 2 { y + 1 } else { y };
    format!(
        "{y:04}-{m:02}-{d:02} {:02}:{:02}:{:02}",
        rem / 3600,
        rem % 3600 / 60,
        rem % 60
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates() {
        assert_eq!(format_unix_ms(0), "1970-01-01 00:00:00");
        assert_eq!(format_unix_ms(1_795_000_000_000), "2026-11-18 11:06:40");
        assert_eq!(format_unix_ms(951_782_400_000), "2000-02-29 00:00:00");
    }

    #[test]
    fn cli_parses() {
        let c = Cli::try_parse_from(["blockd", "volume", "create", "a", "--size", "10G", "--json"])
            .unwrap();
        assert!(c.json);
        assert!(
            matches!(c.cmd, Command::Volume(VolumeCmd::Create { size, .. }) if size == 10 << 30)
        );
        assert!(Cli::try_parse_from(["blockd", "volume", "create", "a", "--size", "ten"]).is_err());
        let c =
            Cli::try_parse_from(["blockd", "checkpoint", "restore", "a", "v2", "--force"]).unwrap();
        assert!(matches!(
            c.cmd,
            Command::Checkpoint(CheckpointCmd::Restore { force: true, .. })
        ));
    }
}
