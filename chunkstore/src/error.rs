use crate::local::BlockAddr;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("I/O error on {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("checksum mismatch at {addr}: expected {expected:08x}, found {actual:08x}")]
    Checksum {
        addr: BlockAddr,
        expected: u32,
        actual: u32,
    },
    #[error("segment {0:016x} is missing")]
    SegmentMissing(u64),
    #[error("no space left on the local disk")]
    NoSpace,
    #[error("invalid argument: {0}")]
    Invalid(String),
    #[error("object store: {0}")]
    Remote(String),
    #[error("object not found: {0}")]
    ObjectNotFound(String),
    #[error("object already exists: {0}")]
    ObjectExists(String),
    #[error("injected failure at {0}")]
    Injected(&'static str),
}

impl Error {
    pub(crate) fn io(what: impl Into<String>, source: std::io::Error) -> Error {
        if source.raw_os_error() == Some(libc::ENOSPC) {
            return Error::NoSpace;
        }
        Error::Io {
            what: what.into(),
            source,
        }
    }
}

pub type Result<T, E = Error> = std::result::Result<T, E>;
