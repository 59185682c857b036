//! Wire encoding (docs/CONTROL.md, "Requests" and "Responses"): one line of JSON each way,
//! versioned. The server parses requests and encodes responses; the client the reverse.

use std::fmt;
use std::path::Path;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

use super::{
    ControlError, ControlRefusal, DiscardNode, LiveStatus, Promoted, Request, Response,
    CONTROL_PROTOCOL_VERSION, KIND_INTERNAL, RESPONSE_LINE_MAX_BYTES,
};
use crate::ffi::MIRROR_EPANIC;

/// A request as sent: the version, then the op's fields.
#[derive(Serialize)]
struct WireRequest<'a> {
    version: u64,
    #[serde(flatten)]
    request: &'a Request,
}

/// A response as sent. Absent members are left out, not sent as `null`.
#[derive(Serialize)]
struct WireResponseOut<'a> {
    version: u64,
    ok: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'a LiveStatus>,
    #[serde(skip_serializing_if = "Option::is_none")]
    promoted: Option<&'a Promoted>,
    #[serde(skip_serializing_if = "Option::is_none")]
    error: Option<&'a ControlRefusal>,
}

/// A response as received (version already checked). Unknown members are ignored: the
/// request side is the strict one (docs/CONTROL.md, "Versioning").
#[derive(Deserialize)]
struct WireResponseIn {
    ok: bool,
    status: Option<LiveStatus>,
    promoted: Option<Promoted>,
    error: Option<ControlRefusal>,
}

/// `request` as one line, `\n` included.
pub(super) fn encode_request(request: &Request) -> Result<Vec<u8>, serde_json::Error> {
    let mut line = serde_json::to_vec(&WireRequest {
        version: CONTROL_PROTOCOL_VERSION,
        request,
    })?;
    line.push(b'\n');
    Ok(line)
}

/// `response` as one line, `\n` included, never longer than [`RESPONSE_LINE_MAX_BYTES`].
pub(super) fn encode_response(response: &Response) -> Vec<u8> {
    let wire = |ok, status, promoted, error| WireResponseOut {
        version: CONTROL_PROTOCOL_VERSION,
        ok,
        status,
        promoted,
        error,
    };
    let body = match response {
        Response::Status(s) => wire(true, Some(s), None, None),
        Response::Promoted(p) => wire(true, None, Some(p), None),
        Response::Done => wire(true, None, None, None),
        Response::Refused(r) => wire(false, None, None, Some(r)),
    };
    // JSON escapes control characters inside strings, so the line holds no raw newline.
    let encoded = serde_json::to_vec(&body).map_err(|e| e.to_string());
    match encoded {
        Ok(mut line) if line.len() < RESPONSE_LINE_MAX_BYTES => {
            line.push(b'\n');
            line
        }
        Ok(line) => encode_internal_error(&format!(
            "the response ({} bytes) exceeds the {RESPONSE_LINE_MAX_BYTES}-byte line limit",
            line.len() + 1
        )),
        Err(e) => encode_internal_error(&format!("the response cannot be encoded: {e}")),
    }
}

/// A refusal that fits the line limit whatever went wrong, so every request gets an answer.
fn encode_internal_error(message: &str) -> Vec<u8> {
    let refusal = ControlRefusal::new(MIRROR_EPANIC, KIND_INTERNAL, message);
    let mut line = serde_json::to_vec(&WireResponseOut {
        version: CONTROL_PROTOCOL_VERSION,
        ok: false,
        status: None,
        promoted: None,
        error: Some(&refusal),
    })
    .unwrap_or_else(|_| {
        br#"{"version":1,"ok":false,"error":{"code":-1015,"kind":"internal","message":"?"}}"#
            .to_vec()
    });
    line.push(b'\n');
    line
}

