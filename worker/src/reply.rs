//! Reply envelopes: what every answer looks like on the wire. A foundation: it knows the wire
//! types, not the operations (the executor builds an operation's final reply from a header).

use schemas::{
    ErrorCode, Op, Reply, ReplyError, ReplyResult, Stage, PROGRESS_STATUS, PROTOCOL_VERSION,
};

/// Who answers, and about what: everything of a reply but the operation's result.
#[derive(Debug, Clone)]
pub struct ReplyHeader {
    pub node: String,
    pub op: Option<Op>,
    pub container_name: Option<String>,
    pub duration_ms: u64,
}

impl ReplyHeader {
    /// A final error reply.
    pub fn error(&self, correlation_id: Option<&str>, code: ErrorCode, message: &str) -> Reply {
        let error = ReplyError {
            code,
            message: message.to_owned(),
        };
        Reply::failure(
            &self.node,
            self.op,
            self.container_name.clone(),
            correlation_id,
            error,
            self.duration_ms,
        )
    }
}

impl ReplyHeader {
    /// A final successful reply.
    pub fn success(
        &self,
        correlation_id: Option<&str>,
        status: u16,
        result: Option<ReplyResult>,
        warnings: Vec<String>,
    ) -> Reply {
        Reply {
            v: PROTOCOL_VERSION,
            correlation_id: correlation_id.map(str::to_owned),
            op: self.op,
            container_name: self.container_name.clone(),
            status,
            ok: true,
            is_final: true,
            stage: None,
            position: None,
            result,
            error: None,
            warnings,
            node: self.node.clone(),
            duration_ms: self.duration_ms,
        }
    }

    /// A progress envelope: not final, status 202, the stage the request has reached.
    pub fn progress(
        &self,
        correlation_id: Option<&str>,
        stage: Stage,
        position: Option<u32>,
    ) -> Reply {
        Reply {
            v: PROTOCOL_VERSION,
            correlation_id: correlation_id.map(str::to_owned),
            op: self.op,
            container_name: self.container_name.clone(),
            status: PROGRESS_STATUS,
            ok: true,
            is_final: false,
            stage: Some(stage.as_str().to_owned()),
            position,
            result: None,
            error: None,
            warnings: Vec::new(),
            node: self.node.clone(),
            duration_ms: self.duration_ms,
        }
    }
}

/// Names `node` as the holder of every container and data record in `result`: a host reports
/// only what it holds, so the records of a fleet-wide `getallcont` say where each one lives.
pub fn stamp_node(result: &mut ReplyResult, node: &str) {
    match result {
        ReplyResult::Container(record) => record.node = Some(node.to_owned()),
        ReplyResult::Page(page) => {
            for record in &mut page.containers {
                record.node = Some(node.to_owned());
            }
            for data in &mut page.data {
                data.node = Some(node.to_owned());
            }
        }
        ReplyResult::Binds(_) => {}
    }
}

pub fn to_body(reply: &Reply) -> String {
    serde_json::to_string(reply).expect("a reply always serialises")
}
