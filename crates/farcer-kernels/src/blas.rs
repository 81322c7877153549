//! CBLAS libraries (OpenBLAS, Intel MKL) opened at run time, and the one choice per
//! process of which GEMM runs which product.
//!
//! Nothing links against a BLAS: the build is the same with or without one, and the
//! `gemm` crate stays the portable fallback. The farcer library reads `FARCER_GEMM` and
//! fixes the choice with [`set_choice`]. A library runs single-threaded and farcer
//! splits each product across its own rayon threads, so no second thread pool spins
//! beside rayon's between the products and the element-wise kernels.

use rayon::prelude::*;
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::sync::OnceLock;

type SgemmFn = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
);
type SetIntFn = unsafe extern "C" fn(c_int);
type PackSizeFn = unsafe extern "C" fn(c_int, c_int, c_int, c_int) -> usize;
type PackFn = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    f32,
    *const f32,
    c_int,
    *mut f32,
);
type ComputeFn = unsafe extern "C" fn(
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    c_int,
    *const f32,
    c_int,
    *const f32,
    c_int,
    f32,
    *mut f32,
    c_int,
);

const ROW_MAJOR: c_int = 101;
const NO_TRANS: c_int = 111;
const TRANS: c_int = 112;
const PACKED: c_int = 151;
const B_MATRIX: c_int = 162;

/// MKL's packed-operand GEMM (`cblas_sgemm_pack_get_size`, `cblas_sgemm_pack`,
/// `cblas_sgemm_compute`); other libraries have none.
#[derive(Clone, Copy)]
struct PackFns {
    size: PackSizeFn,
    pack: PackFn,
    compute: ComputeFn,
}

/// An opened CBLAS library; opened once and kept for the life of the process.
pub struct Cblas {
    /// What it was opened as (`openblas`, `mkl` or a path) and the file found.
    pub name: String,
    sgemm: SgemmFn,
    packs: Option<PackFns>,
}

impl std::fmt::Debug for Cblas {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.name)
    }
}

fn dl_error() -> String {
    // SAFETY: dlerror returns null or a NUL-terminated string owned by libc.
    unsafe {
        let e = libc::dlerror();
        if e.is_null() {
            "unknown error".into()
        } else {
            CStr::from_ptr(e).to_string_lossy().into_owned()
        }
    }
}

fn symbol(handle: *mut c_void, name: &str) -> Option<*mut c_void> {
    let c = CString::new(name).ok()?;
    // SAFETY: handle came from dlopen; the name is NUL-terminated.
    let p = unsafe { libc::dlsym(handle, c.as_ptr() as *const c_char) };
    (!p.is_null()).then_some(p)
}

/// The files tried for a library's short name, in order.
fn candidates(spec: &str) -> Vec<String> {
    let mut v: Vec<String> = match spec {
        "openblas" => vec!["libopenblas.so.0".into(), "libopenblas.so".into()],
        // Newest first, as in [`mkl_files`].
        "mkl" => ["libmkl_rt.so.3", "libmkl_rt.so.2", "libmkl_rt.so"]
            .map(String::from)
            .to_vec(),
        path => return vec![path.to_string()],
    };
    // MKL from its PyPI wheel lives in a virtual environment's lib/; name it with MKLROOT.
    if spec == "mkl" {
        if let Ok(root) = std::env::var("MKLROOT") {
            v.splice(0..0, mkl_files(&root));
        }
    }
    v
}

/// MKL's runtime library under an installation root (a virtual environment, or the
/// folder `scripts/setup` unpacks its wheel into), newest version first: MKL 2025 and
/// earlier ship `.so.2`, its 2026 wheels `.so.3`.
pub fn mkl_files(root: &str) -> [String; 2] {
    ["3", "2"].map(|n| format!("{root}/lib/libmkl_rt.so.{n}"))
}

