//! `buildcfg [NAME]`: the compile-time parameters, those of an unprivileged (non-setuid)
//! install. Not listed among the root's commands, as in apptainer.

use crate::cli::{help, ok, parse, Cmd, Done, Res, VERSION};
use crate::sys;

pub static BUILDCFG: Cmd = Cmd {
    name: "buildcfg",
    usage: "apptainer [global options...] buildcfg",
    short: "Output the currently set compile-time parameters",
    flags: &[],
    interspersed: true,
    subs: &[],
};

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
pub fn buildcfg(args: &[String]) -> Res {
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
