use crate::ids::{CheckpointId, TimelineId};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("volume {0:?} not found")]
    VolumeNotFound(String),
    #[error("volume {0:?} already exists")]
    VolumeExists(String),
    #[error("checkpoint {id} of volume {volume:?} not found")]
    CheckpointNotFound { volume: String, id: CheckpointId },
    #[error(
        "invalid volume name {0:?}: use 1-128 characters from [A-Za-z0-9._-], not starting with '.' or '-'"
    )]
    InvalidName(String),
    #[error("invalid volume size {0} bytes: must be a positive multiple of 4096")]
    InvalidSize(u64),
    #[error("metadata corrupt: {0}")]
    Corrupt(String),
    #[error("timeline {0:?} missing from the catalog")]
    TimelineMissing(TimelineId),
    #[error("rocksdb: {0}")]
    Db(#[from] rocksdb::Error),
    #[error("injected failure at {0}")]
    Injected(&'static str),
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
