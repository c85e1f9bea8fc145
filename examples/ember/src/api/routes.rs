//! From a method, a path and a body to a typed [`ApiRequest`], and the [`ApiResponse`] that
//! answers it.
//!
//! # Endpoints
//!
//! | method | path                         | request                                   |
//! |--------|------------------------------|-------------------------------------------|
//! | GET    | `/`                          | [`ApiRequest::GetInstanceInfo`]           |
//! | GET    | `/version`                   | [`ApiRequest::GetVersion`]                |
//! | GET    | `/machine-config`            | [`ApiRequest::GetMachineConfig`]          |
//! | GET    | `/vm/config`                 | [`ApiRequest::GetVmConfig`]               |
//! | GET    | `/metrics`                   | [`ApiRequest::GetMetrics`] (ember's own)  |
//! | PUT    | `/actions`                   | [`ApiRequest::Action`]                    |
//! | PUT    | `/boot-source`               | [`ApiRequest::PutBootSource`]             |
//! | PUT    | `/drives/{drive_id}`         | [`ApiRequest::PutDrive`]                  |
//! | PUT    | `/entropy`                   | [`ApiRequest::PutEntropy`]                |
//! | PUT    | `/logger`                    | [`ApiRequest::PutLogger`]                 |
//! | PUT    | `/machine-config`            | [`ApiRequest::PutMachineConfig`]          |
//! | PUT    | `/metrics`                   | [`ApiRequest::PutMetrics`]                |
//! | PUT    | `/network-interfaces/{id}`   | [`ApiRequest::PutNetworkInterface`]       |
//! | PUT    | `/snapshot/create`           | [`ApiRequest::CreateSnapshot`]            |
//! | PUT    | `/snapshot/load`             | [`ApiRequest::LoadSnapshot`]              |
//! | PUT    | `/vsock`                     | [`ApiRequest::PutVsock`]                  |
//! | PATCH  | `/drives/{drive_id}`         | [`ApiRequest::PatchDrive`]                |
//! | PATCH  | `/machine-config`            | [`ApiRequest::PatchMachineConfig`]        |
//! | PATCH  | `/network-interfaces/{id}`   | [`ApiRequest::PatchNetworkInterface`]     |
//! | PATCH  | `/vm`                        | [`ApiRequest::PatchVm`]                   |
//! | GET    | `/balloon`                   | [`ApiRequest::GetBalloon`]                |
//! | PUT    | `/balloon`                   | [`ApiRequest::PutBalloon`]                |
//! | PATCH  | `/balloon`                   | [`ApiRequest::PatchBalloon`]              |
//! | GET    | `/balloon/statistics`        | [`ApiRequest::GetBalloonStats`]           |
//! | PATCH  | `/balloon/statistics`        | [`ApiRequest::PatchBalloonStats`]         |
//! | GET    | `/mmds`                      | [`ApiRequest::GetMmds`]                   |
//! | PUT    | `/mmds`                      | [`ApiRequest::PutMmds`]                   |
//! | PATCH  | `/mmds`                      | [`ApiRequest::PatchMmds`]                 |
//! | PUT    | `/mmds/config`               | [`ApiRequest::PutMmdsConfig`]             |
//!
//! `GET /metrics` is not Firecracker's: it answers the metrics in Prometheus' text format
//! (`text/plain; version=0.0.4`). `PUT /metrics` is Firecracker's, and says where the JSON metrics
//! go.
//!
//! # Statuses
//!
//! Like Firecracker, every request the API refuses is answered with 400 and a
//! `{"fault_message": "..."}` body, whatever the reason: an unknown path, a method a path does not
//! serve (Firecracker has no 404 or 405: `micro_http` refuses unknown methods with 400, and the API
//! answers known methods on unknown paths with "Invalid request method and/or path: PUT foo."),
//! a body that is not the expected JSON, an ID that does not match, and whatever the VMM refuses.
//! Messages are Firecracker's where it has one:
//!
//! - "Invalid request method and/or path: {METHOD} {path}." with the path without its leading
//!   `/`; Firecracker shows only the first segment, ember the whole path when it has more;
//! - "GET request cannot have a body.", "Empty PUT request.", "Empty PATCH request.";
//! - "The ID cannot be empty.", "API Resource IDs can only contain alphanumeric characters and
//!   underscores.";
//! - "The id from the path does not match the id from the body!";
//! - "An error occurred when deserializing the json body of a request: {serde's message}.".
//!
//! A request that routes is answered by the VMM: 204 when it was carried out, 200 with a JSON body
//! for the GETs, 400 when refused, 413 when a `PUT` or `PATCH /mmds` would make the MMDS data
//! store larger than its limit (as Firecracker answers). The HTTP layer adds 400 for a malformed request or an oversized
//! body, 417, 501 and 505 (see [`super::http`]), 500 when the VMM does not answer and 503 when the
//! server is full or stopping (see [`super::server`]).

