//! Which CPU kernels the packed path runs, and the f32 matrix product on
//! each of them.
//!
//! A CPU worker's numbers come from two families of kernels: the block
//! kernels of [`crate::packed`] (integer dot products straight from GGUF
//! blocks) and the `gemm` crate's f32 microkernels (prefill bands and host
//! attention). Left to themselves both pick the widest instructions the CPU
//! has, so the same binary computes in a different order on an AVX-512
//! Xeon, an AVX2-only EPYC and a CPU with neither. [`CpuKernels`] names
//! each set so a test can run every one the CPU can, and an operator can
//! pin one: `SILK_CPU_KERNELS=auto|avx512|avx2|portable` (auto, the
//! default, takes the widest the CPU runs; asking for one the CPU lacks is
//! an error that names the missing features).
//!
//! | set | block kernels | f32 products (`gemm`) |
//! | --- | --- | --- |
//! | `avx512` | AVX2 + FMA + F16C | AVX-512F microkernels |
//! | `avx2` | AVX2 + FMA + F16C | AVX2 + FMA microkernels |
//! | `portable` | plain Rust | scalar microkernels |
//!
//! The block kernels have no AVX-512 variant yet, so `avx512` differs from
//! `avx2` only in the f32 products. Burn's own CPU operations (norms,
//! rotary embedding, the dense layout's products) choose their SIMD width
//! themselves and are not covered by this setting.

use std::fmt;
use std::str::FromStr;

use crate::error::{InferenceError, Result};

/// The environment variable that pins the kernel set.
pub const KERNELS_ENV: &str = "SILK_CPU_KERNELS";

/// A set of CPU kernels (see the module documentation).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CpuKernels {
    /// AVX-512F f32 products; AVX2 block kernels.
    Avx512,
    /// AVX2, FMA and F16C.
    Avx2,
    /// Plain Rust and scalar f32 products: any CPU.
    Portable,
}

impl CpuKernels {
    /// Every set, widest first.
    pub const ALL: [Self; 3] = [Self::Avx512, Self::Avx2, Self::Portable];

    /// The name `SILK_CPU_KERNELS` takes.
    pub const fn name(self) -> &'static str {
        match self {
            Self::Avx512 => "avx512",
            Self::Avx2 => "avx2",
            Self::Portable => "portable",
        }
    }

    /// The CPU features this set needs that this CPU lacks (empty when it
    /// can run here).
    pub fn missing_features(self) -> Vec<&'static str> {
        let needs: &[&'static str] = match self {
            Self::Avx512 => &["avx2", "fma", "f16c", "avx512f"],
            Self::Avx2 => &["avx2", "fma", "f16c"],
            Self::Portable => &[],
        };
        needs.iter().copied().filter(|f| !has_feature(f)).collect()
    }

    /// Whether this CPU can run the set.
    pub fn is_supported(self) -> bool {
        self.missing_features().is_empty()
    }

    /// The sets this CPU can run, widest first (always ends with
    /// `Portable`).
    pub fn available() -> Vec<Self> {
        Self::ALL.into_iter().filter(|k| k.is_supported()).collect()
    }

    /// The widest set this CPU runs.
    pub fn best() -> Self {
        Self::available().first().copied().unwrap_or(Self::Portable)
    }

    /// `self`, or an error naming what this CPU lacks for it.
    pub fn require(self) -> Result<Self> {
        let missing = self.missing_features();
        if missing.is_empty() {
            return Ok(self);
        }
        let available: Vec<&str> = Self::available().iter().map(|k| k.name()).collect();
        Err(InferenceError::CpuKernels(format!(
            "`{}` needs {} and this CPU lacks {}; it can run {} (or `auto`)",
            self.name(),
            match self {
                Self::Avx512 => "avx512f, avx2, fma and f16c",
                Self::Avx2 => "avx2, fma and f16c",
                Self::Portable => "nothing",
            },
            missing.join(", "),
            available.join(", "),
        )))
    }

    /// The set `SILK_CPU_KERNELS` asks for (the widest available when it is
    /// unset, empty or `auto`).
    pub fn from_env() -> Result<Self> {
        match std::env::var(KERNELS_ENV) {
            Ok(value) => KernelChoice::from_str(&value)
                .map_err(|e| InferenceError::CpuKernels(format!("{KERNELS_ENV}: {e}")))?
                .resolve()
                .map_err(|e| match e {
                    InferenceError::CpuKernels(m) => {
                        InferenceError::CpuKernels(format!("{KERNELS_ENV}={value}: {m}"))
                    }
                    other => other,
                }),
            Err(std::env::VarError::NotPresent) => Ok(Self::best()),
            Err(std::env::VarError::NotUnicode(_)) => Err(InferenceError::CpuKernels(format!(
                "{KERNELS_ENV} is not UTF-8: use auto, avx512, avx2 or portable"
            ))),
        }
    }
}

