//! The instance state files (reference 4.6): `<configdir>/instances/app/<host>/<user>/NAME/
//! NAME.json`, written by the monitor (`monitor.rs`), read by every `instance` subcommand and by
//! `exec instance://`. A lookup prunes, silently, the entries whose monitor is gone.

use std::fs;
use std::path::{Path, PathBuf};

use crate::action::Bind;
use crate::glob;
use crate::json::J;
use crate::sys;

/// One instance state file.
pub struct Instance {
    pub name: String,
    pub pid: i64,
    pub ppid: i64,
    pub user: String,
    pub image: String,
    pub config: String,
    pub ip: String,
    pub log_err: String,
    pub log_out: String,
}

impl Instance {
    /// The state file: keys in the order of apptainer's instance.File.
    pub fn state_json(&self) -> J {
        J::o(vec![
            ("pid", J::Int(self.pid)),
            ("ppid", J::Int(self.ppid)),
            ("name", J::s(&self.name)),
            ("user", J::s(&self.user)),
            ("image", J::s(&self.image)),
            ("config", J::s(&self.config)),
            ("userns", J::Bool(false)),
            ("cgroup", J::Bool(false)),
            ("ip", J::s(&self.ip)),
            ("logErrPath", J::s(&self.log_err)),
            ("logOutPath", J::s(&self.log_out)),
            ("checkpoint", J::s("")),
            ("sharensMode", J::Bool(false)),
        ])
    }

    fn from_state(text: &str) -> Option<Instance> {
        let v: serde_json::Value = serde_json::from_str(text).ok()?;
        let s = |key: &str| {
            v.get(key)
                .and_then(|x| x.as_str())
                .unwrap_or_default()
                .to_string()
        };
        Some(Instance {
            name: s("name"),
            pid: v.get("pid")?.as_i64()?,
            ppid: v.get("ppid")?.as_i64()?,
            user: s("user"),
            image: s("image"),
            config: s("config"),
            ip: s("ip"),
            log_err: s("logErrPath"),
            log_out: s("logOutPath"),
        })
    }

    /// One element of `instance list --json` (reference 4.2).
    pub fn list_json(&self) -> J {
        J::o(vec![
            ("instance", J::s(&self.name)),
            ("pid", J::Int(self.pid)),
            ("img", J::s(&self.image)),
            ("ip", J::s(&self.ip)),
            ("logErrPath", J::s(&self.log_err)),
            ("logOutPath", J::s(&self.log_out)),
        ])
    }

    /// The binds recorded in the config at start.
    pub fn binds(&self) -> Vec<Bind> {
        let config = sys::base64_decode(&self.config)
            .and_then(|bytes| serde_json::from_slice::<serde_json::Value>(&bytes).ok());
        let Some(list) = config
            .as_ref()
            .and_then(|c| c.get("binds"))
            .and_then(|b| b.as_array())
        else {
            return Vec::new();
        };
        list.iter()
            .map(|b| {
                let s = |k: &str| {
                    b.get(k)
                        .and_then(|v| v.as_str())
                        .unwrap_or_default()
                        .to_string()
                };
                Bind {
                    src: s("source"),
                    dst: s("destination"),
                    opts: s("options"),
                }
            })
            .collect()
    }
}

pub fn state_file(dir: &Path, name: &str) -> PathBuf {
    dir.join(name).join(format!("{name}.json"))
}

pub fn read_state(path: &Path) -> Option<Instance> {
    Instance::from_state(&fs::read_to_string(path).ok()?)
}

/// Instances whose name matches `pattern`, sorted by name. Entries whose monitor
/// is gone are deleted silently (reference 4.6).
pub fn find(dir: &Path, pattern: &str) -> Result<Vec<Instance>, glob::BadPattern> {
    glob::validate(pattern)?;
    let mut names: Vec<String> = match fs::read_dir(dir) {
        Ok(entries) => entries
            .filter_map(Result::ok)
            .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
            .filter_map(|e| e.file_name().into_string().ok())
            .filter(|n| glob::matches(pattern, n))
            .collect(),
        Err(_) => Vec::new(),
    };
    names.sort();
    let mut found = Vec::new();
    for name in names {
        let path = state_file(dir, &name);
        let Some(instance) = read_state(&path) else {
            continue;
        };
        if sys::is_monitor(instance.ppid) {
            found.push(instance);
        } else {
            prune(&path, instance.ppid);
        }
    }
    Ok(found)
}

/// Deletes a state directory if it still belongs to the monitor `ppid`.
pub fn prune(path: &Path, ppid: i64) {
    if read_state(path).is_some_and(|i| i.ppid == ppid) {
        if let Some(dir) = path.parent() {
            let _ = fs::remove_dir_all(dir);
        }
    }
}

/// Instance names allowed by apptainer: `^[a-zA-Z0-9._-]+$`.
pub fn valid_name(name: &str) -> bool {
    !name.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'_' | b'-'))
}
