//! The control plane: one SQLite database per organization (`<data>/orgs/<org>.db`), holding
//! its API tokens (hashed), its sprites (the user's name and the host's internal name) and
//! usage samples. Each database is copied to the object store (`VACUUM INTO` a snapshot,
//! uploaded as `control/orgs/<org>.db`) within `replicate_every` of a change: that interval
//! is the RPO. An API server started with an empty data directory restores every
//! organization from the bucket first.

use parking_lot::Mutex;
use rand::RngCore;
use rusqlite::{Connection, OptionalExtension, params};
use serde::Serialize;
use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    Invalid(String),
    #[error("control plane database: {0}")]
    Db(#[from] rusqlite::Error),
    #[error("control plane: {0}")]
    Io(String),
}

pub type Result<T> = std::result::Result<T, StoreError>;

/// Organization names: 1-15 of `a-z 0-9`, starting with a letter (they prefix internal
/// sprite names).
pub fn validate_org(name: &str) -> Result<()> {
    let ok = (1..=15).contains(&name.len())
        && name.as_bytes()[0].is_ascii_lowercase()
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit());
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "invalid organization name {name:?}: 1-15 characters a-z and 0-9, starting with a letter"
        )))
    }
}

/// Sprite names as users give them: 1-23 of `a-z 0-9 -` (the host name is `<org>--<name>`).
pub fn validate_sprite(name: &str) -> Result<()> {
    let ok = (1..=23).contains(&name.len())
        && !name.starts_with('-')
        && !name.ends_with('-')
        && !name.contains("--")
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(StoreError::Invalid(format!(
            "invalid sprite name {name:?}: 1-23 characters a-z, 0-9 and single '-' inside"
        )))
    }
}

pub fn internal_name(org: &str, sprite: &str) -> String {
    format!("{org}--{sprite}")
}

pub fn now_ms() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

fn hash_token(token: &str) -> String {
    blake3::hash(token.as_bytes()).to_hex().to_string()
}