impl fmt::Display for CpuKernels {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// What an operator asks for: a set, or the widest this CPU runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelChoice {
    /// The widest set the CPU runs.
    Auto,
    /// This set, or an error if the CPU cannot run it.
    Set(CpuKernels),
}

impl KernelChoice {
    /// The set to run on this CPU.
    pub fn resolve(self) -> Result<CpuKernels> {
        match self {
            Self::Auto => Ok(CpuKernels::best()),
            Self::Set(k) => k.require(),
        }
    }
}

impl FromStr for KernelChoice {
    type Err = InferenceError;

    fn from_str(s: &str) -> Result<Self> {
        let s = s.trim();
        if s.is_empty() || s.eq_ignore_ascii_case("auto") {
            return Ok(Self::Auto);
        }
        CpuKernels::ALL
            .into_iter()
            .find(|k| s.eq_ignore_ascii_case(k.name()))
            .map(Self::Set)
            .ok_or_else(|| {
                InferenceError::CpuKernels(format!(
                    "`{s}` is not a kernel set: use auto, avx512, avx2 or portable"
                ))
            })
    }
}

#[cfg(target_arch = "x86_64")]
fn has_feature(name: &str) -> bool {
    match name {
        "avx2" => std::is_x86_feature_detected!("avx2"),
        "fma" => std::is_x86_feature_detected!("fma"),
        "f16c" => std::is_x86_feature_detected!("f16c"),
        "avx512f" => std::is_x86_feature_detected!("avx512f"),
        _ => false,
    }
}

#[cfg(not(target_arch = "x86_64"))]
fn has_feature(_name: &str) -> bool {
    false
}