/// Opens a CBLAS library by short name (`openblas`, `mkl`) or path, once per name for
/// the life of the process, and sets it to run on the calling thread only.
pub fn open(spec: &str) -> Result<&'static Cblas, String> {
    static OPENED: OnceLock<std::sync::Mutex<Vec<(String, &'static Cblas)>>> = OnceLock::new();
    let opened = OPENED.get_or_init(Default::default);
    let mut opened = opened.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((_, c)) = opened.iter().find(|(s, _)| s == spec) {
        return Ok(c);
    }
    let mut errors = Vec::new();
    for file in candidates(spec) {
        let Ok(c) = CString::new(file.clone()) else {
            errors.push(format!("{file}: not a valid file name"));
            continue;
        };
        // SAFETY: a NUL-terminated name; the handle is never closed (the library's
        // functions are used for the life of the process).
        let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_LOCAL) };
        if handle.is_null() {
            errors.push(dl_error());
            continue;
        }
        let Some(sgemm) = symbol(handle, "cblas_sgemm") else {
            errors.push(format!("{file}: has no cblas_sgemm"));
            continue;
        };
        // One thread per call: farcer splits products across its own threads.
        for (f, arg) in [
            ("openblas_set_num_threads", 1),
            ("MKL_Set_Threading_Layer", 1), // MKL_THREADING_SEQUENTIAL
            ("MKL_Set_Num_Threads", 1),
        ] {
            if let Some(p) = symbol(handle, f) {
                // SAFETY: these take one int; the return value (if any) is ignored.
                unsafe { std::mem::transmute::<*mut c_void, SetIntFn>(p)(arg) };
            }
        }
        let packs = match (
            symbol(handle, "cblas_sgemm_pack_get_size"),
            symbol(handle, "cblas_sgemm_pack"),
            symbol(handle, "cblas_sgemm_compute"),
        ) {
            // SAFETY: MKL's declarations of these three (LP64: MKL_INT is int).
            (Some(size), Some(pack), Some(compute)) => unsafe {
                Some(PackFns {
                    size: std::mem::transmute::<*mut c_void, PackSizeFn>(size),
                    pack: std::mem::transmute::<*mut c_void, PackFn>(pack),
                    compute: std::mem::transmute::<*mut c_void, ComputeFn>(compute),
                })
            },
            _ => None,
        };
        let lib: &'static Cblas = Box::leak(Box::new(Cblas {
            name: if file == spec {
                spec.to_string()
            } else {
                format!("{spec} ({file})")
            },
            // SAFETY: cblas_sgemm has this signature in every CBLAS.
            sgemm: unsafe { std::mem::transmute::<*mut c_void, SgemmFn>(sgemm) },
            packs,
        }));
        opened.push((spec.to_string(), lib));
        return Ok(lib);
    }
    Err(format!(
        "cannot open the BLAS library {spec:?}: {}",
        errors.join("; ")
    ))
}

/// Fresh anonymous pages for MKL's packed buffer, never read or written from Rust: the
/// kernel backs a page only once MKL writes it, and huge pages are turned off so an
/// untouched part stays unbacked (the heap could hand back pages that are already
/// resident).
struct Pages {
    ptr: *mut c_void,
    len: usize,
}

// SAFETY: the mapping is owned by one `Pages` and only read after packing.
unsafe impl Send for Pages {}
unsafe impl Sync for Pages {}

impl Pages {
    fn new(len: usize) -> Option<Self> {
        // SAFETY: an anonymous private mapping of `len > 0` bytes; checked for failure.
        unsafe {
            let ptr = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            );
            if ptr == libc::MAP_FAILED {
                return None;
            }
            libc::madvise(ptr, len, libc::MADV_NOHUGEPAGE);
            Some(Pages { ptr, len })
        }
    }
}

impl Drop for Pages {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr, self.len) };
    }
}

/// A frozen weight `(k, n)` packed once into the library's own layout for the right
/// operand of its products (MKL's `cblas_sgemm_pack`): each product then skips
/// repacking it, 5-8% faster on the ViTs' shapes (BENCHMARKS.md). MKL asks for a buffer
/// several times the matrix but writes about 1.2x the matrix's bytes; the rest of the
/// fresh pages it gets is never touched, so it does not become resident.
pub struct PackedB {
    lib: &'static Cblas,
    fns: PackFns,
    buf: Pages,
    k: usize,
    n: usize,
}

