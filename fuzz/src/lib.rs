//! The fuzz targets' properties ([`props`]), shared with `tests/adversarial.rs`.
#![forbid(unsafe_code)]

#[path = "props.rs"]
pub mod props;
