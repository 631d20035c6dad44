//! The admin credential: a token from the configuration, or one generated at
//! first start and kept (mode 0600) in a file in the data directory, so a
//! person on the same machine can sign in from the login link printed then.
//!
//! API clients send `Authorization: Bearer <token>`. Browsers sign in once
//! (`POST /login` with the token, or the printed link's one-time code) and
//! carry a random session id in a cookie; the session lives in the storage
//! backend ([`super::sessions`]), expires when idle and ends at logout.
//! Wrong tokens and codes are throttled per client address
//! ([`super::throttle`]).

use super::sessions::{self, Kind, SessionStore};
use super::throttle::Throttle;
use crate::config::{Runtime, StorageUrl};
use crate::secret::{Secret, digest};
use axum::http::{HeaderMap, header};
use std::io::Write;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

const COOKIE: &str = "td_session";

/// How a request proved it is the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    Bearer,
    Cookie,
}

/// What checking a request's credential found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Check {
    Valid(Credential),
    /// No credential, or a session that is unknown, expired or revoked.
    Missing,
    /// A wrong bearer token (counted by the throttle).
    Wrong,
    /// This address tried too many wrong credentials: wait this long.
    Locked(Duration),
    /// The session store cannot be reached.
    Unavailable,
}

#[derive(Clone)]
pub struct AdminAuth {
    token: Secret,
    /// Stored with every session and code: a new token ends them all.
    fingerprint: String,
    sessions: Option<SessionStore>,
    throttle: Arc<Throttle>,
}

#[derive(Debug, thiserror::Error)]
#[error("admin.token_file: {path}: {reason}")]
pub struct TokenFileError {
    path: String,
    reason: String,
}

/// What loading the token did, for the start-up message.
pub enum Loaded {
    Configured,
    FromFile(PathBuf),
    Generated(PathBuf),
}

impl AdminAuth {
    /// A token without a session store: bearer only (browsers cannot sign in).
    pub fn new(token: Secret) -> AdminAuth {
        let fingerprint = hex::encode(digest(
            format!("td-admin-token\0{}", token.expose()).as_bytes(),
        ));
        AdminAuth {
            token,
            fingerprint,
            sessions: None,
            throttle: Arc::default(),
        }
    }

    /// Keeps browser sessions and login codes in `store`.
    pub fn with_sessions(mut self, store: SessionStore) -> AdminAuth {
        self.sessions = Some(store);
        self
    }

    /// The configured token, else the one in the token file, else a new one
    /// written there; sessions in the configured storage backend.
    pub fn load(runtime: &Runtime) -> Result<(AdminAuth, Loaded), TokenFileError> {
        let (auth, loaded) = Self::load_token(runtime)?;
        let store = SessionStore::for_storage(&runtime.storage).map_err(|e| TokenFileError {
            path: "storage.url".into(),
            reason: e.to_string(),
        })?;
        Ok((auth.with_sessions(store), loaded))
    }

    fn load_token(runtime: &Runtime) -> Result<(AdminAuth, Loaded), TokenFileError> {
        if let Some(t) = &runtime.config.admin.token {
            return Ok((AdminAuth::new(t.clone()), Loaded::Configured));
        }
        let path = token_file(runtime);
        let err = |reason: String| TokenFileError {
            path: path.display().to_string(),
            reason,
        };
        match std::fs::read_to_string(&path) {
            Ok(text) if !text.trim().is_empty() => {
                return Ok((
                    AdminAuth::new(Secret::new(text.trim())),
                    Loaded::FromFile(path),
                ));
            }
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(err(e.to_string())),
        }
        let token = generate();
        write_private(&path, &token).map_err(|e| err(e.to_string()))?;
        Ok((AdminAuth::new(Secret::new(token)), Loaded::Generated(path)))
    }

    pub fn token(&self) -> &Secret {
        &self.token
    }

    pub fn token_matches(&self, given: &str) -> bool {
        self.token.matches(given.as_bytes())
    }

    /// The throttle of wrong credentials.
    pub fn throttle(&self) -> &Throttle {
        &self.throttle
    }

    /// Checks the credential a request carries: a bearer token (wrong ones
    /// count against `peer`), else the session cookie.
    pub async fn check(&self, headers: &HeaderMap, peer: Option<IpAddr>) -> Check {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        if let Some(token) = bearer {
            if let Err(wait) = self.throttle.check(peer) {
                return Check::Locked(wait);
            }
            if self.token_matches(token) {
                return Check::Valid(Credential::Bearer);
            }
            self.throttle.failed(peer);
            return Check::Wrong;
        }
        let Some(id) = session_cookie(headers) else {
            return Check::Missing;
        };
        let Some(store) = &self.sessions else {
            return Check::Missing;
        };
        match store
            .check(sessions::stored_digest(id), self.fingerprint.clone())
            .await
        {
            Ok(true) => Check::Valid(Credential::Cookie),
            Ok(false) => Check::Missing,
            Err(e) => {
                tracing::error!(error = %e, "admin session store unavailable");
                Check::Unavailable
            }
        }
    }

