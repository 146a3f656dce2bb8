//! Glob filters for `grep`: `*` and `?` within a path component, `**` across components,
//! `[abc]`/`[a-z]`/`[!a]` classes and `{a,b}` alternatives. A glob without `/` matches a file's
//! name; one with `/` matches its path relative to the workspace.

/// Most alternatives a glob's braces may expand to.
const MAX_ALTERNATIVES: usize = 64;
const MAX_LEN: usize = 1024;

/// A parsed glob.
#[derive(Debug, Clone)]
pub struct Glob {
    alternatives: Vec<Vec<char>>,
    whole_path: bool,
}

impl Glob {
    pub fn new(pattern: &str) -> Result<Glob, String> {
        if pattern.is_empty() || pattern.len() > MAX_LEN {
            return Err(format!("a glob must have 1 to {MAX_LEN} characters"));
        }
        let alternatives = expand(pattern)?;
        Ok(Glob {
            whole_path: pattern.contains('/'),
            alternatives: alternatives.iter().map(|a| a.chars().collect()).collect(),
        })
    }

    /// Whether `path` (relative, `/`-separated) matches.
    pub fn matches(&self, path: &str) -> bool {
        let subject = if self.whole_path {
            path
        } else {
            path.rsplit('/').next().unwrap_or(path)
        };
        let subject: Vec<char> = subject.chars().collect();
        self.alternatives.iter().any(|p| matches_at(p, &subject))
    }
}

/// Expands `{a,b}` (nesting allowed) into plain patterns.
fn expand(pattern: &str) -> Result<Vec<String>, String> {
    let Some(open) = pattern.find('{') else {
        return Ok(vec![pattern.to_string()]);
    };
    let mut depth = 0;
    let mut close = None;
    let mut splits = Vec::new();
    for (i, c) in pattern[open..].char_indices() {
        match c {
            '{' => depth += 1,
            '}' => {
                depth -= 1;
                if depth == 0 {
                    close = Some(open + i);
                    break;
                }
            }
            ',' if depth == 1 => splits.push(open + i),
            _ => {}
        }
    }
    let close = close.ok_or("unbalanced '{' in the glob")?;
    let (head, tail) = (&pattern[..open], &pattern[close + 1..]);
    let mut bounds = vec![open];
    bounds.extend(&splits);
    bounds.push(close);
    let mut out = Vec::new();
    for pair in bounds.windows(2) {
        let middle = &pattern[pair[0] + 1..pair[1]];
        for expanded in expand(&format!("{head}{middle}{tail}"))? {
            out.push(expanded);
            if out.len() > MAX_ALTERNATIVES {
                return Err(format!(
                    "the glob expands to more than {MAX_ALTERNATIVES} alternatives"
                ));
            }
        }
    }
    Ok(out)
}

/// Iterative matching with backtracking: to the last `*` (which stays within a component),
/// else to the last `**` (which crosses them). No recursion.
fn matches_at(pattern: &[char], subject: &[char]) -> bool {
    let (mut p, mut s) = (0, 0);
    // (index in the pattern after the star, where in the subject it started matching)
    let mut single: Option<(usize, usize)> = None;
    let mut double: Option<(usize, usize)> = None;
    while s < subject.len() {
        if p < pattern.len() {
            match pattern[p] {
                '*' => {
                    if pattern.get(p + 1) == Some(&'*') {
                        let mut next = p + 2;
                        // `**/` also matches no directory at all.
                        if pattern.get(next) == Some(&'/') {
                            next += 1;
                        }
                        double = Some((next, s));
                        single = None;
                        p = next;
                    } else {
                        single = Some((p + 1, s));
                        p += 1;
                    }
                    continue;
                }
                '?' if subject[s] != '/' => {
                    p += 1;
                    s += 1;
                    continue;
                }
                '[' => {
                    if let Some((matched, end)) = class(pattern, p, subject[s]) {
                        if matched {
                            p = end;
                            s += 1;
                            continue;
                        }
                    } else if subject[s] == '[' {
                        p += 1;
                        s += 1;
                        continue;
                    }
                }
                c if c == subject[s] => {
                    p += 1;
                    s += 1;
                    continue;
                }
                _ => {}
            }
        }
        match (single, double) {
            (Some((after, start)), _) if subject[start] != '/' => {
                single = Some((after, start + 1));
                p = after;
                s = start + 1;
            }
            (_, Some((after, start))) => {
                double = Some((after, start + 1));
                single = None;
                p = after;
                s = start + 1;
            }
            _ => return false,
        }
    }
    while p < pattern.len() && pattern[p] == '*' {
        p += 1;
    }
    p == pattern.len()
}

/// Matches `c` against the class starting at `pattern[start] == '['`: (matched, index after).
fn class(pattern: &[char], start: usize, c: char) -> Option<(bool, usize)> {
    let mut i = start + 1;
    let negate = matches!(pattern.get(i), Some('!') | Some('^'));
    if negate {
        i += 1;
    }
    let mut matched = false;
    let mut first = true;
    while i < pattern.len() {
        let lo = pattern[i];
        if lo == ']' && !first {
            return Some((matched != negate && c != '/', i + 1));
        }
        first = false;
        if pattern.get(i + 1) == Some(&'-') && pattern.get(i + 2).is_some_and(|&hi| hi != ']') {
            let hi = pattern[i + 2];
            matched |= lo <= c && c <= hi;
            i += 3;
        } else {
            matched |= lo == c;
            i += 1;
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(glob: &str, path: &str) -> bool {
        Glob::new(glob).unwrap().matches(path)
    }

    #[test]
    fn names_paths_stars_classes_and_braces() {
        assert!(m("*.rs", "src/main.rs"));
        assert!(!m("*.rs", "src/main.rsx"));
        assert!(m("src/*.rs", "src/main.rs"));
        assert!(!m("src/*.rs", "src/a/main.rs"));
        assert!(m("src/**/*.rs", "src/a/b/main.rs"));
        assert!(m("src/**/*.rs", "src/main.rs"));
        assert!(m("**/*.toml", "Cargo.toml"));
        assert!(m("*.{rs,toml}", "Cargo.toml"));
        assert!(m("file?.txt", "file1.txt"));
        assert!(!m("file?.txt", "file12.txt"));
        assert!(m("[a-c]*.md", "b.md"));
        assert!(!m("[!a-c]*.md", "b.md"));
        assert!(m("a*b*c*d", "aXbYcZd"));
        assert!(!m("a*b*c*d", &"a".repeat(5000)));
        assert!(Glob::new("{a,b").is_err());
        assert!(Glob::new("").is_err());
        assert!(Glob::new(&"{a,b}".repeat(10)).is_err());
    }
}
