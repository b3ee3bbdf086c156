//! Bootstrap tokens: single- or few-use secrets, each bound to one workload identity, that let a
//! workload without a certificate get its first one from the CA service.
//!
//! Only a SHA-256 hash of each token is stored, in `tokens.json` in the CA directory, so reading
//! the file does not let anyone impersonate a workload. Every change rewrites the file through a
//! temporary file and a rename (mode 0600), under a lock file, because `warden ca token` (mint)
//! and `warden ca serve` (consume) are separate processes sharing it.

use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Mutex;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use base64::Engine as _;
use serde::{Deserialize, Serialize};

use crate::spiffe::SpiffeId;

/// Name of the token file inside the CA directory.
pub const TOKENS_FILE: &str = "tokens.json";

/// Longest TTL a token may have: bootstrap tokens are meant to be used within minutes.
pub const MAX_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// Records stay this long after expiring so that a late attempt is told "expired" or "used
/// up" rather than "unknown"; afterwards they are dropped to keep the file small.
const RETAIN_AFTER_EXPIRY: Duration = Duration::from_secs(24 * 3600);

/// A lock file older than this was left behind by a crashed process: every holder keeps the
/// lock for milliseconds.
const STALE_LOCK: Duration = Duration::from_secs(30);
const LOCK_WAIT: Duration = Duration::from_secs(5);

/// Why a token was refused or the store could not be used.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TokenError {
    #[error("unknown bootstrap token")]
    Unknown,
    #[error("bootstrap token for {id} expired {ago}s ago")]
    Expired { id: SpiffeId, ago: u64 },
    #[error("bootstrap token for {id} is used up")]
    UsedUp { id: SpiffeId },
    #[error("bootstrap token is bound to {bound}, not to {requested}")]
    WrongIdentity {
        /// SPIFFE IDs as text: two `SpiffeId`s would make every `Result` of this module large.
        bound: String,
        requested: String,
    },
    #[error("invalid token request: {0}")]
    Invalid(String),
    #[error("{}: {source}", path.display())]
    Io { path: PathBuf, source: io::Error },
    #[error("{}: not a valid token file: {msg}", path.display())]
    Corrupt { path: PathBuf, msg: String },
    #[error("{}: still locked by another process after {}s (remove it if no warden process is running)", path.display(), LOCK_WAIT.as_secs())]
    Busy { path: PathBuf },
}

/// What `list` shows about a token: never the token, only a prefix of its hash.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TokenInfo {
    pub hash_prefix: String,
    pub id: SpiffeId,
    pub expires_at: SystemTime,
    pub uses_left: u32,
}

