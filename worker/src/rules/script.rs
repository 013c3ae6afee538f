//! The rules of a script line and an environment variable: what keeps a value of a `start`
//! request inside its place in the definition file (one line, no `%section`, no build stage, no
//! `{{ }}` template). Checked at intake; the renderer in `runtime::definition` relies on them.

use super::{shorten, Refusal};

/// A line of the start script: one line, and nothing the definition-file parser would read as
/// structure. Apptainer finds sections by the first word of a line after any Unicode white
/// space, and build stages by `bootstrap:` at the start of a line; `str::trim_start` trims the
/// same white space as Go's `bufio.ScanWords`.
pub fn check_script_line(line: &str) -> Result<(), Refusal> {
    check_single_line("a container_command line", line)?;
    let head = line.trim_start();
    if head.starts_with('%') {
        return Err(Refusal::bad_request(format!(
            "container_command line {:?} starts with '%', which would open a new definition-file section",
            shorten(line)
        )));
    }
    if starts_with_bootstrap(head) {
        return Err(Refusal::bad_request(format!(
            "container_command line {:?} starts with 'Bootstrap:', which would start a new build stage",
            shorten(line)
        )));
    }
    Ok(())
}

/// An environment variable name: a shell identifier.
pub fn check_env_name(name: &str) -> Result<(), Refusal> {
    let mut chars = name.chars();
    let first_ok = chars
        .next()
        .is_some_and(|c| c.is_ascii_alphabetic() || c == '_');
    if first_ok && chars.all(|c| c.is_ascii_alphanumeric() || c == '_') && name.len() <= 128 {
        Ok(())
    } else {
        Err(Refusal::bad_request(format!(
            "environment name {:?} is not a shell variable name (letters, digits and _, not starting with a digit, at most 128)",
            shorten(name)
        )))
    }
}

/// An environment value: one line; it is quoted when rendered.
pub fn check_env_value(name: &str, value: &str) -> Result<(), Refusal> {
    check_single_line(&format!("the environment value of {name}"), value)
}

/// One line: no line breaks of any kind and no control characters but tab (a line break would
/// let the text open a section; the others have no place in a script line and can hide text
/// in logs and terminals), and no `{{`, which apptainer's build-argument templating replaces
/// across the whole file.
fn check_single_line(what: &str, text: &str) -> Result<(), Refusal> {
    let line_break =
        |c: char| c != '\t' && (c.is_control() || matches!(c, '\u{2028}' | '\u{2029}'));
    if let Some(bad) = text.chars().find(|c| line_break(*c)) {
        return Err(Refusal::bad_request(format!(
            "{what} contains {bad:?}: it must be a single line without control characters (tab is allowed)"
        )));
    }
    if text.contains("{{") {
        return Err(Refusal::bad_request(format!(
            "{what} contains '{{{{', which apptainer would read as a build-argument template"
        )));
    }
    Ok(())
}

/// Whether `text` starts with `bootstrap:` as Go's case-insensitive regexp matches it, which
/// folds the long s (`ſ`) to `s`.
pub fn starts_with_bootstrap(text: &str) -> bool {
    let folded = text.chars().take(10).map(|c| {
        if c == 'ſ' {
            's'
        } else {
            c.to_ascii_lowercase()
        }
    });
    folded.eq("bootstrap:".chars())
}

#[cfg(test)]
mod tests {
    use super::*;

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
