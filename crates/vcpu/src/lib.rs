//! ember-vcpu
#![deny(missing_docs)]
