//! Exponential backoff: the wait before retrying something that failed.

use std::time::Duration;

/// A wait that starts at `first`, doubles after each use up to `max`, and goes back to `first` on
/// [`reset`](Backoff::reset) (after something worked).
///
/// ```
/// use std::time::Duration;
/// use flannel_core::Backoff;
/// let mut b = Backoff::new(Duration::from_millis(100), Duration::from_millis(300));
/// assert_eq!(b.next_delay(), Duration::from_millis(100));
/// assert_eq!(b.next_delay(), Duration::from_millis(200));
/// assert_eq!(b.next_delay(), Duration::from_millis(300));
/// b.reset();
/// assert_eq!(b.next_delay(), Duration::from_millis(100));
/// ```
#[derive(Debug, Clone)]
pub struct Backoff {
    first: Duration,
    max: Duration,
    current: Duration,
}

impl Backoff {
    /// A backoff from `first` up to `max` (`max` below `first` is raised to `first`).
    pub fn new(first: Duration, max: Duration) -> Self {
        Self {
            first,
            max: max.max(first),
            current: first,
        }
    }

    /// The wait to use now; the next one is twice as long, at most `max`.
    pub fn next_delay(&mut self) -> Duration {
        let wait = self.current;
        self.current = self.current.saturating_mul(2).min(self.max);
        wait
    }

    /// The wait [`next_delay`](Backoff::next_delay) would return, without using it.
    pub fn peek(&self) -> Duration {
        self.current
    }

    /// Back to the first wait.
    pub fn reset(&mut self) {
        self.current = self.first;
    }

    /// Sleeps for [`next_delay`](Backoff::next_delay) unless `shutdown` fires first; false if it did.
    pub async fn sleep(&mut self, shutdown: &tokio_util::sync::CancellationToken) -> bool {
        let wait = self.next_delay();
        tokio::select! {
            _ = shutdown.cancelled() => false,
            _ = tokio::time::sleep(wait) => true,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn doubles_up_to_max_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(200), Duration::from_secs(10));
        let waits: Vec<u128> = (0..8).map(|_| b.next_delay().as_millis()).collect();
        assert_eq!(waits, [200, 400, 800, 1600, 3200, 6400, 10000, 10000]);
        b.reset();
        assert_eq!(b.next_delay(), Duration::from_millis(200));
    }

    #[test]
    fn max_below_first_and_huge_values_do_not_panic() {
        let mut b = Backoff::new(Duration::from_secs(2), Duration::from_secs(1));
        assert_eq!(b.next_delay(), Duration::from_secs(2));
        assert_eq!(b.next_delay(), Duration::from_secs(2));
        let mut b = Backoff::new(Duration::MAX / 2 + Duration::from_secs(1), Duration::MAX);
        b.next_delay();
        assert_eq!(b.next_delay(), Duration::MAX);
    }
}
