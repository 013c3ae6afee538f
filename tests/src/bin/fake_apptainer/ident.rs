//! Who we are and where our state lives (reference 4.5): the user, the host name, and the
//! config, instance state, log and cache directories derived from them. Read fresh by each
//! command that needs it (`Ident::load`).

use std::fs;
use std::path::{Path, PathBuf};

use crate::sylog;
use crate::sys::{env_nonempty, uid};

/// (name, home) of a uid from /etc/passwd.
fn passwd_entry(uid: u32) -> Option<(String, String)> {
    let text = fs::read_to_string("/etc/passwd").ok()?;
    text.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.len() >= 6 && fields[2].parse::<u32>().ok() == Some(uid))
            .then(|| (fields[0].to_string(), fields[5].to_string()))
    })
}

/// Who and where we are: the parts of the instance state paths.
pub struct Ident {
    pub uid: u32,
    pub user: String,
    pub host: String,
    pub configdir: PathBuf,
}

impl Ident {
    pub fn load() -> Ident {
        let uid = uid();
        let user = if uid == 0 {
            "root".to_string()
        } else {
            env_nonempty("USER")
                .or_else(|| passwd_entry(uid).map(|e| e.0))
                .unwrap_or_else(|| uid.to_string())
        };
        let host = fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_string())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "localhost".to_string());
        Ident {
            uid,
            user,
            host,
            configdir: configdir(uid),
        }
    }

    /// `<configdir>/instances/app/<hostname>/<user>`
    pub fn state_dir_of(&self, user: &str) -> PathBuf {
        self.configdir
            .join("instances")
            .join("app")
            .join(&self.host)
            .join(user)
    }

    pub fn state_dir(&self) -> PathBuf {
        self.state_dir_of(&self.user)
    }

    /// `<configdir>/instances/logs/<hostname>/<user>`
    pub fn logs_dir(&self) -> PathBuf {
        self.configdir
            .join("instances")
            .join("logs")
            .join(&self.host)
            .join(&self.user)
    }

    /// Image cache: `$APPTAINER_CACHEDIR`, else `<configdir>/cache`.
    pub fn cache_dir(&self) -> PathBuf {
        env_nonempty("APPTAINER_CACHEDIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| self.configdir.join("cache"))
    }
}

fn configdir(uid: u32) -> PathBuf {
    if let Some(dir) = env_nonempty("APPTAINER_CONFIGDIR") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = env_nonempty("SINGULARITY_CONFIGDIR") {
        sylog::info(
            "Environment variable SINGULARITY_CONFIGDIR is set, but APPTAINER_CONFIGDIR is preferred",
        );
        return PathBuf::from(dir);
    }
    let home = env_nonempty("HOME")
        .or_else(|| passwd_entry(uid).map(|e| e.1))
        .unwrap_or_else(|| "/".to_string());
    Path::new(&home).join(".apptainer")
}
