//! QMP wire types: the greeting, events, error replies and common replies.
//!
//! Replies are parsed leniently (unknown fields ignored) on purpose: QEMU adds
//! fields between releases and must not break an older agent.

use serde::{Deserialize, Serialize};
use serde_json::Value;

use crate::error::QmpError;

/// QEMU's version as announced in the QMP greeting.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QemuVersion {
    pub major: u32,
    pub minor: u32,
    pub micro: u32,
    /// Distribution package string, e.g. `Debian 1:10.0.2+ds-...`.
    pub package: String,
}

/// What QEMU says when a client connects.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct QmpGreeting {
    pub version: QemuVersion,
    /// Optional protocol capabilities offered (e.g. `oob`); none are enabled.
    pub capabilities: Vec<String>,
}

/// Event timestamp (wall clock of the QEMU host).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QmpTimestamp {
    pub seconds: i64,
    pub microseconds: i64,
}

/// An asynchronous QMP event such as `STOP`, `RESUME` or `SHUTDOWN`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct QmpEvent {
    pub event: String,
    #[serde(default)]
    pub data: Value,
    #[serde(default)]
    pub timestamp: Option<QmpTimestamp>,
}

/// Reply of `query-status`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusInfo {
    pub running: bool,
    /// QEMU run state: `running`, `paused`, `prelaunch`, `inmigrate`, ...
    pub status: String,
}

#[derive(Deserialize)]
struct GreetingWire {
    #[serde(rename = "QMP")]
    qmp: GreetingBody,
}

#[derive(Deserialize)]
struct GreetingBody {
    version: VersionWire,
    #[serde(default)]
    capabilities: Vec<String>,
}

#[derive(Deserialize)]
struct VersionWire {
    qemu: VersionTriple,
    #[serde(default)]
    package: String,
}

#[derive(Deserialize)]
struct VersionTriple {
    major: u32,
    minor: u32,
    micro: u32,
}

#[derive(Deserialize)]
struct ErrorWire {
    class: String,
    #[serde(default)]
    desc: String,
}

pub(crate) fn parse_greeting(value: Value) -> Result<QmpGreeting, QmpError> {
    let text = snippet(&value);
    let wire: GreetingWire = serde_json::from_value(value)
        .map_err(|e| QmpError::Protocol(format!("expected a QMP greeting, got {text} ({e})")))?;
    let v = wire.qmp.version;
    Ok(QmpGreeting {
        version: QemuVersion {
            major: v.qemu.major,
            minor: v.qemu.minor,
            micro: v.qemu.micro,
            package: v.package.trim().to_string(),
        },
        capabilities: wire.qmp.capabilities,
    })
}

/// Turns a reply object into the command's result.
pub(crate) fn reply_result(
    id: u64,
    mut map: serde_json::Map<String, Value>,
) -> Result<Value, QmpError> {
    if let Some(ret) = map.remove("return") {
        return Ok(ret);
    }
    if let Some(err) = map.remove("error") {
        let text = snippet(&err);
        return match serde_json::from_value::<ErrorWire>(err) {
            Ok(e) => Err(QmpError::Command {
                class: e.class,
                desc: e.desc,
            }),
            Err(_) => Err(QmpError::Protocol(format!(
                "malformed error reply to command {id}: {text}"
            ))),
        };
    }
    Err(QmpError::Protocol(format!(
        "reply to command {id} has neither \"return\" nor \"error\": {}",
        snippet(&Value::Object(map))
    )))
}

/// A short rendering of a JSON value for error messages.
pub(crate) fn snippet(value: &Value) -> String {
    let text = value.to_string();
    bounded(&text)
}

pub(crate) fn bounded(text: &str) -> String {
    const MAX: usize = 200;
    if text.len() <= MAX {
        return text.to_string();
    }
    let mut end = MAX;
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    format!("{}...", &text[..end])
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn parses_qemu_10_greeting() {
        let g = parse_greeting(
            json!({"QMP": {"version": {"qemu": {"micro": 2, "minor": 0, "major": 10},
            "package": "Debian 1:10.0.2"}, "capabilities": ["oob"]}}),
        )
        .expect("greeting");
        assert_eq!(
            (g.version.major, g.version.minor, g.version.micro),
            (10, 0, 2)
        );
        assert_eq!(g.capabilities, vec!["oob".to_string()]);
    }

    #[test]
    fn rejects_non_greeting() {
        let err = parse_greeting(json!({"hello": 1})).expect_err("not a greeting");
        assert!(matches!(err, QmpError::Protocol(_)), "{err}");
    }

    #[test]
    fn error_reply_becomes_command_error() {
        let map = json!({"error": {"class": "GenericError", "desc": "nope"}, "id": 3});
        let Value::Object(map) = map else {
            unreachable!()
        };
        match reply_result(3, map) {
            Err(QmpError::Command { class, desc }) => {
                assert_eq!(class, "GenericError");
                assert_eq!(desc, "nope");
            }
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn bounded_respects_char_boundaries() {
        let long = "é".repeat(300);
        assert!(bounded(&long).ends_with("..."));
    }
}
