//! Networks for `instance start|run` (reference 2.2, 2.5 and 6.3): which network was asked
//! for, the refusal of a CNI network to a non-root caller, and addresses from the `bridge`
//! range allocated under a lock file so that concurrent starts never share one.

use std::collections::HashSet;
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use crate::cli::{Fail, Parsed};
use crate::ident::Ident;
use crate::instance_state::find;
use crate::sylog;
use crate::sys;

/// The starter apptainer names when it fails (a distribution package's path, reference 2.5).
const STARTER: &str = "/usr/libexec/apptainer/bin/starter";

/// The address range of the default `bridge` network (10.22.0.0/16).
const IP_RANGE: &str = "10.22.0.1-10.22.255.254";

/// The first requested network when a network namespace is asked for (reference 2.2).
pub fn network_choice(p: &Parsed) -> Option<String> {
    let mut net = p.bool("net");
    let network = p.str("network");
    if network.is_some() && !net {
        sylog::info("Setting --net (required by --network)");
        net = true;
    }
    if !p.all("network-args").is_empty() && !net {
        sylog::info("Setting --net (required by --network-args)");
        net = true;
    }
    net.then(|| {
        network
            .and_then(|n| n.split(',').next())
            .map(str::trim)
            .filter(|n| !n.is_empty())
            .unwrap_or("bridge")
            .to_string()
    })
}

/// Only root may use a CNI network; anyone may use `none` (reference 2.5 and 6.3). The refusal
/// comes from inside the starter, so apptainer echoes it before its own FATAL.
pub fn check_network_allowed(network: Option<&str>) -> Result<(), Fail> {
    match network {
        Some(net) if net != "none" && sys::uid() != 0 => {
            sylog::fatal("container creation failed: network requires root or a suid installation with /etc/subuid --fakeroot; non-root users can only use --network=none unless permitted by the administrator");
            Err(Fail::Fatal(format!(
                "while executing starter: failed to start instance: while running {STARTER}: exit status 255"
            )))
        }
        _ => Ok(()),
    }
}

/// `IP=` from `--network-args "[net:]K=V;K2=V2"`.
fn requested_ip(network_args: &[&str]) -> Option<String> {
    for arg in network_args {
        for item in sys::csv_split(arg) {
            let body = match (item.find(':'), item.find('=')) {
                (Some(colon), Some(eq)) if colon < eq => &item[colon + 1..],
                _ => item.as_str(),
            };
            for pair in body.split(';') {
                if let Some((k, v)) = pair.split_once('=') {
                    if k.trim().eq_ignore_ascii_case("IP") {
                        let ip = v.trim().split('/').next().unwrap_or_default();
                        return Some(ip.to_string());
                    }
                }
            }
        }
    }
    None
}

/// A requested address if free, else the first of 10.22.0.2, .3, ... not used by
/// a live instance.
pub fn allocate_ip(state_dir: &Path, p: &Parsed) -> Result<String, Fail> {
    let used: HashSet<String> = find(state_dir, "*")
        .unwrap_or_default()
        .into_iter()
        .map(|i| i.ip)
        .filter(|ip| !ip.is_empty())
        .collect();
    if let Some(ip) = requested_ip(&p.all("network-args")) {
        if used.contains(&ip) {
            return Err(Fail::Fatal(format!(
                "container creation failed: failed to allocate for range 0: requested IP address {ip} is not available in range set {IP_RANGE}"
            )));
        }
        return Ok(ip);
    }
    for third in 0..=255u32 {
        for fourth in 1..=254u32 {
            if third == 0 && fourth < 2 {
                continue;
            }
            let ip = format!("10.22.{third}.{fourth}");
            if !used.contains(&ip) {
                return Ok(ip);
            }
        }
    }
    Err(Fail::Fatal(format!(
        "container creation failed: failed to allocate for range 0: no IP addresses available in range set: {IP_RANGE}"
    )))
}

/// A lock file holding the pid of the start that allocates an address.
pub struct IpLock(PathBuf);

impl IpLock {
    pub fn acquire(ident: &Ident) -> Option<IpLock> {
        let dir = ident.configdir.join("instances");
        sys::mkdir_p(&dir, 0o700).ok()?;
        let path = dir.join(format!(".fake-ipam-{}-{}.lock", ident.host, ident.user));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(mut file) => {
                    let _ = write!(file, "{}", std::process::id());
                    return Some(IpLock(path));
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let holder = fs::read_to_string(&path)
                        .ok()
                        .and_then(|s| s.trim().parse::<i64>().ok());
                    if holder.is_some_and(|pid| !sys::is_running(pid)) {
                        let _ = fs::remove_file(&path);
                        continue;
                    }
                }
                Err(_) => return None,
            }
            if Instant::now() > deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for IpLock {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.0);
    }
}
