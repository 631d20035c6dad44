//! The one wait-until helper: tries `check` until it succeeds or `within`
//! has passed, pausing `every` between tries. The caller says what failing
//! means: on time out it gets the last `Err` (what was seen) back.

use std::time::{Duration, Instant};

/// Async form: `check` is tried at once, then every `every`, until `within`
/// has passed; `Err(last seen)` if it never succeeded. (`FnMut` returning a
/// future rather than `AsyncFnMut`: its future stays `Send` for
/// `tokio::spawn`; `async || ...` closures that only read their captures
/// are such closures.)
pub async fn until<T, E, F>(
    within: Duration,
    every: Duration,
    mut check: impl FnMut() -> F,
) -> Result<T, E>
where
    F: std::future::Future<Output = Result<T, E>>,
{
    let deadline = Instant::now() + within;
    loop {
        match check().await {
            Ok(done) => return Ok(done),
            Err(seen) if Instant::now() >= deadline => return Err(seen),
            Err(_) => tokio::time::sleep(every).await,
        }
    }
}

/// Blocking form of [`until`], for tests on plain threads.
pub fn until_blocking<T, E>(
    within: Duration,
    every: Duration,
    mut check: impl FnMut() -> Result<T, E>,
) -> Result<T, E> {
    let deadline = Instant::now() + within;
    loop {
        match check() {
            Ok(done) => return Ok(done),
            Err(seen) if Instant::now() >= deadline => return Err(seen),
            Err(_) => std::thread::sleep(every),
        }
    }
}
