//! Small tools every drill uses: waiting for a condition with a deadline (never a fixed sleep),
//! an HTTP client, scraping a `/metrics` endpoint, free ports and a seeded random source.

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use faultline_metrics::testing::Exposition;

/// Pause between two looks while polling.
pub(crate) const POLL: Duration = Duration::from_millis(50);

/// Polls `check` until it returns `Some`, at most for `timeout`; the error names `what` and the
/// last thing `check` saw.
pub(crate) async fn wait_for<T>(
    what: &str,
    timeout: Duration,
    mut check: impl AsyncFnMut() -> anyhow::Result<Result<T, String>>,
) -> anyhow::Result<T> {
    let deadline = Instant::now() + timeout;
    loop {
        let last = match check().await {
            Ok(Ok(value)) => return Ok(value),
            Ok(Err(state)) => state,
            Err(error) => format!("{error:#}"),
        };
        if Instant::now() >= deadline {
            bail!(
                "{what}: not reached within {:.1}s (last: {last})",
                timeout.as_secs_f64()
            );
        }
        tokio::time::sleep(POLL).await;
    }
}

/// An HTTP client for the API and the metrics endpoints (plain http; the rustls provider is
/// installed because reqwest is built with rustls but without a default provider).
pub(crate) fn http_client(timeout: Duration) -> anyhow::Result<reqwest::Client> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    reqwest::Client::builder()
        .timeout(timeout)
        .build()
        .context("build the HTTP client")
}

/// `GET url` (a `/metrics` endpoint), parsed.
pub(crate) async fn scrape(client: &reqwest::Client, url: &str) -> anyhow::Result<Exposition> {
    let response = client
        .get(url)
        .send()
        .await
        .with_context(|| format!("GET {url}"))?;
    if !response.status().is_success() {
        bail!("GET {url}: {}", response.status());
    }
    let text = response
        .text()
        .await
        .with_context(|| format!("GET {url}"))?;
    Ok(Exposition::parse(&text))
}

/// A task of the drill's own (a steady load, a prober) that is aborted when dropped, so that none
/// outlives its drill when the drill fails early.
#[derive(Debug)]
pub(crate) struct Background<T>(tokio::task::JoinHandle<T>);

impl<T: Send + 'static> Background<T> {
    /// Spawns `task`.
    pub(crate) fn spawn(task: impl Future<Output = T> + Send + 'static) -> Self {
        Background(tokio::spawn(task))
    }

    /// Waits for the task to finish.
    pub(crate) async fn join(mut self) -> anyhow::Result<T> {
        (&mut self.0)
            .await
            .context("a background task of the drill")
    }
}

impl<T> Drop for Background<T> {
    fn drop(&mut self) {
        self.0.abort();
    }
}

/// A TCP port of 127.0.0.1 that was free a moment ago.
pub(crate) fn free_port() -> anyhow::Result<u16> {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").context("find a free port")?;
    Ok(listener.local_addr()?.port())
}

/// A small, seeded random source (xorshift64*): the drills' random choices, reproducible from the
/// seed they print.
#[derive(Debug, Clone)]
pub(crate) struct Rng {
    seed: u64,
    state: u64,
}

impl Rng {
    /// Seeded from `seed` (0 is replaced: xorshift needs a non-zero state).
    pub(crate) fn new(seed: u64) -> Self {
        let seed = if seed == 0 {
            0x9E37_79B9_7F4A_7C15
        } else {
            seed
        };
        Rng { seed, state: seed }
    }

    /// Seeded from `DRILL_SEED` when set (to replay a run), else from the clock.
    pub(crate) fn for_drill() -> Self {
        match std::env::var("DRILL_SEED")
            .ok()
            .and_then(|s| s.trim().parse().ok())
        {
            Some(seed) => Self::new(seed),
            None => Self::from_clock(),
        }
    }

    /// Seeded from the clock.
    fn from_clock() -> Self {
        let nanos = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos());
        Self::new(u64::try_from(nanos % u128::from(u64::MAX)).unwrap_or(1))
    }

    /// The seed to reproduce this source (`DRILL_SEED`).
    pub(crate) fn seed(&self) -> u64 {
        self.seed
    }

    /// The next 64 random bits.
    pub(crate) fn next_u64(&mut self) -> u64 {
        let mut x = self.state;
        x ^= x >> 12;
        x ^= x << 25;
        x ^= x >> 27;
        self.state = x;
        x.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `low..=high`.
    pub(crate) fn between(&mut self, low: u64, high: u64) -> u64 {
        debug_assert!(low <= high);
        low + self.next_u64() % (high - low + 1)
    }

    /// An index below `len` (which must not be 0).
    pub(crate) fn index(&mut self, len: usize) -> usize {
        let len = u64::try_from(len).unwrap_or(u64::MAX).max(1);
        usize::try_from(self.next_u64() % len).unwrap_or(0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_random_source_is_reproducible_and_in_range() {
        let mut a = Rng::new(42);
        let mut b = Rng::new(42);
        let drawn: Vec<u64> = (0..100).map(|_| a.between(50, 400)).collect();
        assert!(drawn.iter().all(|n| (50..=400).contains(n)), "{drawn:?}");
        assert!(
            drawn.iter().any(|n| *n != drawn[0]),
            "not random: {drawn:?}"
        );
        let again: Vec<u64> = (0..100).map(|_| b.between(50, 400)).collect();
        assert_eq!(drawn, again);
        assert_eq!(a.seed(), 42, "the seed survives the draws");
        assert!((0..100).all(|_| a.index(3) < 3));
        assert_ne!(Rng::new(0).next_u64(), 0);
    }

    #[tokio::test]
    async fn waiting_returns_the_value_or_says_what_was_last_seen() {
        let mut n = 0;
        let got = wait_for("n reaches 3", Duration::from_secs(5), async || {
            n += 1;
            Ok(if n >= 3 {
                Ok(n)
            } else {
                Err(format!("n = {n}"))
            })
        })
        .await
        .expect("reached");
        assert_eq!(got, 3);
        let error = wait_for::<()>("never", Duration::ZERO, async || Ok(Err("n = 0".into())))
            .await
            .expect_err("times out");
        assert!(
            error.to_string().contains("never") && error.to_string().contains("n = 0"),
            "{error}"
        );
    }
}
