//! Wire types of the apptainer-orchestrator protocol, version 1, and their JSON Schemas.
//!
//! A request is one AMQP message whose body is a [`Request`]; every answer is one [`Reply`]
//! envelope. Field and operation names are those of the earlier HTTP server, so its clients
//! recognise them. The worker and the command line both depend on this crate; nothing else
//! defines wire types. The checked-in schemas under `schemas/json/` are generated from these
//! types by [`generated_schemas`] and a test fails when they drift.
//!
//! Requests reject unknown fields (a typo becomes a clear 400); readers of replies must ignore
//! fields they do not know, because replies gain fields over time (never lose or rename them).

use std::collections::BTreeMap;
use std::fmt;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

mod names;
mod redact;
mod topology;

pub use names::{ContainerName, InvalidContainerName};
pub use redact::redact_url;
pub use topology::{
    routing_key, NodeId, Topology, ADMIN_TYPE_PREFIX, DEFAULT_EXCHANGE, MAX_EXCHANGE_LEN,
    PLACED_HEADER, PROBE_TYPE, REPLACED_HEADER,
};

/// The protocol version this crate speaks. Replies always carry it; a request without `v` is
/// version 1.
pub const PROTOCOL_VERSION: u32 = 1;

/// The durable queue replies go to when a request has no `reply_to`.
pub const DEFAULT_REPLY_QUEUE: &str = "apptainer.replies";

/// Where `volume_name` is bound inside the container when a `start` names one.
pub const DEFAULT_HOME_MOUNT: &str = "/home/nextpyter";

/// One request: the body of an AMQP message published to the fleet's exchange, named by its
/// `"op"`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "op", rename_all = "lowercase")]
#[schemars(
    title = "Request",
    description = "One apptainer-orchestrator request (protocol v1)."
)]
pub enum Request {
    /// Build the image (if needed) and start the container's instance. 201 on success.
    Start(StartRequest),
    /// Stop a running container. 200; 409 when it is already stopped.
    Stop(ContainerRequest),
    /// Start a stopped container again with its stored binds. 200; 409 when it is running.
    Restart(ContainerRequest),
    /// One container's record. 200.
    Getcont(ContainerRequest),
    /// One page of containers, plus the data left by deleted containers. 200.
    Getallcont(PageRequest),
    /// Unregister a stopped container; its image stays on disk as "data". 204.
    Deletecont(ContainerRequest),
    /// Delete the image and files a deleted container left behind. 204.
    Deletecontdata(ContainerRequest),
    /// Add a bind (host directory to container directory). 200, the binds.
    Createvolume(VolumeRequest),
    /// Remove a bind from a stopped container. 200, the binds. `removevolume` is an alias.
    #[serde(alias = "removevolume")]
    Deletevolume(VolumeRequest),
}

/// The operations, without their fields: what a reply names in `op`, and what logs and metrics
/// are labelled with.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "lowercase")]
pub enum Op {
    Start,
    Stop,
    Restart,
    Getcont,
    Getallcont,
    Deletecont,
    Deletecontdata,
    Createvolume,
    Deletevolume,
}

impl Op {
    pub const ALL: [Op; 9] = [
        Op::Start,
        Op::Stop,
        Op::Restart,
        Op::Getcont,
        Op::Getallcont,
        Op::Deletecont,
        Op::Deletecontdata,
        Op::Createvolume,
        Op::Deletevolume,
    ];

