//! ember-memory
#![deny(missing_docs)]

pub mod layout;
