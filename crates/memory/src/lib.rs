//! ember-memory
#![deny(missing_docs)]
