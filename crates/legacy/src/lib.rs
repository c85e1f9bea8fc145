//! ember-legacy
#![deny(missing_docs)]
