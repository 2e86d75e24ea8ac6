//! Sweeps as the coordinator receives them: the resolved cells a client submits, checked and
//! given their identities before anything is stored. (Parsing sweep files and planning cells
//! from templates joins this module later.)

pub mod cell;

pub use cell::{CellSpec, LoraSpec, NewCell, Sampler};
