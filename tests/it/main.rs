//! The integration tests, one binary (each test binary links candle and the crate again): a module
//! per part of the crate, from the maths up. Two tests stay binaries of their own because they
//! change the whole process: `tests/isa.rs` forces the kernel path of every layer, and
//! `tests/hostile_input.rs` installs an allocator that refuses any allocation above 1 GiB.
//!
//! The offline models are found as the binary finds them and fetched on first use when missing
//! ([`common::models`]), so `cargo test --release` needs no step before it.

mod common;

mod checkpoint;
mod cli;
mod convert;
mod families;
mod gemma;
mod gptq;
mod interop;
mod io;
mod kernels;
mod models;
mod nn;
mod observer;
mod quant;
