//! Ctrl-C and SIGTERM during training: the first asks the run to stop after the step in
//! progress (every file it has written is then complete); a second one ends the process
//! at once, which the run's crash consistency also survives.

use std::sync::atomic::{AtomicBool, Ordering};

static REQUESTED: AtomicBool = AtomicBool::new(false);

/// Whether a stop has been asked for.
pub fn requested() -> bool {
    REQUESTED.load(Ordering::SeqCst)
}

/// Installs the handlers (call once, before training starts).
#[cfg(unix)]
pub fn install() {
    extern "C" {
        fn signal(signum: i32, handler: usize) -> usize;
    }
    const SIGINT: i32 = 2;
    const SIGTERM: i32 = 15;
    const SIG_DFL: usize = 0;
    extern "C" fn on_signal(sig: i32) {
        // Only async-signal-safe work here: an atomic store, and `signal` itself.
        REQUESTED.store(true, Ordering::SeqCst);
        // SAFETY: restoring the default action is async-signal-safe.
        unsafe {
            signal(sig, SIG_DFL);
        }
    }
    // SAFETY: the handler only stores an atomic and resets itself.
    unsafe {
        signal(SIGINT, on_signal as *const () as usize);
        signal(SIGTERM, on_signal as *const () as usize);
    }
}

#[cfg(not(unix))]
pub fn install() {}
