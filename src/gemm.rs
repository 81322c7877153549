//! Which GEMM runs the CPU kernels' products, chosen once per process from
//! `FARCER_GEMM`:
//! - `auto` (the default): on an Intel CPU with MKL (`scripts/setup` installs it), MKL
//!   for every product. Elsewhere each class of product goes to whichever of the `gemm`
//!   crate and the CBLAS libraries that open (OpenBLAS, MKL) ran that class fastest in a
//!   calibration of about ten seconds, and a linear layer's forward reads its weight in
//!   the layout that ran faster; cached per CPU, libraries and thread count under
//!   `$FARCER_HOME/gemm/`. `auto:mkl` (or `auto:<path>`) calibrates one library only.
//!   Without a library, the crate for everything.
//! - `gemm`: the crate for everything (the portable fallback).
//! - `openblas`, `mkl`, or a path to a CBLAS `.so`: that library for every product it
//!   can take (MKL: the copy under `$FARCER_HOME/mkl`, or `MKLROOT`'s).

use crate::util::{farcer_home, sha256_bytes, write_atomic};
use crate::{Error, Result};
use farcer_kernels::blas::{self, Choice};

/// `/proc/cpuinfo` (empty where there is none).
fn cpuinfo() -> String {
    std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default()
}

/// One field of the first CPU in `cpuinfo`'s text (empty where there is none).
fn cpu_field(info: &str, k: &str) -> String {
    info.lines()
        .find(|l| l.split(':').next().is_some_and(|f| f.trim() == k))
        .and_then(|l| l.split_once(':'))
        .map(|(_, v)| v.trim().to_string())
        .unwrap_or_default()
}

/// The CPU's model and vector flags, which the calibration depends on.
fn cpu_id() -> String {
    let info = cpuinfo();
    let field = |k| cpu_field(&info, k);
    let flags = field("flags");
    let flags: Vec<&str> = flags
        .split_whitespace()
        .filter(|f| f.starts_with("avx") || f.starts_with("amx") || *f == "fma")
        .collect();
    format!("{} [{}]", field("model name"), flags.join(" "))
}

/// Reads `FARCER_GEMM` and fixes the process's choice; returns it in words. An unknown
/// library named outright is an error; `auto` without a library falls back to the crate.
pub fn choose_from_env(log: &dyn Fn(&str)) -> Result<String> {
    let spec = std::env::var("FARCER_GEMM").unwrap_or_else(|_| "auto".into());
    let choice = match spec.as_str() {
        "" | "gemm" => Choice::crate_only(),
        "auto" => {
            let mkl = blas::open(&mkl_spec()).ok();
            match mkl {
                // Intel's library on Intel's CPU: every product. On a Xeon with
                // AVX-512 it ran a 128-token step 20% faster than the calibrated mix,
                // which times each class alone and misses it (BENCHMARKS.md).
                Some(mkl) if cpu_field(&cpuinfo(), "vendor_id") == "GenuineIntel" => {
                    Choice::everywhere(mkl)
                }
                _ => {
                    // Every library that opens; none: the crate, as without FARCER_GEMM.
                    let libs: Vec<_> = blas::open("openblas").ok().into_iter().chain(mkl).collect();
                    if libs.is_empty() {
                        Choice::crate_only()
                    } else {
                        calibrated(&libs, log)?
                    }
                }
            }
        }
        auto if auto.starts_with("auto:") => {
            let lib = &auto["auto:".len()..];
            let lib = if lib == "mkl" { mkl_spec() } else { lib.into() };
            match blas::open(&lib) {
                Ok(l) => calibrated(&[l], log)?,
                Err(e) => return Err(Error::msg(format!("FARCER_GEMM={auto}: {e}"))),
            }
        }
        lib => {
            let spec = if lib == "mkl" { mkl_spec() } else { lib.into() };
            Choice::everywhere(
                blas::open(&spec).map_err(|e| Error::msg(format!("FARCER_GEMM={lib}: {e}")))?,
            )
        }
    };
    let words = choice.describe();
    if !blas::set_choice(choice) {
        // An earlier call or product fixed it; the same choice again is fine.
        let fixed = blas::choice().describe();
        if fixed != words {
            return Err(Error::msg(format!(
                "FARCER_GEMM={spec}: the process's GEMM choice was already fixed ({fixed})"
            )));
        }
    }
    Ok(words)
}

