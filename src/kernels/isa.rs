//! The instruction-set paths of the kernels: which ones this CPU has (detected once), the
//! fastest of them, and the process-wide override ([`force_isa`], `CANDLE_QUANT_ISA`).

use candle_core::{bail, Result};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

/// The path [`force_isa`] chose: 0 for none, else 1 + its index in [`Isa::ALL`].
static FORCED: AtomicU8 = AtomicU8::new(0);

/// Makes every int8 layer of the process run on `isa` (`None`: back to the fastest path the CPU
/// has) — to compare paths, or to step around one. Fails, naming the CPU's paths, when this CPU
/// cannot run `isa`. The environment variable `CANDLE_QUANT_ISA` does the same from outside.
pub fn force_isa(isa: Option<Isa>) -> Result<()> {
    let code = match isa {
        None => 0,
        Some(isa) if isa.is_supported() => 1 + Isa::ALL.iter().position(|&i| i == isa).unwrap_or(0) as u8,
        Some(isa) => bail!("kernel path {isa:?} is not available on this CPU, which has {:?}", Isa::detected()),
    };
    FORCED.store(code, Ordering::Relaxed);
    Ok(())
}

/// An instruction-set path for the int8 kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[non_exhaustive]
pub enum Isa {
    /// Portable scalar code.
    Reference,
    /// x86_64 AVX2 + FMA: int8 tiles on `vpmaddubsw`.
    Avx2,
    /// The AVX-VNNI int8 tiles with `vpdpbusd` done exactly by AVX2 arithmetic: slower than
    /// `Avx2` and never picked; it runs the VNNI tiles' code on CPUs without VNNI (tests).
    VnniOnAvx2,
    /// AVX2 + FMA, int8 tiles on AVX-VNNI's `vpdpbusd`.
    AvxVnni,
    /// AVX2 + FMA, int8 tiles on AVX-512 VNNI's `vpdpbusd` (256-bit registers).
    Avx512Vnni,
    /// aarch64 NEON (every aarch64 CPU): `smull` + `sadalp`.
    Neon,
    /// aarch64 NEON with the dot-product extension (`sdot`).
    NeonDot,
}

impl Isa {
    const ALL: [Isa; 7] = [Isa::Reference, Isa::Avx2, Isa::VnniOnAvx2, Isa::AvxVnni, Isa::Avx512Vnni, Isa::Neon, Isa::NeonDot];

    /// The path every layer uses: the one [`force_isa`] chose, else the one `CANDLE_QUANT_ISA`
    /// names (any listed in [`Isa::supported`], case-insensitive), else the fastest this CPU has.
    pub fn best() -> Isa {
        match FORCED.load(Ordering::Relaxed) {
            0 => Isa::detected().last().copied().unwrap_or(Isa::Reference),
            code => Isa::ALL[code as usize - 1],
        }
    }

    /// Every path this CPU can run, slowest first (for tests that force each one).
    pub fn supported() -> Vec<Isa> {
        Isa::detected().to_vec()
    }

    /// Whether this CPU can run `self` (every kernel call asks; detection runs once).
    pub fn is_supported(self) -> bool {
        Isa::detected().contains(&self)
    }

    fn detected() -> &'static [Isa] {
        static DETECTED: OnceLock<Vec<Isa>> = OnceLock::new();
        DETECTED.get_or_init(|| {
            let mut v = vec![Isa::Reference];
            #[cfg(target_arch = "x86_64")]
            if super::x86::available() {
                v.extend([Isa::VnniOnAvx2, Isa::Avx2]);
                if super::x86::avx_vnni_available() {
                    v.push(Isa::AvxVnni);
                }
                if super::x86::avx512_vnni_available() {
                    v.push(Isa::Avx512Vnni);
                }
            }
            #[cfg(target_arch = "aarch64")]
            {
                v.push(Isa::Neon);
                if super::arm::dotprod_available() {
                    v.push(Isa::NeonDot);
                }
            }
            // `CANDLE_QUANT_ISA` picks a slower path than the fastest (to compare paths, or to
            // step around one): the paths after it are dropped.
            if let Ok(name) = std::env::var("CANDLE_QUANT_ISA") {
                match v.iter().position(|isa| format!("{isa:?}").eq_ignore_ascii_case(name.trim())) {
                    Some(p) => v.truncate(p + 1),
                    None => eprintln!("candle-quant: ignoring CANDLE_QUANT_ISA={name}: this CPU's paths are {v:?}"),
                }
            }
            v
        })
    }
}