    /// Starts a session; returns its `Set-Cookie` value.
    pub async fn start_session(
        &self,
        headers: &HeaderMap,
    ) -> Result<String, sessions::SessionError> {
        let store = self.store()?;
        let (id, stored) = sessions::new_secret();
        store
            .create(
                Kind::Session,
                stored,
                self.fingerprint.clone(),
                sessions::ABSOLUTE,
            )
            .await?;
        Ok(session_cookie_header(&id, headers))
    }

    /// Uses up a login code (true once).
    pub async fn redeem_code(&self, code: &str) -> Result<bool, sessions::SessionError> {
        self.store()?
            .redeem(sessions::stored_digest(code), self.fingerprint.clone())
            .await
    }

    /// Ends the session this request's cookie names, if any.
    pub async fn end_session(&self, headers: &HeaderMap) -> Result<(), sessions::SessionError> {
        match (session_cookie(headers), &self.sessions) {
            (Some(id), Some(store)) => store.revoke(sessions::stored_digest(id)).await,
            _ => Ok(()),
        }
    }

    fn store(&self) -> Result<&SessionStore, sessions::SessionError> {
        self.sessions
            .as_ref()
            .ok_or_else(|| sessions::SessionError::new("no session store"))
    }

    pub fn clear_cookie() -> String {
        format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
    }

    /// A new one-time login code, stored (hashed) in the session store.
    pub async fn issue_code(&self) -> Result<String, sessions::SessionError> {
        let (code, stored) = sessions::new_secret();
        self.store()?
            .create(
                Kind::Code,
                stored,
                self.fingerprint.clone(),
                sessions::CODE_TTL,
            )
            .await?;
        Ok(code)
    }

    /// The login link for a server reachable at `base` (`http://host:port`):
    /// `/login?code=…` with a one-time code good for 15 minutes (never the
    /// token). Callable from synchronous code, inside a runtime or not; when
    /// no code can be stored, the link of the sign-in form (`/login`).
    pub fn login_link(&self, base: &str) -> String {
        let base = base.trim_end_matches('/');
        let auth = self.clone();
        let code = std::thread::scope(|s| {
            s.spawn(move || {
                let rt = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .map_err(|e| sessions::SessionError::new(e.to_string()))?;
                rt.block_on(auth.issue_code())
            })
            .join()
            .unwrap_or_else(|_| Err(sessions::SessionError::new("code thread failed")))
        });
        match code {
            Ok(code) => format!("{base}/login?code={code}"),
            Err(e) => {
                tracing::warn!(error = %e, "no one-time login code; the link opens the sign-in form");
                format!("{base}/login")
            }
        }
    }
}

/// The session id a request's cookie carries.
/// Who a request's credential names in the audit trail: `token` (the
/// bearer token) or `session:` and the start of the session's stored digest
/// (the same for every request of one sign-in, useless to open a session).
pub fn actor(headers: &HeaderMap, credential: &Credential) -> String {
    match (credential, session_cookie(headers)) {
        (Credential::Cookie, Some(id)) => {
            let digest = sessions::stored_digest(id);
            format!("session:{}", &digest[..12.min(digest.len())])
        }
        _ => "token".to_owned(),
    }
}

fn session_cookie(headers: &HeaderMap) -> Option<&str> {
    headers
        .get_all(header::COOKIE)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|v| v.split(';'))
        .filter_map(|c| c.trim().split_once('='))
        .find(|(name, _)| *name == COOKIE)
        .map(|(_, value)| value)
        .filter(|v| v.len() == 64 && v.bytes().all(|b| b.is_ascii_hexdigit()))
}

/// `Set-Cookie` for a signed-in browser: not readable by scripts, never
/// sent along with another site's requests; `Secure` behind HTTPS.
fn session_cookie_header(id: &str, headers: &HeaderMap) -> String {
    let https = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .is_some_and(|v| v.eq_ignore_ascii_case("https"));
    format!(
        "{COOKIE}={id}; Path=/; HttpOnly; SameSite=Strict{}",
        if https { "; Secure" } else { "" }
    )
}

