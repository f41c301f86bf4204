//! Inputs a stage cannot use are moved out of the way, never deleted: to
//! `DIR/quarantine/INPUT-FOLDER/NAME`, with `NAME.err` beside it saying which
//! stage refused it, when and why (`KEY.err` for a name too long for the
//! suffix, see [`crate::fsutil::short_name`]). Moving it back into its folder
//! retries it.

use std::path::{Path, PathBuf};

use anyhow::{Context, Result};

use crate::fsutil::write_atomic;
use crate::store::Root;

/// Moves input `name` of folder `folder` of `root` to quarantine with `reason`:
/// on the local filesystem by [`quarantine`]; on an object store the reason is
/// written first, then the input is copied and deleted (a crash between the
/// two leaves the input in place, and the next try copies it again).
pub fn quarantine_in(
    root: &Root,
    folder: &str,
    name: &str,
    stage: &str,
    reason: &anyhow::Error,
) -> Result<()> {
    let remote = match root {
        Root::Local(p) => {
            let input = p.join(folder).join(name);
            return quarantine(&p.join(super::QUARANTINE), folder, &input, stage, reason)
                .map(|_| ());
        }
        Root::Remote(r) => r,
    };
    let input = format!("{folder}/{name}");
    let err_name = match name.len() + ".err".len() > crate::fsutil::NAME_MAX {
        true => format!("{}.err", crate::fsutil::short_name(name)),
        false => format!("{name}.err"),
    };
    let report = format!(
        "stage: {stage}\nfile: {}\ntime_unix_ms: {}\nreason: {reason:#}\n\nMove the file back into {folder}/ to retry it.\n",
        remote.show(&input),
        crate::clock::unix_ms()
    );
    let dir = format!("{}/{folder}", super::QUARANTINE);
    remote.put(&format!("{dir}/{err_name}"), report.into_bytes().into())?;
    remote.copy(&input, &format!("{dir}/{name}"))?;
    remote.delete(&input)?;
    crate::warn!("{stage}: quarantined {name} ({reason:#})");
    Ok(())
}

/// Quarantined files under `root`, as `(folder, name)`.
pub fn list_in(root: &Root) -> Result<Vec<(String, String)>> {
    let remote = match root {
        Root::Local(p) => return Ok(list(&p.join(super::QUARANTINE))),
        Root::Remote(r) => r,
    };
    let mut out: Vec<(String, String)> = remote
        .list_all(super::QUARANTINE)?
        .into_iter()
        .filter_map(|e| {
            let (folder, name) = e.name.split_once('/')?;
            (name.ends_with(".parquet") && !name.starts_with('.') && !name.contains('/'))
                .then(|| (folder.to_string(), name.to_string()))
        })
        .collect();
    out.sort();
    Ok(out)
}

/// Moves `input` (a file in `DIR/<folder>/`) to quarantine with `reason`.
/// Returns where it went.
pub fn quarantine(
    quarantine_dir: &Path,
    folder: &str,
    input: &Path,
    stage: &str,
    reason: &anyhow::Error,
) -> Result<PathBuf> {
    let dir = quarantine_dir.join(folder);
    std::fs::create_dir_all(&dir)
        .with_context(|| format!("{}: cannot create the directory", dir.display()))?;
    let name = input
        .file_name()
        .with_context(|| format!("{}: not a file name", input.display()))?;
    let target = dir.join(name);
    let mut err_name = name.to_os_string();
    err_name.push(".err");
    if err_name.len() > crate::fsutil::NAME_MAX {
        // (the report names the file in full)
        err_name = format!("{}.err", crate::fsutil::short_name(&name.to_string_lossy())).into();
    }
    let report = format!(
        "stage: {stage}\nfile: {}\ntime_unix_ms: {}\nreason: {reason:#}\n\nMove the file back into {folder}/ to retry it.\n",
        input.display(),
        crate::clock::unix_ms()
    );
    // The reason first: a crash between the two leaves a reason without a file
    // (harmless), never a quarantined file without its reason.
    write_atomic(&dir.join(err_name), report.as_bytes())?;
    std::fs::rename(input, &target)
        .with_context(|| format!("moving {} to {}", input.display(), target.display()))?;
    crate::fsutil::sync_parent_dir(&target)?;
    crate::warn!(
        "{stage}: quarantined {} ({reason:#})",
        input
            .file_name()
            .map_or_else(String::new, |n| n.to_string_lossy().into_owned())
    );
    Ok(target)
}

/// Quarantined files of `quarantine_dir`, as `(folder, name)`.
pub fn list(quarantine_dir: &Path) -> Vec<(String, String)> {
    let mut out = Vec::new();
    let Ok(folders) = std::fs::read_dir(quarantine_dir) else {
        return out;
    };
    for folder in folders.filter_map(|e| e.ok()) {
        let folder_name = folder.file_name().to_string_lossy().into_owned();
        for name in super::list_segments(&folder.path()).unwrap_or_default() {
            out.push((folder_name.clone(), name));
        }
    }
    out.sort();
    out
}
