//! Renders the definition file of a `start` request.
//!
//! The file is built only from values that passed the rules of [`crate::rules::script`] at
//! intake (no value may open a new header line or `%section`, start a build stage, or use
//! Apptainer's `{{ }}` templating); [`Outline`] checks every rendered file again before it is
//! written. Part of the runtime: it knows apptainer's file format, not the request path.

use std::collections::BTreeMap;
use std::fmt::Write;

use crate::rules::script::starts_with_bootstrap;

/// The header and sections of one definition file.
pub struct Definition<'a> {
    pub bootstrap: &'a str,
    pub from_os: &'a str,
    pub from_version: &'a str,
    pub environment: &'a BTreeMap<String, String>,
    pub startscript: &'a [String],
}

impl<'a> Definition<'a> {
    /// The definition file of a `start` request.
    pub fn of_start(req: &'a schemas::StartRequest) -> Self {
        Self {
            bootstrap: &req.image_distributor,
            from_os: &req.image_os,
            from_version: &req.image_version,
            environment: &req.environment,
            startscript: &req.container_command,
        }
    }

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

    /// The structure [`Definition::render`] must produce: one build stage, the header keys
    /// `bootstrap` and `from` with exactly the validated values, `%environment` and
    /// `%startscript` once each when they have content, and no template.
    pub fn intended_outline(&self) -> Outline {
        let mut sections = Vec::new();
        if !self.environment.is_empty() {
            sections.push("environment".to_owned());
        }
        if !self.startscript.is_empty() {
            sections.push("startscript".to_owned());
        }
        Outline {
            stages: 1,
            header: vec![
                ("bootstrap".to_owned(), self.bootstrap.to_owned()),
                (
                    "from".to_owned(),
                    format!("{}:{}", self.from_os, self.from_version),
                ),
            ],
            sections,
            templated: false,
        }
    }

    /// [`Definition::render`], checked against [`Definition::intended_outline`]: a defence in
    /// depth behind the intake's rules, so a gap in them fails a request instead of building
    /// something else as root.
    pub fn render_checked(&self) -> Result<String, String> {
        let text = self.render();
        let found = Outline::of(&text);
        let intended = self.intended_outline();
        if found == intended {
            Ok(text)
        } else {
            Err(format!(
                "the rendered definition file has structure {found:?} instead of {intended:?}"
            ))
        }
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

/// The structure apptainer's definition-file parser sees in a text (`pkg/build/types/parser`):
/// used to check every rendered file before it is written, and by the property test and the
/// fuzz target.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outline {
    /// Lines matching `(?mi)^bootstrap:`: each starts a build stage.
    pub stages: usize,
    /// Header entries before the first section, keys lower-cased, continuations joined.
    pub header: Vec<(String, String)>,
    /// Section names in order, lower-cased, without `%`.
    pub sections: Vec<String>,
    /// Whether the text holds `{{`, the start of a build-argument template.
    pub templated: bool,
}

impl Outline {
    pub fn of(text: &str) -> Self {
        let mut stages = 0;
        let mut header = Vec::new();
        let mut sections = Vec::new();
        let mut continued: Option<(String, String)> = None;
        for raw in text.split('\n') {
            let line = raw.strip_suffix('\r').unwrap_or(raw);
            if starts_with_bootstrap(line) {
                stages += 1;
            }
            if let Some(word) = line.split_whitespace().next() {
                if let Some(name) = word.strip_prefix('%') {
                    sections.push(name.to_lowercase());
                    continue;
                }
            }
            if !sections.is_empty() {
                continue;
            }
            let line = line.trim();
            if line.is_empty() || line.starts_with('#') {
                if let Some(entry) = continued.take() {
                    header.push(entry);
                }
                continue;
            }
            let uncommented = line.split('#').next().unwrap_or_default();
            let (key, value) = match continued.take() {
                Some((key, value)) => (key, value + uncommented.trim()),
                None => match uncommented.split_once(':') {
                    Some((key, value)) => (key.trim().to_lowercase(), value.trim().to_owned()),
                    None => (uncommented.trim().to_lowercase(), String::new()),
                },
            };
            match value.strip_suffix('\\') {
                Some(rest) => continued = Some((key, rest.to_owned())),
                None => header.push((key, value)),
            }
        }
        if let Some(entry) = continued {
            header.push(entry);
        }
        Self {
            stages,
            header,
            sections,
            templated: text.contains("{{"),
        }
    }
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
    fn the_outline_sees_what_apptainer_sees() {
        let outline = Outline::of(
            "Bootstrap: docker\nFrom: a:\\\n  b\n\n%post\n  x\nbootſtrap: library\n \u{2028}%runscript\n{{ y }}\n",
        );
        assert_eq!(outline.stages, 2);
        assert_eq!(
            outline.header,
            [
                ("bootstrap".to_owned(), "docker".to_owned()),
                ("from".to_owned(), "a:b".to_owned())
            ]
        );
        assert_eq!(outline.sections, ["post", "runscript"]);
        assert!(outline.templated);
    }

