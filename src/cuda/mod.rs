//! The CUDA path: the embedded fatbin, device discovery with typed errors, and the
//! kernels' launch wrappers.

mod module;

pub use module::{context, fatbin, ptxas_report};
