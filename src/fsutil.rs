//! Durable file writes shared by every stage: a reader never sees a partial
//! file, and once a write returns it survives a crash.

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

/// Writes `bytes` to `path` via `path.tmp`: write, fsync, rename, fsync the directory.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let tmp = tmp_path(path);
    let result = (|| -> Result<()> {
        let mut file =
            File::create(&tmp).with_context(|| format!("cannot create {}", tmp.display()))?;
        file.write_all(bytes)
            .with_context(|| format!("writing {}", tmp.display()))?;
        file.sync_all()
            .with_context(|| format!("{}: fsync", tmp.display()))?;
        drop(file);
        std::fs::rename(&tmp, path)
            .with_context(|| format!("renaming {} to {}", tmp.display(), path.display()))?;
        sync_parent_dir(path)
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

/// An output path that names an existing non-regular file (a character device
/// such as /dev/null, a FIFO, a socket), opened for writing in place: such a
/// target must not be replaced by a renamed temporary file. `None` for a regular
/// file or a new path (write those atomically); an error for a directory.
pub fn open_in_place(path: &Path) -> Result<Option<File>> {
    let Ok(meta) = std::fs::metadata(path) else {
        return Ok(None);
    };
    if meta.is_dir() {
        anyhow::bail!("{}: is a directory, not an output file", path.display());
    }
    if meta.is_file() {
        return Ok(None);
    }
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .with_context(|| format!("{}: cannot open for writing", path.display()))
        .map(Some)
}

/// Writes an output the user named: in place when it is a device or a FIFO
/// (see [`open_in_place`]), else atomically ([`write_atomic`]).
pub fn write_output(path: &Path, bytes: &[u8]) -> Result<()> {
    match open_in_place(path)? {
        Some(mut file) => file
            .write_all(bytes)
            .and_then(|()| file.flush())
            .with_context(|| format!("writing {}", path.display())),
        None => write_atomic(path, bytes),
    }
}

/// The longest file name (bytes) Linux filesystems take (NAME_MAX).
pub const NAME_MAX: usize = 255;

/// Names up to this long are used as they are in derived names (markers,
/// locks, `.tmp` and `.err` files), leaving room for a suffix.
const PLAIN_NAME_MAX: usize = 200;

/// `name` when short enough to derive other names from, else its first bytes
/// and a 128-bit hash of the whole: the same name always gives the same key,
/// and any input name a folder can hold still gets its claim, marker and
/// temporary files.
pub fn short_name(name: &str) -> String {
    if name.len() <= PLAIN_NAME_MAX {
        return name.to_string();
    }
    let mut cut = 100;
    while !name.is_char_boundary(cut) {
        cut -= 1;
    }
    format!("{}~{:032x}", &name[..cut], fnv1a_128(name.as_bytes()))
}

/// FNV-1a, 128 bits: stable across versions and machines (unlike std's hasher).
fn fnv1a_128(bytes: &[u8]) -> u128 {
    const OFFSET: u128 = 0x6c62_272e_07bb_0142_62b8_2175_6295_c58d;
    const PRIME: u128 = 0x0000_0000_0100_0000_0000_0000_0000_013b;
    bytes
        .iter()
        .fold(OFFSET, |h, &b| (h ^ u128::from(b)).wrapping_mul(PRIME))
}

/// `NAME.tmp` beside `NAME`; for a name too long for that, a hidden
/// `.KEY.tmp` (see [`short_name`]), which no folder listing takes for an input.
pub fn tmp_path(path: &Path) -> PathBuf {
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    match name {
        Some(n) if n.len() + ".tmp".len() > NAME_MAX => {
            path.with_file_name(format!(".{}.tmp", short_name(&n)))
        }
        _ => {
            let mut name = path.as_os_str().to_owned();
            name.push(".tmp");
            PathBuf::from(name)
        }
    }
}

/// Makes a rename durable: the directory entry lives in the parent directory.
pub fn sync_parent_dir(path: &Path) -> Result<()> {
    let parent = match path.parent() {
        Some(p) if !p.as_os_str().is_empty() => p,
        _ => Path::new("."),
    };
    File::open(parent)
        .and_then(|d| d.sync_all())
        .with_context(|| format!("{}: fsync of the directory", parent.display()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn atomic_write_replaces_and_leaves_no_tmp() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("LATEST");
        write_atomic(&path, b"one").unwrap();
        write_atomic(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert!(!tmp_path(&path).exists());
    }

    #[test]
    fn long_names_get_short_stable_keys_and_temp_files() {
        assert_eq!(short_name("a.parquet"), "a.parquet");
        let long = format!("{}.parquet", "é".repeat(130)); // 268 bytes
        let key = short_name(&long);
        assert!(key.len() < 140, "{key}");
        assert_eq!(key, short_name(&long), "stable");
        let other = format!("{}x.parquet", "é".repeat(130));
        assert_ne!(key, short_name(&other), "same prefix, another name");
        // a file that long can be written atomically
        let dir = tempfile::tempdir().unwrap();
        let name = format!("{}.parquet", "s".repeat(NAME_MAX - ".parquet".len()));
        let path = dir.path().join(&name);
        let tmp = tmp_path(&path);
        assert!(tmp.file_name().unwrap().len() <= NAME_MAX);
        assert!(tmp.file_name().unwrap().to_string_lossy().starts_with('.'));
        write_atomic(&path, b"x").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"x");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn outputs_to_devices_are_written_in_place() {
        use std::os::unix::fs::FileTypeExt;
        // a regular file or a new path: atomically, as before
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.json");
        write_output(&path, b"one").unwrap();
        write_output(&path, b"two").unwrap();
        assert_eq!(std::fs::read(&path).unwrap(), b"two");
        assert!(!tmp_path(&path).exists());
        // a device stays a device; a full one is an error that names it
        write_output(Path::new("/dev/null"), b"gone").unwrap();
        let err = write_output(Path::new("/dev/full"), b"no room").unwrap_err();
        let msg = format!("{err:#}");
        assert!(
            msg.contains("/dev/full") && msg.contains("No space"),
            "{msg}"
        );
        for dev in ["/dev/null", "/dev/full"] {
            let ft = std::fs::metadata(dev).unwrap().file_type();
            assert!(ft.is_char_device(), "{dev} is no longer a device");
        }
        assert!(!Path::new("/dev/full.tmp").exists());
        // a directory is refused, not renamed over
        let err = write_output(dir.path(), b"x").unwrap_err();
        assert!(err.to_string().contains("is a directory"), "{err}");
    }
}