fn random_hex(bytes: usize) -> String {
    let mut b = vec![0u8; bytes];
    rand::rng().fill_bytes(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    pub created_ms: i64,
    pub revoked_ms: Option<i64>,
}

#[derive(Debug, Clone, Serialize, schemars::JsonSchema)]
pub struct SpriteRow {
    pub name: String,
    pub internal: String,
    pub created_ms: i64,
    /// `private` (a token of the organization is needed) or `public`.
    pub url_auth: String,
}

#[derive(Debug, Clone, Default, Serialize, schemars::JsonSchema)]
pub struct UsageSample {
    pub at_ms: i64,
    pub cpu_seconds: f64,
    pub memory_mib_seconds: f64,
    pub running_seconds: f64,
    pub head_bytes: i64,
    pub checkpoint_bytes: i64,
    pub billable_bytes: i64,
}

struct Org {
    db: Mutex<Connection>,
    dirty: AtomicBool,
}

#[derive(Clone)]
pub struct ControlPlane {
    dir: PathBuf,
    orgs: Arc<Mutex<HashMap<String, Arc<Org>>>>,
    remote: Option<chunkstore::remote::Remote>,
}

impl std::fmt::Debug for ControlPlane {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ControlPlane")
            .field("dir", &self.dir)
            .finish()
    }
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS tokens (
  id TEXT PRIMARY KEY, name TEXT NOT NULL, hash TEXT NOT NULL UNIQUE,
  created_ms INTEGER NOT NULL, revoked_ms INTEGER);
CREATE TABLE IF NOT EXISTS sprites (
  name TEXT PRIMARY KEY, internal TEXT NOT NULL UNIQUE, created_ms INTEGER NOT NULL,
  url_auth TEXT NOT NULL DEFAULT 'private');
CREATE TABLE IF NOT EXISTS usage (
  sprite TEXT NOT NULL, at_ms INTEGER NOT NULL, cpu_seconds REAL NOT NULL,
  memory_mib_seconds REAL NOT NULL, running_seconds REAL NOT NULL,
  head_bytes INTEGER NOT NULL, checkpoint_bytes INTEGER NOT NULL,
  PRIMARY KEY (sprite, at_ms));
";

fn open_db(path: &Path) -> Result<Connection> {
    let c = Connection::open(path)?;
    c.pragma_update(None, "journal_mode", "WAL")?;
    c.pragma_update(None, "synchronous", "FULL")?;
    c.execute_batch(SCHEMA)?;
    Ok(c)
}

fn remote_key(remote: &chunkstore::remote::Remote, org: &str) -> object_store::path::Path {
    remote.key(&format!("control/orgs/{org}.db"))
}

impl ControlPlane {
    /// Opens `<dir>/orgs/*.db`. With an object store and no local organizations, restores them
    /// from the bucket first.
    pub async fn open(dir: &Path, remote: Option<chunkstore::remote::Remote>) -> Result<Self> {
        let odir = dir.join("orgs");
        std::fs::create_dir_all(&odir).map_err(|e| StoreError::Io(e.to_string()))?;
        let local_empty = std::fs::read_dir(&odir)
            .map(|mut r| r.next().is_none())
            .unwrap_or(true);
        if local_empty && let Some(r) = &remote {
            restore_from(r, &odir).await?;
        }
        let mut orgs = HashMap::new();
        for e in std::fs::read_dir(&odir).map_err(|e| StoreError::Io(e.to_string()))? {
            let e = e.map_err(|e| StoreError::Io(e.to_string()))?;
            let n = e.file_name().to_string_lossy().into_owned();
            let Some(org) = n.strip_suffix(".db") else {
                continue;
            };
            if validate_org(org).is_err() {
                continue;
            }
            let db = open_db(&e.path())?;
            orgs.insert(
                org.to_string(),
                Arc::new(Org {
                    db: Mutex::new(db),
                    dirty: AtomicBool::new(false),
                }),
            );
        }
        Ok(ControlPlane {
            dir: odir,
            orgs: Arc::new(Mutex::new(orgs)),
            remote,
        })
    }

    fn org(&self, org: &str) -> Result<Arc<Org>> {
        self.orgs
            .lock()
            .get(org)
            .cloned()
            .ok_or_else(|| StoreError::NotFound(format!("no organization {org:?}")))
    }

    fn with<T>(
        &self,
        org: &str,
        write: bool,
        f: impl FnOnce(&Connection) -> Result<T>,
    ) -> Result<T> {
        let o = self.org(org)?;
        let db = o.db.lock();
        let r = f(&db)?;
        if write {
            o.dirty.store(true, Ordering::Relaxed);
        }
        Ok(r)
    }

    /// Creates an organization and its first token (returned in clear once).
    pub fn create_org(&self, org: &str) -> Result<(TokenInfo, String)> {
        validate_org(org)?;
        {
            let mut orgs = self.orgs.lock();
            if orgs.contains_key(org) {
                return Err(StoreError::AlreadyExists(format!(
                    "organization {org:?} already exists"
                )));
            }
            let db = open_db(&self.dir.join(format!("{org}.db")))?;
            db.execute(
                "INSERT OR REPLACE INTO meta (key, value) VALUES ('created_ms', ?1)",
                params![now_ms().to_string()],
            )?;
            orgs.insert(
                org.to_string(),
                Arc::new(Org {
                    db: Mutex::new(db),
                    dirty: AtomicBool::new(true),
                }),
            );
        }
        self.create_token(org, "default")
    }

    pub fn list_orgs(&self) -> Vec<String> {
        let mut v: Vec<String> = self.orgs.lock().keys().cloned().collect();
        v.sort();
        v
    }

    /// `spr_<org>_<id>_<secret>`: the org and id locate the row; only a hash is stored.
    pub fn create_token(&self, org: &str, name: &str) -> Result<(TokenInfo, String)> {
        if name.is_empty() || name.len() > 64 {
            return Err(StoreError::Invalid(
                "token name must be 1-64 characters".into(),
            ));
        }
        let id = random_hex(6);
        let token = format!("spr_{org}_{id}_{}", random_hex(24));
        let info = TokenInfo {
            id: id.clone(),
            name: name.to_string(),
            created_ms: now_ms(),
            revoked_ms: None,
        };
        self.with(org, true, |db| {
            db.execute(
                "INSERT INTO tokens (id, name, hash, created_ms) VALUES (?1, ?2, ?3, ?4)",
                params![id, name, hash_token(&token), info.created_ms],
            )?;
            Ok(())
        })?;
        Ok((info, token))
    }

    pub fn list_tokens(&self, org: &str) -> Result<Vec<TokenInfo>> {
        self.with(org, false, |db| {
            let mut st = db.prepare(
                "SELECT id, name, created_ms, revoked_ms FROM tokens ORDER BY created_ms, id",
            )?;
            let rows = st.query_map([], |r| {
                Ok(TokenInfo {
                    id: r.get(0)?,
                    name: r.get(1)?,
                    created_ms: r.get(2)?,
                    revoked_ms: r.get(3)?,
                })
            })?;
            Ok(rows.collect::<std::result::Result<Vec<_>, _>>()?)
        })
    }

    pub fn revoke_token(&self, org: &str, id: &str) -> Result<()> {
        let n = self.with(org, true, |db| {
            Ok(db.execute(
                "UPDATE tokens SET revoked_ms = ?1 WHERE id = ?2 AND revoked_ms IS NULL",
                params![now_ms(), id],
            )?)
        })?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("no active token {id:?}")));
        }
        Ok(())
    }

    /// The organization a token belongs to, if it is valid and not revoked.
    pub fn authenticate(&self, token: &str) -> Option<String> {
        let rest = token.strip_prefix("spr_")?;
        let mut it = rest.splitn(3, '_');
        let (org, id) = (it.next()?, it.next()?);
        it.next()?;
        let o = self.org(org).ok()?;
        let db = o.db.lock();
        let hash: Option<String> = db
            .query_row(
                "SELECT hash FROM tokens WHERE id = ?1 AND revoked_ms IS NULL",
                params![id],
                |r| r.get(0),
            )
            .optional()
            .ok()??;
        // Constant-time comparison of the hashes.
        let want = hash?;
        let got = hash_token(token);
        let eq = want.len() == got.len()
            && want
                .bytes()
                .zip(got.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0;
        eq.then(|| org.to_string())
    }

    pub fn add_sprite(&self, org: &str, name: &str, url_auth: &str) -> Result<SpriteRow> {
        validate_sprite(name)?;
        let row = SpriteRow {
            name: name.to_string(),
            internal: internal_name(org, name),
            created_ms: now_ms(),
            url_auth: url_auth.to_string(),
        };
        self.with(org, true, |db| {
            let r = db.execute(
                "INSERT INTO sprites (name, internal, created_ms, url_auth) VALUES (?1, ?2, ?3, ?4)",
                params![row.name, row.internal, row.created_ms, row.url_auth],
            );
            match r {
                Ok(_) => Ok(()),
                Err(rusqlite::Error::SqliteFailure(e, _))
                    if e.code == rusqlite::ErrorCode::ConstraintViolation =>
                {
                    Err(StoreError::AlreadyExists(format!("sprite {name:?} already exists")))
                }
                Err(e) => Err(e.into()),
            }
        })?;
        Ok(row)
    }

    pub fn set_url_auth(&self, org: &str, name: &str, url_auth: &str) -> Result<()> {
        let n = self.with(org, true, |db| {
            Ok(db.execute(
                "UPDATE sprites SET url_auth = ?1 WHERE name = ?2",
                params![url_auth, name],
            )?)
        })?;
        if n == 0 {
            return Err(StoreError::NotFound(format!("no sprite named {name:?}")));
        }
        Ok(())
    }

    pub fn remove_sprite(&self, org: &str, name: &str) -> Result<()> {
        self.with(org, true, |db| {
            db.execute("DELETE FROM sprites WHERE name = ?1", params![name])?;
            Ok(())
        })
    }

    pub fn sprite(&self, org: &str, name: &str) -> Result<SpriteRow> {
        self.with(org, false, |db| {
            db.query_row(
                "SELECT name, internal, created_ms, url_auth FROM sprites WHERE name = ?1",
                params![name],
                |r| {
                    Ok(SpriteRow {
                        name: r.get(0)?,
                        internal: r.get(1)?,
                        created_ms: r.get(2)?,
                        url_auth: r.get(3)?,
                    })
                },
            )
            .optional()?
            .ok_or_else(|| StoreError::NotFound(format!("no sprite named {name:?}")))
        })
    }

    /// Sprites in name order after `after`, at most `limit`.
    pub fn sprites(&self, org: &str, after: Option<&str>, limit: usize) -> Result<Vec<SpriteRow>> {
        self.with(org, false, |db| {
            let mut st = db.prepare(
                "SELECT name, internal, created_ms, url_auth FROM sprites WHERE name > ?1 ORDER BY name LIMIT ?2",
            )?;
            let rows = st.query_map(params![after.unwrap_or(""), limit as i64], |r| {
                Ok(SpriteRow {
                    name: r.get(0)?,
                    internal: r.get(1)?,
                    created_ms: r.get(2)?,
                    url_auth: r.get(3)?,
                })
            })?;
            Ok(rows.collect::<std::result::Result<Vec<_>, _>>()?)
        })
    }

    /// Which organization owns an internal sprite name (the proxy's lookup).
    pub fn owner_of_internal(&self, internal: &str) -> Option<(String, SpriteRow)> {
        let (org, name) = internal.split_once("--")?;
        let row = self.sprite(org, name).ok()?;
        Some((org.to_string(), row))
    }

    pub fn record_usage(&self, org: &str, sprite: &str, s: &UsageSample) -> Result<()> {
        self.with(org, true, |db| {
            db.execute(
                "INSERT OR REPLACE INTO usage (sprite, at_ms, cpu_seconds, memory_mib_seconds, running_seconds, head_bytes, checkpoint_bytes) VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7)",
                params![sprite, s.at_ms, s.cpu_seconds, s.memory_mib_seconds, s.running_seconds, s.head_bytes, s.checkpoint_bytes],
            )?;
            Ok(())
        })
    }

    /// Samples of a sprite between two times (inclusive), oldest first.
    pub fn usage(
        &self,
        org: &str,
        sprite: &str,
        from_ms: i64,
        to_ms: i64,
    ) -> Result<Vec<UsageSample>> {
        self.with(org, false, |db| {
            let mut st = db.prepare(
                "SELECT at_ms, cpu_seconds, memory_mib_seconds, running_seconds, head_bytes, checkpoint_bytes FROM usage WHERE sprite = ?1 AND at_ms >= ?2 AND at_ms <= ?3 ORDER BY at_ms",
            )?;
            let rows = st.query_map(params![sprite, from_ms, to_ms], |r| {
                let head: i64 = r.get(4)?;
                let ck: i64 = r.get(5)?;
                Ok(UsageSample {
                    at_ms: r.get(0)?,
                    cpu_seconds: r.get(1)?,
                    memory_mib_seconds: r.get(2)?,
                    running_seconds: r.get(3)?,
                    head_bytes: head,
                    checkpoint_bytes: ck,
                    billable_bytes: head + ck,
                })
            })?;
            Ok(rows.collect::<std::result::Result<Vec<_>, _>>()?)
        })
    }

    /// Uploads a snapshot of every changed organization. Returns how many were uploaded.
    pub async fn replicate(&self) -> Result<usize> {
        use object_store::ObjectStoreExt;
        let Some(remote) = &self.remote else {
            return Ok(0);
        };
        let orgs: Vec<(String, Arc<Org>)> = self
            .orgs
            .lock()
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        let mut n = 0;
        for (name, o) in orgs {
            if !o.dirty.swap(false, Ordering::Relaxed) {
                continue;
            }
            let snap = self.dir.join(format!(".{name}.snapshot"));
            let _ = std::fs::remove_file(&snap);
            let r = {
                let db = o.db.lock();
                db.execute("VACUUM INTO ?1", params![snap.display().to_string()])
            };
            if let Err(e) = r {
                o.dirty.store(true, Ordering::Relaxed);
                return Err(e.into());
            }
            let data = std::fs::read(&snap).map_err(|e| StoreError::Io(e.to_string()))?;
            let _ = std::fs::remove_file(&snap);
            if let Err(e) = remote
                .store
                .put(&remote_key(remote, &name), data.into())
                .await
            {
                o.dirty.store(true, Ordering::Relaxed);
                return Err(StoreError::Io(format!("uploading {name}: {e}")));
            }
            n += 1;
        }
        Ok(n)
    }
}

