//! What happens after an attempt: success, another attempt at a computed time, or giving up.
//! Pure functions of the attempt result and the schedule, so they are tested without a network.

use std::time::Duration;

use super::outbound::AttemptResult;

/// How long a delivery is retried after the first attempt of its cycle.
pub const RETRY_WINDOW_MS: i64 = 24 * 3600 * 1000;

/// The decision after one attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Next {
    /// 2xx: done.
    Succeeded,
    /// Try again at `at` (unix ms); `schedule_index` is the step used.
    RetryAt {
        /// When the next attempt is due.
        at: i64,
        /// The schedule step after this one.
        schedule_index: i64,
    },
    /// No further attempts.
    Failed {
        /// The endpoint answered 410 Gone and must be disabled.
        disable_endpoint: bool,
        /// Why the delivery gave up.
        reason: String,
    },
}

/// Decides what follows an attempt.
///
/// * 2xx succeeds; `410 Gone` fails and disables the endpoint.
/// * For action requests, a 4xx other than 408 and 429 is final (the agent gets the tool error).
/// * Anything else waits `schedule[schedule_index]` ±20 % (or `Retry-After` if longer, within the
///   24-hour window) until the schedule is exhausted.
pub fn decide(
    result: &AttemptResult,
    is_action: bool,
    schedule: &[Duration],
    schedule_index: i64,
    cycle_started_at: i64,
    now: i64,
    jitter_unit: f64,
) -> Next {
    if result.is_success() {
        return Next::Succeeded;
    }
    if result.status == Some(410) {
        return Next::Failed {
            disable_endpoint: true,
            reason: "the endpoint answered 410 Gone and was disabled".into(),
        };
    }
    if is_action
        && let Some(status) = result.status
        && (400..500).contains(&status)
        && status != 408
        && status != 429
    {
        return Next::Failed {
            disable_endpoint: false,
            reason: format!("the endpoint refused the action request with {status}"),
        };
    }
    let Some(step) = usize::try_from(schedule_index).ok().and_then(|i| schedule.get(i)) else {
        return Next::Failed {
            disable_endpoint: false,
            reason: "every scheduled attempt failed".into(),
        };
    };
    let base = step.as_millis() as f64;
    // jitter_unit in [0, 1) maps to a factor in [0.8, 1.2).
    let mut delay = (base * (0.8 + 0.4 * jitter_unit.clamp(0.0, 1.0))) as i64;
    if let Some(retry_after) = result.retry_after {
        delay = delay.max(retry_after.as_millis().min(i64::MAX as u128) as i64);
    }
    let window_end = cycle_started_at.saturating_add(RETRY_WINDOW_MS);
    // The last attempt runs at the window's end at the latest (a long `Retry-After` can take it
    // there early); after it, the steps left would only fire back to back.
    if now >= window_end {
        return Next::Failed {
            disable_endpoint: false,
            reason: "every attempt within the 24-hour retry window failed".into(),
        };
    }
    let at = now.saturating_add(delay.max(1)).min(window_end);
    Next::RetryAt {
        at,
        schedule_index: schedule_index + 1,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answered(status: u16) -> AttemptResult {
        AttemptResult {
            status: Some(status),
            ..AttemptResult::default()
        }
    }

    fn schedule() -> Vec<Duration> {
        crate::config::parse_schedule(crate::config::DEFAULT_RETRY_SCHEDULE).unwrap()
    }

    #[test]
    fn success_and_gone() {
        assert_eq!(
            decide(&answered(204), false, &schedule(), 0, 0, 0, 0.5),
            Next::Succeeded
        );
        assert!(matches!(
            decide(&answered(410), false, &schedule(), 0, 0, 0, 0.5),
            Next::Failed {
                disable_endpoint: true,
                ..
            }
        ));
    }

    #[test]
    fn action_client_errors_are_final_except_408_and_429() {
        assert!(matches!(
            decide(&answered(422), true, &schedule(), 0, 0, 0, 0.5),
            Next::Failed { .. }
        ));
        assert!(matches!(
            decide(&answered(429), true, &schedule(), 0, 0, 0, 0.5),
            Next::RetryAt { .. }
        ));
        assert!(matches!(
            decide(&answered(408), true, &schedule(), 0, 0, 0, 0.5),
            Next::RetryAt { .. }
        ));
        assert!(matches!(
            decide(&answered(422), false, &schedule(), 0, 0, 0, 0.5),
            Next::RetryAt { .. }
        ));
    }

    #[test]
    fn jitter_stays_within_twenty_percent() {
        for unit in [0.0, 0.25, 0.5, 0.999] {
            let Next::RetryAt { at, schedule_index } =
                decide(&answered(500), false, &schedule(), 0, 0, 0, unit)
            else {
                panic!()
            };
            assert!((4000..6000).contains(&at), "{at}");
            assert_eq!(schedule_index, 1);
        }
    }

    #[test]
    fn retry_after_is_honoured_within_the_window() {
        let mut r = answered(429);
        r.retry_after = Some(Duration::from_secs(60));
        let Next::RetryAt { at, .. } = decide(&r, false, &schedule(), 0, 0, 0, 0.5) else {
            panic!()
        };
        assert_eq!(at, 60_000);
        r.retry_after = Some(Duration::from_secs(10 * 24 * 3600));
        let Next::RetryAt { at, .. } = decide(&r, false, &schedule(), 0, 0, 1000, 0.5) else {
            panic!()
        };
        assert_eq!(at, RETRY_WINDOW_MS, "capped at the end of the 24-hour window");
        // However large, a Retry-After neither overflows nor passes the window's end.
        r.retry_after = Some(Duration::MAX);
        let Next::RetryAt { at, .. } = decide(&r, false, &schedule(), 0, 0, 1000, 0.5) else {
            panic!()
        };
        assert_eq!(at, RETRY_WINDOW_MS);
    }

    #[test]
    fn gives_up_when_the_window_has_ended() {
        // The attempt at the window's end failed with steps left: no burst of the rest.
        let mut r = answered(429);
        r.retry_after = Some(Duration::from_secs(5));
        let ended = decide(&r, false, &schedule(), 2, 0, RETRY_WINDOW_MS, 0.5);
        assert!(
            matches!(
                ended,
                Next::Failed {
                    disable_endpoint: false,
                    ..
                }
            ),
            "{ended:?}"
        );
        let Next::RetryAt { at, .. } = decide(&r, false, &schedule(), 2, 0, RETRY_WINDOW_MS - 1, 0.5) else {
            panic!()
        };
        assert_eq!(
            at, RETRY_WINDOW_MS,
            "a moment before the end, one more attempt at the end"
        );
    }

    #[test]
    fn gives_up_when_the_schedule_is_exhausted() {
        let s = schedule();
        assert!(matches!(
            decide(&answered(500), false, &s, s.len() as i64, 0, 0, 0.5),
            Next::Failed { .. }
        ));
        let timeout = AttemptResult {
            error_class: Some("timeout"),
            ..AttemptResult::default()
        };
        assert!(matches!(
            decide(&timeout, true, &s, 0, 0, 0, 0.5),
            Next::RetryAt { .. }
        ));
    }
}
