//! Where the object-store tier lives: [`RemoteConfig`] (the `[object_store]` section of the
//! daemon's configuration) and [`RemoteConfig::open`], which turns it into a [`Remote`].
//!
//! | `url` | store | key prefix |
//! |---|---|---|
//! | empty | none: the tier is disabled | |
//! | `s3://BUCKET/PREFIX` | S3 or an S3-compatible server (`endpoint`) | `PREFIX` |
//! | `file:///ABS/DIR` | the local directory (created if missing), fsync'ed writes | none |
//! | `memory://` (or `memory:///PREFIX`) | a fresh in-memory store per `open` (tests) | `PREFIX` |
//!
//! S3 settings not set in the configuration are read from the standard environment
//! variables: `endpoint` from `AWS_ENDPOINT_URL_S3`, `AWS_ENDPOINT_URL`, `AWS_ENDPOINT`;
//! `region` from `AWS_REGION`, `AWS_DEFAULT_REGION` (else `us-east-1`); credentials from
//! `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_SESSION_TOKEN`; `allow_http` from
//! `AWS_ALLOW_HTTP`. Without static credentials, `object_store`'s provider chain applies (web
//! identity and container credentials from their `AWS_*` variables, then instance metadata).
//!
//! S3 is opened with conditional put (`If-None-Match` / `If-Match`, object_store's
//! `S3ConditionalPut::ETagMatch`), so `PutMode::Create` and `PutMode::Update` work. The S3
//! client retries a failed request itself at most [`S3_CLIENT_RETRIES`] times within
//! [`S3_CLIENT_RETRY_TIMEOUT`]; longer outages are the business of
//! [`retry()`](super::retry()).
//!
//! Backend support of `PutMode` (object_store 0.14.2): S3 `Create` + `Update` (by ETag);
//! local directory `Create` only (`Update` is `NotImplemented`); memory `Create` + `Update`.

use std::fmt;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use object_store::aws::{AmazonS3Builder, AmazonS3ConfigKey, S3ConditionalPut};
use object_store::local::LocalFileSystem;
use object_store::memory::InMemory;
use object_store::path::Path;
use object_store::{BackoffConfig, ObjectStore, RetryConfig};
use serde::{Deserialize, Serialize};
use url::Url;

use super::Remote;

/// Retries of one S3 request inside the `object_store` client.
pub const S3_CLIENT_RETRIES: usize = 3;
/// Time budget of those retries.
pub const S3_CLIENT_RETRY_TIMEOUT: Duration = Duration::from_secs(30);
const DEFAULT_REGION: &str = "us-east-1";

/// Credential-chain variables handed to the S3 client as they are.
const PASSTHROUGH_ENV: &[&str] = &[
    "AWS_WEB_IDENTITY_TOKEN_FILE",
    "AWS_ROLE_ARN",
    "AWS_ROLE_SESSION_NAME",
    "AWS_ENDPOINT_URL_STS",
    "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
    "AWS_CONTAINER_CREDENTIALS_FULL_URI",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE",
    "AWS_METADATA_ENDPOINT",
    "AWS_IMDSV1_FALLBACK",
];

/// Why a [`RemoteConfig`] could not be opened.
#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("object_store.url {url:?}: {reason}")]
    InvalidUrl { url: String, reason: String },
    #[error("object_store.url {url:?} names no bucket: expected s3://BUCKET/PREFIX")]
    MissingBucket { url: String },
    #[error(
        "object_store.url {url:?}: unsupported scheme {scheme:?} (expected s3://, file:// or memory://)"
    )]
    UnsupportedScheme { url: String, scheme: String },
    #[error("object_store.{field}: {reason}")]
    InvalidSetting { field: &'static str, reason: String },
    #[error("object_store: creating directory {}: {source}", path.display())]
    CreateDir {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("object_store: opening {url:?}: {source}")]
    Open {
        url: String,
        #[source]
        source: object_store::Error,
    },
}

