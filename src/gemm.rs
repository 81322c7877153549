//! Which GEMM runs the CPU kernels' products, chosen once per process from
//! `FARCER_GEMM`:
//! - `auto` (the default): when OpenBLAS can be opened (`scripts/setup` installs it),
//!   each class of product goes to whichever of it and the `gemm` crate ran that class
//!   faster in a calibration of a few seconds, cached per CPU, library and thread count
//!   under `$FARCER_HOME/gemm/`; `auto:mkl` (or `auto:<path>`) calibrates another library.
//!   Without a library, the crate for everything.
//! - `gemm`: the crate for everything (the portable fallback).
//! - `openblas`, `mkl`, or a path to a CBLAS `.so`: that library for every product it
//!   can take (MKL's PyPI wheel: set `MKLROOT` to the environment that holds it).

use crate::util::{farcer_home, sha256_bytes, write_atomic};
use crate::{Error, Result};
use farcer_kernels::blas::{self, Choice};

/// The CPU's model and vector flags, which the calibration depends on.
fn cpu_id() -> String {
    let info = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let field = |k: &str| {
        info.lines()
            .find(|l| l.split(':').next().is_some_and(|f| f.trim() == k))
            .and_then(|l| l.split_once(':'))
            .map(|(_, v)| v.trim().to_string())
            .unwrap_or_default()
    };
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
        auto if auto == "auto" || auto.starts_with("auto:") => {
            let lib = auto.strip_prefix("auto:").unwrap_or("openblas");
            match blas::open(lib) {
                Ok(l) => calibrated(l, log)?,
                // No OpenBLAS here: the crate, as without FARCER_GEMM.
                Err(_) if auto == "auto" => Choice::crate_only(),
                Err(e) => return Err(Error::msg(format!("FARCER_GEMM={auto}: {e}"))),
            }
        }
        lib => Choice::everywhere(
            blas::open(lib).map_err(|e| Error::msg(format!("FARCER_GEMM={lib}: {e}")))?,
        ),
    };
    let words = choice.describe();
    blas::set_choice(choice);
    Ok(words)
}

/// The cached calibration for this CPU, library and thread count, or a new one (saved).
fn calibrated(lib: &'static blas::Cblas, log: &dyn Fn(&str)) -> Result<Choice> {
    let key = format!("{}\n{}\nthreads {}\n", cpu_id(), lib.name, blas::threads());
    let dir = farcer_home().join("gemm");
    let path = dir.join(format!("{}.txt", &sha256_bytes(key.as_bytes())[..16]));
    let cached = |quiet: bool| match std::fs::read_to_string(&path) {
        Ok(text) => {
            let c = text
                .strip_prefix(&key)
                .and_then(|rest| rest.lines().next())
                .and_then(|t| Choice::from_table_text(lib, t));
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
    let c = calibrate_and_save(lib, log, &key, &dir, &path);
    if held {
        let _ = std::fs::remove_file(&lock);
    }
    Ok(c)
}

/// Measures `lib` against the crate and saves the table (a cache that cannot be written
/// costs a calibration next time, not this command).
fn calibrate_and_save(
    lib: &'static blas::Cblas,
    log: &dyn Fn(&str),
    key: &str,
    dir: &std::path::Path,
    path: &std::path::Path,
) -> Choice {
    log(&format!(
        "calibrating GEMM: {} against the gemm crate (once for this CPU)",
        lib.name
    ));
    let (c, ratios) = Choice::calibrate(lib, 5);
    let mut text = format!("{key}{}\n", c.table_text());
    for (class, r) in &ratios {
        text.push_str(&format!("{class}: library/crate time {r:.3}\n"));
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