/// Parses one request line (without its `\n`). The error is the message sent back to the
/// client, saying exactly what was wrong.
pub(super) fn parse_request(line: &[u8]) -> Result<Request, String> {
    let text = std::str::from_utf8(line).map_err(|e| {
        format!(
            "request is not valid UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        )
    })?;
    if text.trim().is_empty() {
        return Err("empty request line: expected one JSON object".into());
    }
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| format!("request is not valid JSON: {e}"))?;
    if !value.is_object() {
        return Err(format!(
            "request must be a JSON object, got {}",
            json_type(&value)
        ));
    }
    // Parsed again, refusing a repeated member: a plain map keeps the last of two `op`s, and
    // `{"op":"status","op":"demote"}` must not quietly demote the node.
    let UniqueMembers(mut fields) =
        serde_json::from_str(text).map_err(|e| format!("bad request: {e}"))?;
    // The version first: a request from another version may not have this version's shape,
    // and the mismatch is the useful thing to report.
    let version = fields.remove("version").ok_or_else(|| {
        format!("request has no \"version\" field; this server speaks version {CONTROL_PROTOCOL_VERSION}")
    })?;
    match version.as_u64() {
        Some(CONTROL_PROTOCOL_VERSION) => {}
        Some(other) => {
            return Err(format!(
                "request version {other} is not supported: this server speaks version \
                 {CONTROL_PROTOCOL_VERSION}"
            ))
        }
        None => {
            return Err(format!(
                "request field \"version\" must be a whole number, got {version}"
            ))
        }
    }
    let request = Request::deserialize(serde_json::Value::Object(fields.clone()))
        .map_err(|e| format!("bad request: {e}"))?;
    // serde's `deny_unknown_fields` covers the ops with members but lets a member-less op
    // (`status`, `demote`) through with extras; anything its own encoding lacks is unknown.
    let known = serde_json::to_value(&request).map_err(|e| format!("bad request: {e}"))?;
    if let Some(extra) = fields.keys().find(|key| known.get(key.as_str()).is_none()) {
        return Err(format!(
            "bad request: unknown field `{extra}` for op `{}`",
            request.op()
        ));
    }
    if let Request::Resolve { discard } = &request {
        DiscardNode::from_str(discard).map_err(|e| format!("bad request: {e}"))?;
    }
    Ok(request)
}

/// A JSON object whose members are all distinct.
struct UniqueMembers(serde_json::Map<String, serde_json::Value>);

impl<'de> Deserialize<'de> for UniqueMembers {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Members;
        impl<'de> serde::de::Visitor<'de> for Members {
            type Value = UniqueMembers;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a JSON object")
            }

            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<UniqueMembers, A::Error> {
                let mut members = serde_json::Map::new();
                while let Some(name) = map.next_key::<String>()? {
                    let value = map.next_value()?;
                    if members.contains_key(&name) {
                        return Err(serde::de::Error::custom(format!(
                            "field `{name}` appears more than once"
                        )));
                    }
                    members.insert(name, value);
                }
                Ok(UniqueMembers(members))
            }
        }
        deserializer.deserialize_map(Members)
    }
}

fn json_type(value: &serde_json::Value) -> &'static str {
    match value {
        serde_json::Value::Null => "null",
        serde_json::Value::Bool(_) => "a boolean",
        serde_json::Value::Number(_) => "a number",
        serde_json::Value::String(_) => "a string",
        serde_json::Value::Array(_) => "an array",
        serde_json::Value::Object(_) => "an object",
    }
}

/// Parses one response line (without its `\n`) and checks it answers `request`.
pub(super) fn parse_response(
    path: &Path,
    request: &Request,
    line: &[u8],
) -> Result<Response, ControlError> {
    let bad = |why: String| ControlError::BadResponse {
        path: path.to_owned(),
        why,
    };
    let text = std::str::from_utf8(line).map_err(|e| {
        bad(format!(
            "not UTF-8 (invalid byte at offset {})",
            e.valid_up_to()
        ))
    })?;
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| bad(format!("not JSON: {e}")))?;
    match value.get("version").and_then(serde_json::Value::as_u64) {
        Some(CONTROL_PROTOCOL_VERSION) => {}
        Some(other) => {
            return Err(bad(format!(
                "response version {other}; this client speaks version {CONTROL_PROTOCOL_VERSION}"
            )))
        }
        None => return Err(bad("no whole-number \"version\" field".into())),
    }
    let wire = WireResponseIn::deserialize(value).map_err(|e| bad(e.to_string()))?;
    let response = match (wire.ok, wire.status, wire.promoted, wire.error) {
        (true, Some(s), None, None) => Response::Status(Box::new(s)),
        (true, None, Some(p), None) => Response::Promoted(p),
        (true, None, None, None) => Response::Done,
        (false, None, None, Some(e)) => Response::Refused(e),
        (ok, s, p, e) => {
            return Err(bad(format!(
                "inconsistent fields: ok={ok} with status {}, promoted {}, error {}",
                present(&s),
                present(&p),
                present(&e)
            )))
        }
    };
    let answers = matches!(
        (request, &response),
        (_, Response::Refused(_))
            | (Request::Status, Response::Status(_))
            | (Request::Promote { .. }, Response::Promoted(_))
            | (
                Request::Demote
                    | Request::Resolve { .. }
                    | Request::Events
                    | Request::Verify { .. },
                Response::Done
            )
    );
    if !answers {
        return Err(bad(format!(
            "a {} request was answered with {response:?}",
            request.op()
        )));
    }
    Ok(response)
}

fn present<T>(member: &Option<T>) -> &'static str {
    if member.is_some() {
        "present"
    } else {
        "absent"
    }
}
