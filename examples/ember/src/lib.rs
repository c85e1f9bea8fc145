//! `ember_vmm`: the example microVM monitor built from the ember crates, as a library.
//!
//! The `ember` binary is a thin `main` over it; the library exists so that other code can reach
//! the VMM's parts without a process: the fuzz targets drive the API's HTTP codec and routes and
//! the configuration file's parsing and checks.
//!
//! The modules, in the order a microVM goes through them:
//!
//! - [`cli`]: the command line;
//! - [`resources`]: the microVM's description, from flags, a configuration file or the API;
//! - [`api`]: Firecracker's REST API on a Unix socket;
//! - [`controller`]: applies the API's requests to the resources and the running microVM;
//! - [`logger`] and [`metrics`]: where the VMM's log lines and counters go;
//! - [`vmm`]: builds the microVM and runs its event loop;
//! - [`mmds`]: puts the metadata service's network stack in front of a network interface's TAP;
//! - [`seccomp`]: the seccomp filter of each kind of thread, and the process's hardening;
//! - [`terminal`]: the host terminal the serial console reads from;
//! - [`signals`]: SIGTERM and SIGINT, which end the event loop cleanly;
//! - [`jailer`]: the `ember-jailer` binary's jail (chroot, namespaces, cgroup, uid), which
//!   execs the VMM.
//!
//! # Example
//!
//! ```
//! use ember_vmm::api::{self, ApiRequest};
//!
//! // A request as a client sends it on the API socket, through the HTTP codec and the routes.
//! let bytes = b"GET /machine-config HTTP/1.1\r\nHost: localhost\r\n\r\n";
//! let (request, consumed) = api::http::parse_request(bytes)?.expect("the request is complete");
//! assert_eq!(consumed, bytes.len());
//! let route = api::routes::parse(&request.method, &request.path, &request.body);
//! assert!(matches!(route, Ok(ApiRequest::GetMachineConfig)));
//! # Ok::<(), api::http::HttpError>(())
//! ```

#![deny(missing_docs)]

pub mod api;
pub mod cli;
pub mod controller;
pub mod jailer;
pub mod logger;
pub mod metrics;
pub mod mmds;
pub mod resources;
pub mod seccomp;
pub mod signals;
pub mod terminal;
pub mod vmm;
