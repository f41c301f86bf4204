//! The wall clock in Unix milliseconds, as every stage stamps time: one helper and
//! one integer type (`i64`, the rollout schema's `created_at`).

use std::time::{SystemTime, UNIX_EPOCH};

/// Unix milliseconds now (0 for a clock set before 1970).
pub fn unix_ms() -> i64 {
    unix_ms_of(SystemTime::now()).unwrap_or(0)
}

/// Unix milliseconds of `t` (a file's modification time, say); `None` before 1970.
pub fn unix_ms_of(t: SystemTime) -> Option<i64> {
    let d = t.duration_since(UNIX_EPOCH).ok()?;
    Some(i64::try_from(d.as_millis()).unwrap_or(i64::MAX))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn counts_milliseconds_since_1970() {
        assert_eq!(unix_ms_of(UNIX_EPOCH), Some(0));
        let t = UNIX_EPOCH + Duration::from_millis(1_700_000_000_123);
        assert_eq!(unix_ms_of(t), Some(1_700_000_000_123));
        assert_eq!(unix_ms_of(UNIX_EPOCH - Duration::from_secs(1)), None);
        assert!(unix_ms() > 1_700_000_000_000);
    }
}
