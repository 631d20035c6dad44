//! In a real browser (Chromium through playwright-core, tests/browser):
//! skipped when it is missing unless `CI` is set.

mod browser_sources;
mod insights_widget;
mod operator_dashboard;
mod operator_page;

use std::path::{Path, PathBuf};

/// The node scripts' folder and the Chromium they drive; `None`, after
/// saying why the test is skipped, when either is missing (never under CI).
pub fn browser() -> Option<(PathBuf, String)> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/browser");
    let chromium = std::env::var("CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    let ready = Path::new(&chromium).exists()
        && dir.join("node_modules/playwright-core").exists()
        && dir
            .join("node_modules/@segment/analytics-next/dist/umd/index.js")
            .exists();
    if ready {
        return Some((dir, chromium));
    }
    assert!(
        std::env::var_os("CI").is_none(),
        "CI must install chromium and `npm ci` in tests/browser"
    );
    eprintln!("skipped: needs {chromium} (apt-get install chromium) and `npm ci` in tests/browser");
    None
}

/// Runs `script` of `dir` with node, driving `chromium`; fails the test with
/// its output unless it succeeds. Returns its stdout.
pub async fn run_node(
    dir: &Path,
    chromium: &str,
    script: &str,
    args: &[&std::ffi::OsStr],
) -> String {
    let mut cmd = std::process::Command::new("node");
    cmd.arg(dir.join(script))
        .args(args)
        .env("CHROMIUM", chromium);
    let out = tokio::process::Command::from(cmd)
        .output()
        .await
        .expect("node runs");
    let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        out.status.success(),
        "browser test failed:\n{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}
