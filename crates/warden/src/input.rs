//! Reading configuration for the CLI: `-f` files, folders (recursively) and `-` for stdin,
//! plus `--mesh`, into the policy crate's loader. Also RFC 3339 times for `--now`.

use std::collections::HashSet;
use std::io::Read;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use warden_policy::config::{Config, Loader};
use warden_policy::diag::Diagnostic;

const EXTENSIONS: [&str; 3] = ["yaml", "yml", "json"];

/// Folders and files already reached, by canonical path. Symlinks can make a tree a graph
/// (`ln -s . again`): without this a walk revisits a folder until the OS refuses the path
/// (40 levels), reads every file that many times, and with two such links never ends.
#[derive(Default)]
pub struct Visited {
    dirs: HashSet<PathBuf>,
    files: HashSet<PathBuf>,
}

fn canonical(path: &Path) -> PathBuf {
    std::fs::canonicalize(path).unwrap_or_else(|_| path.to_path_buf())
}

impl Visited {
    /// True the first time a folder is reached, by whatever path.
    pub fn first_dir(&mut self, path: &Path) -> bool {
        self.dirs.insert(canonical(path))
    }

    /// True the first time a file is reached, by whatever path.
    pub fn first_file(&mut self, path: &Path) -> bool {
        self.files.insert(canonical(path))
    }
}

/// Whether a folder entry is hidden (`.git`, `.cache`, editor files): never read.
pub fn is_hidden(path: &Path) -> bool {
    path.file_name()
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with('.'))
}

fn collect(path: &Path, out: &mut Vec<PathBuf>, seen: &mut Visited) -> Result<()> {
    let meta =
        std::fs::metadata(path).with_context(|| format!("{}: cannot read", path.display()))?;
    if meta.is_dir() {
        if !seen.first_dir(path) {
            return Ok(());
        }
        let mut entries: Vec<PathBuf> = std::fs::read_dir(path)
            .with_context(|| format!("{}: cannot list folder", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        entries.sort();
        for e in entries {
            if is_hidden(&e) {
                continue;
            }
            if e.is_dir() {
                collect(&e, out, seen)?;
            } else if e
                .extension()
                .and_then(|x| x.to_str())
                .is_some_and(|x| EXTENSIONS.contains(&x))
                && seen.first_file(&e)
            {
                out.push(e);
            }
        }
    } else if seen.first_file(path) {
        out.push(path.to_path_buf());
    }
    Ok(())
}

/// Adds every `-f` argument to the loader. Unreadable paths are an error of the command line.
/// A file reached twice (named twice, or through a symlink) is read once.
pub fn add_inputs(loader: &mut Loader, inputs: &[String]) -> Result<()> {
    let mut seen = Visited::default();
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
        collect(Path::new(i), &mut files, &mut seen)?;
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
pub(crate) mod tests {
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

    /// A fresh folder under the system temp dir, removed when dropped.
    pub(crate) struct TempDir(pub PathBuf);

    impl TempDir {
        pub fn new(tag: &str) -> TempDir {
            use std::sync::atomic::{AtomicUsize, Ordering};
            static N: AtomicUsize = AtomicUsize::new(0);
            let p = std::env::temp_dir().join(format!(
                "warden-{tag}-{}-{}",
                std::process::id(),
                N.fetch_add(1, Ordering::Relaxed)
            ));
            let _ = std::fs::remove_dir_all(&p);
            std::fs::create_dir_all(&p).unwrap();
            TempDir(p)
        }
    }

    impl Drop for TempDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[cfg(unix)]
    #[test]
    fn symlink_loops_are_read_once() {
        use std::os::unix::fs::symlink;
        let t = TempDir::new("loops");
        let d = t.0.join("d");
        std::fs::create_dir_all(d.join("sub")).unwrap();
        std::fs::write(d.join("p.yaml"), "kind: Namespace\n").unwrap();
        std::fs::write(d.join("sub/q.yml"), "kind: Namespace\n").unwrap();
        // Two self-links make the naive walk exponential, one makes it read files 40 times.
        symlink(".", d.join("a")).unwrap();
        symlink(".", d.join("b")).unwrap();
        symlink("..", d.join("sub/up")).unwrap();
        // A link to a file already read, and a hidden folder.
        symlink("p.yaml", d.join("z-alias.yaml")).unwrap();
        std::fs::create_dir_all(d.join(".hidden")).unwrap();
        std::fs::write(d.join(".hidden/r.yaml"), "kind: Namespace\n").unwrap();
        let mut out = Vec::new();
        let mut seen = Visited::default();
        collect(&d, &mut out, &mut seen).unwrap();
        // Naming the folder again, or a file in it, adds nothing.
        collect(&d.join("a/b"), &mut out, &mut seen).unwrap();
        collect(&d.join("a/p.yaml"), &mut out, &mut seen).unwrap();
        let names: Vec<String> = out
            .iter()
            .map(|p| p.strip_prefix(&d).unwrap().display().to_string())
            .collect();
        assert_eq!(names, ["p.yaml", "sub/q.yml"]);
    }
}
