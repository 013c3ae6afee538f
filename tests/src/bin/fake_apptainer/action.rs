//! What `exec` and `instance start|run` share (reference 2.2): their option table, the
//! `--bind` values (with `APPTAINER_BIND`/`APPTAINER_BINDPATH`) parsed into `Bind`s and checked
//! like apptainer's mount hook, and the `--env` items.

use std::fs;

use crate::cli::{b, bs, v, vs, Fail, Flag, Kind, Parsed};
use crate::sys;

/// Options of `exec` and `instance start|run` (reference 2.2).
pub static ACTION_FLAGS: &[Flag] = &[
    v(
        "add-caps",
        Kind::Str,
        "a comma separated capability list to add",
    ),
    b(
        "allow-setuid",
        "allow setuid binaries in container (root only)",
    ),
    v(
        "app",
        Kind::Str,
        "set an application to run inside a container",
    ),
    v(
        "apply-cgroups",
        Kind::Str,
        "apply cgroups from file for container processes",
    ),
    v("authfile", Kind::Str, "docker-style authentication file"),
    vs(
        "bind",
        'B',
        Kind::List,
        "a user-bind path specification: src[:dest[:opts]]",
    ),
    v("blkio-weight", Kind::Int, "block IO relative weight"),
    b("boot", "execute /sbin/init to boot container (root only)"),
    bs(
        "cleanenv",
        'e',
        "clean environment before running container",
    ),
    b(
        "compat",
        "apply settings for increased OCI/Docker compatibility",
    ),
    bs(
        "contain",
        'c',
        "use minimal /dev and empty other directories",
    ),
    bs(
        "containall",
        'C',
        "contain not only file systems, but also PID, IPC, and environment",
    ),
    v("cpu-shares", Kind::Int, "CPU shares for container"),
    v("cpus", Kind::Str, "number of CPUs available to container"),
    v("cpuset-cpus", Kind::Str, "list of host CPU ID(s) to run on"),
    v(
        "cpuset-mems",
        Kind::Str,
        "list of host memory nodes to run on",
    ),
    b("disable-cache", "do not use or create cached images/blobs"),
    v("dns", Kind::Str, "list of DNS server separated by commas"),
    b("docker-login", "login to a Docker Repository interactively"),
    v(
        "drop-caps",
        Kind::Str,
        "a comma separated capability list to drop",
    ),
    v(
        "env",
        Kind::Map,
        "pass environment variable to contained process",
    ),
    v(
        "env-file",
        Kind::List,
        "pass environment variables from file",
    ),
    bs(
        "fakeroot",
        'f',
        "run container with the appearance of running as root",
    ),
    vs(
        "home",
        'H',
        Kind::Str,
        "a home directory specification: src[:dest]",
    ),
    v("hostname", Kind::Str, "set container hostname"),
    bs("ipc", 'i', "run container in a new IPC namespace"),
    b(
        "keep-privs",
        "let root user keep privileges in container (root only)",
    ),
    v("memory", Kind::Str, "memory limit in bytes"),
    v(
        "memory-reservation",
        Kind::Str,
        "memory soft limit in bytes",
    ),
    v("memory-swap", Kind::Str, "swap limit"),
    v("mount", Kind::List, "a mount specification"),
    bs("net", 'n', "run container in a new network namespace"),
    v(
        "netns-path",
        Kind::Str,
        "join the network namespace at this path",
    ),
    v(
        "network",
        Kind::Str,
        "specify desired network type separated by commas",
    ),
    v(
        "network-args",
        Kind::List,
        "specify network arguments to pass to CNI plugins",
    ),
    b(
        "no-eval",
        "do not shell evaluate env vars or OCI container CMD/ENTRYPOINT/ARGS",
    ),
    b("no-home", "do NOT mount users home directory"),
    b("no-https", "use http instead of https"),
    b("no-init", "do NOT start shim process with --pid"),
    v("no-mount", Kind::List, "disable one or more mount points"),
    b("no-nv", "disable Nvidia support"),
    b("no-oci", "launch container with native runtime"),
    b(
        "no-privs",
        "drop all privileges from root user in container",
    ),
    b("no-rocm", "disable Rocm support"),
    b(
        "no-setgroups",
        "disable setgroups when entering --fakeroot user namespace",
    ),
    b("no-umask", "do not propagate umask to the container"),
    b("nv", "enable Nvidia support"),
    b("nvccli", "use nvidia-container-cli for GPU setup"),
    b("oci", "launch container with OCI runtime"),
    b("oom-kill-disable", "disable OOM killer"),
    vs(
        "overlay",
        'o',
        Kind::List,
        "use an overlayFS image for persistent data storage",
    ),
    b("passphrase", "prompt for an encryption passphrase"),
    v(
        "pem-path",
        Kind::Str,
        "enter an path to a PEM formatted RSA key",
    ),
    v("pids-limit", Kind::Int, "limit number of container PIDs"),
    b("rocm", "enable experimental Rocm support"),
    vs(
        "scratch",
        'S',
        Kind::List,
        "include a scratch directory within the container",
    ),
    v("security", Kind::List, "enable security features"),
    b("sif-fuse", "attempt FUSE mount of SIF"),
    b("unsquash", "extract the SIF into a temporary sandbox"),
    bs("userns", 'u', "run container in a new user namespace"),
    b("uts", "run container in a new UTS namespace"),
    vs(
        "workdir",
        'W',
        Kind::Str,
        "working directory to be used for /tmp and /var/tmp",
    ),
    bs(
        "writable",
        'w',
        "by default all Apptainer containers are available as read only",
    ),
    b(
        "writable-tmpfs",
        "makes the file system accessible as read-write with non persistent data",
    ),
];

