//! From the bytes of a delivery to a checked [`Request`], or the reason it is refused. Pure:
//! no broker, disk or apptainer, so the fuzz target and the tests call exactly what the intake
//! runs.

use std::collections::HashSet;
use std::fmt;

use schemas::{ErrorCode, Op, Request};
use serde::de::{self, Deserialize, Deserializer, MapAccess, SeqAccess, Visitor};

use crate::rules::request as validate;
use crate::rules::{shorten, Refusal};

/// A refused body: what the error reply says, and what the body said of itself (its `op` and a
/// valid `container_name`), so the reply can name them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refused {
    pub refusal: Refusal,
    pub op: Option<Op>,
    pub container_name: Option<String>,
}

/// What a body says of itself, even when it is not a valid request: its operation and a valid
/// container name, for the reply that refuses it.
pub fn claimed(body: &[u8]) -> (Option<Op>, Option<String>) {
    claims(serde_json::from_slice(body).ok().as_ref())
}

fn claims(body: Option<&serde_json::Value>) -> (Option<Op>, Option<String>) {
    let field = |name: &str| {
        body.and_then(|v| v.get(name))
            .and_then(|v| v.as_str())
            .map(str::to_owned)
    };
    let op = field("op").and_then(|op| {
        let op = if op == "removevolume" {
            "deletevolume".into()
        } else {
            op
        };
        serde_json::from_value(serde_json::Value::String(op)).ok()
    });
    let container_name =
        field("container_name").filter(|n| schemas::ContainerName::parse(n).is_ok());
    (op, container_name)
}

/// Decodes and validates one request body.
///
/// Refused: a body over `max_body_bytes` (413); anything that is not one JSON object of a known
/// operation with the right fields and types, invalid UTF-8, a key repeated in any object,
/// nesting deeper than serde_json's limit of 128 (400); a value outside the rules of
/// [`validate::check`] (400, or 403 for a protected container location).
pub fn decode(body: &[u8], max_body_bytes: usize) -> Result<Request, Refused> {
    if body.len() > max_body_bytes {
        return Err(Refused {
            refusal: Refusal::new(
                ErrorCode::TooLarge,
                format!(
                    "the request body has {} bytes; at most {max_body_bytes} are accepted",
                    body.len()
                ),
            ),
            op: None,
            container_name: None,
        });
    }
    let loose: Option<serde_json::Value> = serde_json::from_slice(body).ok();
    let refuse = |code: ErrorCode, message: String| {
        let (op, container_name) = claims(loose.as_ref());
        Refused {
            refusal: Refusal::new(code, message),
            op,
            container_name,
        }
    };
    if let Err(e) = serde_json::from_slice::<UniqueKeys>(body) {
        let message = match e.classify() {
            serde_json::error::Category::Data => format!("invalid request: {e}"),
            _ => format!("the request body is not valid JSON: {e}"),
        };
        return Err(refuse(ErrorCode::BadRequest, message));
    }
    let request: Request = match serde_json::from_slice(body) {
        Ok(request) => request,
        Err(e) => {
            let detail = loose
                .as_ref()
                .and_then(explain_field_error)
                .unwrap_or_else(|| e.to_string());
            return Err(refuse(
                ErrorCode::BadRequest,
                format!("invalid request: {detail}"),
            ));
        }
    };
    match validate::check(&request) {
        Ok(()) => Ok(request),
        Err(refusal) => Err(refuse(refusal.code, refusal.message)),
    }
}

/// Any JSON value in which no object repeats a key. serde_json keeps the last of repeated keys
/// in maps and a typed struct refuses them, so a body with a repeated key could mean one thing
/// to a client's checker and another to the worker: it is refused whole. Nesting is bounded
/// by serde_json's recursion limit, which applies to this visitor too.
struct UniqueKeys;

impl<'de> Deserialize<'de> for UniqueKeys {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(UniqueKeysVisitor)
    }
}

struct UniqueKeysVisitor;

