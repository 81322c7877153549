//! Small shared pieces: a seeded RNG with a documented algorithm (so prompt sets and
//! initial weights are the same on every machine and every build), atomic file writes,
//! checksums and the farcer home folder.

use crate::error::{IoContext, Result};
use sha2::{Digest, Sha256};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub use farcer_models::Rng;

/// Writes a file so that readers see either the old content or the new one, never half:
/// write to a temporary file in the same folder, flush, then rename over the target.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().unwrap_or(Path::new("."));
    if !dir.as_os_str().is_empty() {
        std::fs::create_dir_all(dir).at(dir)?;
    }
    let tmp = tmp_sibling(path);
    crash_point("write temporary file");
    {
        let mut f = std::fs::File::create(&tmp).at(&tmp)?;
        f.write_all(bytes).at(&tmp)?;
        f.sync_all().at(&tmp)?;
    }
    crash_point("rename temporary file");
    std::fs::rename(&tmp, path).at(path)?;
    Ok(())
}

/// An exclusive lock on a run folder (`.lock` inside it, holding the owner's pid). The
/// operating system drops it when the process ends, however it ends, so a killed run
/// never leaves a stale lock behind.
pub struct DirLock {
    _file: std::fs::File,
}

impl DirLock {
    pub fn acquire(dir: &Path) -> Result<Self> {
        let p = dir.join(".lock");
        let mut f = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&p)
            .at(&p)?;
        match f.try_lock() {
            Ok(()) => {}
            Err(std::fs::TryLockError::WouldBlock) => {
                let mut pid = String::new();
                let _ = f.read_to_string(&mut pid);
                return Err(crate::Error::Locked {
                    path: dir.to_path_buf(),
                    pid: pid.trim().to_string(),
                });
            }
            Err(std::fs::TryLockError::Error(e)) => return Err(crate::Error::io(&p, e)),
        }
        f.set_len(0).at(&p)?;
        write!(f, "{}", std::process::id()).at(&p)?;
        Ok(DirLock { _file: f })
    }
}

/// A test hook for crash consistency: with `FARCER_CRASH_AT=N`, the N-th call in this
/// process aborts it (no destructors, no flush: what `kill -9` leaves). Every write,
/// rename and removal of a run's files calls it first, so a test can kill a run at each
/// of them in turn. Without the variable it costs one atomic add.
pub fn crash_point(what: &str) {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::OnceLock;
    static AT: OnceLock<Option<usize>> = OnceLock::new();
    static SEEN: AtomicUsize = AtomicUsize::new(0);
    let at = *AT.get_or_init(|| {
        std::env::var("FARCER_CRASH_AT")
            .ok()
            .and_then(|v| v.parse().ok())
    });
    let n = SEEN.fetch_add(1, Ordering::SeqCst) + 1;
    if at == Some(n) {
        eprintln!("FARCER_CRASH_AT={n}: aborting before: {what}");
        std::process::abort();
    }
}

/// Copies the plain files of folder `from` into a new folder `to` (not recursive: a
/// checkpoint is flat).
pub fn copy_flat_dir(from: &Path, to: &Path) -> Result<()> {
    crash_point("create folder");
    std::fs::create_dir_all(to).at(to)?;
    for e in std::fs::read_dir(from).at(from)? {
        let e = e.at(from)?;
        let p = e.path();
        if p.is_file() {
            let dest = to.join(e.file_name());
            crash_point("copy file");
            std::fs::copy(&p, &dest).at(&dest)?;
        }
    }
    Ok(())
}

/// Saves tensors as safetensors; unlike candle's `save`, a failure names the file.
pub fn save_tensors<K: AsRef<str> + Ord + std::fmt::Display>(
    tensors: &std::collections::HashMap<K, candle_core::Tensor>,
    path: &Path,
) -> Result<()> {
    crash_point("write tensors");
    candle_core::safetensors::save(tensors, path)
        .map_err(|e| crate::Error::input(path.display().to_string(), format!("cannot write: {e}")))
}

/// Removes what an interrupted write leaves in `dir`: temporary files and folders
/// ([`tmp_sibling`]'s `.NAME.tmpPID`) and staging folders (`NAME.stagingPID`).
pub fn remove_leftovers(dir: &Path) -> Result<()> {
    if !dir.is_dir() {
        return Ok(());
    }
    for e in std::fs::read_dir(dir).at(dir)? {
        let e = e.at(dir)?;
        let n = e.file_name().to_string_lossy().to_string();
        if n.contains(".staging") || (n.starts_with('.') && n.contains(".tmp")) {
            remove_any(&e.path())?;
        }
    }
    Ok(())
}