/// One `src[:dst[:opts]]` bind.
pub struct Bind {
    pub src: String,
    pub dst: String,
    pub opts: String,
}

/// `--bind` values plus `APPTAINER_BIND` and `APPTAINER_BINDPATH`, which are merged.
pub fn bind_values(p: &Parsed) -> Vec<String> {
    let mut values: Vec<String> = p.all("bind").into_iter().map(str::to_string).collect();
    for key in ["APPTAINER_BIND", "APPTAINER_BINDPATH"] {
        if let Some(v) = sys::env_nonempty(key) {
            values.push(v);
        }
    }
    values
}

/// Each value is a comma list of `src[:dst[:opts]]`; `\,` and `\:` escape.
pub fn parse_binds(values: &[String]) -> Vec<Bind> {
    let mut binds = Vec::new();
    for value in values {
        for spec in split_escaped(value, ',') {
            if spec.is_empty() {
                continue;
            }
            let parts = split_escaped(&spec, ':');
            let src = parts[0].clone();
            let dst = parts
                .get(1)
                .filter(|d| !d.is_empty())
                .cloned()
                .unwrap_or_else(|| src.clone());
            let opts = parts.get(2).cloned().unwrap_or_default();
            binds.push(Bind { src, dst, opts });
        }
    }
    binds
}

fn split_escaped(text: &str, sep: char) -> Vec<String> {
    let mut parts = vec![String::new()];
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        let last = parts.len() - 1;
        match c {
            '\\' => match chars.next() {
                Some(n) if n == ',' || n == ':' => parts[last].push(n),
                Some(n) => {
                    parts[last].push('\\');
                    parts[last].push(n);
                }
                None => parts[last].push('\\'),
            },
            c if c == sep => parts.push(String::new()),
            c => parts[last].push(c),
        }
    }
    parts
}

/// A bind whose host source is missing fails like apptainer's mount hook (reference 2.5).
pub fn check_binds(binds: &[Bind]) -> Result<(), Fail> {
    for bind in binds {
        if bind.opts.contains("image-src") {
            continue;
        }
        if fs::symlink_metadata(&bind.src).is_err() {
            let (src, dst) = (&bind.src, &bind.dst);
            return Err(Fail::Fatal(format!(
                "container creation failed: mount hook function failure: mount {src}->{dst} error: while mounting {src}: mount source {src} doesn't exist"
            )));
        }
    }
    Ok(())
}

/// `--env` map items in order (a later key replaces an earlier one).
pub fn parse_env(p: &Parsed) -> Vec<(String, String)> {
    let mut env: Vec<(String, String)> = Vec::new();
    for value in p.all("env") {
        for item in sys::csv_split(value) {
            if let Some((k, v)) = item.split_once('=') {
                env.retain(|(key, _)| key != k);
                env.push((k.to_string(), v.to_string()));
            }
        }
    }
    env
}
