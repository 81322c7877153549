//! The test main of the suites whose tests need inputs from outside the repository
//! (`../shared`, the pinned SmolLM2, ffmpeg, Chromium). cargo's own harness can only pass
//! a test that returns early, and hides what it prints; here a test whose input is
//! missing is counted as *ignored*, and its line says why:
//! `test [skipped: no ../shared/data/meld] meld_counts_match_the_corpus ... ignored`
//! (`FARCER_SHARED` points the suites at another shared folder).
//! Under `CI=true` nothing is skipped: the test runs and fails on the missing input.

use super::in_ci;
use std::process::ExitCode;

/// One test of a suite, and what it needs from outside the repository.
pub struct Test {
    name: &'static str,
    run: fn(),
    /// What is missing, when something is (never under CI).
    missing: Option<String>,
}

/// A test that needs nothing from outside the repository.
pub fn test(name: &'static str, run: fn()) -> Test {
    Test {
        name,
        run,
        missing: None,
    }
}

impl Test {
    /// The test needs `what`; `available` says whether this machine has it (not asked
    /// under CI, where the test must run).
    pub fn needs(mut self, what: &str, available: impl FnOnce() -> bool) -> Test {
        if self.missing.is_none() && !in_ci() && !available() {
            self.missing = Some(what.to_string());
        }
        self
    }

    /// The test reads `<rel>` in the shared data folder.
    pub fn needs_shared(self, rel: &str) -> Test {
        let p = super::shared_root().join(rel);
        self.needs(&p.display().to_string(), || p.exists())
    }

    /// The test runs the pinned SmolLM2 (fetched here if it can be).
    pub fn needs_default_llm(self) -> Test {
        self.needs("pinned SmolLM2", || super::default_llm().is_some())
    }
}

/// `Test`s from the names of test functions in scope.
#[macro_export]
macro_rules! tests {
    ($($name:ident $(. $need:ident ( $($arg:expr),* ))* ),* $(,)?) => {
        vec![$(common::harness::test(stringify!($name), $name)$(.$need($($arg),*))*),*]
    };
}

/// Runs the suite with libtest's arguments (filters, `--list`, `--ignored`, threads).
pub fn main(tests: Vec<Test>) -> ExitCode {
    let args = libtest_mimic::Arguments::from_args();
    let trials = tests
        .into_iter()
        .map(|t| {
            let run = t.run;
            let trial = libtest_mimic::Trial::test(t.name, move || {
                run();
                Ok(())
            });
            match t.missing {
                Some(what) => trial
                    .with_kind(format!("skipped: no {what}"))
                    .with_ignored_flag(true),
                None => trial,
            }
        })
        .collect();
    libtest_mimic::run(&args, trials).exit_code()
}
