//! How a Redis operation that keeps failing is retried: the delay starts
//! at 100 ms and doubles up to 2.5 s, and each wait adds a random jitter of
//! up to that delay again (so waits lie between 100 ms and 5 s), so that
//! instances that lost Redis together do not come back in step; it never
//! gives up. The schedule is
//! backon's exponential backoff (a well-kept crate rather than a doubling
//! written again in each loop).

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBackoff, ExponentialBuilder};

const MIN_DELAY: Duration = Duration::from_millis(100);
const MAX_DELAY: Duration = Duration::from_millis(2500);

pub(super) struct Retry {
    delays: ExponentialBackoff,
}

fn schedule() -> ExponentialBackoff {
    ExponentialBuilder::new()
        .with_min_delay(MIN_DELAY)
        .with_max_delay(MAX_DELAY)
        .with_factor(2.0)
        .with_jitter()
        .without_max_times()
        .build()
}

impl Retry {
    pub(super) fn new() -> Self {
        Self { delays: schedule() }
    }

    /// The next delay of the schedule.
    pub(super) fn next_delay(&mut self) -> Duration {
        self.delays.next().unwrap_or(MAX_DELAY)
    }

    /// Sleeps the next delay.
    pub(super) async fn wait(&mut self) {
        tokio::time::sleep(self.next_delay()).await;
    }

    /// After a success: the next failure starts from the shortest delay.
    pub(super) fn reset(&mut self) {
        self.delays = schedule();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn grows_to_the_cap_with_jitter_and_resets() {
        let mut r = Retry::new();
        let first = r.next_delay();
        // Jitter adds up to the delay again.
        assert!((MIN_DELAY..=MIN_DELAY * 2).contains(&first), "{first:?}");
        let later: Vec<Duration> = (0..20).map(|_| r.next_delay()).collect();
        assert!(later.iter().all(|d| *d <= MAX_DELAY * 2), "{later:?}");
        assert!(later.last().is_some_and(|d| *d >= MAX_DELAY), "{later:?}");
        r.reset();
        assert!(r.next_delay() <= MIN_DELAY * 2);
    }
}
