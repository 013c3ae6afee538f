//! What a running `build` leaves on the host besides its target: the temporary
//! bundle and a helper process.
//!
//! * Real apptainer builds in a bundle directory `build-temp-NNN` under
//!   `$APPTAINER_TMPDIR` (default `$TMPDIR`, else `/tmp`; reference 6.1) and
//!   removes it when the build ends, whether it succeeded or failed; a build
//!   killed with SIGKILL leaves it behind. [`TempBundle`] does the same.
//! * Real apptainer runs helpers (image unpacking, mksquashfs, the fakeroot
//!   engine) as child processes in the caller's process group. [`Helper`] stands
//!   for them: a child named `fake-apptainer-build-helper TARGET` that lives
//!   until the build ends and kills it, or, if the build was killed and nobody
//!   kills the helper, for [`HELPER_LIFETIME`].

use std::fs;
use std::os::unix::process::CommandExt;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The helper's process name (`argv[0]`), by which tests find it in `/proc`.
pub const HELPER_NAME: &str = "fake-apptainer-build-helper";

/// How long an orphaned helper lives before it exits on its own.
const HELPER_LIFETIME: Duration = Duration::from_secs(120);

/// The bundle directory of one build; removed when dropped.
pub struct TempBundle(PathBuf);

impl TempBundle {
    /// Creates `build-temp-NNN/rootfs` under the temporary directory apptainer uses.
    pub fn create() -> std::io::Result<TempBundle> {
        let base = ["APPTAINER_TMPDIR", "TMPDIR"]
            .iter()
            .find_map(|key| crate::sys::env_nonempty(key))
            .unwrap_or_else(|| "/tmp".to_string());
        let digits = format!("{}{}", crate::sys::now_ms() % 1_000_000, std::process::id());
        let dir = PathBuf::from(base).join(format!("build-temp-{digits}"));
        fs::create_dir_all(dir.join("rootfs"))?;
        Ok(TempBundle(dir))
    }
}

impl Drop for TempBundle {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// The helper child of a running build; killed and reaped when dropped.
pub struct Helper(Option<Child>);

impl Helper {
    pub fn spawn(target: &str) -> Helper {
        let child = Command::new("/proc/self/exe")
            .arg0(HELPER_NAME)
            .arg(target)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok();
        Helper(child)
    }
}

impl Drop for Helper {
    fn drop(&mut self) {
        if let Some(child) = &mut self.0 {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Runs the helper when this binary was started as one.
pub fn helper_mode() -> Option<i32> {
    let arg0 = std::env::args_os().next()?;
    if arg0 != HELPER_NAME {
        return None;
    }
    let _ = fs::write("/proc/self/comm", "build-helper");
    let until = Instant::now() + HELPER_LIFETIME;
    while Instant::now() < until {
        std::thread::sleep(Duration::from_millis(200));
    }
    Some(0)
}