/// The object-store tier's location and S3 settings. Unset S3 settings fall back to the
/// `AWS_*` environment variables (module docs).
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RemoteConfig {
    /// `s3://BUCKET/PREFIX`, `file:///ABS/DIR`, `memory://`, or empty to disable the tier.
    pub url: String,
    /// S3-compatible endpoint, e.g. `http://127.0.0.1:9000`; unset means AWS.
    pub endpoint: Option<String>,
    pub region: Option<String>,
    pub access_key_id: Option<String>,
    pub secret_access_key: Option<String>,
    pub session_token: Option<String>,
    /// Permit `http://` endpoints (default false).
    pub allow_http: Option<bool>,
}

impl fmt::Debug for RemoteConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let redact = |s: &Option<String>| s.as_ref().map(|_| "<redacted>");
        f.debug_struct("RemoteConfig")
            .field("url", &self.url)
            .field("endpoint", &self.endpoint)
            .field("region", &self.region)
            .field("access_key_id", &self.access_key_id)
            .field("secret_access_key", &redact(&self.secret_access_key))
            .field("session_token", &redact(&self.session_token))
            .field("allow_http", &self.allow_http)
            .finish()
    }
}

/// A [`RemoteConfig`] with its URL parsed and environment fallbacks applied: what
/// [`RemoteConfig::open`] builds.
#[derive(Clone, PartialEq, Eq)]
pub enum Target {
    Memory {
        prefix: Path,
    },
    File {
        dir: PathBuf,
    },
    S3 {
        bucket: String,
        prefix: Path,
        endpoint: Option<String>,
        region: String,
        access_key_id: Option<String>,
        secret_access_key: Option<String>,
        session_token: Option<String>,
        allow_http: bool,
        /// Credential-chain `AWS_*` variables passed through, `(name, value)`.
        passthrough: Vec<(String, String)>,
    },
}

impl fmt::Debug for Target {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Target::Memory { prefix } => f.debug_struct("Memory").field("prefix", prefix).finish(),
            Target::File { dir } => f.debug_struct("File").field("dir", dir).finish(),
            Target::S3 {
                bucket,
                prefix,
                endpoint,
                region,
                access_key_id,
                allow_http,
                ..
            } => f
                .debug_struct("S3")
                .field("bucket", bucket)
                .field("prefix", prefix)
                .field("endpoint", endpoint)
                .field("region", region)
                .field("access_key_id", access_key_id)
                .field("allow_http", allow_http)
                .finish_non_exhaustive(),
        }
    }
}

impl RemoteConfig {
    /// Whether the tier is configured at all.
    pub fn is_enabled(&self) -> bool {
        !self.url.trim().is_empty()
    }

    /// Opens the configured store, reading fallbacks from the process environment; `None`
    /// when `url` is empty. Creates a `file://` directory; makes no request to S3.
    pub fn open(&self) -> Result<Option<Remote>, RemoteError> {
        self.open_with_env(&|name| std::env::var(name).ok())
    }

