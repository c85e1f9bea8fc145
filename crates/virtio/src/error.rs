//! What the devices share to report errors.

use std::fmt;

/// An error and its sources, joined by ": ", for the log:
/// `log::error!("... {}", ErrorChain(&err))`.
pub(crate) struct ErrorChain<'a>(pub(crate) &'a dyn std::error::Error);

impl fmt::Display for ErrorChain<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.0)?;
        let mut source = self.0.source();
        while let Some(err) = source {
            write!(f, ": {err}")?;
            source = err.source();
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use std::io;

    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("cannot serve the device")]
    struct Outer(#[source] io::Error);

    #[test]
    fn an_error_chain_joins_the_error_and_its_sources_with_colons() {
        let err = Outer(io::Error::other("the disk is gone"));
        assert_eq!(
            ErrorChain(&err).to_string(),
            "cannot serve the device: the disk is gone"
        );
        let alone = io::Error::other("alone");
        assert_eq!(ErrorChain(&alone).to_string(), "alone");
    }
}