    #[test]
    fn environment_values_read_back_through_a_real_shell() {
        let values = [
            "plain",
            "with \"double\" and 'single' quotes",
            "$HOME `id` $(id) ${X:-y}",
            "back\\slash at the end\\",
            "tab\there % # ; & | < > * ? ~ !",
            "unicode é \u{a0} \u{2003}",
            "",
        ];
        let environment: BTreeMap<String, String> = values
            .iter()
            .enumerate()
            .map(|(i, v)| (format!("V{i}"), (*v).to_owned()))
            .collect();
        let text = Definition {
            bootstrap: "docker",
            from_os: "alpine",
            from_version: "3",
            environment: &environment,
            startscript: &[],
        }
        .render_checked()
        .unwrap();
        let exports: String = text
            .lines()
            .filter(|l| l.trim_start().starts_with("export "))
            .map(|l| format!("{l}\n"))
            .collect();
        let names: Vec<String> = environment.keys().map(|k| format!("\"${k}\"")).collect();
        let script = format!("{exports}printf '%s\\0' {}", names.join(" "));
        let output = std::process::Command::new("/bin/sh")
            .args(["-c", &script])
            .env_clear()
            .output()
            .unwrap();
        assert!(output.status.success(), "{output:?}");
        let printed: Vec<String> = String::from_utf8(output.stdout)
            .unwrap()
            .split_terminator('\0')
            .map(str::to_owned)
            .collect();
        let expected: Vec<String> = environment.values().cloned().collect();
        assert_eq!(printed, expected);
    }

    mod property {
        use super::super::*;
        use crate::rules::request as validate;
        use proptest::prelude::*;
        use schemas::{ContainerName, Request, StartRequest};

        /// Pieces that matter to apptainer's parser, to `sh`, or to both.
        const FRAGMENTS: &[&str] = &[
            "%post",
            "%",
            " %",
            "Bootstrap:",
            "bootstrap: library",
            "bootſtrap:",
            "From:",
            "Include: x",
            "{{ arg }}",
            "{",
            "}",
            "{ {",
            "\\",
            "\\\\",
            "\"",
            "'",
            "$",
            "`",
            "$(id)",
            "${HOME}",
            "#",
            ":",
            "export A=1",
            " ",
            "    ",
            "\t",
            "\u{a0}",
            "\u{3000}",
            "é",
            "docker",
            "latest",
            "a",
            "Z",
            "0",
            "_",
            "-",
            ".",
            "/",
            "@",
        ];

        /// Line breaks and other control characters: always refused, so kept rarer.
        const CONTROL: &[&str] = &["\n", "\r", "\u{0}", "\u{b}", "\u{85}", "\u{2028}"];

