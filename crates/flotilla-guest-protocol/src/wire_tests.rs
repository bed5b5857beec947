//! Pins the JSON shape of the messages: this is the wire contract with agents already deployed
//! in guest images, so a change here must be deliberate.

#![allow(clippy::unwrap_used)] // Tests fail loudly by design.

use serde_json::json;

use crate::{
    decode_message, ErrorKind, ExecExit, ExecRequest, FrameError, GuestErrorReply, IdentityRequest,
    InterfaceIdentity, Request, RequestBody, Response, ResponseBody,
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

fn identity() -> IdentityRequest {
    IdentityRequest {
        hostname: "web-2".into(),
        machine_id: "0123456789abcdef0123456789abcdef".into(),
        interfaces: vec![
            InterfaceIdentity {
                name: "eth0".into(),
                mac: "52:54:00:12:34:56".into(),
                addresses: vec!["10.77.0.5/24".into(), "fd00::5/64".into()],
                gateway: Some("10.77.0.1".into()),
            },
            InterfaceIdentity {
                name: "eth1".into(),
                mac: "52:54:00:12:34:57".into(),
                addresses: Vec::new(),
                gateway: None,
            },
        ],
        rng_seed: b"hi".to_vec(),
    }
}

#[test]
fn set_identity_request_shape() {
    let request = Request {
        id: 11,
        body: RequestBody::SetIdentity(identity()),
    };
    let value = serde_json::to_value(&request).unwrap();
    assert_eq!(
        value,
        json!({"id": 11, "body": {"type": "set_identity", "hostname": "web-2",
               "machine_id": "0123456789abcdef0123456789abcdef",
               "interfaces": [
                   {"name": "eth0", "mac": "52:54:00:12:34:56",
                    "addresses": ["10.77.0.5/24", "fd00::5/64"], "gateway": "10.77.0.1"},
                   {"name": "eth1", "mac": "52:54:00:12:34:57", "addresses": [], "gateway": null}
               ],
               "rng_seed": "aGk="}})
    );
    assert_eq!(parse_request(value).unwrap(), request);
    // Through a real frame too.
    let frame = crate::encode_message(&request).unwrap();
    let decoded: Request = decode_message(&frame[crate::HEADER_LEN..]).unwrap();
    assert_eq!(decoded, request);
}

#[test]
fn optional_identity_fields_may_be_omitted() {
    let request = parse_request(json!({"id": 1, "body": {"type": "set_identity",
        "hostname": "a", "machine_id": "0123456789abcdef0123456789abcdef", "rng_seed": "",
        "interfaces": [{"name": "eth0", "mac": "52:54:00:00:00:01"}]}}));
    let RequestBody::SetIdentity(identity) = request.unwrap().body else {
        panic!("not a set_identity");
    };
    assert_eq!(identity.interfaces[0].addresses, Vec::<String>::new());
    assert_eq!(identity.interfaces[0].gateway, None);
    assert!(identity.rng_seed.is_empty());
}

#[test]
fn bad_identity_requests_are_rejected() {
    let base = serde_json::to_value(Request {
        id: 1,
        body: RequestBody::SetIdentity(identity()),
    })
    .unwrap();
    let with = |pointer: &str, key: &str, value: serde_json::Value| {
        let mut case = base.clone();
        case.pointer_mut(pointer)
            .unwrap()
            .as_object_mut()
            .unwrap()
            .insert(key.into(), value);
        case
    };
    let without = |key: &str| {
        let mut case = base.clone();
        case.pointer_mut("/body")
            .unwrap()
            .as_object_mut()
            .unwrap()
            .remove(key);
        case
    };
    let cases = [
        with("/body", "domain", json!("example.com")),
        with("/body/interfaces/0", "mtu", json!(1500)),
        with("/body", "rng_seed", json!("not base64!")),
        with("/body", "rng_seed", json!([1, 2])),
        with("/body/interfaces/1", "addresses", json!("10.0.0.1/8")),
        without("hostname"),
        without("machine_id"),
        without("rng_seed"),
    ];
    for case in cases {
        assert!(parse_request(case.clone()).is_err(), "accepted {case}");
    }
}

#[test]
fn identity_set_response_shape() {
    let response = Response {
        id: 11,
        body: ResponseBody::IdentitySet { applied_ms: 42 },
    };
    let value = serde_json::to_value(&response).unwrap();
    assert_eq!(
        value,
        json!({"id": 11, "body": {"type": "identity_set", "applied_ms": 42}})
    );
    assert_eq!(serde_json::from_value::<Response>(value).unwrap(), response);
}

/// An agent that predates a request type (as agents before `set_identity` do) reads it as an
/// invalid message that still carries its id, so it answers that id with an `InvalidRequest`
/// error and the host's call ends at once instead of waiting out its timeout.
#[test]
fn unknown_request_type_is_answerable_by_id() {
    let payload = br#"{"id": 12, "body": {"type": "set_identity_v9", "hostname": "x"}}"#;
    let error = decode_message::<Request>(payload).unwrap_err();
    assert!(
        matches!(error, FrameError::InvalidMessage { id: Some(12), .. }),
        "{error:?}"
    );
    assert_eq!(error.reply_id(), 12);
    assert_eq!(error.kind(), ErrorKind::InvalidRequest);
}

#[test]
fn identity_debug_hides_the_seed() {
    let text = format!("{:?}", identity());
    assert!(text.contains("<2 bytes>"), "{text}");
    assert!(!text.contains("104"), "{text}"); // b'h'
}