/// Removes a file or folder tree if it is there.
pub fn remove_any(p: &Path) -> Result<()> {
    if p.is_dir() {
        crash_point("remove folder");
        std::fs::remove_dir_all(p).at(p)?;
    } else if p.exists() {
        crash_point("remove file");
        std::fs::remove_file(p).at(p)?;
    }
    Ok(())
}

/// A temporary name next to `path` (same file system, so rename is atomic).
pub fn tmp_sibling(path: &Path) -> PathBuf {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().to_string())
        .unwrap_or_default();
    path.with_file_name(format!(".{name}.tmp{}", std::process::id()))
}

pub fn write_json_atomic<T: serde::Serialize>(path: &Path, value: &T) -> Result<()> {
    let mut s =
        serde_json::to_string_pretty(value).map_err(|e| crate::Error::msg(e.to_string()))?;
    s.push('\n');
    write_atomic(path, s.as_bytes())
}

pub fn sha256_file(path: &Path) -> Result<String> {
    let mut f = std::fs::File::open(path).at(path)?;
    let mut h = Sha256::new();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = f.read(&mut buf).at(path)?;
        if n == 0 {
            break;
        }
        h.update(&buf[..n]);
    }
    Ok(hex(&h.finalize()))
}

pub fn sha256_bytes(bytes: &[u8]) -> String {
    hex(&Sha256::digest(bytes))
}

pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// `$FARCER_HOME`, else `~/.cache/farcer`: where fetched models and caches live.
pub fn farcer_home() -> PathBuf {
    if let Some(h) = std::env::var_os("FARCER_HOME") {
        return PathBuf::from(h);
    }
    let home = std::env::var_os("HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("."));
    home.join(".cache").join("farcer")
}

/// Makes glibc's malloc keep freed tensor buffers for reuse instead of returning each
/// one to the kernel (which then zero-fills fresh pages on the next allocation): about a
/// third of a training step otherwise. Call once at start-up; a no-op off glibc.
pub fn tune_allocator() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        extern "C" {
            fn mallopt(param: i32, value: i32) -> i32;
        }
        const M_TRIM_THRESHOLD: i32 = -1;
        const M_TOP_PAD: i32 = -2;
        const M_MMAP_THRESHOLD: i32 = -3;
        const M_ARENA_MAX: i32 = -8;
        // SAFETY: mallopt only changes allocator parameters; called before threads start.
        unsafe {
            mallopt(M_MMAP_THRESHOLD, 32 << 20);
            mallopt(M_TRIM_THRESHOLD, i32::MAX);
            mallopt(M_TOP_PAD, 256 << 20);
            mallopt(M_ARENA_MAX, 1);
        }
    }
}

/// Mean and (sample) standard deviation.
pub fn mean_std(xs: &[f64]) -> (f64, f64) {
    if xs.is_empty() {
        return (f64::NAN, f64::NAN);
    }
    let n = xs.len() as f64;
    let mean = xs.iter().sum::<f64>() / n;
    if xs.len() < 2 {
        return (mean, 0.0);
    }
    let var = xs.iter().map(|x| (x - mean).powi(2)).sum::<f64>() / (n - 1.0);
    (mean, var.sqrt())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitmix_is_the_published_sequence() {
        // First outputs of SplitMix64 seeded with 0 (reference values from the paper's C code).
        let mut r = Rng::new(0);
        assert_eq!(r.next_u64(), 0xe220a8397b1dcdaf);
        assert_eq!(r.next_u64(), 0x6e789e6aa1b965f4);
    }

    #[test]
    fn below_stays_in_range_and_covers_it() {
        let mut r = Rng::new(7);
        let mut seen = [0usize; 5];
        for _ in 0..1000 {
            seen[r.below(5)] += 1;
        }
        assert!(seen.iter().all(|&c| c > 150), "{seen:?}");
    }

    #[test]
    fn atomic_write_replaces_whole_file() {
        let dir = std::env::temp_dir().join(format!("farcer-atomic-{}", std::process::id()));
        let p = dir.join("x.json");
        write_atomic(&p, b"old").unwrap();
        write_atomic(&p, b"new content").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"new content");
        let leftovers: Vec<_> = std::fs::read_dir(&dir).unwrap().collect();
        assert_eq!(leftovers.len(), 1);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn mean_std_matches_hand_values() {
        let (m, s) = mean_std(&[1.0, 2.0, 3.0, 4.0]);
        assert!((m - 2.5).abs() < 1e-12);
        assert!((s - 1.2909944487358056).abs() < 1e-12);
    }
}