async fn restore_from(remote: &chunkstore::remote::Remote, odir: &Path) -> Result<()> {
    use futures::TryStreamExt;
    use object_store::ObjectStoreExt;
    let prefix = remote.key("control/orgs");
    let list: Vec<object_store::ObjectMeta> = remote
        .store
        .list(Some(&prefix))
        .try_collect()
        .await
        .map_err(|e| {
            StoreError::Io(format!(
                "listing the control plane in the object store: {e}"
            ))
        })?;
    for m in list {
        let Some(file) = m.location.filename() else {
            continue;
        };
        let Some(org) = file.strip_suffix(".db") else {
            continue;
        };
        if validate_org(org).is_err() {
            continue;
        }
        let data = remote
            .store
            .get(&m.location)
            .await
            .map_err(|e| StoreError::Io(e.to_string()))?
            .bytes()
            .await
            .map_err(|e| StoreError::Io(e.to_string()))?;
        let tmp = odir.join(format!(".{org}.restore"));
        std::fs::write(&tmp, &data).map_err(|e| StoreError::Io(e.to_string()))?;
        std::fs::rename(&tmp, odir.join(format!("{org}.db")))
            .map_err(|e| StoreError::Io(e.to_string()))?;
        tracing::info!(
            org,
            bytes = data.len(),
            "organization restored from the object store"
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    #[tokio::test]
    async fn tokens_sprites_and_recovery_from_the_bucket() {
        let d = tempfile::tempdir().unwrap();
        let remote = chunkstore::remote::Remote::memory();
        let cp = ControlPlane::open(&d.path().join("a"), Some(remote.clone()))
            .await
            .unwrap();
        let (_, t1) = cp.create_org("acme").unwrap();
        assert!(matches!(
            cp.create_org("acme"),
            Err(StoreError::AlreadyExists(_))
        ));
        assert!(matches!(cp.create_org("Bad"), Err(StoreError::Invalid(_))));
        assert_eq!(cp.authenticate(&t1).as_deref(), Some("acme"));
        assert_eq!(cp.authenticate(&(t1.clone() + "x")), None);
        assert_eq!(cp.authenticate("spr_other_1_2"), None);
        let (info, t2) = cp.create_token("acme", "ci").unwrap();
        cp.revoke_token("acme", &info.id).unwrap();
        assert_eq!(cp.authenticate(&t2), None);
        assert!(matches!(
            cp.revoke_token("acme", &info.id),
            Err(StoreError::NotFound(_))
        ));
        cp.add_sprite("acme", "web", "private").unwrap();
        assert!(matches!(
            cp.add_sprite("acme", "web", "private"),
            Err(StoreError::AlreadyExists(_))
        ));
        assert!(cp.add_sprite("acme", "a--b", "private").is_err());
        cp.add_sprite("acme", "db", "public").unwrap();
        let page = cp.sprites("acme", None, 1).unwrap();
        assert_eq!(page[0].name, "db");
        assert_eq!(cp.sprites("acme", Some("db"), 10).unwrap()[0].name, "web");
        assert_eq!(cp.owner_of_internal("acme--web").unwrap().0, "acme");
        assert_eq!(cp.replicate().await.unwrap(), 1);
        assert_eq!(cp.replicate().await.unwrap(), 0, "nothing changed");
        // A fresh host on the same bucket gets everything back.
        let cp2 = ControlPlane::open(&d.path().join("b"), Some(remote))
            .await
            .unwrap();
        assert_eq!(cp2.list_orgs(), vec!["acme"]);
        assert_eq!(cp2.authenticate(&t1).as_deref(), Some("acme"));
        assert_eq!(cp2.authenticate(&t2), None);
        assert_eq!(cp2.sprites("acme", None, 10).unwrap().len(), 2);
    }
}