/// MKL as `blas::open` should look for it: the copy `scripts/setup` installs under
/// `$FARCER_HOME/mkl` unless `MKLROOT` names another (or neither: the system's).
fn mkl_spec() -> String {
    if std::env::var_os("MKLROOT").is_none() {
        let root = farcer_home().join("mkl");
        let files = blas::mkl_files(&root.to_string_lossy());
        if let Some(f) = files.into_iter().find(|f| std::path::Path::new(f).exists()) {
            return f;
        }
    }
    "mkl".into()
}

/// The cached calibration for this CPU, these libraries and the thread count, or a new
/// one (saved).
fn calibrated(libs: &[&'static blas::Cblas], log: &dyn Fn(&str)) -> Result<Choice> {
    let names: Vec<&str> = libs.iter().map(|l| l.name.as_str()).collect();
    // v2: one digit per class (which library), the forward's layout, three widths.
    let key = format!(
        "{}\n{}\nthreads {}\nv2\n",
        cpu_id(),
        names.join(", "),
        blas::threads()
    );
    let dir = farcer_home().join("gemm");
    let path = dir.join(format!("{}.txt", &sha256_bytes(key.as_bytes())[..16]));
    let cached = |quiet: bool| match std::fs::read_to_string(&path) {
        Ok(text) => {
            let c = text
                .strip_prefix(&key)
                .and_then(|rest| rest.lines().next())
                .and_then(|t| Choice::from_table_text(libs, t));
            if c.is_none() && !quiet {
                log(&format!(
                    "{}: not a GEMM calibration; measuring again",
                    path.display()
                ));
            }
            c
        }
        Err(e) if e.kind() != std::io::ErrorKind::NotFound && !quiet => {
            log(&format!("{}: {e}; measuring again", path.display()));
            None
        }
        Err(_) => None,
    };
    if let Some(c) = cached(false) {
        return Ok(c);
    }
    // One process calibrates at a time (two at once would each time the other's load):
    // the others wait up to a minute for its table; a lock older than that is stale.
    let lock = path.with_extension("lock");
    let _ = std::fs::create_dir_all(&dir);
    let mut waited = 0;
    let held = loop {
        match std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&lock)
        {
            Ok(_) => break true,
            Err(_) if waited < 600 => {
                let stale = std::fs::metadata(&lock)
                    .and_then(|m| m.modified())
                    .ok()
                    .and_then(|t| t.elapsed().ok())
                    .is_some_and(|age| age.as_secs() > 60);
                if stale {
                    let _ = std::fs::remove_file(&lock);
                    continue;
                }
                if waited == 0 {
                    log("waiting for another farcer process's GEMM calibration");
                }
                std::thread::sleep(std::time::Duration::from_millis(100));
                waited += 1;
                if let Some(c) = cached(true) {
                    return Ok(c);
                }
            }
            // No lock to be had (an unwritable folder, or a minute gone): measure anyway.
            Err(_) => break false,
        }
    };
    let c = calibrate_and_save(libs, log, &key, &dir, &path);
    if held {
        let _ = std::fs::remove_file(&lock);
    }
    Ok(c)
}

/// Measures `libs` against the crate and saves the table (a cache that cannot be written
/// costs a calibration next time, not this command).
fn calibrate_and_save(
    libs: &[&'static blas::Cblas],
    log: &dyn Fn(&str),
    key: &str,
    dir: &std::path::Path,
    path: &std::path::Path,
) -> Choice {
    let names: Vec<&str> = libs.iter().map(|l| l.name.as_str()).collect();
    log(&format!(
        "calibrating GEMM: {} against the gemm crate (once for this CPU)",
        names.join(", ")
    ));
    let (c, ratios) = Choice::calibrate(libs, 3);
    let mut text = format!("{key}{}\n", c.table_text());
    for (class, r) in &ratios {
        text.push_str(&format!("{class} time {r:.3}\n"));
    }
    let saved = std::fs::create_dir_all(dir)
        .map_err(|e| Error::msg(format!("{}: {e}", dir.display())))
        .and_then(|_| write_atomic(path, text.as_bytes()));
    match saved {
        Ok(()) => log(&format!(
            "GEMM: {} (saved in {})",
            c.describe(),
            path.display()
        )),
        Err(e) => log(&format!("GEMM: {} (not saved: {e})", c.describe())),
    }
    c
}
