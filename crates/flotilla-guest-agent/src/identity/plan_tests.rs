use flotilla_guest_protocol::InterfaceIdentity;

use super::*;
use crate::identity::tests::{request, sandbox, v4};

/// The field a rejection names, or a panic if it was accepted.
fn rejected(request: &IdentityRequest) -> String {
    let (_dir, paths) = sandbox();
    match plan(request, &paths) {
        Err(IdentityError::Invalid { field, .. }) => field,
        other => panic!("expected a rejection, got {other:?}"),
    }
}

#[test]
fn a_good_request_is_planned() {
    let (_dir, paths) = sandbox();
    let request = request();
    let plan = plan(&request, &paths).unwrap();
    assert_eq!(
        plan.interfaces,
        vec![InterfacePlan {
            name: "eth0".into(),
            mac: "52:54:00:12:34:56".into(),
            addresses: vec![
                Cidr::parse("10.77.0.5/24").unwrap(),
                Cidr::parse("fd00::5/64").unwrap()
            ],
            gateway: Some("10.77.0.1".parse().unwrap()),
        }]
    );
}

#[test]
fn each_bad_field_is_named() {
    type Edit = fn(&mut IdentityRequest);
    let cases: [(&str, Edit); 22] = [
        ("hostname", |r| r.hostname = String::new()),
        ("hostname", |r| r.hostname = "Web".into()),
        ("hostname", |r| r.hostname = "-web".into()),
        ("hostname", |r| r.hostname = "web.example".into()),
        ("hostname", |r| r.hostname = "a".repeat(64)),
        ("machine_id", |r| {
            r.machine_id = "0123456789ABCDEF0123456789abcdef".into()
        }),
        ("machine_id", |r| r.machine_id = "0123".into()),
        ("machine_id", |r| r.machine_id = "0".repeat(32)),
        ("rng_seed", |r| r.rng_seed = vec![1; 31]),
        ("rng_seed", |r| r.rng_seed = vec![1; 4097]),
        ("interfaces[0].name", |r| {
            r.interfaces[0].name = "eth9".into()
        }),
        ("interfaces[0].name", |r| {
            r.interfaces[0].name = "../eth0".into()
        }),
        ("interfaces[0].name", |r| r.interfaces[0].name = "lo".into()),
        ("interfaces[1].name", |r| {
            r.interfaces.push(r.interfaces[0].clone())
        }),
        ("interfaces[0].mac", |r| {
            r.interfaces[0].mac = "52:54:00:12:34".into()
        }),
        ("interfaces[0].mac", |r| {
            r.interfaces[0].mac = "52-54-00-12-34-56".into()
        }),
        ("interfaces[0].mac", |r| {
            r.interfaces[0].mac = "01:00:5e:00:00:01".into()
        }),
        ("interfaces[0].addresses[0]", |r| {
            r.interfaces[0].addresses[0] = "10.77.0.5".into()
        }),
        ("interfaces[0].addresses[1]", |r| {
            r.interfaces[0].addresses[1] = "10.77.0.6/33".into()
        }),
        ("interfaces[0].addresses[1]", |r| {
            r.interfaces[0].addresses[1] = "10.77.0.5/16".into()
        }),
        ("interfaces[0].gateway", |r| {
            r.interfaces[0].gateway = Some("10.78.0.1".into())
        }),
        ("interfaces[0].gateway", |r| {
            r.interfaces[0].gateway = Some("gateway".into())
        }),
    ];
    for (field, edit) in cases {
        let mut request = request();
        edit(&mut request);
        assert_eq!(rejected(&request), field, "{request:?}");
    }
}

#[test]
fn edge_values_are_accepted() {
    let (_dir, paths) = sandbox();
    let mut request = request();
    request.hostname = format!("0{}", "-".repeat(62));
    request.rng_seed = vec![0; IdentityRequest::RNG_SEED_MAX_LEN];
    request.interfaces[0].mac = "AA:bb:00:00:00:01".into();
    request.interfaces[0].gateway = Some("fe80::1".into());
    request.interfaces.push(InterfaceIdentity {
        name: "eth1".into(),
        mac: "52:54:00:00:00:02".into(),
        addresses: Vec::new(),
        gateway: None,
    });
    assert!(plan(&request, &paths).is_ok());
    request.interfaces[0].gateway = Some("fd00::ffff".into());
    assert!(plan(&request, &paths).is_ok());
}

#[test]
fn subnets_contain_their_addresses_only() {
    let net = Cidr::parse("10.77.0.5/24").unwrap();
    assert!(net.contains("10.77.0.255".parse().unwrap()));
    assert!(!net.contains("10.77.1.1".parse().unwrap()));
    assert!(!net.contains("::1".parse().unwrap()));
    assert!(Cidr::parse("10.0.0.1/0")
        .unwrap()
        .contains("192.0.2.1".parse().unwrap()));
    let host = Cidr::parse("10.0.0.1/32").unwrap();
    assert!(host.contains("10.0.0.1".parse().unwrap()));
    assert!(!host.contains("10.0.0.2".parse().unwrap()));
    assert!(Cidr::parse("0.0.0.0/8").is_err());
    assert!(Cidr::parse("10.0.0.1/+8").is_err());
}

#[test]
fn netmasks_come_from_prefixes() {
    assert_eq!(netmask(0), v4("0.0.0.0"));
    assert_eq!(netmask(1), v4("128.0.0.0"));
    assert_eq!(netmask(24), v4("255.255.255.0"));
    assert_eq!(netmask(31), v4("255.255.255.254"));
    assert_eq!(netmask(32), v4("255.255.255.255"));
    assert_eq!(netmask(33), v4("255.255.255.255"));
}

#[test]
fn macs_parse_to_octets() {
    assert_eq!(
        mac_octets("52:54:00:aB:Cd:ff"),
        Some([0x52, 0x54, 0, 0xab, 0xcd, 0xff])
    );
    for bad in [
        "",
        "52:54:00:12:34",
        "52:54:00:12:34:56:78",
        "52:54:00:12:34:5",
        "52:54:00:12:34:567",
        "52:54:00:12:34:zz",
        "52-54-00-12-34-56",
        "52:54:00:12:34:56:",
    ] {
        assert_eq!(mac_octets(bad), None, "{bad}");
    }
}