#[derive(Debug, Default, Serialize, Deserialize)]
struct TokenFile {
    version: u32,
    tokens: Vec<TokenRecord>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct TokenRecord {
    /// SHA-256 of the token's text, base64url.
    sha256: String,
    identity: String,
    /// Seconds since the Unix epoch.
    expires_at: u64,
    uses_left: u32,
}

/// The bootstrap tokens of one CA.
#[derive(Debug)]
pub struct TokenStore {
    path: PathBuf,
    /// Serialises this process's own read-modify-write cycles; the lock file covers the others.
    local: Mutex<()>,
}

impl TokenStore {
    /// The store in CA directory `dir` (the file is created on the first mint).
    pub fn open(dir: &Path) -> Self {
        TokenStore {
            path: dir.join(TOKENS_FILE),
            local: Mutex::new(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Mints a token for `id`, valid for `ttl` and `uses` requests. The returned text is shown
    /// once and never stored.
    pub fn mint(&self, id: &SpiffeId, ttl: Duration, uses: u32) -> Result<String, TokenError> {
        self.mint_at(id, ttl, uses, SystemTime::now())
    }

    /// `mint` as if the time were `now` (tests, and callers with their own clock).
    pub fn mint_at(
        &self,
        id: &SpiffeId,
        ttl: Duration,
        uses: u32,
        now: SystemTime,
    ) -> Result<String, TokenError> {
        if uses == 0 {
            return Err(TokenError::Invalid("--uses must be at least 1".into()));
        }
        if ttl.is_zero() || ttl > MAX_TTL {
            return Err(TokenError::Invalid(format!(
                "--ttl must be between 1s and {}h, got {}s",
                MAX_TTL.as_secs() / 3600,
                ttl.as_secs()
            )));
        }
        let mut secret = [0u8; 32];
        aws_lc_rs::rand::fill(&mut secret)
            .map_err(|_| TokenError::Invalid("the system random generator failed".into()))?;
        let token = URL_SAFE_NO_PAD.encode(secret);
        let record = TokenRecord {
            sha256: hash(&token),
            identity: id.to_string(),
            expires_at: unix(now + ttl),
            uses_left: uses,
        };
        self.update(now, |file| {
            file.tokens.push(record);
            Ok(())
        })?;
        Ok(token)
    }

    /// Spends one use of `token` and returns the identity it is bound to.
    pub fn consume(&self, token: &str, now: SystemTime) -> Result<SpiffeId, TokenError> {
        self.consume_checked(token, None, now)
    }

    /// Spends one use of `token` only if it is bound to `expected`, so that a request for the
    /// wrong identity is refused without burning the token.
    pub fn consume_for(
        &self,
        token: &str,
        expected: &SpiffeId,
        now: SystemTime,
    ) -> Result<(), TokenError> {
        self.consume_checked(token, Some(expected), now).map(|_| ())
    }

    /// Checks `token` as `consume` would, without spending it: who is asking, before the
    /// request itself is looked at.
    pub fn peek(&self, token: &str, now: SystemTime) -> Result<SpiffeId, TokenError> {
        let _local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        let file = self.load()?;
        let i = find(&file, token)?;
        check(&file.tokens[i], now, &self.path)
    }

    /// Every token still on file, for `warden ca token --list`.
    pub fn list(&self) -> Result<Vec<TokenInfo>, TokenError> {
        let _local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        let file = self.load()?;
        file.tokens
            .iter()
            .map(|r| {
                Ok(TokenInfo {
                    hash_prefix: r.sha256.chars().take(8).collect(),
                    id: parse_id(&r.identity, &self.path)?,
                    expires_at: UNIX_EPOCH + Duration::from_secs(r.expires_at),
                    uses_left: r.uses_left,
                })
            })
            .collect()
    }

    fn consume_checked(
        &self,
        token: &str,
        expected: Option<&SpiffeId>,
        now: SystemTime,
    ) -> Result<SpiffeId, TokenError> {
        let path = self.path.clone();
        self.update(now, |file| {
            let i = find(file, token)?;
            let id = check(&file.tokens[i], now, &path)?;
            if let Some(expected) = expected {
                if *expected != id {
                    return Err(TokenError::WrongIdentity {
                        bound: id.to_string(),
                        requested: expected.to_string(),
                    });
                }
            }
            file.tokens[i].uses_left -= 1;
            Ok(id)
        })
    }

    /// Read-modify-write under both locks; `f`'s error leaves the file untouched.
    fn update<T>(
        &self,
        now: SystemTime,
        f: impl FnOnce(&mut TokenFile) -> Result<T, TokenError>,
    ) -> Result<T, TokenError> {
        let _local = self.local.lock().unwrap_or_else(|e| e.into_inner());
        let _lock = LockFile::acquire(&self.path)?;
        let mut file = self.load()?;
        let out = f(&mut file)?;
        let keep_after = unix(now).saturating_sub(RETAIN_AFTER_EXPIRY.as_secs());
        file.tokens.retain(|r| r.expires_at >= keep_after);
        file.version = 1;
        self.store(&file)?;
        Ok(out)
    }

    fn load(&self) -> Result<TokenFile, TokenError> {
        let text = match fs::read(&self.path) {
            Ok(t) => t,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(TokenFile::default()),
            Err(source) => return Err(self.io(source)),
        };
        serde_json::from_slice(&text).map_err(|e| TokenError::Corrupt {
            path: self.path.clone(),
            msg: e.to_string(),
        })
    }

    /// Write-to-temp, fsync, rename: a crash leaves the old file or the new one, never half of
    /// one (a half-written file would lose every outstanding token or resurrect spent ones).
    fn store(&self, file: &TokenFile) -> Result<(), TokenError> {
        let tmp = self.path.with_extension("json.tmp");
        let text = serde_json::to_vec_pretty(file).map_err(|e| TokenError::Corrupt {
            path: self.path.clone(),
            msg: e.to_string(),
        })?;
        let _ = fs::remove_file(&tmp);
        let mut out = private_file(&tmp).map_err(|e| self.io(e))?;
        out.write_all(&text)
            .and_then(|()| out.sync_all())
            .map_err(|e| self.io(e))?;
        drop(out);
        fs::rename(&tmp, &self.path).map_err(|e| self.io(e))?;
        if let Some(dir) = self.path.parent() {
            // The rename is durable only once the directory entry is.
            if let Ok(d) = fs::File::open(dir) {
                let _ = d.sync_all();
            }
        }
        Ok(())
    }

    fn io(&self, source: io::Error) -> TokenError {
        TokenError::Io {
            path: self.path.clone(),
            source,
        }
    }
}

/// Index of the record whose hash matches. Every record is compared, in constant time, so the
/// time taken says nothing about which stored hash came close.
fn find(file: &TokenFile, token: &str) -> Result<usize, TokenError> {
    let token = token.trim();
    // A 256-bit token is 43 characters; anything far longer is not ours and not worth hashing.
    if token.is_empty() || token.len() > 256 {
        return Err(TokenError::Unknown);
    }
    let h = hash(token);
    let mut found = None;
    for (i, r) in file.tokens.iter().enumerate() {
        if aws_lc_rs::constant_time::verify_slices_are_equal(r.sha256.as_bytes(), h.as_bytes())
            .is_ok()
        {
            found = Some(i);
        }
    }
    found.ok_or(TokenError::Unknown)
}

fn check(r: &TokenRecord, now: SystemTime, path: &Path) -> Result<SpiffeId, TokenError> {
    let id = parse_id(&r.identity, path)?;
    let now = unix(now);
    if now >= r.expires_at {
        return Err(TokenError::Expired {
            id,
            ago: now - r.expires_at,
        });
    }
    if r.uses_left == 0 {
        return Err(TokenError::UsedUp { id });
    }
    Ok(id)
}

fn parse_id(s: &str, path: &Path) -> Result<SpiffeId, TokenError> {
    SpiffeId::from_str(s).map_err(|e| TokenError::Corrupt {
        path: path.to_path_buf(),
        msg: e.to_string(),
    })
}

fn hash(token: &str) -> String {
    URL_SAFE_NO_PAD.encode(aws_lc_rs::digest::digest(
        &aws_lc_rs::digest::SHA256,
        token.as_bytes(),
    ))
}

fn unix(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs())
}

fn private_file(path: &Path) -> io::Result<fs::File> {
    let mut opts = fs::OpenOptions::new();
    opts.write(true).create_new(true);
    #[cfg(unix)]
    {
        use std::os::unix::fs::OpenOptionsExt;
        opts.mode(0o600);
    }
    opts.open(path)
}

/// A cross-process lock: a file created exclusively beside the token file. (`File::lock` is
/// newer than the workspace's minimum Rust.)
struct LockFile {
    path: PathBuf,
}

impl LockFile {
    fn acquire(target: &Path) -> Result<LockFile, TokenError> {
        let path = target.with_extension("json.lock");
        let deadline = std::time::Instant::now() + LOCK_WAIT;
        loop {
            match private_file(&path) {
                Ok(_) => return Ok(LockFile { path }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                    let stale = fs::metadata(&path)
                        .and_then(|m| m.modified())
                        .ok()
                        .and_then(|m| SystemTime::now().duration_since(m).ok())
                        .is_some_and(|age| age > STALE_LOCK);
                    if stale {
                        let _ = fs::remove_file(&path);
                        continue;
                    }
                    if std::time::Instant::now() >= deadline {
                        return Err(TokenError::Busy { path });
                    }
                    // Holders keep the lock for a few milliseconds; poll rather than block.
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err(source) => return Err(TokenError::Io { path, source }),
            }
        }
    }
}

impl Drop for LockFile {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let d = std::env::temp_dir().join(format!(
            "warden-token-{name}-{}-{}",
            std::process::id(),
            unix(SystemTime::now())
        ));
        let _ = fs::remove_dir_all(&d);
        fs::create_dir_all(&d).unwrap();
        d
    }

    fn id(sa: &str) -> SpiffeId {
        SpiffeId::new("cluster.local", "default", sa).unwrap()
    }

    #[test]
    fn mint_consume_use_up_expire() {
        let dir = temp_dir("lifecycle");
        let store = TokenStore::open(&dir);
        let now = SystemTime::now();
        let t = store
            .mint_at(&id("a"), Duration::from_secs(600), 2, now)
            .unwrap();
        assert_eq!(URL_SAFE_NO_PAD.decode(&t).unwrap().len(), 32);

        let text = fs::read_to_string(store.path()).unwrap();
        assert!(!text.contains(&t), "the token itself must not be stored");
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = fs::metadata(store.path()).unwrap().permissions().mode();
            assert_eq!(mode & 0o777, 0o600);
        }

        assert!(matches!(
            store.consume_for(&t, &id("b"), now),
            Err(TokenError::WrongIdentity { .. })
        ));
        assert_eq!(store.consume(&t, now).unwrap(), id("a"));
        assert_eq!(store.peek(&t, now).unwrap(), id("a"));
        store.consume_for(&t, &id("a"), now).unwrap();
        assert!(matches!(
            store.consume(&t, now),
            Err(TokenError::UsedUp { .. })
        ));
        assert!(matches!(
            store.consume("nope", now),
            Err(TokenError::Unknown)
        ));

        let t2 = store
            .mint_at(&id("c"), Duration::from_secs(60), 1, now)
            .unwrap();
        let later = now + Duration::from_secs(61);
        assert!(matches!(
            store.consume(&t2, later),
            Err(TokenError::Expired { .. })
        ));
        // A fresh store object sees the same state: it lives in the file.
        let again = TokenStore::open(&dir);
        assert_eq!(again.list().unwrap().len(), 2);
        assert!(matches!(
            again.consume(&t, now),
            Err(TokenError::UsedUp { .. })
        ));
        // Long-expired records are dropped on the next write.
        let much_later = now + Duration::from_secs(3 * 24 * 3600);
        again
            .mint_at(&id("d"), Duration::from_secs(60), 1, much_later)
            .unwrap();
        assert_eq!(again.list().unwrap().len(), 1);
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn bad_parameters_and_corrupt_file() {
        let dir = temp_dir("bad");
        let store = TokenStore::open(&dir);
        assert!(store.mint(&id("a"), Duration::from_secs(60), 0).is_err());
        assert!(store.mint(&id("a"), Duration::ZERO, 1).is_err());
        assert!(store
            .mint(&id("a"), MAX_TTL + Duration::from_secs(1), 1)
            .is_err());
        fs::write(store.path(), "{not json").unwrap();
        assert!(matches!(
            store.consume("x", SystemTime::now()),
            Err(TokenError::Corrupt { .. })
        ));
        fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn concurrent_consumers_never_overspend() {
        let dir = temp_dir("race");
        let now = SystemTime::now();
        let t = TokenStore::open(&dir)
            .mint_at(&id("a"), Duration::from_secs(600), 3, now)
            .unwrap();
        // One store per thread: only the lock file serialises them, as between processes.
        let handles: Vec<_> = (0..8)
            .map(|_| {
                let (dir, t) = (dir.clone(), t.clone());
                std::thread::spawn(move || TokenStore::open(&dir).consume(&t, now).is_ok())
            })
            .collect();
        let ok = handles
            .into_iter()
            .map(|h| h.join().unwrap())
            .filter(|&b| b)
            .count();
        assert_eq!(ok, 3);
        fs::remove_dir_all(&dir).unwrap();
    }
}