    /// The name on the wire.
    pub fn as_str(self) -> &'static str {
        match self {
            Op::Start => "start",
            Op::Stop => "stop",
            Op::Restart => "restart",
            Op::Getcont => "getcont",
            Op::Getallcont => "getallcont",
            Op::Deletecont => "deletecont",
            Op::Deletecontdata => "deletecontdata",
            Op::Createvolume => "createvolume",
            Op::Deletevolume => "deletevolume",
        }
    }

    /// Reads change nothing: they need not be written to the inbox.
    pub fn is_read(self) -> bool {
        matches!(self, Op::Getcont | Op::Getallcont)
    }

    /// The status of a successful reply.
    pub fn success_status(self) -> u16 {
        match self {
            Op::Start => 201,
            Op::Deletecont | Op::Deletecontdata => 204,
            _ => 200,
        }
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Request {
    pub fn op(&self) -> Op {
        match self {
            Request::Start(_) => Op::Start,
            Request::Stop(_) => Op::Stop,
            Request::Restart(_) => Op::Restart,
            Request::Getcont(_) => Op::Getcont,
            Request::Getallcont(_) => Op::Getallcont,
            Request::Deletecont(_) => Op::Deletecont,
            Request::Deletecontdata(_) => Op::Deletecontdata,
            Request::Createvolume(_) => Op::Createvolume,
            Request::Deletevolume(_) => Op::Deletevolume,
        }
    }

    /// The container the request is about; `None` for `getallcont`, which spans all of them.
    pub fn container_name(&self) -> Option<&ContainerName> {
        match self {
            Request::Start(r) => Some(&r.container_name),
            Request::Stop(r)
            | Request::Restart(r)
            | Request::Getcont(r)
            | Request::Deletecont(r)
            | Request::Deletecontdata(r) => Some(&r.container_name),
            Request::Createvolume(r) | Request::Deletevolume(r) => Some(&r.container_name),
            Request::Getallcont(_) => None,
        }
    }

    /// The protocol version the request asked for (`None`: version 1).
    pub fn version(&self) -> Option<u32> {
        match self {
            Request::Start(r) => r.v,
            Request::Stop(r)
            | Request::Restart(r)
            | Request::Getcont(r)
            | Request::Deletecont(r)
            | Request::Deletecontdata(r) => r.v,
            Request::Createvolume(r) | Request::Deletevolume(r) => r.v,
            Request::Getallcont(r) => r.v,
        }
    }
}

/// `start`: the fields of the earlier server, plus `environment` and `binds`, which its
/// configuration carried.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct StartRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<u32>,
    pub container_name: ContainerName,
    /// The image's name, recorded and reported back (for example `jupyter/base-notebook`).
    pub container_image: String,
    /// The bootstrap agent of the definition file (for example `docker`).
    pub image_distributor: String,
    /// `From:` of the definition file, before the colon (for example `jupyter/base-notebook`).
    pub image_os: String,
    /// `From:` of the definition file, after the colon (for example `latest`).
    pub image_version: String,
    /// The lines of the start script (`%startscript`), run when the instance starts.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub container_command: Vec<String>,
    /// A host directory bound to the container's home mount point (`/home/nextpyter`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_name: Option<String>,
    /// Variables exported in the container (`%environment`).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub environment: BTreeMap<String, String>,
    /// Host directory to container directory, bound at every start.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub binds: BTreeMap<String, String>,
}

/// Operations on one container that need nothing but its name.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ContainerRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<u32>,
    pub container_name: ContainerName,
}

/// `getallcont`: pages count from 1.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PageRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1))]
    pub page: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 1000))]
    pub page_size: Option<u32>,
}

/// `createvolume` and `deletevolume`: one bind of a container.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VolumeRequest {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub v: Option<u32>,
    pub container_name: ContainerName,
    /// A directory on the host; it must exist.
    pub host_location: String,
    /// An absolute directory inside the container's image; it must exist there.
    pub container_location: String,
}

/// The reply envelope: one JSON object per answer, with the request's correlation id.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[schemars(
    title = "Reply",
    description = "The reply envelope of apptainer-orchestrator (protocol v1). Readers must ignore fields they do not know."
)]
pub struct Reply {
    pub v: u32,
    /// The request's `correlation_id`; null when the request carried none.
    pub correlation_id: Option<String>,
    /// The operation; null when the request could not be decoded far enough to know it.
    pub op: Option<Op>,
    /// The container the request named, when it named one.
    pub container_name: Option<String>,
    /// HTTP meaning: 200, 201, 204, 400, 403, 404, 409, 413, 422, 500, 504.
    pub status: u16,
    /// `true` exactly when `status` is below 400.
    pub ok: bool,
    /// `true` on the one final reply of a request.
    #[serde(rename = "final")]
    pub is_final: bool,
    /// On a progress envelope (`final` false, status 202): what the request is doing now, one of
    /// the [`Stage`] names. Readers must accept stages they do not know. Absent on final replies.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<String>,
    /// With stage `queued`: how many requests are ahead of this one in its container's lane
    /// (0: it runs next).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub position: Option<u32>,
    /// The operation's result on success (field names of the earlier server); null otherwise.
    pub result: Option<ReplyResult>,
    pub error: Option<ReplyError>,
    #[serde(default)]
    pub warnings: Vec<String>,
    /// The worker (host) that answered.
    pub node: String,
    /// Time from the worker taking the request to the reply, in milliseconds.
    pub duration_ms: u64,
}

/// The status of a progress envelope: accepted, not finished.
pub const PROGRESS_STATUS: u16 = 202;

/// The AMQP header a request carries (boolean `true`) to receive progress envelopes before its
/// final reply.
pub const PROGRESS_HEADER: &str = "x-progress";

