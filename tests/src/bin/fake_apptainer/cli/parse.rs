//! A pflag-like option parser (reference section 0.3).
//!
//! Global options are options of the root command and must come before the
//! subcommand. `exec` and `instance start|run` stop parsing options at their
//! first argument (the container command and startscript arguments may look like
//! options); `build`, `instance list|stop|stats` and `inspect` accept options
//! anywhere. Errors become cobra flag errors (`Fail::Flag`), printed by `usage.rs`.

use super::flags::{flag_names, Flag, Kind};
use super::{help, Cmd, Fail, Res};
use crate::sys;

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
