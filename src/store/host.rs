//! What a worker reads of its machine and folders: the host name (worker ids,
//! status files, lease owners) and a local folder's segments. A leaf of the
//! storage layer, which the daemon re-exports (`daemon::{hostname,
//! list_segments}`), so that neither imports the other's `mod.rs` for it.

use std::path::Path;

use anyhow::{Context, Result};

/// The host name, for worker ids and status files.
pub fn hostname() -> String {
    let mut buf = [0u8; 256];
    // SAFETY: the buffer is valid for its length; gethostname NUL-terminates on success.
    let rc = unsafe { libc::gethostname(buf.as_mut_ptr().cast(), buf.len()) };
    let name = if rc == 0 {
        let end = buf.iter().position(|&b| b == 0).unwrap_or(buf.len());
        String::from_utf8_lossy(&buf[..end]).into_owned()
    } else {
        String::new()
    };
    let clean: String = name
        .chars()
        .map(
            |c| match c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                true => c,
                false => '_',
            },
        )
        .collect();
    match clean.is_empty() || clean.starts_with('-') {
        true => "host".into(),
        false => clean,
    }
}

/// The `*.parquet` segments of `dir`, sorted by name (time order for claw's own
/// segment names); hidden files and `.tmp` files being written are not segments.
pub fn list_segments(dir: &Path) -> Result<Vec<String>> {
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e).with_context(|| format!("listing {}", dir.display())),
    };
    let mut names: Vec<String> = entries
        .filter_map(|e| e.ok())
        .filter(|e| e.file_type().is_ok_and(|t| t.is_file()))
        .filter_map(|e| e.file_name().into_string().ok())
        .filter(|n| n.ends_with(".parquet") && !n.starts_with('.'))
        .collect();
    names.sort();
    Ok(names)
}
