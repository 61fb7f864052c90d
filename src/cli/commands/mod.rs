//! One module per command, each with its `run`.

pub mod bench;
pub mod calibrate;
pub mod compare;
pub mod embed;
pub mod eval;
pub mod generate;
pub mod inspect;
pub mod probe;
pub mod quantize;
pub mod sensitivity;