use serde::Serialize;
use serde::de::DeserializeOwned;

use super::http::{self, Method, StatusCode};
use super::model::{
    ActionType, Balloon, BalloonUpdate, BootSource, Drive, EntropyDeviceConfig, FaultMessage,
    InstanceActionInfo, Logger, MachineConfiguration, MachineConfigurationUpdate, Metrics,
    MmdsConfig, ModelError, NetworkInterface, PartialDrive, PartialNetworkInterface,
    SnapshotCreateParams, SnapshotLoadParams, Vm, validate_id,
};

/// The `Content-Type` of JSON bodies.
pub const JSON_CONTENT_TYPE: &str = "application/json";

/// The `Content-Type` of Prometheus' text exposition format, the body of `GET /metrics`.
pub const PROMETHEUS_CONTENT_TYPE: &str = "text/plain; version=0.0.4";

/// A request the VMM carries out, with its body parsed and checked.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ApiRequest {
    /// `GET /`: answer an [`InstanceInfo`](super::model::InstanceInfo).
    GetInstanceInfo,
    /// `GET /version`: answer a [`VmmVersion`](super::model::VmmVersion).
    GetVersion,
    /// `PUT /boot-source`.
    PutBootSource(BootSource),
    /// `GET /machine-config`: answer the [`MachineConfiguration`].
    GetMachineConfig,
    /// `PUT /machine-config`.
    PutMachineConfig(MachineConfiguration),
    /// `PATCH /machine-config`, with at least one field.
    PatchMachineConfig(MachineConfigurationUpdate),
    /// `PUT /drives/{drive_id}`.
    PutDrive(Drive),
    /// `PATCH /drives/{drive_id}`.
    PatchDrive(PartialDrive),
    /// `PUT /network-interfaces/{iface_id}`.
    PutNetworkInterface(NetworkInterface),
    /// `PUT /entropy`.
    PutEntropy(EntropyDeviceConfig),
    /// `PUT /vsock`.
    PutVsock(super::model::VsockConfig),
    /// `PATCH /network-interfaces/{iface_id}`.
    PatchNetworkInterface(PartialNetworkInterface),
    /// `PUT /actions`.
    Action(ActionType),
    /// `PATCH /vm`.
    PatchVm(Vm),
    /// `GET /vm/config`: answer the [`FullVmConfiguration`](super::model::FullVmConfiguration).
    GetVmConfig,
    /// `PUT /logger`.
    PutLogger(Logger),
    /// `PUT /metrics`.
    PutMetrics(Metrics),
    /// `GET /metrics`: answer the metrics in Prometheus' text format, with
    /// [`ApiResponse::ok_prometheus`].
    GetMetrics,
    /// `GET /balloon`: answer the [`Balloon`].
    GetBalloon,
    /// `PUT /balloon`.
    PutBalloon(Balloon),
    /// `PATCH /balloon`.
    PatchBalloon(BalloonUpdate),
    /// `GET /balloon/statistics`: answer the
    /// [`BalloonStats`](super::model::BalloonStats).
    GetBalloonStats,
    /// `PATCH /balloon/statistics`.
    PatchBalloonStats(super::model::BalloonStatsUpdate),
    /// `GET /mmds`: answer the MMDS data store's content, `{}` before any `PUT /mmds`.
    GetMmds,
    /// `PUT /mmds`: replace the MMDS data store's content with any JSON value.
    PutMmds(serde_json::Value),
    /// `PATCH /mmds`: a JSON merge patch (RFC 7396) of the MMDS data store's content.
    PatchMmds(serde_json::Value),
    /// `PUT /mmds/config`.
    PutMmdsConfig(MmdsConfig),
    /// `PUT /snapshot/create`.
    CreateSnapshot(SnapshotCreateParams),
    /// `PUT /snapshot/load`.
    LoadSnapshot(SnapshotLoadParams),
}

/// Why a request does not route to an [`ApiRequest`]; answered with 400 by the API thread.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No endpoint serves this method on this path.
    #[error("Invalid request method and/or path: {method} {path}.")]
    InvalidPathMethod {
        /// The method.
        method: String,
        /// The path, without its leading `/`.
        path: String,
    },
    /// A GET has a body.
    #[error("GET request cannot have a body.")]
    GetWithBody,
    /// A PUT has no body.
    #[error("Empty PUT request.")]
    EmptyPut,
    /// A PATCH has no body, or one that changes nothing.
    #[error("Empty PATCH request.")]
    EmptyPatch,
    /// The body is not the JSON the endpoint expects; the message is serde's.
    #[error("An error occurred when deserializing the json body of a request: {0}.")]
    Json(serde_json::Error),
    /// The ID in the path is not the one in the body.
    #[error("The id from the path does not match the id from the body!")]
    IdMismatch,
    /// The ID in the path or a value of the body is refused.
    #[error(transparent)]
    Model(#[from] ModelError),
}

