//! Text as PostgreSQL stores and indexes it.

use std::borrow::Cow;

/// Text as PostgreSQL can store it: NUL (which it refuses) becomes U+FFFD.
pub(super) fn pg_text(s: &str) -> Cow<'_, str> {
    if s.contains('\0') {
        Cow::Owned(s.replace('\0', "\u{FFFD}"))
    } else {
        Cow::Borrowed(s)
    }
}

pub(super) fn pg_text_opt(s: &Option<String>) -> Option<Cow<'_, str>> {
    s.as_deref().map(pg_text)
}

/// The fixed-size key an index holds for client-chosen text (ordering keys,
/// dedupe entries, page-category users): SHA-256 of the stored text, hex.
/// PostgreSQL refuses a B-tree entry over ~2.7 KB, and an index of digests
/// costs the same whatever the ids' length. The SQL twin, used by the
/// schema 3 migration, is [`schema::SQL_TEXT_KEY`].
pub(super) fn text_key(s: &str) -> String {
    use sha2::Digest;
    hex::encode(sha2::Sha256::digest(pg_text(s).as_bytes()))
}
