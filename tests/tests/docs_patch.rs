//! `docs/wireguard-ceiling.patch` is how a reader repeats the measurement of
//! `docs/wireguard-ceiling.md`, by `git apply` on a checkout. This checks, without git, that every
//! hunk still applies as `git apply` would take it: the lines it expects (context and removed
//! lines) stand together, unchanged, in the file it names. A change to those files that breaks the
//! patch fails here, with the hunk named, instead of on a reader's machine.

#![allow(clippy::unwrap_used)]

/// One hunk: the file it is for, its header, and the lines it expects to find there.
#[derive(Debug)]
struct Hunk {
    file: String,
    header: String,
    old: Vec<String>,
}

/// The hunks of a unified diff (as `git diff` writes it).
fn hunks(diff: &str) -> Result<Vec<Hunk>, String> {
    let mut out = Vec::new();
    let mut file: Option<String> = None;
    let mut lines = diff.lines().peekable();
    while let Some(line) = lines.next() {
        if let Some(path) = line.strip_prefix("--- a/") {
            file = Some(path.to_string());
            continue;
        }
        let Some(rest) = line.strip_prefix("@@ -") else {
            continue;
        };
        let file = file
            .clone()
            .ok_or(format!("hunk {line:?} before any file"))?;
        let (old_range, new_range) = rest
            .split_once(" +")
            .ok_or(format!("malformed hunk header {line:?}"))?;
        let count = |range: &str| -> Result<usize, String> {
            let range = range.split(' ').next().unwrap_or(range);
            match range.split_once(',') {
                Some((_, n)) => n.parse().map_err(|e| format!("{line:?}: {e}")),
                None => Ok(1),
            }
        };
        let (mut old_left, mut new_left) = (count(old_range)?, count(new_range)?);
        let mut old = Vec::new();
        while old_left > 0 || new_left > 0 {
            let body = lines
                .next()
                .ok_or(format!("hunk {line:?} of {file} ends early"))?;
            match body.chars().next() {
                Some(' ') | None => {
                    old.push(body.get(1..).unwrap_or("").to_string());
                    old_left = old_left.checked_sub(1).ok_or("too many old lines")?;
                    new_left = new_left.checked_sub(1).ok_or("too many new lines")?;
                }
                Some('-') => {
                    old.push(body[1..].to_string());
                    old_left = old_left.checked_sub(1).ok_or("too many old lines")?;
                }
                Some('+') => new_left = new_left.checked_sub(1).ok_or("too many new lines")?,
                Some('\\') => {}
                Some(_) => return Err(format!("unexpected line {body:?} in {file}")),
            }
        }
        out.push(Hunk {
            file,
            header: line.to_string(),
            old,
        });
    }
    Ok(out)
}

/// Whether `needle` stands in `text` as consecutive whole lines.
fn holds(text: &str, needle: &[String]) -> bool {
    let lines: Vec<&str> = text.lines().collect();
    needle.is_empty()
        || lines
            .windows(needle.len())
            .any(|w| w.iter().zip(needle).all(|(a, b)| *a == b))
}

#[test]
fn the_ceiling_patch_still_applies_to_the_sources() {
    let root = flannel_tests::repo_root();
    let patch = std::fs::read_to_string(root.join("docs/wireguard-ceiling.patch")).unwrap();
    let hunks = hunks(&patch).unwrap();
    assert!(
        hunks.len() >= 5,
        "the patch should change pump.rs, lib.rs and Cargo.toml: {hunks:?}"
    );
    assert!(
        hunks.iter().any(|h| h.file.ends_with("pump.rs")),
        "no hunk for the udp backend's pump.rs"
    );
    let mut broken = Vec::new();
    for h in &hunks {
        let text = std::fs::read_to_string(root.join(&h.file)).unwrap_or_default();
        if !holds(&text, &h.old) {
            broken.push(format!("{} {}", h.file, h.header));
        }
    }
    assert!(
        broken.is_empty(),
        "docs/wireguard-ceiling.patch no longer applies; these hunks do not match their files:\n  {}\n\
         Regenerate it as docs/wireguard-ceiling.md describes (or drop the page's repeat steps).",
        broken.join("\n  ")
    );
}

#[test]
fn the_hunk_check_finds_a_changed_line() {
    let diff = "--- a/f.rs\n+++ b/f.rs\n@@ -1,3 +1,3 @@\n one\n-two\n+deux\n three\n";
    let parsed = hunks(diff).unwrap();
    assert_eq!(parsed.len(), 1);
    assert_eq!(parsed[0].old, ["one", "two", "three"]);
    assert!(holds("zero\none\ntwo\nthree\n", &parsed[0].old));
    assert!(!holds("one\nTWO\nthree\n", &parsed[0].old));
    assert!(!holds("one\nthree\ntwo\n", &parsed[0].old));
    assert!(
        hunks("@@ -1 +1 @@\n-a\n+b\n").is_err(),
        "a hunk without a file"
    );
    assert!(
        hunks("--- a/f\n@@ -1,2 +1,2 @@\n a\n").is_err(),
        "a hunk cut short"
    );
}
