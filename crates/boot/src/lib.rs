//! ember-boot
#![deny(missing_docs)]

pub mod cpu;
