//! The sprite manager: sprites, their states and transitions, the idle timers (warm then
//! cold hibernation), wake, exec, files, checkpoint/restore/fork and metering.
//!
//! One lifecycle operation runs at a time per sprite (`Sprite::op`); readers (get, list) never
//! wait for it. Every step has a timeout and a failure ends in `error` with the reason.

use crate::agent_client::{AgentConn, AgentError, EventStream, GuestError};
use crate::image::{self, ImageRecord};
use crate::proto::{ActivityInfo, Event, ExecSpec, Op};
use crate::vm::{Launcher, Vm, VmSpec};
use blockd::client::{AdminClient, ClientError};
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use std::collections::{HashMap, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub fn write_json_atomic<T: Serialize>(path: &Path, v: &T) -> std::io::Result<()> {
    if let Some(d) = path.parent() {
        std::fs::create_dir_all(d)?;
    }
    let tmp = path.with_extension("json.tmp");
    let data = serde_json::to_vec_pretty(v).map_err(std::io::Error::other)?;
    {
        use std::io::Write;
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(&data)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)
}

/// Sprite names: 1-40 of `a-z 0-9 -`, starting with a letter or digit (they appear in host
/// names and volume names).
pub fn validate_name(name: &str) -> std::result::Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 40
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !name.starts_with('-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid name {name:?}: use 1-40 characters a-z, 0-9 and '-', not starting with '-'"
        ))
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Pending,
    Active,
    Hibernating,
    Hibernated,
    Waking,
    Error,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Pause {
    /// vCPUs stopped, memory kept: processes resume where they were.
    Warm,
    /// VM gone, volume synced: the next wake boots.
    Cold,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Transition {
    pub at_ms: u64,
    pub from: State,
    pub to: State,
    pub reason: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Settings {
    pub vcpus: u32,
    pub memory_mib: u64,
    /// Idle time before a warm pause (0: never).
    pub idle_warm_secs: u64,
    /// Time paused warm before going cold (0: never by time).
    pub idle_cold_secs: u64,
    /// Guest port the sprite URL reaches.
    pub http_port: u16,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            vcpus: 1,
            memory_mib: 512,
            idle_warm_secs: 30,
            idle_cold_secs: 600,
            http_port: 8080,
        }
    }
}

/// Optional overrides (API bodies).
#[derive(Debug, Clone, Default, Serialize, Deserialize, schemars::JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SettingsPatch {
    pub vcpus: Option<u32>,
    pub memory_mib: Option<u64>,
    pub idle_warm_secs: Option<u64>,
    pub idle_cold_secs: Option<u64>,
    pub http_port: Option<u16>,
}

impl SettingsPatch {
    pub fn apply(&self, s: &mut Settings) -> std::result::Result<(), String> {
        let mut n = s.clone();
        if let Some(v) = self.vcpus {
            n.vcpus = v;
        }
        if let Some(v) = self.memory_mib {
            n.memory_mib = v;
        }
        if let Some(v) = self.idle_warm_secs {
            n.idle_warm_secs = v;
        }
        if let Some(v) = self.idle_cold_secs {
            n.idle_cold_secs = v;
        }
        if let Some(v) = self.http_port {
            n.http_port = v;
        }
        if !(1..=16).contains(&n.vcpus) {
            return Err(format!("vcpus must be 1..16, got {}", n.vcpus));
        }
        if !(64..=65536).contains(&n.memory_mib) {
            return Err(format!(
                "memory_mib must be 64..65536, got {}",
                n.memory_mib
            ));
        }
        if n.http_port == 0 {
            return Err("http_port must be 1..65535".into());
        }
        *s = n;
        Ok(())
    }
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
pub struct Usage {
    /// Host CPU time of the VMM process while the sprite ran.
    pub cpu_seconds: f64,
    /// Configured memory times running time.
    pub memory_mib_seconds: f64,
    pub running_seconds: f64,
    pub boots: u64,
    pub warm_wakes: u64,
    pub warm_pauses: u64,
    pub cold_pauses: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpriteRecord {
    pub name: String,
    pub volume: String,
    pub image: String,
    /// `sprite@checkpoint` this one was forked from.
    pub forked_from: Option<String>,
    pub created_at_ms: u64,
    pub state: State,
    /// Set while hibernated.
    pub pause: Option<Pause>,
    pub reason: String,
    pub transitions: VecDeque<Transition>,
    pub settings: Settings,
    pub usage: Usage,
}

const MAX_TRANSITIONS: usize = 64;

/// Timings of a lifecycle operation, split into storage (blockd) and VMM/guest time.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct Timings {
    pub storage_ms: f64,
    pub vmm_ms: f64,
    pub total_ms: f64,
}

#[derive(Debug, thiserror::Error)]
pub enum SpriteError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Conflict(String),
    /// The sprite could not be made to run (boot failed, runtime not answering).
    #[error("{0}")]
    Unavailable(String),
    #[error("{0}")]
    Internal(String),
}

impl SpriteError {
    pub fn code(&self) -> &'static str {
        match self {
            SpriteError::NotFound(_) => "not_found",
            SpriteError::AlreadyExists(_) => "already_exists",
            SpriteError::Invalid(_) => "invalid_argument",
            SpriteError::Conflict(_) => "conflict",
            SpriteError::Unavailable(_) => "unavailable",
            SpriteError::Internal(_) => "internal",
        }
    }

    pub fn http_status(&self) -> u16 {
        match self {
            SpriteError::NotFound(_) => 404,
            SpriteError::AlreadyExists(_) | SpriteError::Conflict(_) => 409,
            SpriteError::Invalid(_) => 400,
            SpriteError::Unavailable(_) => 503,
            SpriteError::Internal(_) => 500,
        }
    }
}

impl From<ClientError> for SpriteError {
    fn from(e: ClientError) -> Self {
        use blockd::error::ErrorCode;
        match &e {
            ClientError::Api { code, .. } => match code {
                ErrorCode::NotFound => SpriteError::NotFound(format!("blockd: {e}")),
                ErrorCode::AlreadyExists => SpriteError::AlreadyExists(format!("blockd: {e}")),
                ErrorCode::InvalidArgument => SpriteError::Invalid(format!("blockd: {e}")),
                ErrorCode::Busy => SpriteError::Conflict(format!("blockd: {e}")),
                ErrorCode::Unavailable => SpriteError::Unavailable(format!("blockd: {e}")),
                ErrorCode::Internal => SpriteError::Internal(format!("blockd: {e}")),
            },
            ClientError::Unreachable { .. } => SpriteError::Unavailable(e.to_string()),
            ClientError::Protocol(_) => SpriteError::Internal(e.to_string()),
        }
    }
}