    /// [`open`](Self::open) with the environment given as a lookup function.
    pub fn open_with_env(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<Remote>, RemoteError> {
        let Some(target) = self.resolve(env)? else {
            return Ok(None);
        };
        let open_err = |source| RemoteError::Open {
            url: self.url.clone(),
            source,
        };
        let remote = match target {
            Target::Memory { prefix } => Remote::new(Arc::new(InMemory::new()), prefix),
            Target::File { dir } => {
                std::fs::create_dir_all(&dir).map_err(|source| RemoteError::CreateDir {
                    path: dir.clone(),
                    source,
                })?;
                let fs = LocalFileSystem::new_with_prefix(&dir)
                    .map_err(open_err)?
                    .with_fsync(true)
                    .with_automatic_cleanup(true);
                Remote::new(Arc::new(fs), Path::default())
            }
            Target::S3 {
                bucket,
                prefix,
                endpoint,
                region,
                access_key_id,
                secret_access_key,
                session_token,
                allow_http,
                passthrough,
            } => {
                let mut b = AmazonS3Builder::new()
                    .with_bucket_name(bucket)
                    .with_region(region)
                    .with_conditional_put(S3ConditionalPut::ETagMatch)
                    .with_retry(RetryConfig {
                        backoff: BackoffConfig {
                            init_backoff: Duration::from_millis(100),
                            max_backoff: Duration::from_secs(5),
                            base: 2.0,
                        },
                        max_retries: S3_CLIENT_RETRIES,
                        retry_timeout: S3_CLIENT_RETRY_TIMEOUT,
                    })
                    .with_allow_http(allow_http);
                if let Some(e) = endpoint {
                    b = b.with_endpoint(e);
                }
                if let Some(k) = access_key_id {
                    b = b.with_access_key_id(k);
                }
                if let Some(s) = secret_access_key {
                    b = b.with_secret_access_key(s);
                }
                if let Some(t) = session_token {
                    b = b.with_token(t);
                }
                for (name, value) in passthrough {
                    if let Ok(key) = name.to_ascii_lowercase().parse::<AmazonS3ConfigKey>() {
                        b = b.with_config(key, value);
                    }
                }
                let s3 = b.build().map_err(open_err)?;
                Remote::new(Arc::new(s3) as Arc<dyn ObjectStore>, prefix)
            }
        };
        Ok(Some(remote))
    }

    /// Parses `url` and applies the environment fallbacks, validating everything `open` can
    /// check without touching the store. `None` when `url` is empty.
    pub fn resolve(
        &self,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Option<Target>, RemoteError> {
        let raw = self.url.trim();
        if raw.is_empty() {
            return Ok(None);
        }
        let invalid = |reason: &str| RemoteError::InvalidUrl {
            url: raw.to_string(),
            reason: reason.to_string(),
        };
        let url = Url::parse(raw).map_err(|e| invalid(&e.to_string()))?;
        if url.query().is_some() || url.fragment().is_some() {
            return Err(invalid("query strings and fragments are not supported"));
        }
        if !url.username().is_empty() || url.password().is_some() {
            return Err(invalid(
                "credentials do not belong in the url: set access_key_id / secret_access_key",
            ));
        }
        let scheme = url.scheme().to_ascii_lowercase();
        if scheme != "s3" {
            self.reject_s3_settings(&scheme)?;
        }
        let target = match scheme.as_str() {
            "memory" => {
                if url.host_str().is_some_and(|h| !h.is_empty()) {
                    return Err(invalid(
                        "memory:// takes no host; use memory:// or memory:///PREFIX",
                    ));
                }
                Target::Memory {
                    prefix: url_prefix(&url).map_err(|r| invalid(&r))?,
                }
            }
            "file" => {
                if url
                    .host_str()
                    .is_some_and(|h| !h.is_empty() && h != "localhost")
                {
                    return Err(invalid(
                        "file:// urls must be absolute: file:///ABS/DIR (three slashes)",
                    ));
                }
                let dir = url
                    .to_file_path()
                    .map_err(|()| invalid("not a local absolute path"))?;
                if dir.parent().is_none() {
                    return Err(invalid("refusing to use / as the object store"));
                }
                Target::File { dir }
            }
            "s3" => {
                let bucket = url.host_str().unwrap_or_default().to_string();
                if bucket.is_empty() {
                    return Err(RemoteError::MissingBucket {
                        url: raw.to_string(),
                    });
                }
                if url.port().is_some() {
                    return Err(invalid(
                        "s3://BUCKET takes no port; set endpoint for a custom server",
                    ));
                }
                validate_bucket(&bucket).map_err(|r| invalid(&r))?;
                self.resolve_s3(bucket, url_prefix(&url).map_err(|r| invalid(&r))?, env)?
            }
            _ => {
                return Err(RemoteError::UnsupportedScheme {
                    url: raw.to_string(),
                    scheme,
                });
            }
        };
        Ok(Some(target))
    }

    fn resolve_s3(
        &self,
        bucket: String,
        prefix: Path,
        env: &dyn Fn(&str) -> Option<String>,
    ) -> Result<Target, RemoteError> {
        let from_env = |names: &[&str]| {
            names.iter().find_map(|n| {
                env(n)
                    .map(|v| v.trim().to_string())
                    .filter(|v| !v.is_empty())
            })
        };
        let setting = |value: &Option<String>, names: &[&str]| {
            value
                .as_ref()
                .map(|v| v.trim().to_string())
                .filter(|v| !v.is_empty())
                .or_else(|| from_env(names))
        };
        let endpoint = setting(
            &self.endpoint,
            &["AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL", "AWS_ENDPOINT"],
        );
        let region = setting(&self.region, &["AWS_REGION", "AWS_DEFAULT_REGION"])
            .unwrap_or_else(|| DEFAULT_REGION.to_string());
        let access_key_id = setting(&self.access_key_id, &["AWS_ACCESS_KEY_ID"]);
        let secret_access_key = setting(&self.secret_access_key, &["AWS_SECRET_ACCESS_KEY"]);
        let session_token = setting(&self.session_token, &["AWS_SESSION_TOKEN"]);
        let allow_http = match self.allow_http {
            Some(v) => v,
            None => match from_env(&["AWS_ALLOW_HTTP"]) {
                None => false,
                Some(v) => parse_bool(&v).ok_or_else(|| RemoteError::InvalidSetting {
                    field: "allow_http",
                    reason: format!("AWS_ALLOW_HTTP={v:?} is not true/false"),
                })?,
            },
        };
        match (&access_key_id, &secret_access_key) {
            (Some(_), None) => {
                return Err(RemoteError::InvalidSetting {
                    field: "secret_access_key",
                    reason: "access_key_id is set but secret_access_key is not (nor AWS_SECRET_ACCESS_KEY)".into(),
                });
            }
            (None, Some(_)) => {
                return Err(RemoteError::InvalidSetting {
                    field: "access_key_id",
                    reason:
                        "secret_access_key is set but access_key_id is not (nor AWS_ACCESS_KEY_ID)"
                            .into(),
                });
            }
            _ => {}
        }
        if let Some(e) = &endpoint {
            let parsed = Url::parse(e).map_err(|err| RemoteError::InvalidSetting {
                field: "endpoint",
                reason: format!("{e:?}: {err}"),
            })?;
            match parsed.scheme() {
                "https" => {}
                "http" if allow_http => {}
                "http" => {
                    return Err(RemoteError::InvalidSetting {
                        field: "endpoint",
                        reason: format!(
                            "{e:?} is plain http: set allow_http = true (or AWS_ALLOW_HTTP=true)"
                        ),
                    });
                }
                other => {
                    return Err(RemoteError::InvalidSetting {
                        field: "endpoint",
                        reason: format!("{e:?}: scheme {other:?} is not http or https"),
                    });
                }
            }
        }
        let passthrough = PASSTHROUGH_ENV
            .iter()
            .filter_map(|n| env(n).map(|v| (n.to_string(), v)))
            .collect();
        Ok(Target::S3 {
            bucket,
            prefix,
            endpoint,
            region,
            access_key_id,
            secret_access_key,
            session_token,
            allow_http,
            passthrough,
        })
    }

    /// S3 settings in the configuration of a non-S3 url are a mistake worth reporting (the
    /// environment's are not: it may be shared with other tools).
    fn reject_s3_settings(&self, scheme: &str) -> Result<(), RemoteError> {
        let set: [(&'static str, bool); 6] = [
            ("endpoint", self.endpoint.is_some()),
            ("region", self.region.is_some()),
            ("access_key_id", self.access_key_id.is_some()),
            ("secret_access_key", self.secret_access_key.is_some()),
            ("session_token", self.session_token.is_some()),
            ("allow_http", self.allow_http.is_some()),
        ];
        match set.iter().find(|(_, is_set)| *is_set) {
            Some((field, _)) => Err(RemoteError::InvalidSetting {
                field,
                reason: format!("only applies to s3:// urls, not {scheme}://"),
            }),
            None => Ok(()),
        }
    }
}

/// The key prefix in a url's path: percent-decoded, without leading/trailing slashes.
fn url_prefix(url: &Url) -> Result<Path, String> {
    let path = url.path().trim_matches('/');
    if path.is_empty() {
        return Ok(Path::default());
    }
    Path::from_url_path(path).map_err(|e| format!("invalid key prefix {path:?}: {e}"))
}

/// S3 bucket naming rules (the subset that matters for a typo): 3..=63 characters of
/// lowercase letters, digits, '.' and '-', starting and ending with a letter or digit.
fn validate_bucket(bucket: &str) -> Result<(), String> {
    let ok_len = (3..=63).contains(&bucket.len());
    let ok_chars = bucket
        .bytes()
        .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'.' || b == b'-');
    let ok_ends = bucket
        .bytes()
        .next()
        .zip(bucket.bytes().last())
        .is_some_and(|(a, z)| a.is_ascii_alphanumeric() && z.is_ascii_alphanumeric());
    if ok_len && ok_chars && ok_ends {
        Ok(())
    } else {
        Err(format!(
            "bucket name {bucket:?} is invalid: 3-63 characters of a-z, 0-9, '.', '-', starting and ending with a letter or digit"
        ))
    }
}

fn parse_bool(v: &str) -> Option<bool> {
    match v.trim().to_ascii_lowercase().as_str() {
        "1" | "true" | "yes" | "on" => Some(true),
        "0" | "false" | "no" | "off" => Some(false),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use std::collections::HashMap;

    use object_store::{ObjectStoreExt, PutMode, PutPayload};

    use super::*;

    fn env(vars: &[(&str, &str)]) -> impl Fn(&str) -> Option<String> {
        let map: HashMap<String, String> = vars
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        move |k| map.get(k).cloned()
    }

    fn no_env() -> impl Fn(&str) -> Option<String> {
        env(&[])
    }

    fn cfg(url: &str) -> RemoteConfig {
        RemoteConfig {
            url: url.into(),
            ..RemoteConfig::default()
        }
    }

    #[test]
    fn empty_url_disables() {
        assert_eq!(cfg("").resolve(&no_env()).unwrap(), None);
        assert_eq!(cfg("  ").resolve(&no_env()).unwrap(), None);
        assert!(cfg("").open_with_env(&no_env()).unwrap().is_none());
        assert!(!cfg("").is_enabled());
    }

    #[test]
    fn memory_urls() {
        assert_eq!(
            cfg("memory://").resolve(&no_env()).unwrap(),
            Some(Target::Memory {
                prefix: Path::default()
            })
        );
        assert_eq!(
            cfg("memory:///a/b/").resolve(&no_env()).unwrap(),
            Some(Target::Memory {
                prefix: Path::from("a/b")
            })
        );
        assert!(matches!(
            cfg("memory://host").resolve(&no_env()),
            Err(RemoteError::InvalidUrl { .. })
        ));
    }

    #[test]
    fn file_urls() {
        assert_eq!(
            cfg("file:///var/lib/sprites/objects")
                .resolve(&no_env())
                .unwrap(),
            Some(Target::File {
                dir: PathBuf::from("/var/lib/sprites/objects")
            })
        );
        assert_eq!(
            cfg("file:///tmp/with%20space").resolve(&no_env()).unwrap(),
            Some(Target::File {
                dir: PathBuf::from("/tmp/with space")
            })
        );
        for bad in ["file://relative/dir", "file:///", "file://host/x"] {
            let e = cfg(bad).resolve(&no_env()).unwrap_err();
            assert!(matches!(e, RemoteError::InvalidUrl { .. }), "{bad}: {e}");
        }
    }

    #[test]
    fn s3_urls_and_defaults() {
        let t = cfg("s3://my-bucket/some/prefix/")
            .resolve(&no_env())
            .unwrap()
            .unwrap();
        let Target::S3 {
            bucket,
            prefix,
            endpoint,
            region,
            access_key_id,
            allow_http,
            ..
        } = t
        else {
            panic!("not s3: {t:?}");
        };
        assert_eq!(bucket, "my-bucket");
        assert_eq!(prefix, Path::from("some/prefix"));
        assert_eq!(endpoint, None);
        assert_eq!(region, "us-east-1");
        assert_eq!(access_key_id, None);
        assert!(!allow_http);
        let Some(Target::S3 { prefix, .. }) = cfg("s3://bucket").resolve(&no_env()).unwrap() else {
            panic!()
        };
        assert!(prefix.is_root());
    }

    #[test]
    fn s3_errors() {
        for url in ["s3://", "s3:///prefix"] {
            let e = cfg(url).resolve(&no_env()).unwrap_err();
            assert!(matches!(e, RemoteError::MissingBucket { .. }), "{url}: {e}");
        }
        for url in [
            "s3://Upper/x",
            "s3://a/x",
            "s3://bucket:9000/x",
            "s3://bucket/x?y=1",
            "s3://k:s@bucket/x",
        ] {
            let e = cfg(url).resolve(&no_env()).unwrap_err();
            assert!(matches!(e, RemoteError::InvalidUrl { .. }), "{url}: {e}");
        }
        for url in ["gs://bucket/x", "http://example.com/x"] {
            let e = cfg(url).resolve(&no_env()).unwrap_err();
            assert!(
                matches!(e, RemoteError::UnsupportedScheme { .. }),
                "{url}: {e}"
            );
        }
        assert!(matches!(
            cfg("not a url").resolve(&no_env()),
            Err(RemoteError::InvalidUrl { .. })
        ));
    }

    #[test]
    fn env_fallbacks_and_precedence() {
        let e = env(&[
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:5000"),
            ("AWS_DEFAULT_REGION", "eu-west-1"),
            ("AWS_ACCESS_KEY_ID", "env-key"),
            ("AWS_SECRET_ACCESS_KEY", "env-secret"),
            ("AWS_SESSION_TOKEN", "env-token"),
            ("AWS_ALLOW_HTTP", "true"),
            ("AWS_ROLE_ARN", "arn:aws:iam::1:role/x"),
        ]);
        let Some(Target::S3 {
            endpoint,
            region,
            access_key_id,
            secret_access_key,
            session_token,
            allow_http,
            passthrough,
            ..
        }) = cfg("s3://bucket/p").resolve(&e).unwrap()
        else {
            panic!()
        };
        assert_eq!(endpoint.as_deref(), Some("http://127.0.0.1:5000"));
        assert_eq!(region, "eu-west-1");
        assert_eq!(access_key_id.as_deref(), Some("env-key"));
        assert_eq!(secret_access_key.as_deref(), Some("env-secret"));
        assert_eq!(session_token.as_deref(), Some("env-token"));
        assert!(allow_http);
        assert_eq!(
            passthrough,
            [(
                "AWS_ROLE_ARN".to_string(),
                "arn:aws:iam::1:role/x".to_string()
            )]
        );

        // Configuration wins over the environment; AWS_REGION over AWS_DEFAULT_REGION.
        let c = RemoteConfig {
            url: "s3://bucket/p".into(),
            endpoint: Some("https://s3.example.com".into()),
            access_key_id: Some("cfg-key".into()),
            secret_access_key: Some("cfg-secret".into()),
            allow_http: Some(false),
            ..RemoteConfig::default()
        };
        let e = env(&[
            ("AWS_ENDPOINT_URL", "http://127.0.0.1:5000"),
            ("AWS_REGION", "ap-south-1"),
            ("AWS_DEFAULT_REGION", "eu-west-1"),
            ("AWS_ACCESS_KEY_ID", "env-key"),
        ]);
        let Some(Target::S3 {
            endpoint,
            region,
            access_key_id,
            secret_access_key,
            allow_http,
            ..
        }) = c.resolve(&e).unwrap()
        else {
            panic!()
        };
        assert_eq!(endpoint.as_deref(), Some("https://s3.example.com"));
        assert_eq!(region, "ap-south-1");
        assert_eq!(access_key_id.as_deref(), Some("cfg-key"));
        assert_eq!(secret_access_key.as_deref(), Some("cfg-secret"));
        assert!(!allow_http);
    }

    #[test]
    fn setting_errors() {
        let http = RemoteConfig {
            url: "s3://bucket".into(),
            endpoint: Some("http://127.0.0.1:5000".into()),
            ..RemoteConfig::default()
        };
        let e = http.resolve(&no_env()).unwrap_err();
        assert!(
            matches!(
                e,
                RemoteError::InvalidSetting {
                    field: "endpoint",
                    ..
                }
            ),
            "{e}"
        );
        assert!(e.to_string().contains("allow_http"), "{e}");
        assert!(http.resolve(&env(&[("AWS_ALLOW_HTTP", "1")])).is_ok());
        assert!(matches!(
            http.resolve(&env(&[("AWS_ALLOW_HTTP", "maybe")])),
            Err(RemoteError::InvalidSetting {
                field: "allow_http",
                ..
            })
        ));
        let bad_endpoint = RemoteConfig {
            endpoint: Some("ftp://x".into()),
            ..http.clone()
        };
        assert!(matches!(
            bad_endpoint.resolve(&no_env()),
            Err(RemoteError::InvalidSetting {
                field: "endpoint",
                ..
            })
        ));
        let half_creds = RemoteConfig {
            url: "s3://bucket".into(),
            access_key_id: Some("k".into()),
            ..RemoteConfig::default()
        };
        assert!(matches!(
            half_creds.resolve(&no_env()),
            Err(RemoteError::InvalidSetting {
                field: "secret_access_key",
                ..
            })
        ));
        assert!(
            half_creds
                .resolve(&env(&[("AWS_SECRET_ACCESS_KEY", "s")]))
                .is_ok()
        );
        let s3_field_on_file = RemoteConfig {
            url: "file:///tmp/x".into(),
            region: Some("eu-west-1".into()),
            ..RemoteConfig::default()
        };
        assert!(matches!(
            s3_field_on_file.resolve(&no_env()),
            Err(RemoteError::InvalidSetting {
                field: "region",
                ..
            })
        ));
        // The environment's S3 settings do not spoil a file:// url.
        assert!(
            cfg("file:///tmp/x")
                .resolve(&env(&[("AWS_REGION", "x")]))
                .is_ok()
        );
    }

    #[test]
    fn deserialize_rejects_unknown_fields_and_redacts_secrets() {
        let c: RemoteConfig = serde_json::from_str(
            r#"{"url": "s3://bucket/p", "endpoint": "http://127.0.0.1:5000", "allow_http": true,
                "access_key_id": "k", "secret_access_key": "very-secret"}"#,
        )
        .unwrap();
        assert_eq!(c.url, "s3://bucket/p");
        assert_eq!(c.allow_http, Some(true));
        assert!(!format!("{c:?}").contains("very-secret"));
        let t = c.resolve(&no_env()).unwrap();
        assert!(!format!("{t:?}").contains("very-secret"));
        let e = serde_json::from_str::<RemoteConfig>(r#"{"url": "memory://", "bucket": "x"}"#)
            .unwrap_err();
        assert!(e.to_string().contains("unknown field"), "{e}");
        let c: RemoteConfig = serde_json::from_str("{}").unwrap();
        assert_eq!(c, RemoteConfig::default());
    }

    #[tokio::test]
    async fn open_memory_and_file() {
        let r = cfg("memory:///pre")
            .open_with_env(&no_env())
            .unwrap()
            .unwrap();
        assert_eq!(r.key("a/b"), Path::from("pre/a/b"));
        r.store
            .put(&r.key("a/b"), PutPayload::from_static(b"x"))
            .await
            .unwrap();

        let dir = tempfile::tempdir().unwrap();
        let sub = dir.path().join("objects/nested");
        let url = Url::from_file_path(&sub).unwrap().to_string();
        let r = cfg(&url).open_with_env(&no_env()).unwrap().unwrap();
        assert!(sub.is_dir());
        let k = r.key("volumes/v/lease");
        r.store
            .put_opts(&k, PutPayload::from_static(b"1"), PutMode::Create.into())
            .await
            .unwrap();
        assert!(sub.join("volumes/v/lease").is_file());
        let e = r
            .store
            .put_opts(&k, PutPayload::from_static(b"2"), PutMode::Create.into())
            .await
            .unwrap_err();
        assert!(
            matches!(e, object_store::Error::AlreadyExists { .. }),
            "{e}"
        );
    }

    #[test]
    fn open_s3_builds_without_network() {
        let c = RemoteConfig {
            url: "s3://bucket/p".into(),
            endpoint: Some("http://127.0.0.1:1".into()),
            allow_http: Some(true),
            access_key_id: Some("k".into()),
            secret_access_key: Some("s".into()),
            ..RemoteConfig::default()
        };
        let r = c.open_with_env(&no_env()).unwrap().unwrap();
        assert_eq!(r.prefix, Path::from("p"));
        assert!(r.store.to_string().contains("bucket"), "{}", r.store);
    }
}