impl std::fmt::Debug for PackedB {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PackedB({} x {}, {})", self.k, self.n, self.lib.name)
    }
}

impl PackedB {
    /// Packs `b` `(k, n)` on `lib`: `b` row-major, or when `transposed` its transpose
    /// `(n, k)` row-major (a linear layer's `(out, in)` weight, packed as `w^T` with no
    /// copy). `None` when the library cannot pack, a size passes `int`, or the buffer
    /// cannot be mapped.
    pub fn new(
        lib: &'static Cblas,
        b: &[f32],
        transposed: bool,
        k: usize,
        n: usize,
    ) -> Option<Self> {
        let fns = lib.packs?;
        assert!(b.len() >= k * n, "packed operand shorter than ({k}, {n})");
        if k == 0 || n == 0 || [k, n].iter().any(|&v| v > c_int::MAX as usize) {
            return None;
        }
        // The row count is only a hint for the layout (any count may use it after).
        // SAFETY: MKL's documented signatures; dest holds the size it asked for.
        unsafe {
            let bytes = (fns.size)(B_MATRIX, 1024, n as c_int, k as c_int);
            if bytes == 0 {
                return None;
            }
            let buf = Pages::new(bytes)?;
            let (trans, ld) = if transposed {
                (TRANS, k)
            } else {
                (NO_TRANS, n)
            };
            (fns.pack)(
                ROW_MAJOR,
                B_MATRIX,
                trans,
                1024,
                n as c_int,
                k as c_int,
                1.0,
                b.as_ptr(),
                ld as c_int,
                buf.ptr as *mut f32,
            );
            Some(PackedB {
                lib,
                fns,
                buf,
                k,
                n,
            })
        }
    }

    /// `(k, n)`.
    pub fn shape(&self) -> (usize, usize) {
        (self.k, self.n)
    }

    /// `dst (+)= a @ b` for `m` rows of `a` (row stride `a_rs`), split over `threads`
    /// threads by rows (a packed operand cannot be split by columns).
    ///
    /// # Safety
    /// `a` holds `m` rows of `k` values at stride `a_rs >= k`; `dst` `m` rows of `n` at
    /// stride `dst_rs >= n`; all sizes fit `int`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn gemm(
        &self,
        m: usize,
        a: *const f32,
        a_rs: usize,
        dst: *mut f32,
        dst_rs: usize,
        acc: bool,
        threads: usize,
    ) {
        let (k, n) = (self.k, self.n);
        let beta = if acc { 1.0 } else { 0.0 };
        let call = |m: usize, a: *const f32, c: *mut f32| {
            (self.fns.compute)(
                ROW_MAJOR,
                NO_TRANS,
                PACKED,
                m as c_int,
                n as c_int,
                k as c_int,
                a,
                a_rs as c_int,
                self.buf.ptr as *const f32,
                n as c_int,
                beta,
                c,
                dst_rs as c_int,
            )
        };
        let (a, dst) = (a as usize, dst as usize);
        in_blocks(m, 8, threads, |lo, hi| {
            let (a, dst) = (a as *const f32, dst as *mut f32);
            call(hi - lo, a.add(lo * a_rs), dst.add(lo * dst_rs));
        });
    }
}

/// Runs `f(lo, hi)` on one block of `0..len` per thread (at most `threads` blocks, each
/// a multiple of `align` long but the last), in parallel; on the calling thread when
/// there is one block.
fn in_blocks(len: usize, align: usize, threads: usize, f: impl Fn(usize, usize) + Sync) {
    let parts = threads.min(len.div_ceil(align)).max(1);
    if parts == 1 {
        f(0, len);
        return;
    }
    let step = len.div_ceil(parts).div_ceil(align) * align;
    (0..parts).into_par_iter().for_each(|p| {
        let (lo, hi) = (p * step, ((p + 1) * step).min(len));
        if lo < hi {
            f(lo, hi);
        }
    });
}

