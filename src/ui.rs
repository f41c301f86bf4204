//! Messages to stderr, filtered by the global `-q`/`-v` flags.
//!
//! stdout is reserved for data (Parquet streams, JSON reports), so everything meant
//! for a person goes through these macros to stderr.

use std::sync::atomic::{AtomicI8, Ordering};

static VERBOSITY: AtomicI8 = AtomicI8::new(0);

/// -1 = quiet (errors only), 0 = normal, 1+ = verbose.
pub fn set_verbosity(level: i8) {
    VERBOSITY.store(level, Ordering::Relaxed);
}

pub fn verbosity() -> i8 {
    VERBOSITY.load(Ordering::Relaxed)
}

/// Progress and summaries a person wants to see; hidden by `-q`.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => {
        if $crate::ui::verbosity() >= 0 { eprintln!("claw: {}", format_args!($($arg)*)); }
    };
}

/// Details for `-v`.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => {
        if $crate::ui::verbosity() >= 1 { eprintln!("claw: {}", format_args!($($arg)*)); }
    };
}

/// Something the user should know even with `-q` is not an error but worth saying.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => {
        if $crate::ui::verbosity() >= 0 { eprintln!("claw: warning: {}", format_args!($($arg)*)); }
    };
}
