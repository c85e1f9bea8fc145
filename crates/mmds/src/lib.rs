#![doc = include_str!("../README.md")]
#![deny(missing_docs)]

pub mod ns;

pub use ns::MmdsNetworkStack;

/// What the guest-facing network stack does with the bytes a guest sent on one TCP connection.
pub trait RequestHandler: Send {
    /// Looks at the bytes received so far on one connection, oldest first.
    ///
    /// Returns [`Handled::Incomplete`] while the request needs more bytes, or the answer and how
    /// many of the received bytes the request used (the stack drops them and calls again with the
    /// rest, so several requests on one connection are answered in order).
    fn handle(&mut self, received: &[u8]) -> Handled;
}

/// The outcome of [`RequestHandler::handle`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handled {
    /// The request is not complete yet.
    Incomplete,
    /// A complete request was read and answered.
    Response {
        /// How many received bytes the request used.
        consumed: usize,
        /// The HTTP response to send back, whole.
        bytes: Vec<u8>,
        /// Whether the connection is to be closed after the response (a malformed request, or
        /// `Connection: close`).
        close: bool,
    },
}

pub mod data_store;
pub mod handler;
pub mod http;
pub mod token;

pub use data_store::{Mmds, MmdsVersion, OutputFormat};
pub use handler::MmdsHandler;
