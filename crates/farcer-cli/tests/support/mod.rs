//! Running the `farcer` binary from tests, as a user runs it.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::Command;

/// Runs `farcer args` from the repository's root: (success, stdout, stderr).
pub fn farcer(args: &[&str]) -> (bool, String, String) {
    farcer_env(args, &[])
}

/// [`farcer`] with extra environment variables.
pub fn farcer_env(args: &[&str], env: &[(&str, &str)]) -> (bool, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_farcer"))
        .current_dir(crate::common::root())
        .args(args)
        .envs(env.iter().copied())
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).to_string(),
        String::from_utf8_lossy(&out.stderr).to_string(),
    )
}

/// An empty temporary folder named for this test binary (`suite`), the test and the process.
pub fn tmpdir(suite: &str, name: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("farcer-{suite}-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    std::fs::create_dir_all(&d).unwrap();
    d
}