impl ApiError {
    /// The status of the answer: always 400, as in Firecracker.
    pub fn status(&self) -> StatusCode {
        StatusCode::BadRequest
    }
}

/// Routes a request: finds its endpoint, parses its body and checks it.
///
/// # Arguments
///
/// * `method` - the request's method.
/// * `path` - the path of its target, without the query.
/// * `body` - its body, empty when it has none.
///
/// # Errors
///
/// An [`ApiError`] when no endpoint serves the method on the path, or the body is refused.
pub fn parse(method: &Method, path: &str, body: &[u8]) -> Result<ApiRequest, ApiError> {
    let relative = path.trim_start_matches('/');
    let mut segments = relative.split_terminator('/');
    let resource = segments.next().unwrap_or_default();
    let sub = segments.next();
    let routed = if segments.next().is_some() {
        None
    } else {
        match method {
            Method::Get if !body.is_empty() => return Err(ApiError::GetWithBody),
            Method::Get => route_get(resource, sub),
            Method::Put if body.is_empty() => return Err(ApiError::EmptyPut),
            Method::Put => route_put(resource, sub, body)?,
            Method::Patch if body.is_empty() => return Err(ApiError::EmptyPatch),
            Method::Patch => route_patch(resource, sub, body)?,
            Method::Other(_) => None,
        }
    };
    routed.ok_or_else(|| ApiError::InvalidPathMethod {
        method: method.as_str().to_string(),
        path: relative.to_string(),
    })
}

/// The GET endpoints; `None` when none serves the path.
fn route_get(resource: &str, sub: Option<&str>) -> Option<ApiRequest> {
    match (resource, sub) {
        ("", None) => Some(ApiRequest::GetInstanceInfo),
        ("version", None) => Some(ApiRequest::GetVersion),
        ("machine-config", None) => Some(ApiRequest::GetMachineConfig),
        ("vm", Some("config")) => Some(ApiRequest::GetVmConfig),
        ("metrics", None) => Some(ApiRequest::GetMetrics),
        ("balloon", None) => Some(ApiRequest::GetBalloon),
        ("balloon", Some("statistics")) => Some(ApiRequest::GetBalloonStats),
        ("mmds", None) => Some(ApiRequest::GetMmds),
        _ => None,
    }
}

/// The PUT endpoints; `None` when none serves the path.
fn route_put(
    resource: &str,
    sub: Option<&str>,
    body: &[u8],
) -> Result<Option<ApiRequest>, ApiError> {
    let request = match (resource, sub) {
        ("actions", None) => {
            let info: InstanceActionInfo = from_json(body)?;
            ApiRequest::Action(info.action_type)
        }
        ("balloon", None) => ApiRequest::PutBalloon(checked(body, Balloon::validate)?),
        ("boot-source", None) => ApiRequest::PutBootSource(checked(body, BootSource::validate)?),
        ("drives", id) => ApiRequest::PutDrive(checked_with_id(
            id,
            body,
            |drive: &Drive| &drive.drive_id,
            Drive::validate,
        )?),
        ("entropy", None) => ApiRequest::PutEntropy(checked(body, EntropyDeviceConfig::validate)?),
        ("logger", None) => ApiRequest::PutLogger(checked(body, Logger::validate)?),
        ("machine-config", None) => {
            ApiRequest::PutMachineConfig(checked(body, MachineConfiguration::validate)?)
        }
        ("metrics", None) => ApiRequest::PutMetrics(checked(body, Metrics::validate)?),
        ("mmds", None) => ApiRequest::PutMmds(from_json(body)?),
        ("mmds", Some("config")) => ApiRequest::PutMmdsConfig(checked(body, MmdsConfig::validate)?),
        ("network-interfaces", id) => ApiRequest::PutNetworkInterface(checked_with_id(
            id,
            body,
            |iface: &NetworkInterface| &iface.iface_id,
            NetworkInterface::validate,
        )?),
        ("vsock", None) => {
            ApiRequest::PutVsock(checked(body, super::model::VsockConfig::validate)?)
        }
        ("snapshot", Some("create")) => {
            ApiRequest::CreateSnapshot(checked(body, SnapshotCreateParams::validate)?)
        }
        ("snapshot", Some("load")) => {
            ApiRequest::LoadSnapshot(checked(body, SnapshotLoadParams::validate)?)
        }
        _ => return Ok(None),
    };
    Ok(Some(request))
}

