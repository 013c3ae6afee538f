//! Definition files, parsed like apptainer's parser (reference 1.5): header keys,
//! multi-stage `Bootstrap:` splitting, sections, `%files` and `%labels`. Used by `cmd/build.rs`;
//! nothing here runs a section.

use std::collections::BTreeMap;

/// Bootstrap agents accepted in a definition header (reference 1.5).
pub const AGENTS: &[&str] = &[
    "docker",
    "docker-archive",
    "docker-daemon",
    "oci",
    "oci-archive",
    "library",
    "oras",
    "shub",
    "localimage",
    "debootstrap",
    "yum",
    "dnf",
    "zypper",
    "arch",
    "busybox",
    "scratch",
];

const HEADER_KEYS: &[&str] = &[
    "bootstrap",
    "from",
    "includecmd",
    "mirrorurl",
    "updateurl",
    "osversion",
    "include",
    "library",
    "registry",
    "namespace",
    "stage",
    "product",
    "user",
    "regcode",
    "productpgp",
    "registerurl",
    "modules",
    "fingerprints",
    "confurl",
    "setopt",
    "target",
    "frontend",
    "filename",
    "buildargs",
];

const SECTIONS: &[&str] = &[
    "help",
    "setup",
    "files",
    "labels",
    "environment",
    "pre",
    "post",
    "runscript",
    "test",
    "startscript",
    "arguments",
];

const APP_SECTIONS: &[&str] = &[
    "appinstall",
    "applabels",
    "appfiles",
    "appenv",
    "apptest",
    "apphelp",
    "apprun",
    "appstart",
];

/// One stage of a definition file.
#[derive(Default)]
pub struct Stage {
    pub header: Vec<(String, String)>,
    pub sections: BTreeMap<String, String>,
    pub files: Vec<(String, String)>,
    pub labels: BTreeMap<String, String>,
}

