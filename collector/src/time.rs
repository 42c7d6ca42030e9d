//! Time as the store keeps it (nanoseconds since the Unix epoch) and as
//! reports print it (RFC 3339).

use std::time::{Duration, SystemTime, UNIX_EPOCH};

pub fn now_unix_nanos() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_nanos()).unwrap_or(u64::MAX))
}

/// RFC 3339 in UTC with millisecond precision, e.g. `2026-11-26T06:51:18.123Z`.
pub fn rfc3339(unix_nanos: u64) -> String {
    humantime::format_rfc3339_millis(UNIX_EPOCH + Duration::from_nanos(unix_nanos)).to_string()
}
