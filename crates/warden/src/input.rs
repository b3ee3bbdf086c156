//! Reading configuration for the CLI: `-f` files, folders (recursively) and `-` for stdin,
//! plus `--mesh`, into the policy crate's loader. Also RFC 3339 times for `--now`.

use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use warden_policy::config::{Config, Loader};
use warden_policy::diag::Diagnostic;

const EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

fn collect(path: &Path, out: &mut Vec<PathBuf>) -> Result<()> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("{}: cannot read", path.display()))?;
    if meta.is_dir() {
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("{}: cannot list folder", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for e in entries {
            let hidden = e
                .file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with('.'));
            if hidden {
                continue;
            }
            if e.is_dir() {
                collect(&e, out)?;
            } else if e
                .extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| EXTENSIONS.contains(&x))
            {
                out.push(e);
            }
        }
    } else {
        out.push(path.to_path_buf());
    }
    Ok(())
}

/// Adds every `-f` argument to the loader. Unreadable paths are an error of the command line.
pub fn add_inputs(loader: &mut Loader, inputs: &[String]) -> Result<()> {
    for i in inputs {
        if i == "-" {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .context("reading configuration from stdin")?;
            loader.add_text("<stdin>", &text);
            continue;
        }
        let mut files = Vec::new();
        collect(Path::new(i), &mut files)?;
        for f in files {
            let text = std::fs::read_to_string(&f)
                .with_context(|| format!("{}: cannot read", f.display()))?;
            loader.add_text(&f.display().to_string(), &text);
        }
    }
    Ok(())
}

pub fn add_mesh(loader: &mut Loader, mesh: Option<&str>) -> Result<()> {
    if let Some(m) = mesh {
        let text =
            std::fs::read_to_string(m).with_context(|| format!("{m}: cannot read mesh config"))?;
        loader.set_mesh_text(m, &text);
    }
    Ok(())
}

/// Loads a configuration; returns it with all diagnostics (errors included).
pub fn load(inputs: &[String], mesh: Option<&str>) -> Result<(Config, Vec<Diagnostic>)> {
    if inputs.is_empty() {
        bail!("no configuration given: use -f FILE|DIR|- (repeatable)");
    }
    let mut loader = Loader::new();
    add_inputs(&mut loader, inputs)?;
    add_mesh(&mut loader, mesh)?;
    Ok(loader.finish())
}

/// Parses an RFC 3339 timestamp (`2026-06-01T00:00:00Z`, offsets and fractions allowed) into
/// Unix seconds.
pub fn parse_rfc3339(s: &str) -> Option<i64> {
    let b = s.as_bytes();
    if b.len() < 20
        || b[4] != b'-'
        || b[7] != b'-'
        || !matches!(b[10], b'T' | b't' | b' ')
        || b[13] != b':'
        || b[16] != b':'
    {
        return None;
    }
    let num = |r: std::ops::Range<usize>| -> Option<i64> {
        let t = s.get(r)?;
        t.bytes()
            .all(|c| c.is_ascii_digit())
            .then(|| t.parse().ok())
            .flatten()
    };
    let (y, mo, d, h, mi, se) = (
        num(0..4)?,
        num(5..7)?,
        num(8..10)?,
        num(11..13)?,
        num(14..16)?,
        num(17..19)?,
    );
    if !(1..=12).contains(&mo) || !(1..=31).contains(&d) || h > 23 || mi > 59 || se > 60 {
        return None;
    }
    let mut rest = &s[19..];
    if let Some(r) = rest.strip_prefix('.') {
        let n = r.bytes().take_while(u8::is_ascii_digit).count();
        if n == 0 {
            return None;
        }
        rest = &r[n..];
    }
    let offset = match rest {
        "Z" | "z" => 0,
        o if o.len() == 6 && (o.starts_with('+') || o.starts_with('-')) && &o[3..4] == ":" => {
            let hh: i64 = o[1..3].parse().ok()?;
            let mm: i64 = o[4..6].parse().ok()?;
            let v = hh * 3600 + mm * 60;
            if o.starts_with('-') {
                -v
            } else {
                v
            }
        }
        _ => return None,
    };
    // Days from civil (proleptic Gregorian).
    let (y2, m2) = if mo <= 2 {
        (y - 1, mo + 9)
    } else {
        (y, mo - 3)
    };
    let era = y2.div_euclid(400);
    let yoe = y2 - era * 400;
    let doy = (153 * m2 + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    Some(days * 86_400 + h * 3600 + mi * 60 + se - offset)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rfc3339() {
        assert_eq!(parse_rfc3339("1970-01-01T00:00:00Z"), Some(0));
        assert_eq!(parse_rfc3339("2026-06-01T00:00:00Z"), Some(1_780_272_000));
        assert_eq!(
            parse_rfc3339("2026-06-01T02:00:00+02:00"),
            Some(1_780_272_000)
        );
        assert_eq!(
            parse_rfc3339("2026-06-01T00:00:00.123Z"),
            Some(1_780_272_000)
        );
        assert_eq!(parse_rfc3339("2026-13-01T00:00:00Z"), None);
        assert_eq!(parse_rfc3339("yesterday"), None);
    }
}