/// What a request is doing, as progress envelopes name it in `stage`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// Accepted and waiting in its container's lane.
    Queued,
    /// `apptainer build`: can take many minutes.
    BuildingImage,
    /// `apptainer instance start`.
    StartingInstance,
    /// `apptainer instance stop`.
    StoppingInstance,
    /// Removing a deleted container's image and files.
    DeletingData,
}

impl Stage {
    /// The name on the wire (and in the inbox's `intent` column).
    pub fn as_str(self) -> &'static str {
        match self {
            Stage::Queued => "queued",
            Stage::BuildingImage => "building_image",
            Stage::StartingInstance => "starting_instance",
            Stage::StoppingInstance => "stopping_instance",
            Stage::DeletingData => "deleting_data",
        }
    }
}

impl fmt::Display for Stage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a successful reply carries in `result`, by operation.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(untagged)]
pub enum ReplyResult {
    /// `start`, `stop`, `restart`, `getcont`.
    Container(ContainerRecord),
    /// `getallcont`.
    Page(ContainerPage),
    /// `createvolume`, `deletevolume`.
    Binds(BindsResult),
}

/// A container as the earlier server reported it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ContainerRecord {
    pub container_name: String,
    pub container_active: bool,
    /// The instance's IP address; empty when it is stopped or has no network of its own.
    pub container_ip: String,
    pub container_image: String,
    pub image_distributor: String,
    pub image_os: String,
    pub image_version: String,
    /// Host directory to container directory.
    pub binds: BTreeMap<String, String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volume_name: Option<String>,
}

/// One page of `getallcont`. Pages run through the registered containers by name, then the
/// data of deleted containers by name: a page holds at most `page_size` records of both kinds
/// together, and the last page is `ceil((total + data_total) / page_size)`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ContainerPage {
    pub containers: Vec<ContainerRecord>,
    /// Data left on disk by deleted containers, removable with `deletecontdata` (this page's).
    pub data: Vec<LeftoverData>,
    pub page: u32,
    pub page_size: u32,
    /// Registered containers in all pages.
    pub total: u64,
    /// Data of deleted containers in all pages (absent in replies of older workers, which
    /// listed all of it on every page).
    #[serde(default)]
    pub data_total: u64,
}

/// The image a deleted container left behind.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct LeftoverData {
    pub container_name: String,
    pub container_image: String,
}

/// The binds of a container after a volume operation.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct BindsResult {
    pub container_name: String,
    pub binds: BTreeMap<String, String>,
}

/// Why a request failed: a stable code to branch on, and a sentence a person can act on.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ReplyError {
    pub code: ErrorCode,
    pub message: String,
}

/// Stable error codes; each goes with one status.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "snake_case")]
pub enum ErrorCode {
    BadRequest,
    Forbidden,
    NotFound,
    Conflict,
    Unprocessable,
    TooLarge,
    RuntimeFailed,
    Timeout,
    DeadlineExceeded,
    Internal,
}

impl ErrorCode {
    pub fn status(self) -> u16 {
        match self {
            ErrorCode::BadRequest => 400,
            ErrorCode::Forbidden => 403,
            ErrorCode::NotFound => 404,
            ErrorCode::Conflict => 409,
            ErrorCode::TooLarge => 413,
            ErrorCode::Unprocessable => 422,
            ErrorCode::RuntimeFailed | ErrorCode::Internal => 500,
            ErrorCode::Timeout | ErrorCode::DeadlineExceeded => 504,
        }
    }
}

/// The schemas checked in under `schemas/json/`: file name and pretty-printed content.
pub fn generated_schemas() -> Vec<(&'static str, String)> {
    let pretty = |schema: schemars::Schema| {
        let mut text = serde_json::to_string_pretty(&schema).expect("a schema serialises");
        text.push('\n');
        text
    };
    let mut request = schemars::schema_for!(Request);
    accept_op_alias(&mut request, "deletevolume", "removevolume");
    vec![
        ("request.json", pretty(request)),
        ("reply.json", pretty(schemars::schema_for!(Reply))),
    ]
}

/// schemars does not carry serde's variant aliases into the schema: widen the `op` constant of
/// `canonical` to an enum that also holds `alias`, so the schema accepts what the types accept.
fn accept_op_alias(schema: &mut schemars::Schema, canonical: &str, alias: &str) {
    let variants = schema
        .get_mut("oneOf")
        .and_then(|v| v.as_array_mut())
        .expect("an internally tagged enum generates oneOf");
    for variant in variants {
        let Some(op) = variant.pointer_mut("/properties/op") else {
            continue;
        };
        if op.get("const").and_then(|c| c.as_str()) == Some(canonical) {
            let op = op.as_object_mut().expect("op is a schema object");
            op.remove("const");
            op.insert("enum".into(), serde_json::json!([canonical, alias]));
        }
    }
}
