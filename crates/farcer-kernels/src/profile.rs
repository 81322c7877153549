//! Where the kernels' time goes: wall time and calls per part (GEMM, attention, norms,
//! activations, RoPE, copies, LoRA adapters), and the GEMMs' floating-point operations,
//! summed while [`start`] is on. Only the thread that started it counts, and only its outermost span
//! (a GEMM inside attention is attention's), so the parts add up to at most the wall time
//! of what ran; what is left is everything outside these kernels (candle's ops, autograd,
//! allocation). Off, a span costs one relaxed atomic load.

use std::cell::Cell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::Instant;

/// A kind of kernel (its discriminant is its index in [`PARTS`] and the totals).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Part {
    Gemm,
    Attention,
    Norm,
    Activation,
    Rope,
    Copy,
    /// LoRA adapters inside a fused layer: dropout, their low-rank products, and adding
    /// their gradients. Their products count here, not in [`Part::Gemm`] or its rate.
    Adapter,
}

pub const PARTS: [Part; 7] = [
    Part::Gemm,
    Part::Attention,
    Part::Norm,
    Part::Activation,
    Part::Rope,
    Part::Copy,
    Part::Adapter,
];

impl Part {
    pub fn name(self) -> &'static str {
        match self {
            Part::Gemm => "gemm",
            Part::Attention => "attention",
            Part::Norm => "norm",
            Part::Activation => "activation",
            Part::Rope => "rope",
            Part::Copy => "copy",
            Part::Adapter => "adapter",
        }
    }
}

/// One part's sums.
#[derive(Clone, Copy, Debug, Default)]
pub struct Total {
    pub seconds: f64,
    pub calls: u64,
    /// Floating-point operations (GEMMs only).
    pub flops: f64,
}

impl Total {
    const ZERO: Total = Total {
        seconds: 0.0,
        calls: 0,
        flops: 0.0,
    };
}

/// The sums of every part, indexed by `Part as usize`.
pub type Totals = [Total; PARTS.len()];

static ON: AtomicBool = AtomicBool::new(false);
static TOTALS: Mutex<Totals> = Mutex::new([Total::ZERO; PARTS.len()]);

thread_local! {
    static MINE: Cell<bool> = const { Cell::new(false) };
    static DEPTH: Cell<u32> = const { Cell::new(0) };
}

/// Starts (or restarts from zero) counting the calling thread's kernels.
pub fn start() {
    MINE.with(|m| m.set(true));
    *TOTALS.lock().unwrap_or_else(|p| p.into_inner()) = [Total::ZERO; PARTS.len()];
    ON.store(true, Ordering::Relaxed);
}

/// The sums since [`start`], per part in the order of [`PARTS`].
pub fn totals() -> Totals {
    *TOTALS.lock().unwrap_or_else(|p| p.into_inner())
}

/// Times its scope as `part` (when counting, and outermost on the counting thread).
pub(crate) struct Span {
    part: Part,
    /// Set when this span raised the thread's depth.
    entered: bool,
    /// Set when it is the outermost one, and so counts.
    t0: Option<Instant>,
    flops: f64,
}

#[inline]
pub(crate) fn span(part: Part, flops: f64) -> Span {
    if !ON.load(Ordering::Relaxed) || !MINE.with(|m| m.get()) {
        return Span {
            part,
            entered: false,
            t0: None,
            flops,
        };
    }
    let depth = DEPTH.with(|d| d.replace(d.get() + 1));
    Span {
        part,
        entered: true,
        t0: (depth == 0).then(Instant::now),
        flops,
    }
}

impl Drop for Span {
    fn drop(&mut self) {
        if self.entered {
            DEPTH.with(|d| d.set(d.get() - 1));
        }
        if let Some(t0) = self.t0 {
            let s = t0.elapsed().as_secs_f64();
            let mut t = TOTALS.lock().unwrap_or_else(|p| p.into_inner());
            let t = &mut t[self.part as usize];
            t.seconds += s;
            t.calls += 1;
            t.flops += self.flops;
        }
    }
}