impl From<AgentError> for SpriteError {
    fn from(e: AgentError) -> Self {
        match e {
            AgentError::Guest(g) if g.is(crate::proto::ERR_NOT_FOUND) => {
                SpriteError::NotFound(g.message)
            }
            AgentError::Guest(g) => SpriteError::Invalid(g.message),
            other => SpriteError::Unavailable(format!("guest runtime: {other}")),
        }
    }
}

type Result<T> = std::result::Result<T, SpriteError>;

#[derive(Debug, Clone)]
pub struct ManagerConfig {
    pub data_dir: PathBuf,
    pub blockd_socket: PathBuf,
    pub default_image: String,
    pub defaults: Settings,
    /// Host name suffix of sprite URLs: `<name>.<domain>`.
    pub domain: String,
    /// Public base URL of the proxy (for `url` in sprite records), e.g. `http://127.0.0.1:8480`.
    pub proxy_url: Option<String>,
    pub boot_timeout: Duration,
    pub agent_timeout: Duration,
    /// Warm-paused sprites go cold while the host's MemAvailable is below this (MiB; 0: off).
    pub min_mem_available_mib: u64,
    /// Boot again after the VMM dies unexpectedly (else the sprite goes to `error` and the
    /// next request boots it).
    pub restart_on_crash: bool,
    /// Path of the sprite-agent binary (image builds).
    pub agent_bin: PathBuf,
}

struct Running {
    vm: Box<dyn Vm>,
    agent: AgentConn,
    cpu_ticks: Mutex<Option<u64>>,
}

struct Sprite {
    rec: Mutex<SpriteRecord>,
    op: tokio::sync::Mutex<()>,
    run: Mutex<Option<Arc<Running>>>,
    last_activity: Mutex<Instant>,
    busy: AtomicUsize,
    paused_at: Mutex<Option<Instant>>,
    last_meter: Mutex<Instant>,
    dirty: std::sync::atomic::AtomicBool,
    last_saved: Mutex<Instant>,
}

impl Sprite {
    fn running(&self) -> Option<Arc<Running>> {
        self.run.lock().clone()
    }

    fn touch(&self) {
        *self.last_activity.lock() = Instant::now();
    }
}

/// Keeps a sprite awake while held (an exec, a proxied connection).
pub struct ActivityGuard {
    sprite: Arc<Sprite>,
}

impl std::fmt::Debug for ActivityGuard {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ActivityGuard")
    }
}

impl ActivityGuard {
    fn new(sprite: Arc<Sprite>) -> ActivityGuard {
        sprite.busy.fetch_add(1, Ordering::SeqCst);
        sprite.touch();
        ActivityGuard { sprite }
    }

    /// Records activity that is not a held guard (stdin arriving, output flowing).
    pub fn touch(&self) {
        self.sprite.touch();
    }
}

impl Drop for ActivityGuard {
    fn drop(&mut self) {
        self.sprite.busy.fetch_sub(1, Ordering::SeqCst);
        self.sprite.touch();
    }
}

/// What the sprite's management API answered ([`Manager::runtime_api`]).
#[derive(Debug)]
pub enum RuntimeReply {
    /// Status and JSON body (`Null` for 204).
    Json(u16, serde_json::Value),
    /// Status, then NDJSON lines as `output` events until `exit`; the guard keeps the sprite
    /// awake while it streams.
    Stream {
        status: u16,
        events: EventStream,
        guard: ActivityGuard,
    },
}

/// A command started in a sprite. Dropping it kills a non-detachable command.
#[derive(Debug)]
pub struct ExecHandle {
    pub session: String,
    pub pid: u32,
    pub events: EventStream,
    pub agent: AgentConn,
    pub detachable: bool,
    pub guard: ActivityGuard,
    finished: bool,
    exited: bool,
}

impl ExecHandle {
    /// Next output/exit event; `None` once the exit was seen or the VM went away.
    pub async fn next(&mut self) -> Option<Event> {
        if self.finished {
            return None;
        }
        let ev = self.events.next().await;
        self.guard.touch();
        if matches!(ev, Some(Event::Exit { .. })) {
            self.exited = true;
        }
        if matches!(ev, Some(Event::Exit { .. }) | None) {
            self.finished = true;
        }
        ev
    }

    /// The stream ended without an exit event (the VM or its runtime went away).
    pub fn finished_without_exit(&self) -> bool {
        self.finished && !self.exited
    }

    pub fn stdin(&self, data: Vec<u8>) -> Result<()> {
        self.guard.touch();
        self.agent
            .notify(Op::Stdin {
                session: self.session.clone(),
                data,
            })
            .map_err(Into::into)
    }

    pub fn close_stdin(&self) -> Result<()> {
        self.agent
            .notify(Op::CloseStdin {
                session: self.session.clone(),
            })
            .map_err(Into::into)
    }
}

impl Drop for ExecHandle {
    fn drop(&mut self) {
        if self.finished {
            return;
        }
        let session = self.session.clone();
        let op = if self.detachable {
            Op::Detach { session }
        } else {
            Op::Kill {
                session,
                signal: libc::SIGKILL,
            }
        };
        let _ = self.agent.notify(op);
    }
}

/// A sprite as reported to users.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct SpriteView {
    #[serde(flatten)]
    pub record: SpriteRecord,
    pub url: Option<String>,
    /// Idle time (ms) as the manager sees it.
    pub idle_ms: u64,
    pub storage: Option<serde_json::Value>,
    pub vmm: Option<String>,
}

#[derive(Debug)]
pub struct Manager {
    cfg: ManagerConfig,
    blockd: AdminClient,
    launcher: Arc<dyn Launcher>,
    vhost_dir: PathBuf,
    object_store: bool,
    nbd_socket: PathBuf,
    sprites: Mutex<HashMap<String, Arc<Sprite>>>,
    wake_observer: std::sync::OnceLock<Observer>,
}

struct Observer(WakeObserver);

impl std::fmt::Debug for Observer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("WakeObserver")
    }
}

/// Called after every successful wake with its kind and duration (metrics).
pub type WakeObserver = Box<dyn Fn(Pause, Duration) + Send + Sync>;

impl std::fmt::Debug for Sprite {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sprite")
            .field("name", &self.rec.lock().name)
            .finish()
    }
}

fn sprites_dir(cfg: &ManagerConfig) -> PathBuf {
    cfg.data_dir.join("sprites")
}

pub fn images_dir(data_dir: &Path) -> PathBuf {
    data_dir.join("images")
}

fn volume_of(name: &str) -> String {
    format!("sprite-{name}")
}

