//! Shared plumbing: uninitialised buffers, a pointer rayon tasks share, the thread
//! count for GEMMs, and the macro that compiles a loop for each x86 vector width.

/// A raw pointer that rayon tasks may share; each task writes a disjoint region.
#[derive(Clone, Copy)]
pub(crate) struct SendPtr(pub(crate) *mut f32);
unsafe impl Send for SendPtr {}
unsafe impl Sync for SendPtr {}

impl SendPtr {
    /// Through a method, so closures capture the whole (Send) wrapper.
    pub(crate) fn get(self) -> *mut f32 {
        self.0
    }
}

/// An f32 vector the caller fully overwrites (no zero-fill pass).
#[allow(clippy::uninit_vec)]
pub(crate) fn uninit(n: usize) -> Vec<f32> {
    let mut v = Vec::with_capacity(n);
    // SAFETY: f32 has no invalid bit patterns and every caller writes all `n` values
    // before reading any.
    unsafe { v.set_len(n) };
    v
}

pub(crate) fn parallelism() -> gemm::Parallelism {
    match rayon::current_num_threads() {
        0 | 1 => gemm::Parallelism::None,
        n => gemm::Parallelism::Rayon(n),
    }
}

/// Whether the baseline build may use fused multiply-adds: always on aarch64, and on
/// x86-64 only when the whole crate is compiled for FMA (elsewhere `mul_add` would be a
/// libm call per value).
pub(crate) const BASE_FMA: bool = cfg!(target_arch = "aarch64") || cfg!(target_feature = "fma");

/// Compiles `$body` (loops over slices; whatever it calls must be `#[inline(always)]` to
/// be compiled with it) for AVX-512, AVX2+FMA and the baseline, and runs the best one
/// this CPU has. The body sees a const `FMA`: whether its build has fused multiply-adds
/// (see [`crate::math::fmadd`]).
macro_rules! multiversion {
    ($(#[$attr:meta])* $vis:vis fn $name:ident($($arg:ident: $ty:ty),*) $(-> $ret:ty)? $body:block) => {
        $(#[$attr])*
        $vis fn $name($($arg: $ty),*) $(-> $ret)? {
            #[inline(always)]
            #[allow(unused)]
            fn imp<const FMA: bool>($($arg: $ty),*) $(-> $ret)? $body
            #[cfg(target_arch = "x86_64")]
            {
                #[target_feature(enable = "avx512f,avx512bw,avx512dq,avx2,fma")]
                unsafe fn v4($($arg: $ty),*) $(-> $ret)? { imp::<true>($($arg),*) }
                #[target_feature(enable = "avx2,fma")]
                unsafe fn v3($($arg: $ty),*) $(-> $ret)? { imp::<true>($($arg),*) }
                if std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("avx512bw")
                    && std::arch::is_x86_feature_detected!("avx512dq")
                {
                    return unsafe { v4($($arg),*) };
                }
                if std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
                {
                    return unsafe { v3($($arg),*) };
                }
            }
            imp::<{ $crate::util::BASE_FMA }>($($arg),*)
        }
    };
}
