//! The Firecracker-compatible HTTP API of ember, served on a Unix socket.
//!
//! Four layers, each usable and tested on its own, none of which knows the VMM:
//!
//! - [`http`]: a strict HTTP/1.1 codec, a pure function over the bytes a client sent;
//! - [`model`]: the JSON bodies of Firecracker's API description, and the checks of what ember
//!   can honour;
//! - [`routes`]: from method, path and body to a typed [`ApiRequest`], and the [`ApiResponse`]
//!   that answers it;
//! - [`server`]: the `ember_api` thread that serves the socket and hands each [`ApiRequest`] to
//!   the VMM with a [`Responder`](server::Responder).
//!
//! The VMM starts it with [`ApiServer::spawn`], registers the returned [`ApiRequests`] in its
//! epoll loop, and answers each request it drains with [`Responder::send`](server::Responder::send).

pub mod http;
pub mod model;
pub mod routes;
pub mod server;

pub use routes::{ApiRequest, ApiResponse};
pub use server::{ApiRequests, ApiServer};