impl<'de> Visitor<'de> for UniqueKeysVisitor {
    type Value = UniqueKeys;

    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("any JSON value")
    }

    fn visit_bool<E>(self, _: bool) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_i64<E>(self, _: i64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_u64<E>(self, _: u64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_f64<E>(self, _: f64) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_str<E>(self, _: &str) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_unit<E>(self) -> Result<UniqueKeys, E> {
        Ok(UniqueKeys)
    }

    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<UniqueKeys, A::Error> {
        while seq.next_element::<UniqueKeys>()?.is_some() {}
        Ok(UniqueKeys)
    }

    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<UniqueKeys, A::Error> {
        let mut seen = HashSet::new();
        while let Some(key) = map.next_key::<String>()? {
            map.next_value::<UniqueKeys>()?;
            if let Some(key) = seen.replace(key) {
                return Err(de::Error::custom(format_args!(
                    "the key {:?} appears more than once in one object",
                    shorten(&key)
                )));
            }
        }
        Ok(UniqueKeys)
    }
}

/// Serde reports errors inside an internally tagged enum without the field's name; decoding the
/// operation's own fields again names it ("container_name: invalid type: integer `7`...").
fn explain_field_error(body: &serde_json::Value) -> Option<String> {
    fn first_error<T: serde::de::DeserializeOwned>(fields: serde_json::Value) -> Option<String> {
        serde_path_to_error::deserialize::<_, T>(fields)
            .err()
            .map(|e| match e.path().to_string().as_str() {
                "." => e.inner().to_string(),
                path => format!("{path}: {}", e.inner()),
            })
    }
    let mut fields = body.as_object()?.clone();
    let op = fields.remove("op")?;
    let fields = serde_json::Value::Object(fields);
    match op.as_str()? {
        "start" => first_error::<schemas::StartRequest>(fields),
        "stop" | "restart" | "getcont" | "deletecont" | "deletecontdata" => {
            first_error::<schemas::ContainerRequest>(fields)
        }
        "getallcont" => first_error::<schemas::PageRequest>(fields),
        "createvolume" | "deletevolume" | "removevolume" => {
            first_error::<schemas::VolumeRequest>(fields)
        }
        unknown => Some(unknown_operation(unknown)),
    }
}

/// Serde would say "unknown variant"; a client needs the word it sent and the ones it can send.
fn unknown_operation(op: &str) -> String {
    let known: Vec<&str> = Op::ALL.iter().map(|op| op.as_str()).collect();
    format!(
        "unknown operation `{}`; the operations are {} (and removevolume, another name for deletevolume)",
        shorten(op),
        known.join(", ")
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    const MAX: usize = 1024 * 1024;

    fn refused(body: &[u8]) -> Refused {
        decode(body, MAX).expect_err(&String::from_utf8_lossy(body))
    }

    #[test]
    fn a_valid_request_decodes() {
        let request = decode(br#"{"op":"stop","container_name":"nb1"}"#, MAX).unwrap();
        assert_eq!(request.op(), Op::Stop);
    }

    #[test]
    fn a_body_over_the_limit_is_too_large() {
        let body = br#"{"op":"getallcont"}"#;
        assert_eq!(
            decode(body, 5).unwrap_err().refusal.code,
            ErrorCode::TooLarge
        );
    }

    #[test]
    fn repeated_keys_are_refused_at_any_depth_even_when_spelled_with_escapes() {
        for body in [
            &br#"{"op":"stop","container_name":"a","container_name":"b"}"#[..],
            br#"{"op":"stop","\u006fp":"start","container_name":"a"}"#,
            br#"{"op":"start","container_name":"a","container_image":"i","image_distributor":"docker","image_os":"o","image_version":"v","environment":{"A":"1","A":"2"}}"#,
        ] {
            let refused = refused(body);
            assert_eq!(refused.refusal.code, ErrorCode::BadRequest);
            assert!(
                refused.refusal.message.contains("more than once"),
                "{}",
                refused.refusal.message
            );
        }
    }

    #[test]
    fn deep_nesting_is_refused_without_overflowing_the_stack() {
        let depth = 100_000;
        let mut body = "[".repeat(depth);
        body.push_str(&"]".repeat(depth));
        let refused = refused(body.as_bytes());
        assert!(
            refused.refusal.message.contains("recursion limit"),
            "{}",
            refused.refusal.message
        );
        let mut nested = r#"{"op":"getallcont","page":"#.to_owned();
        nested.push_str(&"{\"a\":".repeat(depth));
        assert_eq!(refused_code(nested.as_bytes()), ErrorCode::BadRequest);
    }

    fn refused_code(body: &[u8]) -> ErrorCode {
        refused(body).refusal.code
    }

    #[test]
    fn invalid_utf8_is_refused() {
        let refused = refused(b"{\"op\":\"stop\",\"container_name\":\"nb\xff1\"}");
        assert_eq!(refused.refusal.code, ErrorCode::BadRequest);
    }

    #[test]
    fn an_unknown_operation_is_named_and_the_operations_are_listed() {
        let refused = refused(br#"{"op":"getcnt","container_name":"nb1"}"#);
        assert_eq!(refused.refusal.code, ErrorCode::BadRequest);
        assert!(
            refused
                .refusal
                .message
                .contains("unknown operation `getcnt`; the operations are start, stop, restart,"),
            "{}",
            refused.refusal.message
        );
        assert!(
            !refused.refusal.message.contains("variant"),
            "{}",
            refused.refusal.message
        );
    }

    #[test]
    fn the_refusal_names_the_operation_and_a_valid_container() {
        let refused = refused(br#"{"op":"removevolume","container_name":"nb1"}"#);
        assert_eq!(refused.op, Some(Op::Deletevolume));
        assert_eq!(refused.container_name.as_deref(), Some("nb1"));
        assert!(
            refused.refusal.message.contains("host_location"),
            "{}",
            refused.refusal.message
        );
    }
}
