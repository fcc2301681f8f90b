//! The engine's error type and its mappings to each boundary: block-device status
//! (NBD errno / virtio status), HTTP status of the admin API, and CLI exit codes.

use vhost_blk::DeviceError;

#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    #[error(transparent)]
    Meta(#[from] snapshotter::Error),
    #[error(transparent)]
    Data(#[from] chunkstore::Error),
    #[error(
        "volume {name:?} is in use by {clients} client(s); disconnect them first or pass --force (which disconnects them)"
    )]
    Busy { name: String, clients: usize },
    #[error("volume {name:?} is attached by {holder}; {hint}")]
    AttachConflict {
        name: String,
        holder: String,
        hint: String,
    },
    #[error("volume {0:?} is being restored or deleted; try again")]
    Transitioning(String),
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("object store: {0}")]
    Remote(String),
    #[error("{0}")]
    Fenced(String),
    #[error("internal error: {0}")]
    Internal(String),
}

/// Stable error codes shared by the admin API (JSON `code`) and the CLI (exit status).
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    NotFound,
    AlreadyExists,
    InvalidArgument,
    Busy,
    /// The object store failed or is unreachable (retry later).
    Unavailable,
    Internal,
}

impl ErrorCode {
    pub fn http_status(self) -> u16 {
        match self {
            ErrorCode::NotFound => 404,
            ErrorCode::AlreadyExists => 409,
            ErrorCode::Busy => 409,
            ErrorCode::InvalidArgument => 400,
            ErrorCode::Unavailable => 503,
            ErrorCode::Internal => 500,
        }
    }

    /// Exit status of the CLI (documented in the README).
    pub fn exit_code(self) -> i32 {
        match self {
            ErrorCode::Internal => 1,
            ErrorCode::NotFound => 3,
            ErrorCode::AlreadyExists => 4,
            ErrorCode::Busy => 5,
            ErrorCode::InvalidArgument => 6,
            ErrorCode::Unavailable => 8,
        }
    }
}

impl EngineError {
    pub fn code(&self) -> ErrorCode {
        use snapshotter::Error as M;
        match self {
            EngineError::Meta(M::VolumeNotFound(_) | M::CheckpointNotFound { .. }) => {
                ErrorCode::NotFound
            }
            EngineError::Meta(M::VolumeExists(_)) => ErrorCode::AlreadyExists,
            EngineError::Meta(M::InvalidName(_) | M::InvalidSize(_)) | EngineError::Invalid(_) => {
                ErrorCode::InvalidArgument
            }
            EngineError::Busy { .. }
            | EngineError::Transitioning(_)
            | EngineError::AttachConflict { .. }
            | EngineError::Fenced(_) => ErrorCode::Busy,
            EngineError::Remote(_)
            | EngineError::Data(chunkstore::Error::Remote(_))
            | EngineError::Data(chunkstore::Error::ObjectNotFound(_))
            | EngineError::Data(chunkstore::Error::ObjectExists(_)) => ErrorCode::Unavailable,
            EngineError::Data(chunkstore::Error::Invalid(_)) => ErrorCode::InvalidArgument,
            _ => ErrorCode::Internal,
        }
    }

    pub fn to_device_error(&self) -> DeviceError {
        match self {
            EngineError::Data(chunkstore::Error::NoSpace) => DeviceError::NoSpace,
            EngineError::Meta(snapshotter::Error::VolumeNotFound(v)) => {
                DeviceError::Gone(format!("volume {v} was deleted"))
            }
            EngineError::Transitioning(v) => {
                DeviceError::Gone(format!("volume {v} is being restored"))
            }
            e => DeviceError::Io(e.to_string()),
        }
    }
}

impl From<EngineError> for DeviceError {
    fn from(e: EngineError) -> Self {
        e.to_device_error()
    }
}
