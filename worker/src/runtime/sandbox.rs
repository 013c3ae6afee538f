//! Looking inside a sandbox image from the host, the way the container sees its own tree:
//! symbolic links are followed with the sandbox as the root, so neither an absolute target nor
//! `..` leads out of it.
//!
//! This answers "does this directory exist in the image" by reading the directory tree that
//! `apptainer build --sandbox` wrote, instead of starting a container (`apptainer exec IMAGE test
//! -d PATH`) for it: the same answer for what the image holds, without a container launch per
//! question.

use std::collections::VecDeque;
use std::ffi::OsString;
use std::io;
use std::path::{Component, Path, PathBuf};

/// How many symbolic links one lookup follows before giving up (Linux's own limit, `ELOOP`).
const MAX_SYMLINKS: u32 = 40;

/// Whether `path` (absolute, inside the container) names a directory of the sandbox at `root`.
/// A missing component, a file where a directory is needed, or a chain of links that does not
/// end are all `false`; only a failure to read the tree (permissions, I/O) is an error.
pub fn is_dir(root: &Path, path: &str) -> io::Result<bool> {
    let mut pending: VecDeque<OsString> = components(Path::new(path)).collect();
    let mut resolved: Vec<OsString> = Vec::new();
    let mut links = 0;
    while let Some(part) = pending.pop_front() {
        if part == ".." {
            resolved.pop();
            continue;
        }
        let candidate = join(root, &resolved).join(&part);
        let meta = match std::fs::symlink_metadata(&candidate) {
            Ok(meta) => meta,
            Err(e) if is_absent(&e) => return Ok(false),
            Err(e) => return Err(e),
        };
        if meta.file_type().is_symlink() {
            links += 1;
            if links > MAX_SYMLINKS {
                return Ok(false);
            }
            let target = std::fs::read_link(&candidate)?;
            if target.is_absolute() {
                resolved.clear();
            }
            for part in components(&target).collect::<Vec<_>>().into_iter().rev() {
                pending.push_front(part);
            }
        } else if meta.is_dir() {
            resolved.push(part);
        } else {
            // A file (or device, socket...): the path goes on through it, or ends on it.
            return Ok(false);
        }
    }
    Ok(std::fs::metadata(join(root, &resolved))?.is_dir())
}

/// The named components of a path, with `..` kept and `.` and the root dropped.
fn components(path: &Path) -> impl Iterator<Item = OsString> + '_ {
    path.components().filter_map(|c| match c {
        Component::Normal(name) => Some(name.to_owned()),
        Component::ParentDir => Some(OsString::from("..")),
        Component::RootDir | Component::CurDir | Component::Prefix(_) => None,
    })
}

fn join(root: &Path, parts: &[OsString]) -> PathBuf {
    let mut path = root.to_path_buf();
    path.extend(parts);
    path
}

fn is_absent(error: &io::Error) -> bool {
    matches!(
        error.kind(),
        io::ErrorKind::NotFound | io::ErrorKind::NotADirectory
    )
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::symlink;

    use super::is_dir;

    /// A sandbox with `/mnt/data`, a file `/etc/hostname`, and links of every kind.
    fn sandbox() -> tempfile::TempDir {
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path();
        std::fs::create_dir_all(root.join("mnt/data")).unwrap();
        std::fs::create_dir_all(root.join("etc")).unwrap();
        std::fs::write(root.join("etc/hostname"), "box\n").unwrap();
        // Absolute, as images have them: /data -> /mnt/data inside the container.
        symlink("/mnt/data", root.join("data")).unwrap();
        symlink("../mnt", root.join("etc/up")).unwrap();
        symlink("/etc/hostname", root.join("host")).unwrap();
        symlink("loop", root.join("loop")).unwrap();
        dir
    }

    #[test]
    fn directories_of_the_image_are_found() {
        let dir = sandbox();
        for path in [
            "/",
            "/mnt",
            "/mnt/data",
            "/mnt/data/",
            "/mnt/./data",
            "/etc",
        ] {
            assert!(is_dir(dir.path(), path).unwrap(), "{path}");
        }
    }

    #[test]
    fn missing_paths_and_files_are_not_directories() {
        let dir = sandbox();
        for path in [
            "/srv",
            "/mnt/data/x",
            "/etc/hostname",
            "/etc/hostname/x",
            "/host",
        ] {
            assert!(!is_dir(dir.path(), path).unwrap(), "{path}");
        }
    }

    #[test]
    fn links_resolve_inside_the_image() {
        let dir = sandbox();
        assert!(is_dir(dir.path(), "/data").unwrap());
        assert!(is_dir(dir.path(), "/etc/up/data").unwrap());
        assert!(!is_dir(dir.path(), "/loop").unwrap());
    }

    #[test]
    fn nothing_outside_the_image_is_seen() {
        let outside = tempfile::tempdir().unwrap();
        std::fs::create_dir(outside.path().join("only-on-the-host")).unwrap();
        let dir = sandbox();
        // An absolute link to a host directory means that path inside the image.
        symlink(outside.path(), dir.path().join("escape")).unwrap();
        assert!(!is_dir(dir.path(), "/escape").unwrap());
        // `..` stops at the image's root, as it does at a real root.
        let up = format!("/../../../..{}", outside.path().display());
        assert!(!is_dir(dir.path(), &up).unwrap());
        assert!(is_dir(dir.path(), "/../../mnt/data").unwrap());
    }
}
