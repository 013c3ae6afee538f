//! How a command declares its options: `Flag` (long name, shorthand, value kind, usage text)
//! and the `b`/`bs`/`v`/`vs` constructors the tables in `cmd/` are written with. Parsing them
//! is `parse.rs`; listing them in help and errors is `usage.rs`.

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

pub const fn b(long: &'static str, usage: &'static str) -> Flag {
    Flag {
        long,
        short: None,
        kind: Kind::Bool,
        usage,
    }
}

pub const fn bs(long: &'static str, short: char, usage: &'static str) -> Flag {
    Flag {
        long,
        short: Some(short),
        kind: Kind::Bool,
        usage,
    }
}

pub const fn v(long: &'static str, kind: Kind, usage: &'static str) -> Flag {
    Flag {
        long,
        short: None,
        kind,
        usage,
    }
}

pub const fn vs(long: &'static str, short: char, kind: Kind, usage: &'static str) -> Flag {
    Flag {
        long,
        short: Some(short),
        kind,
        usage,
    }
}

pub static HELP_FLAG: Flag = bs("help", 'h', "help for this command");

pub fn flag_names(flag: &Flag) -> String {
    match flag.short {
        Some(s) => format!("-{s}, --{}", flag.long),
        None => format!("--{}", flag.long),
    }
}