/// The PATCH endpoints; `None` when none serves the path.
fn route_patch(
    resource: &str,
    sub: Option<&str>,
    body: &[u8],
) -> Result<Option<ApiRequest>, ApiError> {
    let request = match (resource, sub) {
        ("balloon", None) => ApiRequest::PatchBalloon(checked(body, BalloonUpdate::validate)?),
        ("balloon", Some("statistics")) => ApiRequest::PatchBalloonStats(from_json(body)?),
        ("drives", id) => ApiRequest::PatchDrive(checked_with_id(
            id,
            body,
            |drive: &PartialDrive| &drive.drive_id,
            PartialDrive::validate,
        )?),
        ("machine-config", None) => {
            let update: MachineConfigurationUpdate = from_json(body)?;
            if update.is_empty() {
                return Err(ApiError::EmptyPatch);
            }
            update.validate()?;
            ApiRequest::PatchMachineConfig(update)
        }
        ("network-interfaces", id) => ApiRequest::PatchNetworkInterface(checked_with_id(
            id,
            body,
            |iface: &PartialNetworkInterface| &iface.iface_id,
            PartialNetworkInterface::validate,
        )?),
        ("vm", None) => ApiRequest::PatchVm(from_json(body)?),
        ("mmds", None) => ApiRequest::PatchMmds(from_json(body)?),
        _ => return Ok(None),
    };
    Ok(Some(request))
}

/// The body as a `T`.
fn from_json<T: DeserializeOwned>(body: &[u8]) -> Result<T, ApiError> {
    serde_json::from_slice(body).map_err(ApiError::Json)
}

/// The body as a `T` that `validate` accepts.
fn checked<T: DeserializeOwned>(
    body: &[u8],
    validate: fn(&T) -> Result<(), ModelError>,
) -> Result<T, ApiError> {
    let value = from_json(body)?;
    validate(&value)?;
    Ok(value)
}

/// The body as a `T` for the resource whose ID is in the path, in Firecracker's order of
/// checks: the path's ID, the JSON, the body's ID against the path's, then the values.
fn checked_with_id<T: DeserializeOwned>(
    id: Option<&str>,
    body: &[u8],
    id_of: fn(&T) -> &str,
    validate: fn(&T) -> Result<(), ModelError>,
) -> Result<T, ApiError> {
    let id = path_id(id)?;
    let value = from_json(body)?;
    if id_of(&value) != id {
        return Err(ApiError::IdMismatch);
    }
    validate(&value)?;
    Ok(value)
}

/// The checked ID of the path; missing, it is empty, as Firecracker reports it.
fn path_id(id: Option<&str>) -> Result<&str, ApiError> {
    let id = id.unwrap_or_default();
    validate_id(id)?;
    Ok(id)
}

/// The body of an [`ApiResponse`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ResponseBody {
    /// No body: 204.
    Empty,
    /// A JSON document.
    Json(String),
    /// Prometheus' text exposition format.
    Prometheus(String),
}

/// The answer to a request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ApiResponse {
    status: StatusCode,
    body: ResponseBody,
}

impl ApiResponse {
    /// 204 No Content: the request was carried out.
    pub fn no_content() -> Self {
        ApiResponse {
            status: StatusCode::NoContent,
            body: ResponseBody::Empty,
        }
    }

    /// 200 OK with `value` as JSON; 500 should `value` not serialize.
    pub fn ok_json<T: Serialize + ?Sized>(value: &T) -> Self {
        match serde_json::to_string(value) {
            Ok(json) => ApiResponse {
                status: StatusCode::Ok,
                body: ResponseBody::Json(json),
            },
            Err(err) => ApiResponse::internal_error(format!("Cannot serialize the answer: {err}")),
        }
    }

    /// 200 OK with metrics in Prometheus' text format, the answer to `GET /metrics`.
    pub fn ok_prometheus(text: impl Into<String>) -> Self {
        ApiResponse {
            status: StatusCode::Ok,
            body: ResponseBody::Prometheus(text.into()),
        }
    }

    /// 400 Bad Request with `{"fault_message": message}`: the request was refused.
    pub fn bad_request(message: impl Into<String>) -> Self {
        ApiResponse::fault(StatusCode::BadRequest, message)
    }

    /// 500 Internal Server Error with `{"fault_message": message}`.
    pub fn internal_error(message: impl Into<String>) -> Self {
        ApiResponse::fault(StatusCode::InternalServerError, message)
    }