/// Why a browser request comes from another site, when it does (Fetch
/// metadata, else `Origin` against `Host`).
pub fn cross_site(headers: &HeaderMap) -> Option<&'static str> {
    let text = |name| headers.get(name).and_then(|v| v.to_str().ok());
    if let Some(site) = text("sec-fetch-site") {
        if !matches!(site, "same-origin" | "none") {
            return Some("the request comes from another site (Sec-Fetch-Site)");
        }
    }
    // A page served with `Referrer-Policy: no-referrer` (every page here)
    // posts its forms with `Origin: null`; the browser's own
    // `Sec-Fetch-Site: same-origin` says where it came from then.
    let same_origin_fetch = text("sec-fetch-site") == Some("same-origin");
    if let Some(origin) =
        text(header::ORIGIN.as_str()).filter(|o| !(same_origin_fetch && *o == "null"))
    {
        let host = text(header::HOST.as_str()).unwrap_or("");
        let origin_host = origin.split_once("://").map(|(_, rest)| rest);
        if origin_host != Some(host) {
            return Some("the request comes from another origin (Origin)");
        }
    }
    None
}

/// Where the generated token is kept.
pub fn token_file(runtime: &Runtime) -> PathBuf {
    if let Some(p) = &runtime.config.admin.token_file {
        return p.clone();
    }
    match &runtime.storage {
        StorageUrl::Sqlite(db) => db
            .parent()
            .filter(|d| !d.as_os_str().is_empty())
            .unwrap_or(Path::new("."))
            .join("admin-token"),
        StorageUrl::Postgres(_) => PathBuf::from("data/admin-token"),
    }
}

fn generate() -> String {
    use rand::RngCore;
    let mut bytes = [0u8; 32];
    rand::rng().fill_bytes(&mut bytes);
    hex::encode(bytes)
}

/// Creates `path` readable by its owner only; an existing file is kept.
fn write_private(path: &Path, token: &str) -> std::io::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir)?;
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        options.mode(0o600);
    }
    let mut file = options.open(path)?;
    writeln!(file, "{token}")?;
    file.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.append(*k, v.parse().unwrap());
        }
        h
    }

    #[tokio::test]
    async fn bearer_in_any_case_authenticates_and_wrong_ones_are_throttled() {
        let auth = AdminAuth::new(Secret::new("t0ken"));
        let peer: Option<IpAddr> = Some("192.0.2.9".parse().unwrap());
        for scheme in ["Bearer", "bearer", "BEARER"] {
            let h = headers(&[("authorization", &format!("{scheme} t0ken"))]);
            assert_eq!(
                auth.check(&h, peer).await,
                Check::Valid(Credential::Bearer),
                "{scheme}"
            );
        }
        let wrong = headers(&[("authorization", "Bearer nope")]);
        assert_eq!(auth.check(&wrong, peer).await, Check::Wrong);
        assert_eq!(
            auth.check(&headers(&[("authorization", "Basic dDBrZW46")]), peer)
                .await,
            Check::Missing
        );
        // A cookie without a session store is no credential; a forged one neither.
        let h = headers(&[("cookie", &format!("td_session={}", "a".repeat(64)))]);
        assert_eq!(auth.check(&h, peer).await, Check::Missing);
        for _ in 0..super::super::throttle::BURST as usize {
            auth.check(&wrong, peer).await;
        }
        let right = headers(&[("authorization", "Bearer t0ken")]);
        assert!(matches!(auth.check(&right, peer).await, Check::Locked(_)));
    }

    #[test]
    fn cross_site_requests_are_recognised() {
        assert!(cross_site(&headers(&[("sec-fetch-site", "cross-site")])).is_some());
        assert!(cross_site(&headers(&[("sec-fetch-site", "same-site")])).is_some());
        assert!(cross_site(&headers(&[("sec-fetch-site", "same-origin")])).is_none());
        let h = headers(&[("origin", "http://evil.test"), ("host", "127.0.0.1:8080")]);
        assert!(cross_site(&h).is_some());
        let h = headers(&[
            ("origin", "http://127.0.0.1:8080"),
            ("host", "127.0.0.1:8080"),
        ]);
        assert!(cross_site(&h).is_none());
        assert!(cross_site(&HeaderMap::new()).is_none());
        // The sign-in form under `Referrer-Policy: no-referrer` (Chromium).
        let h = headers(&[("origin", "null"), ("sec-fetch-site", "same-origin")]);
        assert!(cross_site(&h).is_none());
        let h = headers(&[("origin", "null"), ("host", "127.0.0.1:8080")]);
        assert!(cross_site(&h).is_some());
    }

    #[test]
    fn generated_token_is_kept_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("sub/admin-token");
        write_private(&path, "abc").unwrap();
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = std::fs::metadata(&path).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }
        assert!(write_private(&path, "other").is_err(), "never overwritten");
        assert_eq!(std::fs::read_to_string(&path).unwrap().trim(), "abc");
    }
}