/// Which GEMM runs a product.
#[derive(Clone, Copy, Debug)]
pub enum Engine {
    /// The `gemm` crate.
    Crate,
    /// A CBLAS library, split across farcer's threads.
    Blas(&'static Cblas),
}

impl Engine {
    pub fn name(&self) -> String {
        match self {
            Engine::Crate => "gemm crate".into(),
            Engine::Blas(c) => c.name.clone(),
        }
    }
}

/// How CBLAS says a product with these strides: (trans a, lda, trans b, ldb), or `None`
/// when it cannot (neither stride of an operand is 1, or a size passes `int`).
#[allow(clippy::too_many_arguments)]
pub fn cblas_layout(
    m: usize,
    n: usize,
    k: usize,
    dst_rs: usize,
    a_rs: usize,
    a_cs: usize,
    b_rs: usize,
    b_cs: usize,
) -> Option<(c_int, usize, c_int, usize)> {
    // Row-major: a (m, k) is NoTrans with lda = a_rs when its columns are contiguous, or
    // Trans of a (k, m) matrix with lda = a_cs when its rows are.
    let side = |rs: usize, cs: usize, rows: usize, cols: usize| {
        if cs == 1 && rs >= cols.max(1) {
            Some((NO_TRANS, rs))
        } else if rs == 1 && cs >= rows.max(1) {
            Some((TRANS, cs))
        } else {
            None
        }
    };
    let (ta, lda) = side(a_rs, a_cs, m, k)?;
    let (tb, ldb) = side(b_rs, b_cs, k, n)?;
    if dst_rs < n
        || [m, n, k, lda, ldb, dst_rs]
            .iter()
            .any(|&v| v > c_int::MAX as usize)
    {
        return None;
    }
    Some((ta, lda, tb, ldb))
}

/// Runs `dst (+)= a @ b` on a CBLAS library split over `threads` threads; returns false
/// (having done nothing) when the strides cannot be said in CBLAS (neither stride 1).
#[allow(clippy::too_many_arguments)]
pub(crate) unsafe fn blas_gemm(
    lib: &Cblas,
    m: usize,
    n: usize,
    k: usize,
    dst: *mut f32,
    dst_rs: usize,
    acc: bool,
    a: *const f32,
    a_rs: usize,
    a_cs: usize,
    b: *const f32,
    b_rs: usize,
    b_cs: usize,
    threads: usize,
) -> bool {
    let Some((ta, lda, tb, ldb)) = cblas_layout(m, n, k, dst_rs, a_rs, a_cs, b_rs, b_cs) else {
        return false;
    };
    let beta = if acc { 1.0 } else { 0.0 };
    let call = |m: usize, n: usize, a: *const f32, b: *const f32, c: *mut f32| {
        (lib.sgemm)(
            ROW_MAJOR,
            ta,
            tb,
            m as c_int,
            n as c_int,
            k as c_int,
            1.0,
            a,
            lda as c_int,
            b,
            ldb as c_int,
            beta,
            c,
            dst_rs as c_int,
        )
    };
    // Split the longer side into one block per thread (rows in multiples of 8, columns
    // of 16, so no block splits a vector).
    let (len, align) = if m >= n { (m, 8) } else { (n, 16) };
    let (a, b, dst) = (a as usize, b as usize, dst as usize);
    in_blocks(len, align, threads, |lo, hi| {
        let (a, b, dst) = (a as *const f32, b as *const f32, dst as *mut f32);
        if m >= n {
            // Rows lo..hi of a and of dst.
            call(hi - lo, n, a.add(lo * a_rs), b, dst.add(lo * dst_rs));
        } else {
            // Columns lo..hi of b and of dst.
            call(m, hi - lo, a, b.add(lo * b_cs), dst.add(lo));
        }
    });
    true
}

/// Product classes: layout (a, b each as stored: NN, NT, TN, TT) x rows (up to 256, up
/// to 1024, more) x inner size (up to 1024, more). Each class goes to one engine.
const M_EDGES: [usize; 2] = [256, 1024];
const K_EDGE: usize = 1024;
/// Per class: 0 for the crate, `i + 1` for the choice's library `i`.
type Table = [[[u8; 2]; 3]; 4];

fn class(m: usize, k: usize, a_t: bool, b_t: bool) -> (usize, usize, usize) {
    let layout = (a_t as usize) << 1 | b_t as usize;
    let mb = M_EDGES.iter().filter(|&&e| m > e).count();
    (layout, mb, (k > K_EDGE) as usize)
}

const LAYOUTS: [&str; 4] = ["NN", "NT", "TN", "TT"];

/// Which engine runs each class of top-level product, fixed once per process, and which
/// way a linear layer's forward reads its weight.
#[derive(Clone, Debug)]
pub struct Choice {
    libs: Vec<&'static Cblas>,
    table: Table,
    /// Per (rows, inner size) class: the forward reads the `(out, in)` weight as stored
    /// (NT) instead of its `(in, out)` copy (NN). MKL on an Intel Xeon runs NT twice as
    /// fast as NN at 128 rows; the crate wants the copy.
    forward_nt: [[bool; 2]; 3],
    /// Products inside parallel tasks (attention's blocks, single-threaded) run on the
    /// library too; the calibration times whole products only, so it keeps them on the
    /// crate.
    in_tasks: bool,
}

impl Choice {
    /// The `gemm` crate for everything (the default).
    pub fn crate_only() -> Self {
        Choice {
            libs: Vec::new(),
            table: Default::default(),
            forward_nt: Default::default(),
            in_tasks: false,
        }
    }