    /// `status` with `{"fault_message": message}`.
    pub fn fault(status: StatusCode, message: impl Into<String>) -> Self {
        let fault = FaultMessage {
            fault_message: message.into(),
        };
        // A struct of one string always serializes; the fallback keeps the answer JSON anyway.
        let json = serde_json::to_string(&fault)
            .unwrap_or_else(|_| String::from(r#"{"fault_message":""}"#));
        ApiResponse {
            status,
            body: ResponseBody::Json(json),
        }
    }

    /// The status.
    pub fn status(&self) -> StatusCode {
        self.status
    }

    /// The HTTP response that carries this answer.
    pub fn to_http(&self) -> http::Response {
        let (content_type, body) = match &self.body {
            ResponseBody::Empty => (JSON_CONTENT_TYPE, Vec::new()),
            ResponseBody::Json(json) => (JSON_CONTENT_TYPE, json.as_bytes().to_vec()),
            ResponseBody::Prometheus(text) => (PROMETHEUS_CONTENT_TYPE, text.as_bytes().to_vec()),
        };
        http::Response {
            status: self.status,
            content_type,
            body,
        }
    }
}

impl From<ApiError> for ApiResponse {
    fn from(err: ApiError) -> Self {
        ApiResponse::fault(err.status(), err.to_string())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::model::{CacheType, HugePages, VmState};

    fn get(path: &str) -> Result<ApiRequest, ApiError> {
        parse(&Method::Get, path, b"")
    }

    fn put(path: &str, body: &str) -> Result<ApiRequest, ApiError> {
        parse(&Method::Put, path, body.as_bytes())
    }

    fn patch(path: &str, body: &str) -> Result<ApiRequest, ApiError> {
        parse(&Method::Patch, path, body.as_bytes())
    }

    fn message(result: Result<ApiRequest, ApiError>) -> String {
        result.unwrap_err().to_string()
    }

    #[test]
    fn every_get_endpoint_routes() {
        assert_eq!(get("/").unwrap(), ApiRequest::GetInstanceInfo);
        assert_eq!(get("").unwrap(), ApiRequest::GetInstanceInfo);
        assert_eq!(get("/version").unwrap(), ApiRequest::GetVersion);
        assert_eq!(
            get("/machine-config").unwrap(),
            ApiRequest::GetMachineConfig
        );
        assert_eq!(
            get("/machine-config/").unwrap(),
            ApiRequest::GetMachineConfig
        );
        assert_eq!(get("/vm/config").unwrap(), ApiRequest::GetVmConfig);
        assert_eq!(get("/metrics").unwrap(), ApiRequest::GetMetrics);
    }

    #[test]
    fn every_put_endpoint_routes() {
        assert_eq!(
            put("/actions", r#"{"action_type":"InstanceStart"}"#).unwrap(),
            ApiRequest::Action(ActionType::InstanceStart)
        );
        assert_eq!(
            put("/actions", r#"{"action_type":"SendCtrlAltDel"}"#).unwrap(),
            ApiRequest::Action(ActionType::SendCtrlAltDel)
        );
        assert_eq!(
            put("/actions", r#"{"action_type":"FlushMetrics"}"#).unwrap(),
            ApiRequest::Action(ActionType::FlushMetrics)
        );
        let ApiRequest::PutBootSource(boot) = put(
            "/boot-source",
            r#"{"kernel_image_path":"/k","boot_args":"quiet"}"#,
        )
        .unwrap() else {
            panic!("not a boot source");
        };
        assert_eq!(boot.boot_args.as_deref(), Some("quiet"));
        let ApiRequest::PutDrive(drive) = put(
            "/drives/rootfs",
            r#"{"drive_id":"rootfs","path_on_host":"/r","is_root_device":true,"is_read_only":false}"#,
        )
        .unwrap() else {
            panic!("not a drive");
        };
        assert_eq!(drive.cache_type, CacheType::Unsafe);
        assert_eq!(
            put("/logger", r#"{"level":"Debug"}"#).unwrap(),
            ApiRequest::PutLogger(Logger {
                level: Some(crate::api::model::LogLevel::Debug),
                ..Logger::default()
            })
        );
        let ApiRequest::PutMachineConfig(config) = put(
            "/machine-config",
            r#"{"vcpu_count":2,"mem_size_mib":512,"huge_pages":"Transparent"}"#,
        )
        .unwrap() else {
            panic!("not a machine configuration");
        };
        assert_eq!(config.huge_pages, HugePages::Transparent);
        assert_eq!(
            put("/metrics", r#"{"metrics_path":"/m"}"#).unwrap(),
            ApiRequest::PutMetrics(Metrics {
                metrics_path: "/m".into()
            })
        );
        assert!(matches!(
            put(
                "/network-interfaces/eth0",
                r#"{"iface_id":"eth0","host_dev_name":"tap0","guest_mac":"06:00:00:00:00:01"}"#
            ),
            Ok(ApiRequest::PutNetworkInterface(_))
        ));
    }

    #[test]
    fn every_patch_endpoint_routes() {
        assert_eq!(
            patch(
                "/drives/rootfs",
                r#"{"drive_id":"rootfs","path_on_host":"/new"}"#
            )
            .unwrap(),
            ApiRequest::PatchDrive(PartialDrive {
                drive_id: "rootfs".into(),
                path_on_host: Some("/new".into()),
                rate_limiter: None,
            })
        );
        assert_eq!(
            patch("/machine-config", r#"{"mem_size_mib":1024}"#).unwrap(),
            ApiRequest::PatchMachineConfig(MachineConfigurationUpdate {
                mem_size_mib: Some(1024),
                ..MachineConfigurationUpdate::default()
            })
        );
        assert!(matches!(
            patch(
                "/network-interfaces/eth0",
                r#"{"iface_id":"eth0","tx_rate_limiter":{"ops":{"size":1,"refill_time":1}}}"#
            ),
            Ok(ApiRequest::PatchNetworkInterface(_))
        ));
        assert_eq!(
            patch("/vm", r#"{"state":"Paused"}"#).unwrap(),
            ApiRequest::PatchVm(Vm {
                state: VmState::Paused
            })
        );
    }

    #[test]
    fn the_mmds_endpoints_route() {
        assert_eq!(get("/mmds").unwrap(), ApiRequest::GetMmds);
        assert_eq!(
            put("/mmds", r#"{"latest": {"a": "b"}}"#).unwrap(),
            ApiRequest::PutMmds(serde_json::json!({"latest": {"a": "b"}}))
        );
        // Any JSON value is a data store, as in Firecracker.
        assert_eq!(
            put("/mmds", r#""text""#).unwrap(),
            ApiRequest::PutMmds(serde_json::json!("text"))
        );
        assert_eq!(
            patch("/mmds", r#"{"a": null}"#).unwrap(),
            ApiRequest::PatchMmds(serde_json::json!({"a": null}))
        );
        let Ok(ApiRequest::PutMmdsConfig(config)) = put(
            "/mmds/config",
            r#"{"network_interfaces": ["eth0"], "version": "V2"}"#,
        ) else {
            panic!("not an MMDS configuration");
        };
        assert_eq!(config.version, ember_mmds::MmdsVersion::V2);
        assert!(
            message(put("/mmds", "{")).starts_with(
                "An error occurred when deserializing the json body of a request: EOF"
            )
        );
        assert_eq!(
            message(put("/mmds/config", r#"{"network_interfaces": []}"#)),
            "The list of network interface IDs that allow forwarding MMDS requests is empty."
        );
        assert!(
            message(put("/mmds/config", r#"{"version": "V2"}"#))
                .contains("missing field `network_interfaces`")
        );
        assert_eq!(
            message(patch("/mmds/config", "{}")),
            "Invalid request method and/or path: PATCH mmds/config."
        );
        assert_eq!(
            message(get("/mmds/config")),
            "Invalid request method and/or path: GET mmds/config."
        );
    }

    #[test]
    fn unknown_paths_get_firecrackers_message() {
        assert_eq!(
            message(put("/foo", "{}")),
            "Invalid request method and/or path: PUT foo."
        );
        assert_eq!(
            message(get("/vm")),
            "Invalid request method and/or path: GET vm."
        );
        assert_eq!(
            message(get("/vm/state")),
            "Invalid request method and/or path: GET vm/state."
        );
        assert_eq!(
            message(get("/machine-config/x/y")),
            "Invalid request method and/or path: GET machine-config/x/y."
        );
        assert_eq!(
            message(put("/boot-source/extra", r#"{"kernel_image_path":"/k"}"#)),
            "Invalid request method and/or path: PUT boot-source/extra."
        );
    }

    #[test]
    fn wrong_methods_get_firecrackers_message() {
        assert_eq!(
            message(put("/vm", r#"{"state":"Paused"}"#)),
            "Invalid request method and/or path: PUT vm."
        );
        assert_eq!(
            message(patch("/boot-source", r#"{"kernel_image_path":"/k"}"#)),
            "Invalid request method and/or path: PATCH boot-source."
        );
        assert_eq!(
            message(get("/actions")),
            "Invalid request method and/or path: GET actions."
        );
        assert_eq!(
            message(get("/drives/rootfs")),
            "Invalid request method and/or path: GET drives/rootfs."
        );
        for method in ["POST", "DELETE", "HEAD", "OPTIONS"] {
            assert_eq!(
                message(parse(&Method::Other(method.into()), "/machine-config", b"")),
                format!("Invalid request method and/or path: {method} machine-config.")
            );
        }
    }

    #[test]
    fn bodies_must_match_the_method() {
        assert_eq!(
            message(parse(&Method::Get, "/machine-config", b"{}")),
            "GET request cannot have a body."
        );
        assert_eq!(
            message(parse(&Method::Get, "/nowhere", b"{}")),
            "GET request cannot have a body."
        );
        assert_eq!(message(put("/boot-source", "")), "Empty PUT request.");
        assert_eq!(message(put("/nowhere", "")), "Empty PUT request.");
        assert_eq!(message(patch("/vm", "")), "Empty PATCH request.");
        assert_eq!(
            message(patch("/machine-config", "{}")),
            "Empty PATCH request."
        );
    }

    #[test]
    fn ids_in_the_path_are_checked() {
        let body = r#"{"drive_id":"a","path_on_host":"/r","is_root_device":false}"#;
        assert_eq!(message(put("/drives", body)), "The ID cannot be empty.");
        assert_eq!(message(put("/drives/", body)), "The ID cannot be empty.");
        assert_eq!(
            message(put("/drives/a.b", body)),
            "API Resource IDs can only contain alphanumeric characters and underscores."
        );
        assert_eq!(
            message(put("/drives/..", body)),
            "API Resource IDs can only contain alphanumeric characters and underscores."
        );
        assert_eq!(
            message(put("/drives/a/b", body)),
            "Invalid request method and/or path: PUT drives/a/b."
        );
        assert_eq!(
            message(put("/drives/a%2Fb", body)),
            "API Resource IDs can only contain alphanumeric characters and underscores."
        );
        assert_eq!(
            message(patch("/network-interfaces", r#"{"iface_id":"e"}"#)),
            "The ID cannot be empty."
        );
    }

    #[test]
    fn ids_in_the_path_and_body_must_match() {
        const MISMATCH: &str = "The id from the path does not match the id from the body!";
        assert_eq!(
            message(put(
                "/drives/a",
                r#"{"drive_id":"b","path_on_host":"/r","is_root_device":false}"#
            )),
            MISMATCH
        );
        assert_eq!(message(patch("/drives/a", r#"{"drive_id":"b"}"#)), MISMATCH);
        assert_eq!(
            message(put(
                "/network-interfaces/a",
                r#"{"iface_id":"b","host_dev_name":"tap0"}"#
            )),
            MISMATCH
        );
        assert_eq!(
            message(patch("/network-interfaces/a", r#"{"iface_id":"b"}"#)),
            MISMATCH
        );
        // A body ID that is not valid cannot equal the valid one of the path.
        assert_eq!(
            message(patch("/drives/a", r#"{"drive_id":"a/"}"#)),
            MISMATCH
        );
    }

    #[test]
    fn bad_json_gets_serdes_message() {
        assert_eq!(
            message(put("/boot-source", "{")),
            "An error occurred when deserializing the json body of a request: EOF while parsing \
             an object at line 1 column 1."
        );
        assert!(
            message(put(
                "/machine-config",
                r#"{"vcpu_count":1,"mem_size_mib":1,"foo":1}"#
            ))
            .contains("unknown field `foo`")
        );
        assert!(
            message(put("/actions", r#"{"action_type":"Explode"}"#))
                .contains("unknown variant `Explode`")
        );
        assert!(
            message(put("/machine-config", r#"{"vcpu_count":1}"#))
                .contains("missing field `mem_size_mib`")
        );
        assert!(message(patch("/vm", r#"{"state":1}"#)).contains("expected value"));
        assert!(message(put("/logger", r#""x""#)).contains("invalid type: string"));
    }

    #[test]
    fn refused_values_get_the_models_message() {
        assert_eq!(
            message(put(
                "/machine-config",
                r#"{"vcpu_count":64,"mem_size_mib":128}"#
            )),
            "The number of vCPUs must be between 1 and 32, not 64."
        );
        assert!(
            message(put(
                "/drives/v",
                r#"{"drive_id":"v","is_root_device":false,"socket":"/s"}"#
            ))
            .contains("vhost-user")
        );
        assert!(message(patch("/machine-config", r#"{"smt":true}"#)).contains("smt"));
    }

    #[test]
    fn errors_become_400_with_a_fault_message() {
        let response = ApiResponse::from(put("/foo", "{}").unwrap_err());
        assert_eq!(response.status(), StatusCode::BadRequest);
        assert_eq!(
            &response.body,
            &ResponseBody::Json(
                r#"{"fault_message":"Invalid request method and/or path: PUT foo."}"#.into()
            )
        );
    }

    #[test]
    fn responses_have_their_status_and_content_type() {
        let response = ApiResponse::no_content();
        assert_eq!(response.status(), StatusCode::NoContent);
        assert!(response.to_http().body.is_empty());

        let response = ApiResponse::ok_json(&MachineConfiguration::default());
        assert_eq!(response.status(), StatusCode::Ok);
        let http = response.to_http();
        assert_eq!(http.content_type, "application/json");
        assert!(http.body.starts_with(b"{\"vcpu_count\":1,"));

        let response = ApiResponse::ok_prometheus("# TYPE x counter\nx 1\n");
        let http = response.to_http();
        assert_eq!(http.content_type, "text/plain; version=0.0.4");
        assert_eq!(http.body, b"# TYPE x counter\nx 1\n");

        let response = ApiResponse::bad_request("say \"no\"");
        assert_eq!(response.status(), StatusCode::BadRequest);
        assert_eq!(
            &response.body,
            &ResponseBody::Json(r#"{"fault_message":"say \"no\""}"#.into())
        );
        assert_eq!(
            ApiResponse::internal_error("x").status(),
            StatusCode::InternalServerError
        );
    }

    #[test]
    fn a_value_that_does_not_serialize_is_a_500() {
        let mut map = std::collections::HashMap::new();
        map.insert((1, 2), 3);
        let response = ApiResponse::ok_json(&map);
        assert_eq!(response.status(), StatusCode::InternalServerError);
    }

    #[test]
    fn put_entropy_routes_with_an_optional_rate_limiter_and_refuses_bad_bodies() {
        assert_eq!(
            put("/entropy", "{}").unwrap(),
            ApiRequest::PutEntropy(EntropyDeviceConfig::default())
        );
        let Ok(ApiRequest::PutEntropy(config)) = put(
            "/entropy",
            r#"{"rate_limiter":{"bandwidth":{"size":131072,"refill_time":1000}}}"#,
        ) else {
            panic!("not an entropy device");
        };
        assert_eq!(config.rate_limiter.unwrap().bandwidth.unwrap().size, 131072);

        assert!(message(put("/entropy", r#"{"rate":1}"#)).contains("unknown field `rate`"));
        assert!(message(put("/entropy", "1")).starts_with(
            "An error occurred when deserializing the json body of a request: invalid type"
        ));
        assert_eq!(message(put("/entropy", "")), "Empty PUT request.");
        assert!(
            message(put(
                "/entropy",
                &format!(
                    r#"{{"rate_limiter":{{"ops":{{"size":1,"refill_time":{}}}}}}}"#,
                    u64::MAX
                )
            ))
            .contains("refill")
        );
        // Firecracker serves only PUT, and only on /entropy itself.
        assert_eq!(
            message(get("/entropy")),
            "Invalid request method and/or path: GET entropy."
        );
        assert_eq!(
            message(patch("/entropy", "{}")),
            "Invalid request method and/or path: PATCH entropy."
        );
        assert_eq!(
            message(put("/entropy/x", "{}")),
            "Invalid request method and/or path: PUT entropy/x."
        );
    }

    #[test]
    fn put_vsock_routes_firecrackers_body_and_refuses_bad_ones() {
        use super::super::model::VsockConfig;

        assert_eq!(
            put("/vsock", r#"{"guest_cid": 3, "uds_path": "/v.sock"}"#).unwrap(),
            ApiRequest::PutVsock(VsockConfig::new(3, "/v.sock"))
        );
        let Ok(ApiRequest::PutVsock(old)) = put(
            "/vsock",
            r#"{"vsock_id": "vsock0", "guest_cid": 7, "uds_path": "v"}"#,
        ) else {
            panic!("not a vsock device");
        };
        assert_eq!(old.vsock_id.as_deref(), Some("vsock0"));

        assert!(message(put("/vsock", r#"{"guest_cid": 3}"#)).contains("missing field `uds_path`"));
        assert!(
            message(put(
                "/vsock",
                r#"{"guest_cid": 3, "uds_path": "v", "cid": 3}"#
            ))
            .contains("unknown field `cid`")
        );
        assert_eq!(
            message(put("/vsock", r#"{"guest_cid": 2, "uds_path": "v"}"#)),
            "The guest_cid 2 is reserved: a guest's CID is between 3 and 4294967294."
        );
        assert!(
            message(put("/vsock", r#"{"guest_cid": 3, "uds_path": ""}"#))
                .starts_with("The uds_path must be the path of a Unix socket")
        );
        assert_eq!(message(put("/vsock", "")), "Empty PUT request.");
        // Firecracker serves only PUT, and only on /vsock itself.
        assert_eq!(
            message(get("/vsock")),
            "Invalid request method and/or path: GET vsock."
        );
        assert_eq!(
            message(patch("/vsock", "{}")),
            "Invalid request method and/or path: PATCH vsock."
        );
        assert_eq!(
            message(put("/vsock/x", "{}")),
            "Invalid request method and/or path: PUT vsock/x."
        );
    }
}
