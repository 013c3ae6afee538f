//! Renders the definition file of a `start` request.
//!
//! The file is built only from values that passed [`check_script_line`], [`check_env_name`] and
//! [`check_env_value`] at intake; this module owns those rules because it is what they protect:
//! no value may open a new header line or `%section`, start a build stage, or use Apptainer's
//! `{{ }}` templating.

use std::collections::BTreeMap;
use std::fmt::Write;

/// The header and sections of one definition file.
pub struct Definition<'a> {
    pub bootstrap: &'a str,
    pub from_os: &'a str,
    pub from_version: &'a str,
    pub environment: &'a BTreeMap<String, String>,
    pub startscript: &'a [String],
}

impl Definition<'_> {
    pub fn render(&self) -> String {
        let mut out = String::new();
        let _ = writeln!(out, "Bootstrap: {}", self.bootstrap);
        let _ = writeln!(out, "From: {}:{}", self.from_os, self.from_version);
        if !self.environment.is_empty() {
            out.push_str("\n%environment\n");
            for (name, value) in self.environment {
                let _ = writeln!(out, "    export {name}={}", shell_quote(value));
            }
        }
        if !self.startscript.is_empty() {
            out.push_str("\n%startscript\n");
            for line in self.startscript {
                let _ = writeln!(out, "    {line}");
            }
        }
        out
    }
}

/// Double-quotes `value` for `/bin/sh`, escaping what is special inside double quotes.
fn shell_quote(value: &str) -> String {
    let mut quoted = String::with_capacity(value.len() + 2);
    quoted.push('"');
    for c in value.chars() {
        if matches!(c, '"' | '\\' | '$' | '`') {
            quoted.push('\\');
        }
        quoted.push(c);
    }
    quoted.push('"');
    quoted
}

/// A line of the start script: one line, and nothing the definition-file parser would read as
/// structure.
pub fn check_script_line(line: &str) -> Result<(), String> {
    check_single_line("a container_command line", line)?;
    let head = line.trim_start();
    if head.starts_with('%') {
        return Err(format!(
            "container_command line {line:?} starts with '%', which would open a new definition-file section"
        ));
    }
    if head.to_ascii_lowercase().starts_with("bootstrap:") {
        return Err(format!(
            "container_command line {line:?} starts with 'Bootstrap:', which would start a new build stage"
        ));
    }
    Ok(())
}

/// An environment variable name: a shell identifier.
pub fn check_env_name(name: &str) -> Result<(), String> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_') && name.len() <= 128 {
        Ok(())
    } else {
        Err(format!(
            "environment name {name:?} is not a shell variable name (letters, digits and _, not starting with a digit, at most 128)"
        ))
    }
}

/// An environment value: one line; it is quoted when rendered.
pub fn check_env_value(name: &str, value: &str) -> Result<(), String> {
    check_single_line(&format!("environment value of {name}"), value)
}

fn check_single_line(what: &str, text: &str) -> Result<(), String> {
    if text.contains(['\n', '\r', '\0']) {
        return Err(format!(
            "{what} must be a single line without NUL characters"
        ));
    }
    if text.contains("{{") {
        return Err(format!(
            "{what} contains '{{{{', which apptainer would read as a build-argument template"
        ));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_header_environment_and_startscript() {
        let environment = BTreeMap::from([("GREETING".to_owned(), "say \"hi\" $HOME".to_owned())]);
        let startscript = vec!["cd /home/nextpyter".to_owned(), "jupyter lab".to_owned()];
        let text = Definition {
            bootstrap: "docker",
            from_os: "jupyter/base-notebook",
            from_version: "latest",
            environment: &environment,
            startscript: &startscript,
        }
        .render();
        assert_eq!(
            text,
            "Bootstrap: docker\nFrom: jupyter/base-notebook:latest\n\n%environment\n    export GREETING=\"say \\\"hi\\\" \\$HOME\"\n\n%startscript\n    cd /home/nextpyter\n    jupyter lab\n"
        );
    }

    #[test]
    fn lines_that_would_change_the_file_structure_are_refused() {
        for bad in [
            "%post",
            "  %runscript",
            "Bootstrap: docker",
            "a\nb",
            "echo {{ x }}",
        ] {
            assert!(check_script_line(bad).is_err(), "{bad:?} should be refused");
        }
        assert!(check_script_line("echo 100% done").is_ok());
        assert!(check_env_name("PATH_2").is_ok());
        assert!(check_env_name("2X").is_err());
        assert!(check_env_name("A-B").is_err());
    }
}