impl Manager {
    /// Opens the manager: asks blockd where its sockets are, loads the sprites. Sprites that
    /// were running when the previous manager stopped are cold now (their VMs died with it).
    pub async fn open(
        cfg: ManagerConfig,
        launcher: Arc<dyn Launcher>,
    ) -> anyhow::Result<Arc<Manager>> {
        let blockd = AdminClient::new(&cfg.blockd_socket);
        let status = blockd
            .call("GET", "/v1/status", None)
            .await
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        let vhost_dir = status["vhost_dir"]
            .as_str()
            .map(PathBuf::from)
            .ok_or_else(|| {
                anyhow::anyhow!(
                    "blockd serves no vhost-user sockets (vhost.enabled = false); sprites need them"
                )
            })?;
        let nbd_socket = status["nbd_socket"]
            .as_str()
            .map(PathBuf::from)
            .unwrap_or_default();
        let object_store = status["object_store"].as_bool().unwrap_or(false);
        let mut sprites = HashMap::new();
        let mut stale = Vec::new();
        if let Ok(rd) = std::fs::read_dir(sprites_dir(&cfg)) {
            for e in rd.flatten() {
                if e.path().extension().is_none_or(|x| x != "json") {
                    continue;
                }
                let Ok(data) = std::fs::read(e.path()) else {
                    continue;
                };
                let mut rec: SpriteRecord = match serde_json::from_slice(&data) {
                    Ok(r) => r,
                    Err(err) => {
                        tracing::warn!(path = %e.path().display(), %err, "skipping unreadable sprite record");
                        continue;
                    }
                };
                if matches!(
                    rec.state,
                    State::Active | State::Hibernating | State::Waking
                ) || rec.pause == Some(Pause::Warm)
                {
                    push_transition(
                        &mut rec,
                        State::Hibernated,
                        "manager restarted: the VM stopped with it",
                    );
                    rec.pause = Some(Pause::Cold);
                    stale.push(rec.name.clone());
                }
                let name = rec.name.clone();
                sprites.insert(name, Arc::new(new_sprite(rec)));
            }
        }
        let m = Arc::new(Manager {
            cfg,
            blockd,
            launcher,
            vhost_dir,
            object_store,
            nbd_socket,
            sprites: Mutex::new(sprites),
            wake_observer: std::sync::OnceLock::new(),
        });
        // Only the records changed above need writing.
        for name in stale {
            if let Some(s) = m.sprites.lock().get(&name) {
                m.persist(s);
            }
        }
        Ok(m)
    }

    pub fn config(&self) -> &ManagerConfig {
        &self.cfg
    }

    pub fn blockd(&self) -> &AdminClient {
        &self.blockd
    }

    pub fn nbd_socket(&self) -> &Path {
        &self.nbd_socket
    }

    pub fn launcher_name(&self) -> String {
        self.launcher.name()
    }

    fn persist(&self, s: &Sprite) {
        let rec = s.rec.lock().clone();
        let p = sprites_dir(&self.cfg).join(format!("{}.json", rec.name));
        if let Err(e) = write_json_atomic(&p, &rec) {
            tracing::error!(sprite = %rec.name, %e, "cannot save the sprite record");
        }
        s.dirty.store(false, Ordering::Relaxed);
        *s.last_saved.lock() = Instant::now();
    }

    fn get(&self, name: &str) -> Result<Arc<Sprite>> {
        self.sprites
            .lock()
            .get(name)
            .cloned()
            .ok_or_else(|| SpriteError::NotFound(format!("no sprite named {name:?}")))
    }

    fn set_state(&self, s: &Sprite, to: State, pause: Option<Pause>, reason: &str) {
        {
            let mut r = s.rec.lock();
            push_transition(&mut r, to, reason);
            r.pause = pause;
        }
        tracing::info!(sprite = %s.rec.lock().name, state = ?to, ?pause, reason, "state");
        self.persist(s);
    }

    fn image(&self, name: &str) -> Result<ImageRecord> {
        image::load(&images_dir(&self.cfg.data_dir), name)
            .map_err(|e| SpriteError::NotFound(format!("{e:#}")))
    }

    pub fn view(&self, name: &str) -> Result<SpriteView> {
        let s = self.get(name)?;
        Ok(self.view_of(&s))
    }

    fn view_of(&self, s: &Sprite) -> SpriteView {
        let record = s.rec.lock().clone();
        let url = self
            .cfg
            .proxy_url
            .as_ref()
            .map(|base| format!("{}/s/{}/", base.trim_end_matches('/'), record.name));
        SpriteView {
            url,
            idle_ms: s.last_activity.lock().elapsed().as_millis() as u64,
            storage: None,
            vmm: s.running().map(|_| self.launcher.name()),
            record,
        }
    }

    /// A sprite with blockd's storage figures for its volume.
    pub async fn describe(&self, name: &str) -> Result<SpriteView> {
        let mut v = self.view(name)?;
        v.storage = self
            .blockd
            .call("GET", &format!("/v1/volumes/{}", v.record.volume), None)
            .await
            .ok();
        Ok(v)
    }

    pub fn list(&self) -> Vec<SpriteView> {
        let mut v: Vec<SpriteView> = self
            .sprites
            .lock()
            .values()
            .map(|s| self.view_of(s))
            .collect();
        v.sort_by(|a, b| a.record.name.cmp(&b.record.name));
        v
    }

    /// Creates a sprite (its root volume an O(1) clone of the image's checkpoint) and boots it.
    pub async fn create(
        self: &Arc<Self>,
        name: &str,
        image: Option<&str>,
        patch: &SettingsPatch,
    ) -> Result<(SpriteView, Timings)> {
        validate_name(name).map_err(SpriteError::Invalid)?;
        let mut settings = self.cfg.defaults.clone();
        patch.apply(&mut settings).map_err(SpriteError::Invalid)?;
        let image_name = image.unwrap_or(&self.cfg.default_image).to_string();
        let img = self.image(&image_name)?;
        self.create_from(
            name,
            &img.volume,
            &img.checkpoint,
            &image_name,
            None,
            settings,
        )
        .await
    }

