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

/// Writes one line to stderr. A closed stderr (the reader of a daemon's log went
/// away) must not kill the process mid-work, as `eprintln!` would by panicking.
pub fn log_line(args: std::fmt::Arguments) {
    use std::io::Write;
    let _ = writeln!(std::io::stderr().lock(), "{args}");
}

/// Progress and summaries a person wants to see; hidden by `-q`.
#[macro_export]
macro_rules! info {
    ($($arg:tt)*) => {
        if $crate::ui::verbosity() >= 0 { $crate::ui::log_line(format_args!("claw: {}", format_args!($($arg)*))); }
    };
}

/// Details for `-v`.
#[macro_export]
macro_rules! debug {
    ($($arg:tt)*) => {
        if $crate::ui::verbosity() >= 1 { $crate::ui::log_line(format_args!("claw: {}", format_args!($($arg)*))); }
    };
}

/// Something the user should know even with `-q` is not an error but worth saying.
#[macro_export]
macro_rules! warn {
    ($($arg:tt)*) => {
        if $crate::ui::verbosity() >= 0 { $crate::ui::log_line(format_args!("claw: warning: {}", format_args!($($arg)*))); }
    };
}

/// Peak resident memory of this process so far (Linux `VmHWM`), in bytes.
pub fn peak_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// A progress bar on stderr when it is a terminal and not `-q`; hidden otherwise
/// (pipes, CI logs), where the per-step log lines say the same.
pub fn progress_bar(total: Option<u64>, what: &str) -> indicatif::ProgressBar {
    use std::io::IsTerminal;
    if verbosity() < 0 || !std::io::stderr().is_terminal() {
        return indicatif::ProgressBar::hidden();
    }
    let bar = match total {
        Some(n) => indicatif::ProgressBar::new(n),
        None => indicatif::ProgressBar::new_spinner(),
    };
    let template = match total {
        Some(_) => "{prefix} [{bar:30}] {pos}/{len} {msg} ({elapsed}, eta {eta})",
        None => "{prefix} {spinner} {pos} {msg} ({elapsed})",
    };
    if let Ok(style) = indicatif::ProgressStyle::with_template(template) {
        bar.set_style(style.progress_chars("=> "));
    }
    bar.set_prefix(what.to_string());
    bar
}
