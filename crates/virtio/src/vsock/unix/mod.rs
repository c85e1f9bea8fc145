//! Firecracker's hybrid host side of a vsock device: guest connections meet host processes
//! through Unix sockets ([`VsockUnixBackend`]).
//!
//! `muxer.rs` holds the listener, the host connections still writing their `CONNECT` line and
//! the connections, and routes packets and host socket events to them; `connection.rs` is one
//! connection's state machine and flow control.

mod connection;
mod muxer;

pub use muxer::VsockUnixBackend;