impl Stage {
    pub fn header(&self, key: &str) -> Option<&str> {
        self.header
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    pub fn section(&self, name: &str) -> Option<&str> {
        self.sections.get(name).map(String::as_str)
    }
}

/// apptainer's `parser.All`: one stage per line starting with `Bootstrap:`.
pub fn parse_definition(raw: &str) -> Result<Vec<Stage>, String> {
    let mut starts = Vec::new();
    let mut pos = 0;
    for line in raw.split_inclusive('\n') {
        if line
            .get(..10)
            .is_some_and(|p| p.eq_ignore_ascii_case("bootstrap:"))
        {
            starts.push(pos);
        }
        pos += line.len();
    }
    let mut chunks = Vec::new();
    let mut previous = 0;
    for start in starts {
        chunks.push(&raw[previous..start]);
        previous = start;
    }
    chunks.push(&raw[previous..]);
    let mut stages = Vec::new();
    for chunk in chunks {
        if let Some(stage) = parse_stage(chunk)? {
            stages.push(stage);
        }
    }
    if stages.is_empty() {
        return Err("no stages found in definition file".to_string());
    }
    Ok(stages)
}

/// One stage; `None` when it holds nothing (an empty definition).
fn parse_stage(text: &str) -> Result<Option<Stage>, String> {
    let mut header = String::new();
    let mut tokens: Vec<String> = Vec::new();
    for line in text.lines() {
        let line = line.strip_suffix('\r').unwrap_or(line);
        if line
            .split_whitespace()
            .next()
            .is_some_and(|w| w.starts_with('%'))
        {
            tokens.push(format!("{}\n", line.trim_start()));
        } else if let Some(current) = tokens.last_mut() {
            current.push_str(line);
            current.push('\n');
        } else {
            header.push_str(line);
            header.push('\n');
        }
    }
    let mut stage = Stage {
        header: parse_header(&header)
            .map_err(|e| format!("failed to parse deffile header: {e}"))?,
        ..Stage::default()
    };
    let mut invalid = Vec::new();
    for token in tokens {
        let (first, body) = token.split_once('\n').unwrap_or((&token, ""));
        let first = first.trim_start_matches('%');
        let name = first
            .split(' ')
            .next()
            .unwrap_or_default()
            .to_ascii_lowercase();
        if name == "files" {
            stage.files.extend(parse_files(body));
        } else if APP_SECTIONS.contains(&name.as_str()) {
            continue;
        } else {
            if !SECTIONS.contains(&name.as_str()) && !invalid.contains(&name) {
                invalid.push(name.clone());
            }
            stage.sections.entry(name).or_default().push_str(body);
        }
    }
    if !invalid.is_empty() {
        invalid.sort();
        return Err(format!(
            "invalid section(s) specified: {}",
            invalid.join(", ")
        ));
    }
    if stage.header.is_empty()
        && stage.files.is_empty()
        && stage.sections.values().all(String::is_empty)
    {
        return Ok(None);
    }
    stage.labels = parse_labels(stage.section("labels").unwrap_or_default());
    Ok(Some(stage))
}

/// `Key: value` header lines, as apptainer's `doHeader` reads them.
fn parse_header(text: &str) -> Result<Vec<(String, String)>, String> {
    let mut header: Vec<(String, String)> = Vec::new();
    let mut insert = |key: String, value: String| match header.iter_mut().find(|(k, _)| *k == key) {
        Some(entry) => entry.1 = value,
        None => header.push((key, value)),
    };
    let (mut key_cont, mut val_cont) = (String::new(), String::new());
    for line in text.trim().split('\n') {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            if !key_cont.is_empty() {
                insert(std::mem::take(&mut key_cont), std::mem::take(&mut val_cont));
            }
            continue;
        }
        let trimmed = line.split('#').next().unwrap_or_default();
        let (key, value) = if val_cont.is_empty() {
            let Some((k, v)) = trimmed.split_once(':') else {
                return Err(format!("header key {trimmed} had no val"));
            };
            (k.trim().to_ascii_lowercase(), v.trim().to_string())
        } else {
            (
                std::mem::take(&mut key_cont),
                std::mem::take(&mut val_cont) + trimmed.trim(),
            )
        };
        if let Some(stripped) = value.strip_suffix('\\') {
            key_cont = key;
            val_cont = match stripped.strip_suffix("\\n") {
                Some(s) => format!("{s}\n"),
                None => stripped.to_string(),
            };
            continue;
        }
        let numbered = key
            .strip_prefix("otherurl")
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()));
        if !HEADER_KEYS.contains(&key.as_str()) && !numbered {
            return Err(format!("invalid header keyword found: {key}"));
        }
        insert(key, value);
    }
    Ok(header)
}

/// `%files` lines: `src [dst]`, double quotes group words.
fn parse_files(body: &str) -> Vec<(String, String)> {
    body.lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| {
            let words = split_quoted(line);
            let src = words.first().cloned().unwrap_or_default();
            let dst = words.get(1).cloned().unwrap_or_default();
            (src, dst)
        })
        .collect()
}

fn split_quoted(line: &str) -> Vec<String> {
    let mut words = Vec::new();
    let mut word = String::new();
    let mut quoted = false;
    for c in line.chars() {
        match c {
            '"' => quoted = !quoted,
            c if c.is_whitespace() && !quoted => {
                if !word.is_empty() {
                    words.push(std::mem::take(&mut word));
                }
            }
            c => word.push(c),
        }
    }
    if !word.is_empty() {
        words.push(word);
    }
    words
}

/// `%labels` lines: `NAME value`.
fn parse_labels(body: &str) -> BTreeMap<String, String> {
    body.trim()
        .split('\n')
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
        .map(|line| match line.split_once(' ') {
            Some((k, v)) => (k.trim().to_string(), v.trim().to_string()),
            None => (line.to_string(), String::new()),
        })
        .collect()
}
