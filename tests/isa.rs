//! `force_isa`: one process-wide choice of kernel path (its own test binary, since it affects
//! every layer of the process).

use candle_quant::runtime::{force_isa, Isa};

#[test]
fn forcing_a_path_and_going_back() {
    let fastest = Isa::best();
    force_isa(Some(Isa::Reference)).unwrap();
    assert_eq!(Isa::best(), Isa::Reference);
    // A path this CPU lacks is refused, naming the paths it has, and changes nothing.
    #[cfg(target_arch = "x86_64")]
    let missing = Isa::Neon;
    #[cfg(not(target_arch = "x86_64"))]
    let missing = Isa::Avx2;
    let err = force_isa(Some(missing)).unwrap_err().to_string();
    assert!(err.contains(&format!("{missing:?}")) && err.contains("Reference"), "{err}");
    assert_eq!(Isa::best(), Isa::Reference);
    force_isa(None).unwrap();
    assert_eq!(Isa::best(), fastest);
}
