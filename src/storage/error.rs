//! Storage errors, sorted by what a caller can do about them. Each keeps its
//! cause: a description (in the message, as logs show it) and, when a
//! driver or the system raised it, that error itself as `source()` for code
//! that needs its type. Causes are shared, so errors stay cheap to clone (a
//! failed group commit answers every caller with the same error).

use std::error::Error;
use std::fmt;
use std::sync::Arc;

/// What caused a [`StorageError`].
#[derive(Clone)]
pub struct Cause {
    text: String,
    source: Option<Arc<dyn Error + Send + Sync + 'static>>,
}

impl Cause {
    /// A cause raised by `source`, described by its own message.
    pub fn of(source: impl Error + Send + Sync + 'static) -> Cause {
        Cause {
            text: source.to_string(),
            source: Some(Arc::new(source)),
        }
    }

    /// The same cause, its description preceded by `context`.
    pub fn context(self, context: impl fmt::Display) -> Cause {
        Cause {
            text: format!("{context}: {}", self.text),
            source: self.source,
        }
    }

    /// The same cause, described anew from its description.
    pub fn reworded(self, describe: impl FnOnce(&str) -> String) -> Cause {
        Cause {
            text: describe(&self.text),
            source: self.source,
        }
    }

    /// The description alone.
    pub fn text(&self) -> &str {
        &self.text
    }
}

impl From<String> for Cause {
    fn from(text: String) -> Cause {
        Cause { text, source: None }
    }
}

impl From<&str> for Cause {
    fn from(text: &str) -> Cause {
        Cause::from(text.to_owned())
    }
}

impl fmt::Display for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.text)
    }
}

impl fmt::Debug for Cause {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(&self.text, f)?;
        if let Some(source) = &self.source {
            write!(f, " (from {source:?})")?;
        }
        Ok(())
    }
}

/// Causes compare by description (the source's type is not comparable).
impl PartialEq for Cause {
    fn eq(&self, other: &Cause) -> bool {
        self.text == other.text
    }
}

impl Eq for Cause {}

/// What went wrong in storage, typed so callers can tell a passing failure
/// (retry later) from one that needs an operator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StorageError {
    /// Cannot reach or use storage right now (connection lost, busy, disk
    /// full, pool exhausted); the same call may work later.
    Unavailable(Cause),
    /// A concurrent change got in the way (serialization failure, deadlock,
    /// a broken uniqueness assumption); retrying the operation is safe.
    Conflict(Cause),
    /// The stored data is damaged or not usable by this build, or the
    /// operation's own data is refused; an operator must act. Retrying does
    /// not help.
    Corrupt(Cause),
    /// Storage was closed (shutting down).
    Closed,
}

impl StorageError {
    /// Whether trying the same operation again later may succeed.
    pub fn is_transient(&self) -> bool {
        matches!(
            self,
            StorageError::Unavailable(_) | StorageError::Conflict(_)
        )
    }

    /// What caused it (`None` for [`StorageError::Closed`]).
    pub fn cause(&self) -> Option<&Cause> {
        match self {
            StorageError::Unavailable(c) | StorageError::Conflict(c) | StorageError::Corrupt(c) => {
                Some(c)
            }
            StorageError::Closed => None,
        }
    }

    /// The same kind of error, its description preceded by `context`.
    pub fn context(self, context: impl fmt::Display) -> StorageError {
        match self {
            StorageError::Unavailable(c) => StorageError::Unavailable(c.context(context)),
            StorageError::Conflict(c) => StorageError::Conflict(c.context(context)),
            StorageError::Corrupt(c) => StorageError::Corrupt(c.context(context)),
            StorageError::Closed => StorageError::Closed,
        }
    }
}

impl fmt::Display for StorageError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StorageError::Unavailable(c) => write!(f, "storage unavailable: {c}"),
            StorageError::Conflict(c) => write!(f, "storage conflict: {c}"),
            StorageError::Corrupt(c) => write!(f, "storage damaged: {c}"),
            StorageError::Closed => f.write_str("storage is closed"),
        }
    }
}

impl Error for StorageError {
    /// The driver's or system's error, when one raised this.
    fn source(&self) -> Option<&(dyn Error + 'static)> {
        let source = self.cause()?.source.as_deref()?;
        Some(source as &(dyn Error + 'static))
    }
}

/// Why [`super::Storage::accept_with`] stored nothing.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AcceptError {
    #[error(transparent)]
    Storage(#[from] StorageError),
    /// [`super::AcceptOptions::first_unseen`]: the first message's
    /// `messageId` is already stored.
    #[error("a message with messageId {0:?} is already stored")]
    AlreadyStored(String),
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cause_keeps_its_source_through_context_and_clones() {
        let io = std::io::Error::new(std::io::ErrorKind::PermissionDenied, "denied");
        let e = StorageError::Unavailable(Cause::of(io)).context("opening td.db");
        let copy = e.clone();
        assert_eq!(
            copy.to_string(),
            "storage unavailable: opening td.db: denied"
        );
        let source = copy.source().expect("the io error is the source");
        let io = source
            .downcast_ref::<std::io::Error>()
            .expect("typed as it was raised");
        assert_eq!(io.kind(), std::io::ErrorKind::PermissionDenied);
        assert!(copy.is_transient());
        // A described cause has no source.
        let plain = StorageError::Corrupt("stored 1 of 2 messages".into());
        assert!(plain.source().is_none());
        assert!(!plain.is_transient());
        assert_eq!(
            plain,
            StorageError::Corrupt("stored 1 of 2 messages".into())
        );
    }
}
