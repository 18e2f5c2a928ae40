//! Keeping a failing STS from taking the gateway down with it.
//!
//! Per token service: a concurrency cap (a burst of fresh tokens queues briefly, then gets 503
//! instead of flooding the STS), a bounded retry with jitter for failures that are safe and
//! likely to pass (no connection, 503), and a circuit breaker. After `failure_threshold`
//! consecutive failures the breaker opens: misses fail fast with 503 and `Retry-After` while
//! cached tokens keep being served; after `open_for` one probe is let through (half-open), and
//! its success closes the breaker. A 429 or 503 with `Retry-After` holds calls off until then,
//! so the gateway never answers an overloaded STS with a retry storm.

use std::sync::Mutex;
use std::time::{Duration, Instant};

use tokio::sync::{Semaphore, SemaphorePermit};

use super::{ExchangeError, Unavailability};

use crate::config::ResilienceSettings;

/// Base of the retry backoff; the actual wait is jittered between 1× and 2× this.
const RETRY_BACKOFF: Duration = Duration::from_millis(50);

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Breaker {
    Closed { failures: u32 },
    Open { until: Instant },
    HalfOpen { probing: bool },
}

/// The breaker's state for metrics and the status page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BreakerState {
    Closed,
    Open,
    HalfOpen,
}

impl BreakerState {
    pub fn as_str(self) -> &'static str {
        match self {
            BreakerState::Closed => "closed",
            BreakerState::Open => "open",
            BreakerState::HalfOpen => "half_open",
        }
    }
}

/// The guard of one token service.
#[derive(Debug)]
pub struct Resilience {
    pub settings: ResilienceSettings,
    slots: Semaphore,
    breaker: Mutex<Breaker>,
}

/// Permission to make one STS call. Holds a concurrency slot; `probe` marks the half-open
/// breaker's single trial call.
pub struct Admission<'a> {
    _slot: SemaphorePermit<'a>,
    probe: bool,
}

impl Resilience {
    pub fn new(settings: ResilienceSettings) -> Resilience {
        Resilience {
            slots: Semaphore::new(settings.max_concurrent.max(1)),
            breaker: Mutex::new(Breaker::Closed { failures: 0 }),
            settings,
        }
    }