/// `dst = scale · lhs · rhs` (overwriting `dst`), single-threaded, with the
/// f32 microkernels of `kernels`. Strides are in elements; `m × k` times
/// `k × n`.
///
/// # Safety
/// Every `(row, column)` of each operand, at its strides, lies inside its
/// allocation; `dst` overlaps neither input; `kernels.is_supported()`.
#[allow(unsafe_code, clippy::too_many_arguments)]
pub(crate) unsafe fn gemm_f32(
    kernels: CpuKernels,
    (m, n, k): (usize, usize, usize),
    (dst, dst_rs, dst_cs): (*mut f32, isize, isize),
    (lhs, lhs_rs, lhs_cs): (*const f32, isize, isize),
    (rhs, rhs_rs, rhs_cs): (*const f32, isize, isize),
    scale: f32,
) {
    // gemm-common's entry point with one of gemm-f32's microkernel tables,
    // as `gemm::gemm` does after picking a table from the CPU's features.
    macro_rules! with {
        ($simd:ty, $table:path, $width:expr) => {{
            use $table as t;
            let simd = <$simd as gemm_common::simd::MixedSimd<f32, f32, f32, f32>>::try_new()
                .expect("the caller checked that the CPU supports this kernel set");
            // SAFETY: the caller's contract is gemm's.
            unsafe {
                gemm_common::gemm::gemm_basic_generic::<
                    $simd,
                    f32,
                    { $width },
                    { t::MR_DIV_N * $width },
                    { t::NR },
                    { t::MR_DIV_N },
                    { t::H_M },
                    { t::H_N },
                >(
                    simd,
                    m,
                    n,
                    k,
                    dst,
                    dst_cs,
                    dst_rs,
                    false,
                    lhs,
                    lhs_cs,
                    lhs_rs,
                    rhs,
                    rhs_cs,
                    rhs_rs,
                    // gemm's alpha scales the old dst (not read), beta the product.
                    0.0,
                    scale,
                    false,
                    false,
                    false,
                    |a, b, c| a * b + c,
                    &t::UKR,
                    &t::H_UKR,
                    false,
                    gemm_common::Parallelism::None,
                )
            }
        }};
    }
    match kernels {
        #[cfg(target_arch = "x86_64")]
        CpuKernels::Avx512 => with!(
            gemm_common::simd::V4,
            gemm_f32::microkernel::avx512f::f32,
            16
        ),
        #[cfg(target_arch = "x86_64")]
        CpuKernels::Avx2 => with!(gemm_common::simd::V3, gemm_f32::microkernel::fma::f32, 8),
        _ => with!(
            gemm_common::simd::Scalar,
            gemm_f32::microkernel::scalar::f32,
            1
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn choices_parse_and_unknown_ones_are_refused_by_name() {
        assert_eq!(
            "auto".parse::<KernelChoice>().ok(),
            Some(KernelChoice::Auto)
        );
        assert_eq!("".parse::<KernelChoice>().ok(), Some(KernelChoice::Auto));
        assert_eq!(
            " AVX2 ".parse::<KernelChoice>().ok(),
            Some(KernelChoice::Set(CpuKernels::Avx2))
        );
        let err = "sse9".parse::<KernelChoice>().expect_err("unknown");
        assert!(
            err.to_string().contains("`sse9` is not a kernel set"),
            "{err}"
        );
    }

    #[test]
    fn every_set_either_runs_here_or_names_what_is_missing() {
        assert!(CpuKernels::Portable.is_supported());
        assert_eq!(CpuKernels::available().last(), Some(&CpuKernels::Portable));
        assert_eq!(
            KernelChoice::Auto.resolve().ok(),
            CpuKernels::available().first().copied()
        );
        for k in CpuKernels::ALL {
            match k.require() {
                Ok(got) => assert_eq!(got, k),
                Err(e) => {
                    let missing = k.missing_features();
                    assert!(!missing.is_empty());
                    let msg = e.to_string();
                    assert!(
                        msg.contains(missing[0]) && msg.contains("portable"),
                        "{msg}"
                    );
                }
            }
        }
    }

    /// Each set's f32 product against a plain f64 one, with strided
    /// (transposed) operands as the packed path uses them.
    #[test]
    fn gemm_on_every_available_set_matches_a_plain_product() {
        let (m, n, k) = (37, 19, 70);
        let lhs: Vec<f32> = (0..m * k)
            .map(|i| ((i * 7 % 23) as f32 - 11.0) / 9.0)
            .collect();
        // rhs stored transposed: element (r, c) at c * k + r.
        let rhs: Vec<f32> = (0..k * n)
            .map(|i| ((i * 5 % 17) as f32 - 8.0) / 7.0)
            .collect();
        let mut want = vec![0f32; m * n];
        for i in 0..m {
            for j in 0..n {
                let s: f64 = (0..k)
                    .map(|r| f64::from(lhs[i * k + r]) * f64::from(rhs[j * k + r]))
                    .sum();
                want[i * n + j] = (0.5 * s) as f32;
            }
        }
        for kernels in CpuKernels::available() {
            let mut dst = vec![f32::NAN; m * n];
            // SAFETY: the strides describe the three vectors exactly, dst is
            // its own allocation, and `available` checked the CPU.
            #[allow(unsafe_code)]
            unsafe {
                gemm_f32(
                    kernels,
                    (m, n, k),
                    (dst.as_mut_ptr(), n as isize, 1),
                    (lhs.as_ptr(), k as isize, 1),
                    (rhs.as_ptr(), 1, k as isize),
                    0.5,
                );
            }
            for (g, w) in dst.iter().zip(&want) {
                assert!(
                    (g - w).abs() <= 1e-4 * (1.0 + w.abs()),
                    "{kernels}: {g} vs {w}"
                );
            }
        }
    }
}
