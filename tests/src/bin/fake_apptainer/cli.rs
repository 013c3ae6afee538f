//! The command tree, a pflag-like option parser and cobra-style errors
//! (reference sections 0.3 and 0.4).
//!
//! Global options are options of the root command and must come before the
//! subcommand. `exec` and `instance start|run` stop parsing options at their
//! first argument (the container command and startscript arguments may look like
//! options); `build`, `instance list|stop|stats` and `inspect` accept options
//! anywhere.

use std::io::Write;

use crate::sylog;
use crate::sys;
use crate::{build, exec, image, instance};

pub const VERSION: &str = "1.4.5-fake";

const RUN_LINE: &str = "Run 'apptainer --help' for more detailed usage information.\n";

/// How an invocation ended.
pub enum Done {
    Code(i32),
    /// The command run by `exec` was killed by this signal: re-raise it.
    Signal(i32),
}

/// Why an invocation failed.
pub enum Fail {
    /// `sylog.Fatalf`: `FATAL:   msg`, exit 255.
    Fatal(String),
    /// An error returned from a command's RunE: `Error for command "x": msg` + usage, exit 1.
    Command(&'static Cmd, String),
    /// An option parsing error: `Error for command "x": msg` + the option list, exit 1.
    Flag(&'static Cmd, String),
    /// A cmdline.CommandError: usage only (after `Error: <prefix>` when given), exit 1.
    Usage(&'static Cmd, Option<String>),
}

pub type Res = Result<Done, Fail>;

pub fn ok() -> Res {
    Ok(Done::Code(0))
}

// ---------------------------------------------------------------------------
// Options

#[derive(Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    Bool,
    Str,
    Int,
    /// Repeatable string (string array or slice).
    List,
    /// pflag StringToString: comma-separated `K=V` items, repeatable.
    Map,
}

pub struct Flag {
    pub long: &'static str,
    pub short: Option<char>,
    pub kind: Kind,
    pub usage: &'static str,
}

const fn b(long: &'static str, usage: &'static str) -> Flag {
    Flag {
        long,
        short: None,
        kind: Kind::Bool,
        usage,
    }
}

const fn bs(long: &'static str, short: char, usage: &'static str) -> Flag {
    Flag {
        long,
        short: Some(short),
        kind: Kind::Bool,
        usage,
    }
}

const fn v(long: &'static str, kind: Kind, usage: &'static str) -> Flag {
    Flag {
        long,
        short: None,
        kind,
        usage,
    }
}

const fn vs(long: &'static str, short: char, kind: Kind, usage: &'static str) -> Flag {
    Flag {
        long,
        short: Some(short),
        kind,
        usage,
    }
}

static HELP_FLAG: Flag = bs("help", 'h', "help for this command");

static ROOT_FLAGS: &[Flag] = &[
    bs(
        "debug",
        'd',
        "print debugging information (highest verbosity)",
    ),
    b("nocolor", "print without color output (default False)"),
    bs("silent", 's', "only print errors"),
    bs("quiet", 'q', "suppress normal output"),
    bs("verbose", 'v', "print additional information"),
    vs(
        "config",
        'c',
        Kind::Str,
        "specify a configuration file (for root or unprivileged installation only)",
    ),
    b(
        "build-config",
        "use configuration needed for building containers",
    ),
    b("version", "version for apptainer"),
];

static BUILD_FLAGS: &[Flag] = &[
    bs(
        "sandbox",
        's',
        "build image as sandbox format (chroot directory structure)",
    ),
    bs("force", 'F', "overwrite an image file if it exists"),
    bs(
        "fakeroot",
        'f',
        "build with the appearance of running as root",
    ),
    b(
        "fix-perms",
        "ensure owner has rwX permissions on all container content",
    ),
    bs(
        "notest",
        'T',
        "build without running tests in %test section",
    ),
    bs(
        "update",
        'u',
        "run definition over existing container (skips header)",
    ),
    v(
        "section",
        Kind::List,
        "only run specific section(s) of deffile",
    ),
    v(
        "build-arg",
        Kind::List,
        "defines variable=value to replace {{ variable }} entries",
    ),
    v(
        "build-arg-file",
        Kind::Str,
        "specifies a file containing variable=value lines",
    ),
    b(
        "warn-unused-build-args",
        "shows warning instead of fatal message for unused build args",
    ),
    v(
        "arch",
        Kind::Str,
        "architecture for container-based sources",
    ),
    v(
        "arch-variant",
        Kind::Str,
        "architecture variant for container-based sources",
    ),
    b("disable-cache", "do not use cache or create cache"),
    b("no-cleanup", "do NOT clean up bundle after failed build"),
    b("json", "interpret build definition as JSON"),
    v("library", Kind::Str, "container Library URL"),
    bs(
        "encrypt",
        'e',
        "build an image with an encrypted file system",
    ),
    b("passphrase", "prompt for an encryption passphrase"),
    v(
        "pem-path",
        Kind::Str,
        "enter an path to a PEM formatted RSA key",
    ),
    b("nv", "inject host Nvidia libraries during build"),
    b("nvccli", "use nvidia-container-cli for GPU setup"),
    b("rocm", "inject host Rocm libraries during build"),
    vs("bind", 'B', Kind::List, "a user-bind path specification"),
    v("mount", Kind::List, "a mount specification"),
    b(
        "writable-tmpfs",
        "during the %test section, makes the file system accessible as read-write",
    ),
    b("userns", "build without using setuid even if available"),
    b("ignore-subuid", "ignore entries inside /etc/subuid"),
    b("ignore-fakeroot-command", "ignore fakeroot command"),
    v(
        "mksquashfs-args",
        Kind::Str,
        "additional arguments to mksquashfs",
    ),
    v("authfile", Kind::Str, "docker-style authentication file"),
    b("docker-login", "login to a Docker Repository interactively"),
    b("no-https", "use http instead of https"),
    v(
        "tmpdir",
        Kind::Str,
        "specify a temporary directory to use for build",
    ),
    b("reproducible", "build a reproducible image"),
];

/// Options of `exec` and `instance start|run` (reference 2.2).
static ACTION_FLAGS: &[Flag] = &[
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

static INSTANCE_START_FLAGS: &[Flag] = &[
    v(
        "pid-file",
        Kind::Str,
        "write instance PID to the file with the given name",
    ),
    v(
        "dmtcp-launch",
        Kind::Str,
        "checkpoint for dmtcp to save container process state to",
    ),
    v(
        "dmtcp-restart",
        Kind::Str,
        "checkpoint for dmtcp to use to restart container process",
    ),
];

static INSTANCE_RUN_FLAGS: &[Flag] = &[v(
    "runscript-timeout",
    Kind::Str,
    "timeout for the runscript interpreter",
)];

static EXEC_FLAGS: &[Flag] = &[
    bs("pid", 'p', "run container in a new PID namespace"),
    b("no-pid", "do not run container in a new PID namespace"),
    v(
        "cwd",
        Kind::Str,
        "initial working directory for payload process inside the container",
    ),
    v(
        "pwd",
        Kind::Str,
        "initial working directory for payload process inside the container",
    ),
    b(
        "sharens",
        "share the namespace and image with other containers launched from the same parent process",
    ),
];

static INSTANCE_STOP_FLAGS: &[Flag] = &[
    vs(
        "user",
        'u',
        Kind::Str,
        "if running as root, stop instances belonging to user",
    ),
    bs("all", 'a', "stop all user's instances"),
    bs("force", 'F', "force kill instance"),
    vs("signal", 's', Kind::Str, "signal sent to the instance"),
    vs(
        "timeout",
        't',
        Kind::Int,
        "force kill non stopped instances after X seconds",
    ),
];

static INSTANCE_LIST_FLAGS: &[Flag] = &[
    vs(
        "user",
        'u',
        Kind::Str,
        "if running as root, list instances from \"<username>\"",
    ),
    bs("json", 'j', "print structured json instead of list"),
    bs(
        "logs",
        'l',
        "display location of stdout and sterr log files for instances",
    ),
    bs("all", 'a', "list all instances, including hidden ones"),
];

static INSTANCE_STATS_FLAGS: &[Flag] = &[
    vs(
        "user",
        'u',
        Kind::Str,
        "if running as root, show stats for an instance of this user",
    ),
    bs("json", 'j', "output stats in json"),
    b(
        "no-stream",
        "disable streaming (live update) of instance stats",
    ),
];

static INSPECT_FLAGS: &[Flag] = &[
    bs(
        "labels",
        'l',
        "show the labels associated with the image (default)",
    ),
    bs(
        "deffile",
        'd',
        "show the Apptainer recipe file that was used to generate the image",
    ),
    bs("runscript", 'r', "show the runscript for the image"),
    bs("startscript", 's', "show the startscript for the image"),
    bs("test", 't', "show the test script for the image"),
    bs(
        "environment",
        'e',
        "show the environment settings for the image",
    ),
    bs(
        "helpfile",
        'H',
        "inspect the runscript helpfile, if it exists",
    ),
    bs("json", 'j', "print structured json instead of sections"),
    b("list-apps", "list all apps in a container"),
    v("app", Kind::Str, "inspect a specific app"),
    b("all", "show all available data (imply --json option)"),
];

// ---------------------------------------------------------------------------
// Commands

pub struct Cmd {
    pub name: &'static str,
    /// The usage line: the parents' Use strings and this command's.
    pub usage: &'static str,
    pub short: &'static str,
    pub flags: &'static [&'static [Flag]],
    pub interspersed: bool,
    pub subs: &'static [&'static Cmd],
}

pub static ROOT: Cmd = Cmd {
    name: "apptainer",
    usage: "apptainer [global options...]",
    short: "Linux container platform optimized for High Performance Computing (HPC) and Enterprise Performance Computing (EPC)",
    flags: &[ROOT_FLAGS],
    interspersed: false,
    subs: &[&BUILD, &EXEC, &INSPECT, &INSTANCE, &VERSION_CMD],
};

pub static BUILD: Cmd = Cmd {
    name: "build",
    usage: "apptainer [global options...] build [local options...] <IMAGE PATH> <BUILD SPEC>",
    short: "Build an Apptainer image",
    flags: &[BUILD_FLAGS],
    interspersed: true,
    subs: &[],
};

pub static EXEC: Cmd = Cmd {
    name: "exec",
    usage: "apptainer [global options...] exec [exec options...] <container> <command>",
    short: "Run a command within a container",
    flags: &[ACTION_FLAGS, EXEC_FLAGS],
    interspersed: false,
    subs: &[],
};

pub static INSPECT: Cmd = Cmd {
    name: "inspect",
    usage: "apptainer [global options...] inspect [inspect options...] <image path>",
    short: "Show metadata for an image",
    flags: &[INSPECT_FLAGS],
    interspersed: true,
    subs: &[],
};

pub static VERSION_CMD: Cmd = Cmd {
    name: "version",
    usage: "apptainer [global options...] version",
    short: "Show the version for Apptainer",
    flags: &[],
    interspersed: true,
    subs: &[],
};

pub static BUILDCFG: Cmd = Cmd {
    name: "buildcfg",
    usage: "apptainer [global options...] buildcfg",
    short: "Output the currently set compile-time parameters",
    flags: &[],
    interspersed: true,
    subs: &[],
};

pub static INSTANCE: Cmd = Cmd {
    name: "instance",
    usage: "apptainer [global options...] instance",
    short: "Manage containers running as services",
    flags: &[],
    interspersed: false,
    subs: &[
        &INSTANCE_LIST,
        &INSTANCE_RUN,
        &INSTANCE_START,
        &INSTANCE_STATS,
        &INSTANCE_STOP,
    ],
};

pub static INSTANCE_START: Cmd = Cmd {
    name: "start",
    usage: "apptainer [global options...] instance start [start options...] <container path> <instance name> [startscript args...]",
    short: "Start a named instance of the given container image",
    flags: &[ACTION_FLAGS, INSTANCE_START_FLAGS],
    interspersed: false,
    subs: &[],
};

pub static INSTANCE_RUN: Cmd = Cmd {
    name: "run",
    usage: "apptainer [global options...] instance run [run options...] <container path> <instance name> [runscript args...]",
    short: "Run a named instance of the given container image",
    flags: &[ACTION_FLAGS, INSTANCE_START_FLAGS, INSTANCE_RUN_FLAGS],
    interspersed: false,
    subs: &[],
};

pub static INSTANCE_STOP: Cmd = Cmd {
    name: "stop",
    usage: "apptainer [global options...] instance stop [stop options...] [instance]",
    short: "Stop a named instance of a given container image",
    flags: &[INSTANCE_STOP_FLAGS],
    interspersed: true,
    subs: &[],
};

pub static INSTANCE_LIST: Cmd = Cmd {
    name: "list",
    usage: "apptainer [global options...] instance list [list options...] [<instance name glob>]",
    short: "List all running and named Apptainer instances",
    flags: &[INSTANCE_LIST_FLAGS],
    interspersed: true,
    subs: &[],
};

pub static INSTANCE_STATS: Cmd = Cmd {
    name: "stats",
    usage: "apptainer [global options...] instance stats [stats options...] <instance name>",
    short: "Get stats for a named instance",
    flags: &[INSTANCE_STATS_FLAGS],
    interspersed: true,
    subs: &[],
};

impl Cmd {
    fn all_flags(&self) -> impl Iterator<Item = &'static Flag> + '_ {
        self.flags
            .iter()
            .flat_map(|group| group.iter())
            .chain(std::iter::once(&HELP_FLAG))
    }
}

// ---------------------------------------------------------------------------
// Parsing

/// Parsed options (in command-line order) and positional arguments.
#[derive(Default)]
pub struct Parsed {
    values: Vec<(&'static str, String)>,
    pub args: Vec<String>,
    pub help: bool,
}

impl Parsed {
    pub fn bool(&self, long: &str) -> bool {
        self.str(long) == Some("true")
    }