    async fn create_from(
        self: &Arc<Self>,
        name: &str,
        src_volume: &str,
        checkpoint: &str,
        image: &str,
        forked_from: Option<String>,
        settings: Settings,
    ) -> Result<(SpriteView, Timings)> {
        let t0 = Instant::now();
        let sprite = {
            let mut map = self.sprites.lock();
            if map.contains_key(name) {
                return Err(SpriteError::AlreadyExists(format!(
                    "sprite {name:?} already exists"
                )));
            }
            let mut rec = SpriteRecord {
                name: name.to_string(),
                volume: volume_of(name),
                image: image.to_string(),
                forked_from,
                created_at_ms: now_ms(),
                state: State::Pending,
                pause: None,
                reason: "created".into(),
                transitions: VecDeque::new(),
                settings,
                usage: Usage::default(),
            };
            rec.transitions.push_back(Transition {
                at_ms: rec.created_at_ms,
                from: State::Pending,
                to: State::Pending,
                reason: "created".into(),
            });
            let s = Arc::new(new_sprite(rec));
            map.insert(name.to_string(), s.clone());
            s
        };
        let _op = sprite.op.lock().await;
        let volume = volume_of(name);
        let ts = Instant::now();
        if let Err(e) = self
            .blockd
            .call(
                "POST",
                &format!("/v1/volumes/{src_volume}/clone"),
                Some(serde_json::json!({"checkpoint": checkpoint, "name": volume})),
            )
            .await
        {
            self.sprites.lock().remove(name);
            return Err(e.into());
        }
        let storage_ms = ms(ts.elapsed());
        self.persist(&sprite);
        let boot = self.boot(&sprite, "created").await?;
        let t = Timings {
            storage_ms: storage_ms + boot.storage_ms,
            vmm_ms: boot.vmm_ms,
            total_ms: ms(t0.elapsed()),
        };
        Ok((self.view_of(&sprite), t))
    }

    /// Boots the sprite's VM and waits for its runtime (op lock held by the caller).
    async fn boot(&self, s: &Arc<Sprite>, reason: &str) -> Result<Timings> {
        let t0 = Instant::now();
        let (name, image_name, settings, volume) = {
            let r = s.rec.lock();
            (
                r.name.clone(),
                r.image.clone(),
                r.settings.clone(),
                r.volume.clone(),
            )
        };
        if let Some(old) = s.run.lock().take() {
            old.vm.kill();
        }
        let img = match self.image(&image_name) {
            Ok(i) => i,
            Err(e) => {
                self.set_state(s, State::Error, None, &format!("boot: {e}"));
                return Err(e);
            }
        };
        let spec = VmSpec {
            name: name.clone(),
            run_dir: self.cfg.data_dir.join("run").join(&name),
            kernel: img.kernel.clone(),
            initrd: img.initrd.clone(),
            cmdline: format!("console=ttyS0 quiet loglevel=3 panic=-1 sprite.name={name}"),
            disk_socket: self.vhost_dir.join(format!("{volume}.sock")),
            vcpus: settings.vcpus,
            memory_mib: settings.memory_mib,
        };
        let vm = match self.launcher.launch(&spec).await {
            Ok(vm) => vm,
            Err(e) => {
                let msg = format!("boot ({reason}): {e:#}");
                self.set_state(s, State::Error, None, &msg);
                return Err(SpriteError::Unavailable(msg));
            }
        };
        let fail = |vm: Box<dyn Vm>, what: String| {
            let diag = vm.diagnostics();
            vm.kill();
            let msg = format!("boot ({reason}): {what}");
            tracing::warn!(sprite = %name, "{msg}\n{diag}");
            self.set_state(s, State::Error, None, &msg);
            SpriteError::Unavailable(msg)
        };
        let agent = match AgentConn::connect(&vm.agent_socket(), Duration::from_secs(10)).await {
            Ok(a) => a,
            Err(e) => {
                return Err(fail(
                    vm,
                    format!("cannot connect to the guest runtime's port: {e}"),
                ));
            }
        };
        if let Err(e) = agent.wait_ready(self.cfg.boot_timeout).await {
            let why = match vm.exited() {
                Some(x) => format!("{x} before its runtime answered"),
                None => format!("the guest runtime did not answer: {e}"),
            };
            return Err(fail(vm, why));
        }
        let running = Arc::new(Running {
            vm,
            agent,
            cpu_ticks: Mutex::new(None),
        });
        *s.run.lock() = Some(running);
        *s.last_meter.lock() = Instant::now();
        *s.paused_at.lock() = None;
        s.touch();
        s.rec.lock().usage.boots += 1;
        self.set_state(s, State::Active, None, reason);
        Ok(Timings {
            storage_ms: 0.0,
            vmm_ms: ms(t0.elapsed()),
            total_ms: ms(t0.elapsed()),
        })
    }

    /// Makes the sprite run (resume a warm pause, boot a cold one) and returns it.
    async fn ensure_running(
        self: &Arc<Self>,
        name: &str,
        reason: &str,
    ) -> Result<(Arc<Sprite>, Arc<Running>, Option<Timings>)> {
        let s = self.get(name)?;
        // Cheap path without the op lock.
        {
            let st = s.rec.lock().state;
            if st == State::Active
                && let Some(r) = s.running()
            {
                s.touch();
                return Ok((s.clone(), r, None));
            }
        }
        let _op = s.op.lock().await;
        if !self.sprites.lock().contains_key(name) {
            return Err(SpriteError::NotFound(format!("no sprite named {name:?}")));
        }
        let t = self.wake_locked(&s, reason).await?;
        let r = s
            .running()
            .ok_or_else(|| SpriteError::Internal("sprite not running after wake".into()))?;
        s.touch();
        Ok((s.clone(), r, t))
    }

    /// Wakes under the op lock. `None` when it was already running.
    async fn wake_locked(&self, s: &Arc<Sprite>, reason: &str) -> Result<Option<Timings>> {
        let (state, pause) = {
            let r = s.rec.lock();
            (r.state, r.pause)
        };
        let t0 = Instant::now();
        match (state, pause, s.running()) {
            (State::Active, _, Some(_)) => Ok(None),
            (State::Hibernated, Some(Pause::Warm), Some(r)) => {
                self.set_state(s, State::Waking, None, reason);
                if let Err(e) = r.vm.resume().await {
                    let msg = format!("warm wake: {e:#}");
                    self.set_state(s, State::Error, None, &msg);
                    return Err(SpriteError::Unavailable(msg));
                }
                if let Err(e) = r.agent.call(Op::Ping, self.cfg.agent_timeout).await {
                    let msg = format!("warm wake: guest runtime: {e}");
                    self.set_state(s, State::Error, None, &msg);
                    return Err(SpriteError::Unavailable(msg));
                }
                *s.last_meter.lock() = Instant::now();
                *s.paused_at.lock() = None;
                s.rec.lock().usage.warm_wakes += 1;
                self.set_state(s, State::Active, None, reason);
                self.observe_wake(Pause::Warm, t0.elapsed());
                Ok(Some(Timings {
                    storage_ms: 0.0,
                    vmm_ms: ms(t0.elapsed()),
                    total_ms: ms(t0.elapsed()),
                }))
            }
            _ => {
                // Cold, pending, or error: boot (processes start fresh).
                if state != State::Pending {
                    self.set_state(s, State::Waking, None, reason);
                }
                let t = self.boot(s, reason).await?;
                if state != State::Pending {
                    self.observe_wake(Pause::Cold, t0.elapsed());
                }
                Ok(Some(t))
            }
        }
    }