    /// The breaker's current state.
    pub fn state(&self) -> BreakerState {
        match *self.lock() {
            Breaker::Closed { .. } => BreakerState::Closed,
            Breaker::Open { until } if Instant::now() >= until => BreakerState::HalfOpen,
            Breaker::Open { .. } => BreakerState::Open,
            Breaker::HalfOpen { .. } => BreakerState::HalfOpen,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Breaker> {
        match self.breaker.lock() {
            Ok(guard) => guard,
            Err(poisoned) => poisoned.into_inner(),
        }
    }

    /// Asks to call the STS: refused at once while the breaker is open (or its probe is out),
    /// else after waiting up to `queue_timeout` for a concurrency slot.
    pub async fn admit(&self) -> Result<Admission<'_>, ExchangeError> {
        let probe = {
            let mut breaker = self.lock();
            match *breaker {
                Breaker::Closed { .. } => false,
                Breaker::Open { until } => {
                    let now = Instant::now();
                    if now < until {
                        return Err(open_error(until - now));
                    }
                    *breaker = Breaker::HalfOpen { probing: true };
                    true
                }
                Breaker::HalfOpen { probing: true } => {
                    return Err(open_error(self.settings.open_for));
                }
                Breaker::HalfOpen { probing: false } => {
                    *breaker = Breaker::HalfOpen { probing: true };
                    true
                }
            }
        };
        match tokio::time::timeout(self.settings.queue_timeout, self.slots.acquire()).await {
            Ok(Ok(slot)) => Ok(Admission { _slot: slot, probe }),
            _ => {
                if probe {
                    // Give the probe back: this call never reached the STS.
                    *self.lock() = Breaker::HalfOpen { probing: false };
                }
                Err(ExchangeError::Unavailable {
                    cause: Unavailability::Overloaded,
                    retry_after: Some(Duration::from_secs(1)),
                })
            }
        }
    }

    /// Records how the admitted call ended. Rejections of the caller's token say the STS is
    /// healthy; our own bad credentials say nothing about its health.
    pub fn record(&self, admission: Admission<'_>, result: &Result<(), ExchangeError>) {
        let mut breaker = self.lock();
        let healthy = match result {
            Ok(()) => Some(true),
            // The STS answered, about the user: it is working.
            Err(
                ExchangeError::SubjectRejected { .. }
                | ExchangeError::Forbidden { .. }
                | ExchangeError::StepUp(_),
            ) => Some(true),
            // Our own setup failing says nothing about the STS (a signing failure or a
            // missing actor never reached it).
            Err(ExchangeError::ClientRejected { .. } | ExchangeError::SigningFailed(_)) => None,
            Err(ExchangeError::Unavailable {
                retry_after: Some(after),
                ..
            }) => {
                // The STS said when to come back (429 or 503 with Retry-After): honour it.
                *breaker = Breaker::Open {
                    until: Instant::now() + *after,
                };
                tracing::warn!(retry_after = ?after, "token service asked the gateway to back off");
                return;
            }
            Err(_) => Some(false),
        };
        match (healthy, *breaker) {
            (None, Breaker::HalfOpen { .. }) if admission.probe => {
                *breaker = Breaker::HalfOpen { probing: false };
            }
            (None, _) => {}
            (Some(true), _) => *breaker = Breaker::Closed { failures: 0 },
            (Some(false), Breaker::Closed { failures }) => {
                let failures = failures + 1;
                if failures >= self.settings.failure_threshold {
                    tracing::warn!(
                        failures,
                        open_for = ?self.settings.open_for,
                        "token service circuit breaker opened"
                    );
                    *breaker = Breaker::Open {
                        until: Instant::now() + self.settings.open_for,
                    };
                } else {
                    *breaker = Breaker::Closed { failures };
                }
            }
            (Some(false), _) => {
                *breaker = Breaker::Open {
                    until: Instant::now() + self.settings.open_for,
                };
            }
        }
    }

    /// The wait before retry number `attempt` (1-based), jittered so a fleet of gateways does
    /// not retry in lockstep.
    pub fn backoff(attempt: u32) -> Duration {
        let base = RETRY_BACKOFF * attempt;
        let jitter = rand::random::<f64>();
        base + base.mul_f64(jitter)
    }
}

fn open_error(remaining: Duration) -> ExchangeError {
    ExchangeError::Unavailable {
        cause: Unavailability::CircuitOpen,
        retry_after: Some(remaining.max(Duration::from_secs(1))),
    }
}

/// Whether a failed attempt may be repeated: the STS did not answer at all, or said 503
/// without telling us how long to wait.
pub fn retryable(error: &ExchangeError) -> bool {
    matches!(
        error,
        ExchangeError::Unavailable {
            retry_after: None,
            cause: Unavailability::CannotConnect
                | Unavailability::ConnectionFailed
                | Unavailability::Status(503),
        }
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::exchange::OAuthErrorCode;

    fn settings() -> ResilienceSettings {
        ResilienceSettings {
            failure_threshold: 2,
            open_for: Duration::from_millis(100),
            ..ResilienceSettings::default()
        }
    }

    fn down() -> Result<(), ExchangeError> {
        Err(ExchangeError::Unavailable {
            cause: Unavailability::CannotConnect,
            retry_after: None,
        })
    }

    #[tokio::test]
    async fn opens_after_consecutive_failures_and_closes_after_a_good_probe() {
        let r = Resilience::new(settings());
        for _ in 0..2 {
            let a = r.admit().await.unwrap();
            r.record(a, &down());
        }
        assert_eq!(r.state(), BreakerState::Open);
        assert!(matches!(
            r.admit().await,
            Err(ExchangeError::Unavailable { .. })
        ));
        tokio::time::sleep(Duration::from_millis(120)).await;
        let probe = r.admit().await.unwrap();
        assert!(r.admit().await.is_err(), "one probe at a time");
        r.record(probe, &Ok(()));
        assert_eq!(r.state(), BreakerState::Closed);
        assert!(r.admit().await.is_ok());
    }

    #[tokio::test]
    async fn a_failed_probe_reopens() {
        let r = Resilience::new(settings());
        for _ in 0..2 {
            let a = r.admit().await.unwrap();
            r.record(a, &down());
        }
        tokio::time::sleep(Duration::from_millis(120)).await;
        let probe = r.admit().await.unwrap();
        r.record(probe, &down());
        assert_eq!(r.state(), BreakerState::Open);
    }

    #[tokio::test]
    async fn retry_after_holds_calls_off() {
        let r = Resilience::new(settings());
        let a = r.admit().await.unwrap();
        r.record(
            a,
            &Err(ExchangeError::Unavailable {
                cause: Unavailability::Status(429),
                retry_after: Some(Duration::from_secs(30)),
            }),
        );
        match r.admit().await {
            Err(ExchangeError::Unavailable {
                retry_after: Some(d),
                ..
            }) => assert!(d > Duration::from_secs(25)),
            _ => panic!("expected a fast refusal"),
        }
    }

    #[tokio::test]
    async fn rejected_callers_do_not_trip_the_breaker() {
        let r = Resilience::new(settings());
        for _ in 0..5 {
            let a = r.admit().await.unwrap();
            r.record(
                a,
                &Err(ExchangeError::SubjectRejected {
                    code: OAuthErrorCode::InvalidGrant,
                }),
            );
        }
        assert_eq!(r.state(), BreakerState::Closed);
    }

    #[tokio::test]
    async fn our_own_setup_failures_leave_the_breaker_alone() {
        let r = Resilience::new(settings());
        for _ in 0..5 {
            let a = r.admit().await.unwrap();
            r.record(
                a,
                &Err(ExchangeError::ClientRejected {
                    status: 401,
                    code: None,
                }),
            );
        }
        assert_eq!(r.state(), BreakerState::Closed);
    }

    #[tokio::test]
    async fn the_concurrency_cap_refuses_after_the_queue_timeout() {
        let r = Resilience::new(ResilienceSettings {
            max_concurrent: 1,
            queue_timeout: Duration::from_millis(20),
            ..settings()
        });
        let held = r.admit().await.unwrap();
        assert!(matches!(
            r.admit().await,
            Err(ExchangeError::Unavailable { .. })
        ));
        drop(held);
        assert!(r.admit().await.is_ok());
    }

    #[test]
    fn only_no_answer_or_a_bare_503_is_retried() {
        let unavailable = |cause, retry_after| ExchangeError::Unavailable { cause, retry_after };
        for retried in [
            unavailable(Unavailability::CannotConnect, None),
            unavailable(Unavailability::ConnectionFailed, None),
            unavailable(Unavailability::Status(503), None),
        ] {
            assert!(retryable(&retried), "{retried:?}");
        }
        for kept in [
            // The STS said when to come back: the breaker holds calls off instead.
            unavailable(Unavailability::Status(503), Some(Duration::from_secs(1))),
            unavailable(Unavailability::Status(429), None),
            unavailable(Unavailability::Status(500), None),
            unavailable(
                Unavailability::OAuthError(OAuthErrorCode::TemporarilyUnavailable),
                None,
            ),
            unavailable(Unavailability::CircuitOpen, None),
            unavailable(Unavailability::Overloaded, None),
            ExchangeError::Timeout(Duration::from_secs(1)),
            ExchangeError::SubjectRejected {
                code: OAuthErrorCode::InvalidGrant,
            },
        ] {
            assert!(!retryable(&kept), "{kept:?}");
        }
    }

    #[test]
    fn backoff_is_jittered_and_bounded() {
        for attempt in 1..3 {
            let d = Resilience::backoff(attempt);
            assert!(d >= RETRY_BACKOFF * attempt && d <= RETRY_BACKOFF * attempt * 2);
        }
    }
}
