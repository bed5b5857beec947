//! Pins the JSON shape of the messages: this is the wire contract with agents already deployed
//! in guest images, so a change here must be deliberate.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use serde_json::json;

use crate::{
    ErrorKind, ExecExit, ExecRequest, GuestErrorReply, Request, RequestBody, Response, ResponseBody,
};

fn parse_request(value: serde_json::Value) -> Result<Request, serde_json::Error> {
    serde_json::from_value(value)
}

#[test]
fn exec_request_shape() {
    let request = Request {
        id: 9,
        body: RequestBody::Exec(ExecRequest {
            env: [("K".to_string(), "v".to_string())].into(),
            stdin: Some(b"hi".to_vec()),
            timeout_ms: Some(100),
            ..ExecRequest::new(["ls", "-l"])
        }),
    };
    assert_eq!(
        serde_json::to_value(&request).unwrap(),
        json!({"id": 9, "body": {"type": "exec", "argv": ["ls", "-l"], "env": {"K": "v"},
               "cwd": null, "stdin": "aGk=", "timeout_ms": 100, "stream": false}})
    );
}

#[test]
fn optional_exec_fields_may_be_omitted() {
    let request = parse_request(json!({"id": 1, "body": {"type": "exec", "argv": ["true"]}}));
    assert_eq!(
        request.unwrap().body,
        RequestBody::Exec(ExecRequest::new(["true"]))
    );
}

#[test]
fn unknown_request_fields_are_rejected() {
    let cases = [
        json!({"id": 1, "body": {"type": "exec", "argv": ["x"], "user": "root"}}),
        json!({"id": 1, "body": {"type": "hello", "nonce": 1, "protocol_version": 1, "x": 0}}),
        json!({"id": 1, "body": {"type": "ping"}, "trace": true}),
        json!({"id": 1, "body": {"type": "reformat"}}),
        json!({"body": {"type": "ping"}}),
        json!({"id": -1, "body": {"type": "ping"}}),
    ];
    for case in cases {
        assert!(parse_request(case.clone()).is_err(), "accepted {case}");
    }
}

#[test]
fn simple_request_shapes() {
    let cases = [
        (RequestBody::Info, json!({"type": "info"})),
        (RequestBody::Ping, json!({"type": "ping"})),
        (
            RequestBody::Shutdown { reboot: false },
            json!({"type": "shutdown", "reboot": false}),
        ),
        (
            RequestBody::Hello {
                nonce: 5,
                protocol_version: 1,
            },
            json!({"type": "hello", "nonce": 5, "protocol_version": 1}),
        ),
    ];
    for (body, expected) in cases {
        let request = Request { id: 3, body };
        let value = serde_json::to_value(&request).unwrap();
        assert_eq!(value, json!({"id": 3, "body": expected}));
        assert_eq!(parse_request(value).unwrap(), request);
    }
}

#[test]
fn exit_and_error_response_shapes() {
    let exit = Response {
        id: 4,
        body: ResponseBody::Exit(ExecExit {
            code: Some(0),
            stdout: b"ok\n".to_vec(),
            duration_ms: 12,
            ..ExecExit::default()
        }),
    };
    assert_eq!(
        serde_json::to_value(&exit).unwrap(),
        json!({"id": 4, "body": {"type": "exit", "code": 0, "signal": null, "timed_out": false,
               "duration_ms": 12, "stdout": "b2sK", "stderr": ""}})
    );
    let error = Response {
        id: 0,
        body: ResponseBody::Error(GuestErrorReply {
            kind: ErrorKind::CommandNotFound,
            message: "x: command not found in guest".into(),
        }),
    };
    assert_eq!(
        serde_json::to_value(&error).unwrap(),
        json!({"id": 0, "body": {"type": "error", "kind": "command_not_found",
               "message": "x: command not found in guest"}})
    );
    let pong = serde_json::to_value(Response {
        id: 1,
        body: ResponseBody::Pong,
    })
    .unwrap();
    assert_eq!(pong, json!({"id": 1, "body": {"type": "pong"}}));
}

#[test]
fn bad_base64_is_rejected() {
    let request = parse_request(json!({"id": 1, "body": {"type": "exec", "argv": ["cat"],
                                       "stdin": "not base64!"}}));
    assert!(request.is_err());
}
