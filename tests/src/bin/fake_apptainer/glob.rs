//! Instance-name globs with Go `filepath.Match` semantics (reference section 4.3):
//! `*`, `?`, `[...]`, `[^...]` (and `[!...]`), `\` escapes; a plain name is an exact
//! match. A malformed pattern is an error for the whole pattern, as Go's `Glob`
//! reports it before matching anything.

pub struct BadPattern;

/// Checks the whole pattern for syntax errors.
pub fn validate(pattern: &str) -> Result<(), BadPattern> {
    let p: Vec<char> = pattern.chars().collect();
    let mut i = 0;
    while i < p.len() {
        match p[i] {
            '\\' => {
                if i + 1 >= p.len() {
                    return Err(BadPattern);
                }
                i += 2;
            }
            '[' => i = class_end(&p, i + 1)?,
            _ => i += 1,
        }
    }
    Ok(())
}

/// Returns whether `name` matches `pattern` (which must be valid).
pub fn matches(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let s: Vec<char> = name.chars().collect();
    match_here(&p, &s)
}

fn match_here(p: &[char], s: &[char]) -> bool {
    let Some(&first) = p.first() else {
        return s.is_empty();
    };
    match first {
        '*' => {
            let rest = &p[1..];
            for i in 0..=s.len() {
                if i > 0 && s[i - 1] == '/' {
                    break;
                }
                if match_here(rest, &s[i..]) {
                    return true;
                }
            }
            false
        }
        '?' => !s.is_empty() && s[0] != '/' && match_here(&p[1..], &s[1..]),
        '[' => {
            let Ok(end) = class_end(p, 1) else {
                return false;
            };
            match s.first() {
                Some(&c) if c != '/' && class_matches(&p[1..end - 1], c) => {
                    match_here(&p[end..], &s[1..])
                }
                _ => false,
            }
        }
        '\\' => p.len() > 1 && s.first() == Some(&p[1]) && match_here(&p[2..], &s[1..]),
        c => s.first() == Some(&c) && match_here(&p[1..], &s[1..]),
    }
}

/// `start` is just after `[`; returns the index just after the closing `]`.
fn class_end(p: &[char], start: usize) -> Result<usize, BadPattern> {
    let mut i = start;
    if i < p.len() && (p[i] == '^' || p[i] == '!') {
        i += 1;
    }
    let mut ranges = 0;
    loop {
        if i < p.len() && p[i] == ']' && ranges > 0 {
            return Ok(i + 1);
        }
        i = class_char(p, i)?;
        if i < p.len() && p[i] == '-' {
            i = class_char(p, i + 1)?;
        }
        ranges += 1;
    }
}

/// One (possibly escaped) character of a class; returns the index after it.
fn class_char(p: &[char], i: usize) -> Result<usize, BadPattern> {
    match p.get(i) {
        None | Some('-') | Some(']') => Err(BadPattern),
        Some('\\') => {
            if i + 1 < p.len() {
                Ok(i + 2)
            } else {
                Err(BadPattern)
            }
        }
        Some(_) => Ok(i + 1),
    }
}

/// `body` is the class without its brackets.
fn class_matches(body: &[char], c: char) -> bool {
    let (negated, mut rest) = match body.first() {
        Some('^') | Some('!') => (true, &body[1..]),
        _ => (false, body),
    };
    let mut matched = false;
    while !rest.is_empty() {
        let (lo, after) = take_char(rest);
        rest = after;
        let mut hi = lo;
        if rest.first() == Some(&'-') {
            let (h, after) = take_char(&rest[1..]);
            hi = h;
            rest = after;
        }
        if lo <= c && c <= hi {
            matched = true;
        }
    }
    matched != negated
}

fn take_char(p: &[char]) -> (char, &[char]) {
    if p[0] == '\\' && p.len() > 1 {
        (p[1], &p[2..])
    } else {
        (p[0], &p[1..])
    }
}