    /// `lib` for every product it can express, attention's included (forwards read the
    /// transposed copies).
    pub fn everywhere(lib: &'static Cblas) -> Self {
        Choice {
            libs: vec![lib],
            table: [[[1; 2]; 3]; 4],
            forward_nt: Default::default(),
            in_tasks: true,
        }
    }

    /// The first library that some class uses, if any.
    pub fn lib(&self) -> Option<&'static Cblas> {
        let used = |i: usize| {
            self.table
                .iter()
                .flatten()
                .flatten()
                .any(|&v| v as usize == i + 1)
        };
        (0..self.libs.len())
            .find(|&i| used(i))
            .map(|i| self.libs[i])
    }

    /// Times each library in `libs` against the crate on three products per class (rows
    /// 128, 512 and 2048; inner size 576 and 2048; 576, 960 and 3072 columns, their
    /// times summed; layouts NN, NT and TN), all engines and layouts of a class taking
    /// turns `reps` times (the order reversed every other turn). A class goes to the
    /// library with the lowest median of per-turn time ratios (library / crate) when that
    /// median is below 0.9: a tie, or a gain within the noise of a short calibration,
    /// stays on the portable crate. The forward reads weights as stored when NT on its
    /// engine beats NN on its own by the same margin. Returns the choice and the medians,
    /// named.
    pub fn calibrate(libs: &[&'static Cblas], reps: usize) -> (Self, Vec<(String, f64)>) {
        let reps = reps.max(1);
        let engines: Vec<Engine> = std::iter::once(Engine::Crate)
            .chain(libs.iter().map(|&l| Engine::Blas(l)))
            .collect();
        let mut c = Choice {
            libs: libs.to_vec(),
            table: Default::default(),
            forward_nt: Default::default(),
            in_tasks: false,
        };
        let median = |mut r: Vec<f64>| {
            r.sort_by(f64::total_cmp);
            r[r.len() / 2]
        };
        let mut ratios = Vec::new();
        for m in [128, 512, 2048] {
            for k in [576, 2048] {
                // secs[turn][layout][engine], summed over the columns of typical
                // products (a power of two alone misleads: with a row stride of 4 KiB,
                // MKL's NN runs at two thirds of its speed at 960 or 1536 columns).
                const COLUMNS: [usize; 3] = [576, 960, 3072];
                let mut secs = vec![vec![vec![0.0; engines.len()]; 3]; reps];
                for (turn, s) in secs.iter_mut().enumerate() {
                    let mut order: Vec<(usize, usize)> = (0..3)
                        .flat_map(|l| (0..engines.len()).map(move |e| (l, e)))
                        .collect();
                    if turn % 2 == 1 {
                        order.reverse();
                    }
                    for (l, e) in order {
                        let (a_t, b_t) = (l & 2 != 0, l & 1 != 0);
                        s[l][e] = COLUMNS
                            .iter()
                            .map(|&n| crate::gemm::time_gemm(engines[e], m, n, k, a_t, b_t, 1))
                            .sum();
                    }
                }
                let (_, mb, kb) = class(m, k, false, false);
                let mut best = [0usize; 3];
                for (l, name) in LAYOUTS.iter().enumerate().take(3) {
                    let mut pick = (0, 0.9);
                    for (e, lib) in libs.iter().enumerate().map(|(i, l)| (i + 1, l)) {
                        let r = median(secs.iter().map(|s| s[l][e] / s[l][0]).collect());
                        ratios.push((format!("{name} m={m} k={k} {}/crate", lib.name), r));
                        if r < pick.1 {
                            pick = (e, r);
                        }
                    }
                    best[l] = pick.0;
                    c.table[l][mb][kb] = pick.0 as u8;
                }
                let r = median(secs.iter().map(|s| s[1][best[1]] / s[0][best[0]]).collect());
                ratios.push((format!("forward m={m} k={k} NT/NN"), r));
                c.forward_nt[mb][kb] = r < 0.9;
            }
        }
        (c, ratios)
    }

    /// The choice as text (for a cache file): one digit per class (0 the crate, `i + 1`
    /// library `i`), a space, then one `0`/`1` per forward class.
    pub fn table_text(&self) -> String {
        let digits: String = self
            .table
            .iter()
            .flatten()
            .flatten()
            .map(|&v| char::from(b'0' + v))
            .collect();
        let fwd: String = self
            .forward_nt
            .iter()
            .flatten()
            .map(|&u| if u { '1' } else { '0' })
            .collect();
        format!("{digits} {fwd}")
    }

    /// The inverse of [`Choice::table_text`] for these libraries, in the order the
    /// calibration took them; `None` if the text is not such a table.
    pub fn from_table_text(libs: &[&'static Cblas], text: &str) -> Option<Self> {
        let (digits, fwd) = text.trim().split_once(' ')?;
        let digits: Vec<u8> = digits
            .bytes()
            .map(|c| c.is_ascii_digit().then(|| c - b'0'))
            .collect::<Option<_>>()?;
        let fwd: Vec<bool> = fwd
            .chars()
            .map(|c| match c {
                '0' => Some(false),
                '1' => Some(true),
                _ => None,
            })
            .collect::<Option<_>>()?;
        let classes = LAYOUTS.len() * (M_EDGES.len() + 1) * 2;
        if digits.len() != classes
            || digits.iter().any(|&d| d as usize > libs.len())
            || fwd.len() != (M_EDGES.len() + 1) * 2
        {
            return None;
        }
        let mut c = Choice {
            libs: libs.to_vec(),
            table: Default::default(),
            forward_nt: Default::default(),
            in_tasks: false,
        };
        // The order `table_text` wrote them in.
        for (slot, d) in c.table.iter_mut().flatten().flatten().zip(digits) {
            *slot = d;
        }
        for (slot, u) in c.forward_nt.iter_mut().flatten().zip(fwd) {
            *slot = u;
        }
        Some(c)
    }

    /// Which classes run on which library, and where the forward reads weights as
    /// stored, in words.
    pub fn describe(&self) -> String {
        let [m0, m1] = M_EDGES;
        let rows = [
            format!("m<={m0}"),
            format!("{m0}<m<={m1}"),
            format!("m>{m1}"),
        ];
        let inner = [format!("k<={K_EDGE}"), format!("k>{K_EDGE}")];
        let mut parts = Vec::new();
        // Whether some class is left to the crate.
        let mut rest = true;
        for (i, lib) in self.libs.iter().enumerate() {
            let mut on = Vec::new();
            for (l, name) in LAYOUTS.iter().enumerate() {
                for (mb, rows) in rows.iter().enumerate() {
                    for (kb, inner) in inner.iter().enumerate() {
                        if self.table[l][mb][kb] as usize == i + 1 {
                            on.push(format!("{name} {rows} {inner}"));
                        }
                    }
                }
            }
            if on.len() == LAYOUTS.len() * rows.len() * inner.len() {
                parts.push(format!("{} for every product", lib.name));
                rest = false;
            } else if !on.is_empty() {
                parts.push(format!("{} for {}", lib.name, on.join(", ")));
            }
        }
        if parts.is_empty() {
            parts.push("gemm crate for every product".into());
        } else if rest {
            parts.push("gemm crate for the rest".into());
        }
        let mut fwd = Vec::new();
        for (mb, rows) in rows.iter().enumerate() {
            for (kb, inner) in inner.iter().enumerate() {
                if self.forward_nt[mb][kb] {
                    fwd.push(format!("{rows} {inner}"));
                }
            }
        }
        if !fwd.is_empty() {
            parts.push(format!(
                "forwards read weights as stored for {}",
                fwd.join(", ")
            ));
        }
        if self.in_tasks {
            parts.push(
                "attention's products on the library too (but unmasked heads of 64 on \
                 AVX-512, which run their own tiles)"
                    .into(),
            );
        }
        parts.join("; ")
    }

    fn engine(&self, m: usize, k: usize, a_t: bool, b_t: bool) -> Engine {
        let (l, mb, kb) = class(m, k, a_t, b_t);
        match self.table[l][mb][kb] as usize {
            0 => Engine::Crate,
            i => Engine::Blas(self.libs[i - 1]),
        }
    }
}

static CHOICE: OnceLock<Choice> = OnceLock::new();

/// Fixes the process's choice; false if one was already fixed (by an earlier call, or
/// by the first product, which fixes [`Choice::crate_only`]).
pub fn set_choice(c: Choice) -> bool {
    CHOICE.set(c).is_ok()
}

/// The process's choice (the crate for everything unless [`set_choice`] said otherwise).
pub fn choice() -> &'static Choice {
    CHOICE.get_or_init(Choice::crate_only)
}

/// The library that frozen weights are packed for: the one the process's choice sends
/// every plain (NN) product to, when it can pack (MKL); `None` otherwise.
///
/// It reads the choice without fixing it: loading a model before the program chooses
/// must not lock in the default.
pub fn packing() -> Option<&'static Cblas> {
    let c = CHOICE.get()?;
    let i = c.table[0][0][0] as usize;
    let all_nn = i > 0 && c.table[0].iter().flatten().all(|&v| v as usize == i);
    let lib = c.libs[i.checked_sub(1)?];
    (all_nn && lib.packs.is_some()).then_some(lib)
}

/// The engine for a top-level product of this shape under the process's choice.
pub(crate) fn engine_for(m: usize, k: usize, a_t: bool, b_t: bool) -> Engine {
    choice().engine(m, k, a_t, b_t)
}

/// The engine for a product inside a parallel task (single-threaded).
pub(crate) fn engine_in_task(m: usize, k: usize, a_t: bool, b_t: bool) -> Engine {
    let c = choice();
    if c.in_tasks {
        c.engine(m, k, a_t, b_t)
    } else {
        Engine::Crate
    }
}

/// Whether a linear layer's forward over `m` rows with inner size `k` should read its
/// weight as stored, `(out, in)`, rather than its transposed copy.
pub fn forward_reads_original(m: usize, k: usize) -> bool {
    let (_, mb, kb) = class(m, k, false, false);
    choice().forward_nt[mb][kb]
}

/// The threads a top-level product is split over (rayon's pool).
pub fn threads() -> usize {
    rayon::current_num_threads()
}