        fn text() -> impl Strategy<Value = String> {
            let piece = prop_oneof![
                12 => proptest::sample::select(FRAGMENTS).prop_map(str::to_owned),
                1 => proptest::sample::select(CONTROL).prop_map(str::to_owned),
                1 => any::<char>().prop_map(String::from),
            ];
            proptest::collection::vec(piece, 0..8).prop_map(|pieces| pieces.concat())
        }

        fn reference() -> impl Strategy<Value = String> {
            prop_oneof![
                12 => "[a-z0-9][a-z0-9._/:@+-]{0,30}",
                1 => text(),
            ]
        }

        fn env_name() -> impl Strategy<Value = String> {
            prop_oneof![
                12 => "[A-Za-z_][A-Za-z0-9_]{0,12}",
                1 => text(),
            ]
        }

        fn start_request() -> impl Strategy<Value = StartRequest> {
            (
                prop_oneof![
                    12 => proptest::sample::select(validate::ALLOWED_DISTRIBUTORS).prop_map(str::to_owned),
                    1 => text(),
                ],
                reference(),
                reference(),
                proptest::collection::vec(text(), 0..5),
                proptest::collection::btree_map(env_name(), text(), 0..5),
            )
                .prop_map(|(distributor, os, version, command, environment)| StartRequest {
                    v: None,
                    container_name: ContainerName::parse("nb1").unwrap(),
                    container_image: os.clone(),
                    image_distributor: distributor,
                    image_os: os,
                    image_version: version,
                    container_command: command,
                    volume_name: None,
                    environment,
                    binds: BTreeMap::new(),
                })
        }

        /// Reads a value quoted by `shell_quote` back the way `sh` does inside double quotes;
        /// `None` when the text would expand something or does not end where the quote does.
        fn sh_unquote(quoted: &str) -> Option<String> {
            let mut chars = quoted.strip_prefix('"')?.chars();
            let mut value = String::new();
            loop {
                match chars.next()? {
                    '"' => return chars.next().is_none().then_some(value),
                    '$' | '`' => return None,
                    '\\' => match chars.next()? {
                        c @ ('$' | '`' | '"' | '\\') => value.push(c),
                        '\n' => {}
                        c => {
                            value.push('\\');
                            value.push(c);
                        }
                    },
                    c => value.push(c),
                }
            }
        }

        proptest! {
            #![proptest_config(ProptestConfig::with_cases(4000))]

            #[test]
            fn what_passes_validation_renders_exactly_the_intended_structure(req in start_request()) {
                if validate::check(&Request::Start(req.clone())).is_err() {
                    return Ok(());
                }
                let definition = Definition::of_start(&req);
                let text = definition.render();
                let outline = Outline::of(&text);
                prop_assert_eq!(&outline, &definition.intended_outline(), "{}", text);
                prop_assert_eq!(outline.sections.iter().filter(|s| *s == "environment").count(), usize::from(!req.environment.is_empty()));

                // Each environment value reads back through sh quoting, in name order.
                let environment_body = text
                    .split_once("\n%environment\n")
                    .map_or("", |(_, rest)| rest.split("\n%startscript\n").next().unwrap_or_default());
                let mut exports = environment_body.lines().filter_map(|l| l.strip_prefix("    export "));
                for (name, value) in &req.environment {
                    let line = exports.next().expect("one export per variable");
                    let quoted = line.strip_prefix(&format!("{name}=")).expect("the name comes first");
                    let unquoted = sh_unquote(quoted);
                    prop_assert_eq!(unquoted.as_ref(), Some(value), "{}", line);
                }
                prop_assert!(exports.next().is_none());

                // The start script is the request's lines, in order, and nothing else.
                if !req.container_command.is_empty() {
                    let body = text.split_once("\n%startscript\n").expect("a start script section").1;
                    let lines: Vec<&str> = body.lines().map(|l| l.strip_prefix("    ").unwrap_or(l)).collect();
                    prop_assert_eq!(lines, req.container_command.iter().map(String::as_str).collect::<Vec<_>>());
                }
            }
        }
    }
}