    /// Registers the wake observer (once; later calls are ignored).
    pub fn set_wake_observer(&self, f: WakeObserver) {
        let _ = self.wake_observer.set(Observer(f));
    }

    fn observe_wake(&self, kind: Pause, took: Duration) {
        if let Some(f) = self.wake_observer.get() {
            (f.0)(kind, took);
        }
    }

    /// Wakes a sprite (no-op when active). Returns how long it took, if it was asleep.
    pub async fn wake(self: &Arc<Self>, name: &str, reason: &str) -> Result<Option<Timings>> {
        self.ensure_running(name, reason).await.map(|(_, _, t)| t)
    }

    /// Keeps the sprite awake while the guard lives (wakes it first).
    pub async fn hold(
        self: &Arc<Self>,
        name: &str,
        reason: &str,
    ) -> Result<(ActivityGuard, AgentConn)> {
        let (s, r, _) = self.ensure_running(name, reason).await?;
        Ok((ActivityGuard::new(s), r.agent.clone()))
    }

    pub async fn exec(self: &Arc<Self>, name: &str, spec: ExecSpec) -> Result<ExecHandle> {
        if spec.args.is_empty() {
            return Err(SpriteError::Invalid("empty command".into()));
        }
        let (s, r, _) = self.ensure_running(name, "exec").await?;
        let guard = ActivityGuard::new(s);
        let detachable = spec.detachable;
        let mut events = r.agent.open(Op::Exec(spec))?;
        match tokio::time::timeout(self.cfg.agent_timeout, events.next()).await {
            Err(_) => {
                self.runtime_unresponsive(name, "exec").await;
                Err(SpriteError::Unavailable(format!(
                    "the guest runtime did not answer within {:?}",
                    self.cfg.agent_timeout
                )))
            }
            Ok(None) => Err(SpriteError::Unavailable(
                "guest runtime connection closed".into(),
            )),
            Ok(Some(Event::Started { session, pid })) => Ok(ExecHandle {
                session,
                pid,
                events,
                agent: r.agent.clone(),
                detachable,
                guard,
                finished: false,
                exited: false,
            }),
            Ok(Some(Event::Error { message, .. })) => Err(SpriteError::Invalid(message)),
            Ok(Some(other)) => Err(SpriteError::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// Follows a detachable session (scrollback first).
    pub async fn attach(self: &Arc<Self>, name: &str, session: &str) -> Result<ExecHandle> {
        let (s, r, _) = self.ensure_running(name, "attach").await?;
        let guard = ActivityGuard::new(s);
        let events = r.agent.open(Op::Attach {
            session: session.to_string(),
        })?;
        Ok(ExecHandle {
            session: session.to_string(),
            pid: 0,
            events,
            agent: r.agent.clone(),
            detachable: true,
            guard,
            finished: false,
            exited: false,
        })
    }

    /// A request to the runtime that needs a running sprite (wakes it).
    pub async fn agent_call(self: &Arc<Self>, name: &str, op: Op) -> Result<serde_json::Value> {
        self.agent_call_raw(name, op)
            .await?
            .map_err(|g| AgentError::Guest(g).into())
    }

    /// [`Manager::agent_call`] with the guest's own error apart (its `code` intact).
    pub async fn agent_call_raw(
        self: &Arc<Self>,
        name: &str,
        op: Op,
    ) -> Result<std::result::Result<serde_json::Value, GuestError>> {
        let (s, r, _) = self.ensure_running(name, "request").await?;
        let _g = ActivityGuard::new(s);
        match r.agent.call(op, self.cfg.agent_timeout).await {
            Ok(v) => Ok(Ok(v)),
            Err(AgentError::Guest(g)) => Ok(Err(g)),
            Err(AgentError::Timeout(t)) => {
                self.runtime_unresponsive(name, "request").await;
                Err(SpriteError::Unavailable(format!(
                    "the guest runtime did not answer within {t:?}"
                )))
            }
            Err(e) => Err(e.into()),
        }
    }

    /// One request to the sprite's management API (services; [`crate::mgmt`]), waking it.
    pub async fn runtime_api(
        self: &Arc<Self>,
        name: &str,
        method: &str,
        path: &str,
        body: String,
    ) -> Result<RuntimeReply> {
        let (s, r, _) = self.ensure_running(name, "services request").await?;
        let guard = ActivityGuard::new(s);
        let mut events = r.agent.open(Op::Api {
            method: method.to_string(),
            path: path.to_string(),
            body,
        })?;
        // A stop waits up to 5 s for the process, needs up to 10 s: more than a plain call.
        let wait = self.cfg.agent_timeout + Duration::from_secs(20);
        match tokio::time::timeout(wait, events.next()).await {
            Err(_) => Err(SpriteError::Unavailable(format!(
                "the guest runtime did not answer within {wait:?}"
            ))),
            Ok(None) => Err(SpriteError::Unavailable(
                "guest runtime connection closed".into(),
            )),
            Ok(Some(Event::Ok { value })) => {
                let status = value["status"].as_u64().unwrap_or(500) as u16;
                if value["stream"] == true {
                    Ok(RuntimeReply::Stream {
                        status,
                        events,
                        guard,
                    })
                } else {
                    Ok(RuntimeReply::Json(status, value["body"].clone()))
                }
            }
            Ok(Some(Event::Error { message, .. })) => Err(SpriteError::Unavailable(format!(
                "the sprite's runtime cannot serve this (an older image?): {message}"
            ))),
            Ok(Some(other)) => Err(SpriteError::Internal(format!("unexpected reply {other:?}"))),
        }
    }

    /// The runtime stopped answering: the sprite goes to `error` (its VM is stopped; the
    /// disk keeps everything the guest flushed; the next request boots it again).
    async fn runtime_unresponsive(&self, name: &str, what: &str) {
        let Ok(s) = self.get(name) else { return };
        let _op = s.op.lock().await;
        if let Some(r) = s.run.lock().take() {
            r.vm.kill();
        }
        self.set_state(
            &s,
            State::Error,
            None,
            &format!(
                "guest runtime did not answer {what} within {:?}; VM stopped",
                self.cfg.agent_timeout
            ),
        );
    }

    /// Hibernates now (`warm` or `cold`).
    pub async fn hibernate(&self, name: &str, pause: Pause, reason: &str) -> Result<Timings> {
        let s = self.get(name)?;
        let _op = s.op.lock().await;
        self.hibernate_locked(&s, pause, reason).await
    }

    async fn hibernate_locked(
        &self,
        s: &Arc<Sprite>,
        pause: Pause,
        reason: &str,
    ) -> Result<Timings> {
        let t0 = Instant::now();
        let (state, cur) = {
            let r = s.rec.lock();
            (r.state, r.pause)
        };
        let run = s.running();
        match (pause, state, cur, run) {
            (Pause::Warm, State::Active, _, Some(r)) => {
                self.meter(s);
                self.set_state(s, State::Hibernating, None, reason);
                if let Err(e) = r.vm.pause().await {
                    let msg = format!("warm pause: {e:#}");
                    self.set_state(s, State::Error, None, &msg);
                    return Err(SpriteError::Unavailable(msg));
                }
                *s.paused_at.lock() = Some(Instant::now());
                s.rec.lock().usage.warm_pauses += 1;
                self.set_state(s, State::Hibernated, Some(Pause::Warm), reason);
                Ok(Timings {
                    storage_ms: 0.0,
                    vmm_ms: ms(t0.elapsed()),
                    total_ms: ms(t0.elapsed()),
                })
            }
            (Pause::Warm, State::Hibernated, Some(_), _) => Ok(Timings::default()),
            (Pause::Cold, State::Hibernated, Some(Pause::Cold), _) => Ok(Timings::default()),
            (Pause::Cold, _, _, Some(r)) => {
                self.meter(s);
                self.set_state(s, State::Hibernating, None, reason);
                let mut notes = Vec::new();
                if cur == Some(Pause::Warm)
                    && let Err(e) = r.vm.resume().await
                {
                    notes.push(format!("resume: {e:#}"));
                }
                // The guest writes back its page cache, gives back trimmed blocks and freezes
                // (a clean journal) before the VMM stops.
                let t = self.cfg.agent_timeout;
                for op in [
                    Op::Sync,
                    Op::Fstrim,
                    Op::Freeze {
                        timeout_ms: Some(60_000),
                    },
                ] {
                    let what = format!("{op:?}");
                    if let Err(e) = r.agent.call(op, t).await {
                        notes.push(format!("{what}: {e}"));
                    }
                }
                let vmm_ms = ms(t0.elapsed());
                let quit = r.vm.quit(Duration::from_secs(30)).await;
                s.run.lock().take();
                if let Err(e) = quit {
                    notes.push(format!("{e:#}"));
                }
                let ts = Instant::now();
                let volume = s.rec.lock().volume.clone();
                self.blockd
                    .call("POST", &format!("/v1/volumes/{volume}/flush"), None)
                    .await?;
                if self.object_store
                    && let Err(e) = self
                        .blockd
                        .call("POST", &format!("/v1/volumes/{volume}/sync"), None)
                        .await
                {
                    notes.push(format!("volume sync: {e}"));
                }
                let storage_ms = ms(ts.elapsed());
                *s.paused_at.lock() = Some(Instant::now());
                s.rec.lock().usage.cold_pauses += 1;
                let why = if notes.is_empty() {
                    reason.to_string()
                } else {
                    format!("{reason} ({})", notes.join("; "))
                };
                self.set_state(s, State::Hibernated, Some(Pause::Cold), &why);
                Ok(Timings {
                    storage_ms,
                    vmm_ms,
                    total_ms: ms(t0.elapsed()),
                })
            }
            (Pause::Cold, _, _, None) => {
                // Nothing runs (pending, error): it is cold already.
                self.set_state(s, State::Hibernated, Some(Pause::Cold), reason);
                Ok(Timings::default())
            }
            (Pause::Warm, st, _, _) => Err(SpriteError::Conflict(format!(
                "a warm pause needs a running sprite; it is {st:?}"
            ))),
        }
    }

    /// Checkpoint: freeze the guest's filesystems, O(1) checkpoint in blockd, thaw.
    pub async fn checkpoint(
        &self,
        name: &str,
        comment: Option<&str>,
    ) -> Result<(serde_json::Value, Timings)> {
        let s = self.get(name)?;
        let _op = s.op.lock().await;
        let t0 = Instant::now();
        let (state, pause, volume) = {
            let r = s.rec.lock();
            (r.state, r.pause, r.volume.clone())
        };
        let run = s.running();
        let live = run
            .as_ref()
            .filter(|_| state == State::Active || pause == Some(Pause::Warm));
        let t = self.cfg.agent_timeout;
        let mut vmm = Duration::ZERO;
        if let Some(r) = live {
            let tv = Instant::now();
            if pause == Some(Pause::Warm) {
                r.vm.resume()
                    .await
                    .map_err(|e| SpriteError::Unavailable(format!("{e:#}")))?;
            }
            r.agent
                .call(
                    Op::Freeze {
                        timeout_ms: Some(30_000),
                    },
                    t,
                )
                .await?;
            vmm += tv.elapsed();
        }
        let ts = Instant::now();
        let body = serde_json::json!({"comment": comment.unwrap_or("sprite checkpoint")});
        let res = self
            .blockd
            .call(
                "POST",
                &format!("/v1/volumes/{volume}/checkpoints"),
                Some(body),
            )
            .await;
        let storage = ts.elapsed();
        if let Some(r) = live {
            let tv = Instant::now();
            let thawed = r.agent.call(Op::Thaw, t).await;
            if pause == Some(Pause::Warm) {
                let _ = r.vm.pause().await;
            }
            vmm += tv.elapsed();
            thawed?;
        }
        let ck = res?;
        s.touch();
        Ok((
            ck,
            Timings {
                storage_ms: ms(storage),
                vmm_ms: ms(vmm),
                total_ms: ms(t0.elapsed()),
            },
        ))
    }

    pub async fn checkpoints(&self, name: &str) -> Result<serde_json::Value> {
        let volume = self.get(name)?.rec.lock().volume.clone();
        Ok(self
            .blockd
            .call("GET", &format!("/v1/volumes/{volume}/checkpoints"), None)
            .await?)
    }

    pub async fn delete_checkpoint(&self, name: &str, id: &str) -> Result<()> {
        let volume = self.get(name)?.rec.lock().volume.clone();
        self.blockd
            .call(
                "DELETE",
                &format!("/v1/volumes/{volume}/checkpoints/{id}"),
                None,
            )
            .await?;
        Ok(())
    }

    /// Restore: stop the VM, restore the volume (blockd keeps the replaced head as a
    /// checkpoint), boot.
    pub async fn restore(
        &self,
        name: &str,
        checkpoint: &str,
    ) -> Result<(serde_json::Value, Timings)> {
        let s = self.get(name)?;
        let _op = s.op.lock().await;
        let t0 = Instant::now();
        let volume = s.rec.lock().volume.clone();
        // Validate before stopping anything.
        self.blockd
            .call(
                "GET",
                &format!("/v1/volumes/{volume}/checkpoints/{checkpoint}"),
                None,
            )
            .await?;
        let mut vmm = Duration::ZERO;
        if let Some(r) = s.running() {
            let tv = Instant::now();
            self.meter(&s);
            if s.rec.lock().pause == Some(Pause::Warm) {
                let _ = r.vm.resume().await;
            }
            // The replaced head stays reachable: make it consistent first.
            let _ = r.agent.call(Op::Sync, self.cfg.agent_timeout).await;
            let _ = r.vm.quit(Duration::from_secs(30)).await;
            s.run.lock().take();
            vmm += tv.elapsed();
        }
        let ts = Instant::now();
        let res = self
            .blockd
            .call(
                "POST",
                &format!("/v1/volumes/{volume}/checkpoints/{checkpoint}/restore"),
                Some(serde_json::json!({"force": true})),
            )
            .await;
        let storage = ts.elapsed();
        let out = match res {
            Ok(v) => v,
            Err(e) => {
                let e: SpriteError = e.into();
                self.set_state(
                    &s,
                    State::Error,
                    None,
                    &format!("restore {checkpoint}: {e}"),
                );
                return Err(e);
            }
        };
        self.set_state(&s, State::Waking, None, &format!("restored {checkpoint}"));
        let b = self.boot(&s, &format!("restored {checkpoint}")).await?;
        Ok((
            out,
            Timings {
                storage_ms: ms(storage),
                vmm_ms: ms(vmm) + b.vmm_ms,
                total_ms: ms(t0.elapsed()),
            },
        ))
    }

    /// A new sprite from a checkpoint of this one (no data copied) , booted.
    pub async fn fork(
        self: &Arc<Self>,
        name: &str,
        checkpoint: &str,
        new_name: &str,
        patch: &SettingsPatch,
    ) -> Result<(SpriteView, Timings)> {
        validate_name(new_name).map_err(SpriteError::Invalid)?;
        let s = self.get(name)?;
        let (volume, image, mut settings) = {
            let r = s.rec.lock();
            (r.volume.clone(), r.image.clone(), r.settings.clone())
        };
        patch.apply(&mut settings).map_err(SpriteError::Invalid)?;
        self.create_from(
            new_name,
            &volume,
            checkpoint,
            &image,
            Some(format!("{name}@{checkpoint}")),
            settings,
        )
        .await
    }

    pub async fn update_settings(&self, name: &str, patch: &SettingsPatch) -> Result<SpriteView> {
        let s = self.get(name)?;
        {
            let mut r = s.rec.lock();
            patch.apply(&mut r.settings).map_err(SpriteError::Invalid)?;
        }
        self.persist(&s);
        Ok(self.view_of(&s))
    }

    /// Destroys the sprite: VM, volume (and its checkpoints), record.
    pub async fn delete(&self, name: &str) -> Result<()> {
        let s = self.get(name)?;
        let _op = s.op.lock().await;
        if let Some(r) = s.run.lock().take() {
            r.vm.kill();
        }
        let volume = s.rec.lock().volume.clone();
        match self
            .blockd
            .call("DELETE", &format!("/v1/volumes/{volume}?force=true"), None)
            .await
        {
            Ok(_) | Err(ClientError::Api { status: 404, .. }) => {}
            Err(e) => return Err(e.into()),
        }
        self.sprites.lock().remove(name);
        let _ = std::fs::remove_file(sprites_dir(&self.cfg).join(format!("{name}.json")));
        let _ = std::fs::remove_dir_all(self.cfg.data_dir.join("run").join(name));
        Ok(())
    }

    /// Kills the VMM of a running sprite (operators, fault tests).
    pub fn kill_vm(&self, name: &str) -> Result<()> {
        let s = self.get(name)?;
        match s.running() {
            Some(r) => {
                r.vm.kill();
                Ok(())
            }
            None => Err(SpriteError::Conflict(format!("sprite {name:?} has no VM"))),
        }
    }

    /// Adds CPU and memory time since the last call (only while running and not paused).
    fn meter(&self, s: &Sprite) {
        let now = Instant::now();
        let dt = {
            let mut last = s.last_meter.lock();
            let dt = now.duration_since(*last).as_secs_f64();
            *last = now;
            dt
        };
        let running = {
            let r = s.rec.lock();
            r.state == State::Active
        };
        let Some(run) = s.running() else { return };
        if !running {
            return;
        }
        let ticks = run.vm.pid().and_then(proc_cpu_ticks);
        let mut prev = run.cpu_ticks.lock();
        // SAFETY: sysconf with a constant.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as f64;
        let cpu = match (ticks, *prev) {
            (Some(t), Some(p)) if t >= p => (t - p) as f64 / hz,
            (Some(t), None) => t as f64 / hz,
            _ => 0.0,
        };
        if let Some(t) = ticks {
            *prev = Some(t);
        }
        let mut r = s.rec.lock();
        r.usage.cpu_seconds += cpu;
        r.usage.running_seconds += dt;
        r.usage.memory_mib_seconds += dt * r.settings.memory_mib as f64;
        s.dirty.store(true, Ordering::Relaxed);
    }

    /// One pass of the housekeeping loop: crashes, metering, idle pauses, memory pressure.
    pub async fn tick(self: &Arc<Self>) {
        let sprites: Vec<Arc<Sprite>> = self.sprites.lock().values().cloned().collect();
        let low_memory = self.cfg.min_mem_available_mib > 0
            && mem_available_mib().is_some_and(|m| m < self.cfg.min_mem_available_mib);
        let mut coldest: Option<(Instant, Arc<Sprite>)> = None;
        for s in sprites {
            // Skip sprites in the middle of an operation.
            let Ok(op) = s.op.try_lock() else { continue };
            let (state, pause, settings, name) = {
                let r = s.rec.lock();
                (r.state, r.pause, r.settings.clone(), r.name.clone())
            };
            if let Some(r) = s.running()
                && let Some(why) = r.vm.exited()
            {
                s.run.lock().take();
                let msg = format!("VM stopped unexpectedly: {why}");
                self.set_state(&s, State::Error, None, &msg);
                if self.cfg.restart_on_crash {
                    let me = self.clone();
                    let s2 = s.clone();
                    drop(op);
                    tokio::spawn(async move {
                        let _op = s2.op.lock().await;
                        let _ = me.boot(&s2, "restart after crash").await;
                    });
                }
                continue;
            }
            self.meter(&s);
            // Usage is saved every few seconds (and at every transition).
            if s.dirty.load(Ordering::Relaxed)
                && s.last_saved.lock().elapsed() >= Duration::from_secs(5)
            {
                self.persist(&s);
            }
            match (state, pause) {
                (State::Active, _) if settings.idle_warm_secs > 0 => {
                    let idle = s.last_activity.lock().elapsed();
                    if s.busy.load(Ordering::SeqCst) > 0
                        || idle < Duration::from_secs(settings.idle_warm_secs)
                    {
                        continue;
                    }
                    // Ask the guest: running detachable sessions, open connections and live tasks count.
                    let Some(r) = s.running() else { continue };
                    drop(op);
                    let me = self.clone();
                    let s2 = s.clone();
                    tokio::spawn(async move {
                        let act = r.agent.call(Op::Activity, me.cfg.agent_timeout).await;
                        match act
                            .map(|v| serde_json::from_value::<ActivityInfo>(v).unwrap_or_default())
                        {
                            Ok(a)
                                if a.running_sessions > 0
                                    || a.tcp_connections > 0
                                    || a.tasks > 0 =>
                            {
                                s2.touch()
                            }
                            Ok(_) => {
                                let reason = format!("idle for {}s", settings.idle_warm_secs);
                                let _op = s2.op.lock().await;
                                // Re-check: a request may have come in meanwhile.
                                let idle = s2.last_activity.lock().elapsed();
                                if s2.busy.load(Ordering::SeqCst) == 0
                                    && idle >= Duration::from_secs(settings.idle_warm_secs)
                                    && s2.rec.lock().state == State::Active
                                {
                                    let _ = me.hibernate_locked(&s2, Pause::Warm, &reason).await;
                                }
                            }
                            Err(AgentError::Timeout(_)) => {
                                me.runtime_unresponsive(&name, "an activity check").await
                            }
                            Err(e) => tracing::warn!(sprite = %name, %e, "activity check failed"),
                        }
                    });
                }
                (State::Hibernated, Some(Pause::Warm)) => {
                    let since = s.paused_at.lock().map(|t| t.elapsed()).unwrap_or_default();
                    if settings.idle_cold_secs > 0
                        && since >= Duration::from_secs(settings.idle_cold_secs)
                    {
                        drop(op);
                        let me = self.clone();
                        let s2 = s.clone();
                        tokio::spawn(async move {
                            let _op = s2.op.lock().await;
                            if s2.rec.lock().pause == Some(Pause::Warm) {
                                let reason =
                                    format!("paused warm for {}s", settings.idle_cold_secs);
                                let _ = me.hibernate_locked(&s2, Pause::Cold, &reason).await;
                            }
                        });
                    } else if low_memory {
                        let at = s.paused_at.lock().unwrap_or_else(Instant::now);
                        if coldest.as_ref().is_none_or(|(t, _)| at < *t) {
                            coldest = Some((at, s.clone()));
                        }
                    }
                }
                _ => {}
            }
        }
        if let Some((_, s)) = coldest {
            let me = self.clone();
            tokio::spawn(async move {
                let _op = s.op.lock().await;
                if s.rec.lock().pause == Some(Pause::Warm) {
                    let _ = me
                        .hibernate_locked(&s, Pause::Cold, "host memory pressure")
                        .await;
                }
            });
        }
    }

    /// Runs [`Manager::tick`] every 500 ms until cancelled.
    pub async fn run_housekeeping(self: Arc<Self>, stop: tokio_util::sync::CancellationToken) {
        let mut iv = tokio::time::interval(Duration::from_millis(500));
        loop {
            tokio::select! {
                _ = stop.cancelled() => break,
                _ = iv.tick() => self.tick().await,
            }
        }
    }

    /// Stops every VM (daemon shutdown): guests are synced first; sprites are left cold.
    pub async fn shutdown(&self) {
        let sprites: Vec<Arc<Sprite>> = self.sprites.lock().values().cloned().collect();
        for s in sprites {
            let _op = s.op.lock().await;
            if s.running().is_some() {
                let _ = self
                    .hibernate_locked(&s, Pause::Cold, "daemon shutdown")
                    .await;
            }
        }
    }

    /// Storage figures for usage: blockd's stat of the volume.
    pub async fn usage(&self, name: &str) -> Result<serde_json::Value> {
        let s = self.get(name)?;
        self.meter(&s);
        let (usage, volume) = {
            let r = s.rec.lock();
            (r.usage.clone(), r.volume.clone())
        };
        let storage = self
            .blockd
            .call("GET", &format!("/v1/volumes/{volume}"), None)
            .await?;
        Ok(serde_json::json!({ "name": name, "compute": usage, "storage": storage }))
    }
}

fn new_sprite(rec: SpriteRecord) -> Sprite {
    Sprite {
        rec: Mutex::new(rec),
        op: tokio::sync::Mutex::new(()),
        run: Mutex::new(None),
        last_activity: Mutex::new(Instant::now()),
        busy: AtomicUsize::new(0),
        paused_at: Mutex::new(None),
        last_meter: Mutex::new(Instant::now()),
        dirty: std::sync::atomic::AtomicBool::new(false),
        last_saved: Mutex::new(Instant::now()),
    }
}

fn push_transition(r: &mut SpriteRecord, to: State, reason: &str) {
    let t = Transition {
        at_ms: now_ms(),
        from: r.state,
        to,
        reason: reason.to_string(),
    };
    r.transitions.push_back(t);
    while r.transitions.len() > MAX_TRANSITIONS {
        r.transitions.pop_front();
    }
    r.state = to;
    r.reason = reason.to_string();
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// utime + stime of a process, in clock ticks.
fn proc_cpu_ticks(pid: u32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // Fields after the command name (which may contain spaces) start after the last ')'.
    let rest = &s[s.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state); utime is field 14, stime 15.
    let utime: u64 = f.get(11)?.parse().ok()?;
    let stime: u64 = f.get(12)?.parse().ok()?;
    Some(utime + stime)
}

fn mem_available_mib() -> Option<u64> {
    let s = std::fs::read_to_string("/proc/meminfo").ok()?;
    let line = s.lines().find(|l| l.starts_with("MemAvailable:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib / 1024)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[test]
    fn names() {
        assert!(validate_name("web-1").is_ok());
        for bad in ["", "-x", "UPPER", "a_b", "a.b", &"x".repeat(41)] {
            assert!(validate_name(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn settings_patch_validates() {
        let mut s = Settings::default();
        assert!(
            SettingsPatch {
                vcpus: Some(0),
                ..Default::default()
            }
            .apply(&mut s)
            .is_err()
        );
        assert!(
            SettingsPatch {
                memory_mib: Some(1),
                ..Default::default()
            }
            .apply(&mut s)
            .is_err()
        );
        assert_eq!(s, Settings::default(), "a rejected patch changes nothing");
        SettingsPatch {
            idle_warm_secs: Some(5),
            ..Default::default()
        }
        .apply(&mut s)
        .unwrap();
        assert_eq!(s.idle_warm_secs, 5);
    }

    #[test]
    fn cpu_ticks_of_self() {
        assert!(proc_cpu_ticks(std::process::id()).is_some());
    }
}