    /// The last value given.
    pub fn str(&self, long: &str) -> Option<&str> {
        self.values
            .iter()
            .rev()
            .find(|(k, _)| *k == long)
            .map(|(_, v)| v.as_str())
    }

    /// Every value given, in order.
    pub fn all(&self, long: &str) -> Vec<&str> {
        self.values
            .iter()
            .filter(|(k, _)| *k == long)
            .map(|(_, v)| v.as_str())
            .collect()
    }

    pub fn int(&self, long: &str, default: i64) -> i64 {
        self.str(long)
            .and_then(|v| v.parse().ok())
            .unwrap_or(default)
    }

    fn set(&mut self, flag: &'static Flag, value: String) -> Result<(), String> {
        let value = match flag.kind {
            Kind::Bool => match value.as_str() {
                "1" | "t" | "T" | "true" | "TRUE" | "True" => "true".to_string(),
                "0" | "f" | "F" | "false" | "FALSE" | "False" => "false".to_string(),
                _ => {
                    return Err(invalid(
                        flag,
                        &value,
                        &format!("strconv.ParseBool: parsing {value:?}: invalid syntax"),
                    ))
                }
            },
            Kind::Int => {
                if value.parse::<i64>().is_err() {
                    return Err(invalid(
                        flag,
                        &value,
                        &format!("strconv.ParseInt: parsing {value:?}: invalid syntax"),
                    ));
                }
                value
            }
            Kind::Map => {
                if let Some(bad) = sys::csv_split(&value).iter().find(|i| !i.contains('=')) {
                    return Err(invalid(
                        flag,
                        &value,
                        &format!("{bad} must be formatted as key=value"),
                    ));
                }
                value
            }
            Kind::Str | Kind::List => value,
        };
        self.values.push((flag.long, value));
        Ok(())
    }
}

fn flag_names(flag: &Flag) -> String {
    match flag.short {
        Some(s) => format!("-{s}, --{}", flag.long),
        None => format!("--{}", flag.long),
    }
}

fn invalid(flag: &Flag, value: &str, why: &str) -> String {
    format!(
        "invalid argument {value:?} for \"{}\" flag: {why}",
        flag_names(flag)
    )
}

/// How many positional arguments a command takes, with cobra's message when the count is off.
#[derive(Clone, Copy)]
pub enum Arity {
    AtLeast(usize),
    Exactly(usize),
    Between(usize, usize),
}

impl Arity {
    fn refuse(self, got: usize) -> Option<String> {
        match self {
            Arity::AtLeast(n) if got < n => {
                Some(format!("requires at least {n} arg(s), only received {got}"))
            }
            Arity::Exactly(n) if got != n => Some(format!("accepts {n} arg(s), received {got}")),
            Arity::Between(low, high) if got < low || got > high => Some(format!(
                "accepts between {low} and {high} arg(s), received {got}"
            )),
            _ => None,
        }
    }
}

/// Parses the arguments of a command that takes `arity` positional ones. `Err` holds how the
/// command ends here: its `--help`, a flag error, or cobra's error for a wrong count.
pub fn parse_with(cmd: &'static Cmd, args: &[String], arity: Arity) -> Result<Parsed, Res> {
    let p = parse(cmd, args).map_err(Err)?;
    if p.help {
        return Err(help(cmd));
    }
    match arity.refuse(p.args.len()) {
        Some(message) => Err(Err(Fail::Command(cmd, message))),
        None => Ok(p),
    }
}

/// Parses `args` with the options of `cmd`; errors are cobra flag errors (exit 1).
pub fn parse(cmd: &'static Cmd, args: &[String]) -> Result<Parsed, Fail> {
    parse_args(cmd, args).map_err(|msg| Fail::Flag(cmd, msg))
}

fn parse_args(cmd: &'static Cmd, args: &[String]) -> Result<Parsed, String> {
    let mut parsed = Parsed::default();
    let mut i = 0;
    while i < args.len() {
        let arg = &args[i];
        i += 1;
        if arg == "--" {
            parsed.args.extend(args[i..].iter().cloned());
            break;
        }
        if let Some(body) = arg.strip_prefix("--") {
            let (name, inline) = match body.split_once('=') {
                Some((n, v)) => (n, Some(v)),
                None => (body, None),
            };
            let flag = cmd
                .all_flags()
                .find(|f| f.long == name)
                .ok_or_else(|| format!("unknown flag: --{name}"))?;
            if flag.long == "help" {
                parsed.help = true;
                continue;
            }
            let value = if flag.kind == Kind::Bool {
                inline.unwrap_or("true").to_string()
            } else if let Some(v) = inline {
                v.to_string()
            } else if i < args.len() {
                i += 1;
                args[i - 1].clone()
            } else {
                return Err(format!("flag needs an argument: --{name}"));
            };
            parsed.set(flag, value)?;
        } else if arg.len() > 1 && arg.starts_with('-') {
            let shorts: Vec<char> = arg[1..].chars().collect();
            let mut j = 0;
            while j < shorts.len() {
                let c = shorts[j];
                let flag = cmd
                    .all_flags()
                    .find(|f| f.short == Some(c))
                    .ok_or_else(|| format!("unknown shorthand flag: '{c}' in {arg}"))?;
                let rest: String = shorts[j + 1..].iter().collect();
                if flag.long == "help" {
                    parsed.help = true;
                    j += 1;
                } else if flag.kind == Kind::Bool {
                    if let Some(value) = rest.strip_prefix('=') {
                        parsed.set(flag, value.to_string())?;
                        break;
                    }
                    parsed.set(flag, "true".to_string())?;
                    j += 1;
                } else {
                    let value = if let Some(v) = rest.strip_prefix('=') {
                        v.to_string()
                    } else if !rest.is_empty() {
                        rest
                    } else if i < args.len() {
                        i += 1;
                        args[i - 1].clone()
                    } else {
                        return Err(format!("flag needs an argument: '{c}' in {arg}"));
                    };
                    parsed.set(flag, value)?;
                    break;
                }
            }
        } else {
            parsed.args.push(arg.clone());
            if !cmd.interspersed {
                parsed.args.extend(args[i..].iter().cloned());
                break;
            }
        }
    }
    Ok(parsed)
}

// ---------------------------------------------------------------------------
// Output of usage, help and errors

/// cobra's UsageString with apptainer's UseTemplate.
fn usage_string(cmd: &Cmd) -> String {
    let mut out = format!("Usage:\n  {}", cmd.usage);
    if !cmd.subs.is_empty() {
        out.push_str(" <command>\n\nAvailable Commands:");
        for sub in cmd.subs {
            out.push_str(&format!("\n  {:<11} {}", sub.name, sub.short));
        }
    }
    out.push('\n');
    out
}

/// pflag's FlagUsages: sorted by name, usage texts aligned.
fn flag_usages(cmd: &Cmd) -> String {
    let mut flags: Vec<&Flag> = cmd.all_flags().collect();
    flags.sort_by_key(|f| f.long);
    let lines: Vec<(String, &Flag)> = flags
        .into_iter()
        .map(|f| {
            let mut line = match f.short {
                Some(s) => format!("  -{s}, --{}", f.long),
                None => format!("      --{}", f.long),
            };
            match f.kind {
                Kind::Bool => {}
                Kind::Str => line.push_str(" string"),
                Kind::Int => line.push_str(" int"),
                Kind::List => line.push_str(" strings"),
                Kind::Map => line.push_str(" stringToString"),
            }
            (line, f)
        })
        .collect();
    let width = lines.iter().map(|(l, _)| l.len()).max().unwrap_or(0);
    let mut out = String::new();
    for (line, flag) in lines {
        let default = if flag.long == "timeout" {
            " (default 10)"
        } else {
            ""
        };
        out.push_str(&format!(
            "{line}{}   {}{default}\n",
            " ".repeat(width - line.len()),
            flag.usage
        ));
    }
    out
}

/// `--help`: the help text on stdout, exit 0.
pub fn help(cmd: &'static Cmd) -> Res {
    let text = format!(
        "{}\n\n{}\nOptions:\n{}\n",
        cmd.short,
        usage_string(cmd),
        flag_usages(cmd)
    );
    sys::stdout(&text);
    ok()
}

/// Prints what a failure prints and returns how the invocation ends.
pub fn finish(result: Res) -> Done {
    let fail = match result {
        Ok(done) => return done,
        Err(fail) => fail,
    };
    let text = match fail {
        Fail::Fatal(msg) => {
            sylog::fatal(&msg);
            return Done::Code(255);
        }
        Fail::Command(cmd, msg) => format!(
            "Error for command \"{}\": {msg}\n\n{}\n{RUN_LINE}",
            cmd.name,
            usage_string(cmd)
        ),
        Fail::Flag(cmd, msg) => format!(
            "Error for command \"{}\": {msg}\n\nOptions for {} command:\n\n{}\n{RUN_LINE}",
            cmd.name,
            cmd.name,
            flag_usages(cmd)
        ),
        Fail::Usage(cmd, prefix) => {
            let prefix = prefix
                .map(|p| format!("Error: {p}\n\n"))
                .unwrap_or_default();
            format!("{prefix}{}\n{RUN_LINE}", usage_string(cmd))
        }
    };
    let _ = std::io::stderr().lock().write_all(text.as_bytes());
    Done::Code(1)
}

// ---------------------------------------------------------------------------
// Dispatch

/// Runs one invocation (everything after argv[0]).
pub fn run(argv: &[String]) -> Res {
    let parsed = parse(&ROOT, argv)?;
    set_message_level(&parsed);
    if parsed.help {
        return help(&ROOT);
    }
    if parsed.bool("version") {
        sys::stdout(&format!("apptainer version {VERSION}\n"));
        return ok();
    }
    let Some(sub) = parsed.args.first() else {
        return Err(Fail::Usage(&ROOT, None));
    };
    let rest = &parsed.args[1..];
    match sub.as_str() {
        "build" => build::run(rest),
        "exec" => exec::run(rest),
        "inspect" => image::inspect(rest),
        "instance" => instance_group(rest),
        "version" => {
            let p = parse(&VERSION_CMD, rest)?;
            if p.help {
                return help(&VERSION_CMD);
            }
            sys::stdout(&format!("{VERSION}\n"));
            ok()
        }
        "buildcfg" => buildcfg(rest),
        "help" => help(&ROOT),
        other => Err(Fail::Usage(
            &ROOT,
            Some(format!("unknown command \"{other}\" for \"apptainer\"")),
        )),
    }
}

/// Level from APPTAINER_MESSAGELEVEL/QUIET/SILENT/VERBOSE/DEBUG and the global options.
fn set_message_level(parsed: &Parsed) {
    let on = |flag: &str, env: &str| parsed.bool(flag) || sys::env_truthy(env);
    let level = if on("debug", "APPTAINER_DEBUG") {
        5
    } else if on("verbose", "APPTAINER_VERBOSE") {
        4
    } else if on("quiet", "APPTAINER_QUIET") {
        -1
    } else if on("silent", "APPTAINER_SILENT") {
        -3
    } else {
        sys::env_nonempty("APPTAINER_MESSAGELEVEL")
            .and_then(|l| l.parse().ok())
            .unwrap_or(1)
    };
    sylog::set_level(level);
    sylog::debug(&format!("Apptainer version: {VERSION}"));
}

fn instance_group(args: &[String]) -> Res {
    let sub = args.first().map(String::as_str);
    let rest = args.get(1..).unwrap_or(&[]);
    match sub {
        Some("start") => instance::start(rest, false),
        Some("run") => instance::start(rest, true),
        Some("stop") => instance::stop(rest),
        Some("list") => instance::list(rest),
        Some("stats") => instance::stats(rest),
        _ => {
            let parsed = parse(&INSTANCE, args)?;
            if parsed.help {
                return help(&INSTANCE);
            }
            Err(Fail::Command(&INSTANCE, "invalid command".to_string()))
        }
    }
}

const BUILDCFG_VALUES: &[(&str, &str)] = &[
    ("PACKAGE_NAME", "apptainer"),
    ("PACKAGE_VERSION", VERSION),
    ("BINDIR", "/usr/bin"),
    ("LIBEXECDIR", "/usr/libexec"),
    ("SYSCONFDIR", "/etc"),
    ("APPTAINER_CONF_FILE", "/etc/apptainer/apptainer.conf"),
    ("APPTAINER_SUID_INSTALL", "0"),
];

/// `buildcfg [NAME]`: pretends to be an unprivileged (non-setuid) install.
fn buildcfg(args: &[String]) -> Res {
    let p = parse(&BUILDCFG, args)?;
    if p.help {
        return help(&BUILDCFG);
    }
    match p.args.first() {
        None => {
            for (k, v) in BUILDCFG_VALUES {
                sys::stdout(&format!("{k}={v}\n"));
            }
            ok()
        }
        Some(name) => match BUILDCFG_VALUES.iter().find(|(k, _)| k == name) {
            Some((_, v)) => {
                sys::stdout(&format!("{v}\n"));
                ok()
            }
            None => Ok(Done::Code(1)),
        },
    }
}
