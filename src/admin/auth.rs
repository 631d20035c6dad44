//! The admin credential: a token from the configuration, or one generated at
//! first start and kept (mode 0600) in a file in the data directory, so a
//! person on the same machine can sign in from the login link printed then.
//! Browsers sign in once (`/login`) and carry a session cookie derived from
//! the token; API clients send `Authorization: Bearer <token>`.

use crate::config::{Runtime, StorageUrl};
use crate::secret::{Secret, digest};
use axum::http::{HeaderMap, header};
use std::io::Write;
use std::path::{Path, PathBuf};
use subtle::ConstantTimeEq;

const COOKIE: &str = "td_session";

/// How a request proved it is the operator.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Credential {
    Bearer,
    Cookie,
}

#[derive(Clone)]
pub struct AdminAuth {
    token: Secret,
    /// The cookie value: a digest of the token, so the token itself never
    /// sits in the browser.
    session: String,
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
    pub fn new(token: Secret) -> AdminAuth {
        let session = hex::encode(digest(format!("td-session\0{}", token.expose()).as_bytes()));
        AdminAuth { token, session }
    }

    /// The configured token, else the one in the token file, else a new one
    /// written there.
    pub fn load(runtime: &Runtime) -> Result<(AdminAuth, Loaded), TokenFileError> {
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

    /// The credential a request carries, if it is valid.
    pub fn credential(&self, headers: &HeaderMap) -> Option<Credential> {
        let bearer = headers
            .get(header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.trim().split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, token)| token.trim());
        if let Some(token) = bearer {
            return self.token_matches(token).then_some(Credential::Bearer);
        }
        let cookie = headers
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().split_once('='))
            .find(|(name, _)| *name == COOKIE)
            .map(|(_, value)| value)?;
        let ok: bool = digest(cookie.as_bytes())
            .ct_eq(&digest(self.session.as_bytes()))
            .into();
        ok.then_some(Credential::Cookie)
    }

    /// `Set-Cookie` for a signed-in browser: not readable by scripts, never
    /// sent along with another site's requests; `Secure` behind HTTPS.
    pub fn session_cookie(&self, headers: &HeaderMap) -> String {
        let https = headers
            .get("x-forwarded-proto")
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.eq_ignore_ascii_case("https"));
        format!(
            "{COOKIE}={}; Path=/; HttpOnly; SameSite=Strict{}",
            self.session,
            if https { "; Secure" } else { "" }
        )
    }

    pub fn clear_cookie() -> String {
        format!("{COOKIE}=; Path=/; HttpOnly; SameSite=Strict; Max-Age=0")
    }

    /// The login link for a server reachable at `base` (`http://host:port`).
    pub fn login_link(&self, base: &str) -> String {
        let token: String =
            form_urlencoded::byte_serialize(self.token.expose().as_bytes()).collect();
        format!("{}/login?token={token}", base.trim_end_matches('/'))
    }
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
    if let Some(origin) = text(header::ORIGIN.as_str()) {
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

    #[test]
    fn bearer_in_any_case_and_the_cookie_authenticate() {
        let auth = AdminAuth::new(Secret::new("t0ken"));
        for scheme in ["Bearer", "bearer", "BEARER"] {
            let h = headers(&[("authorization", &format!("{scheme} t0ken"))]);
            assert_eq!(auth.credential(&h), Some(Credential::Bearer), "{scheme}");
        }
        assert_eq!(
            auth.credential(&headers(&[("authorization", "Bearer nope")])),
            None
        );
        assert_eq!(
            auth.credential(&headers(&[("authorization", "Basic dDBrZW46")])),
            None
        );
        let cookie = auth.session_cookie(&HeaderMap::new());
        let value = cookie.split(';').next().unwrap();
        assert!(!value.contains("t0ken"));
        let h = headers(&[("cookie", &format!("a=b; {value}"))]);
        assert_eq!(auth.credential(&h), Some(Credential::Cookie));
        assert_eq!(
            auth.credential(&headers(&[("cookie", "td_session=x")])),
            None
        );
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
