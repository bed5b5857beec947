use flotilla_guest_protocol::InterfaceIdentity;

use super::*;
use crate::identity::plan::plan;
use crate::identity::tests::{request, sandbox, v4};

#[test]
fn ip_commands_readdress_in_order() {
    let (_dir, paths) = sandbox();
    let mut request = request();
    request.interfaces.push(InterfaceIdentity {
        name: "eth1".into(),
        mac: "52:54:00:00:00:02".into(),
        addresses: vec!["fd00:1::2/64".into()],
        gateway: Some("fe80::1".into()),
    });
    let plan = plan(&request, &paths).unwrap();
    let lines = |at: usize| -> Vec<String> {
        ip_commands(&plan.interfaces[at])
            .iter()
            .map(|args| args.join(" "))
            .collect()
    };
    assert_eq!(
        lines(0),
        [
            "link set dev eth0 down",
            "link set dev eth0 address 52:54:00:12:34:56",
            "addr flush dev eth0",
            "addr add 10.77.0.5/24 dev eth0",
            "addr add fd00::5/64 dev eth0",
            "link set dev eth0 up",
            "route replace default via 10.77.0.1 dev eth0",
        ]
    );
    assert_eq!(
        lines(1).last().unwrap(),
        "-6 route replace default via fe80::1 dev eth1"
    );
}

/// `eth0` as planned from [`request`], with `addresses` and `gateway` instead.
fn interface(addresses: &[&str], gateway: Option<&str>) -> InterfacePlan {
    InterfacePlan {
        name: "eth0".into(),
        mac: "52:54:00:12:34:56".into(),
        addresses: addresses.iter().map(|a| Cidr::parse(a).unwrap()).collect(),
        gateway: gateway.map(|g| g.parse().unwrap()),
    }
}

fn current(ipv4: &[(&str, &str)], routable_ipv6: bool) -> Current {
    Current {
        ipv4: ipv4.iter().map(|(l, a)| (l.to_string(), v4(a))).collect(),
        routable_ipv6,
    }
}

#[test]
fn one_ipv4_address_is_readdressed_by_ioctl() {
    let change = Ipv4Change {
        mac: [0x52, 0x54, 0, 0x12, 0x34, 0x56],
        address: v4("10.77.0.5"),
        prefix: 24,
        gateway: Some(v4("10.77.0.1")),
    };
    let fast = |interface: &InterfacePlan, now: &Current| readdress(interface, Some(now), || true);
    let interface = interface(&["10.77.0.5/24"], Some("10.77.0.1"));
    // No address yet, the source VM's address, or this one already.
    for now in [
        current(&[], false),
        current(&[("eth0", "10.77.0.9")], false),
        current(&[("eth0", "10.77.0.5")], false),
    ] {
        assert_eq!(fast(&interface, &now), Readdress::Ioctls(change));
    }
    let no_gateway = interface_without_gateway();
    assert_eq!(
        fast(&no_gateway, &current(&[], false)),
        Readdress::Ioctls(Ipv4Change {
            gateway: None,
            ..change
        })
    );
    // Routable IPv6 addresses go away with the link unless the kernel keeps them.
    let v6 = current(&[("eth0", "10.77.0.9")], true);
    assert_eq!(
        readdress(&interface, Some(&v6), || false),
        Readdress::Ioctls(change)
    );
    assert_eq!(readdress(&interface, Some(&v6), || true), Readdress::Ip);
}

fn interface_without_gateway() -> InterfacePlan {
    interface(&["10.77.0.5/24"], None)
}

#[test]
fn everything_else_is_readdressed_with_ip() {
    let none = current(&[], false);
    let ip = |interface: &InterfacePlan, now: Option<&Current>| {
        assert_eq!(
            readdress(interface, now, || false),
            Readdress::Ip,
            "{interface:?} {now:?}"
        );
    };
    ip(&interface(&[], None), Some(&none));
    ip(
        &interface(&["10.77.0.5/24", "10.77.0.6/24"], None),
        Some(&none),
    );
    ip(
        &interface(&["10.77.0.5/24", "fd00::5/64"], None),
        Some(&none),
    );
    ip(&interface(&["fd00::5/64"], None), Some(&none));
    ip(&interface(&["10.77.0.5/24"], Some("fe80::1")), Some(&none));
    ip(&interface(&["127.0.0.2/8"], None), Some(&none));
    ip(&interface(&["0.1.2.3/8"], None), Some(&none));
    ip(&interface(&["255.255.255.255/32"], None), Some(&none));
    // Addresses unknown, aliases, or a labelled address the ioctl would not replace.
    let one = interface(&["10.77.0.5/24"], None);
    ip(&one, None);
    ip(
        &one,
        Some(&current(
            &[("eth0", "10.77.0.9"), ("eth0", "10.77.0.10")],
            false,
        )),
    );
    ip(
        &one,
        Some(&current(
            &[("eth0", "10.77.0.9"), ("eth0:1", "10.77.0.10")],
            false,
        )),
    );
    ip(&one, Some(&current(&[("eth0:1", "10.77.0.9")], false)));
}

#[test]
fn current_addresses_are_the_interfaces_own() {
    let all: Vec<(String, IpAddr)> = [
        ("lo", "127.0.0.1"),
        ("eth0", "10.77.0.9"),
        ("eth0:1", "10.77.0.10"),
        ("eth01", "10.1.0.1"),
        ("eth1", "10.2.0.1"),
        ("eth0", "fe80::5054:ff:fe12:3456"),
        ("eth1", "fd00::1"),
    ]
    .iter()
    .map(|(name, ip)| (name.to_string(), ip.parse().unwrap()))
    .collect();
    assert_eq!(
        current_addresses("eth0", &all),
        current(&[("eth0", "10.77.0.9"), ("eth0:1", "10.77.0.10")], false)
    );
    assert_eq!(
        current_addresses("eth1", &all),
        current(&[("eth1", "10.2.0.1")], true)
    );
    assert_eq!(current_addresses("eth2", &all), Current::default());
}

#[test]
fn keep_addr_on_down_follows_the_kernel() {
    assert!(!keeps_addresses(Some(0), Some(0)));
    assert!(keeps_addresses(Some(0), Some(1)));
    assert!(keeps_addresses(Some(1), Some(0)));
    assert!(!keeps_addresses(Some(-1), Some(1)));
    assert!(!keeps_addresses(Some(0), Some(-1)));
    assert!(keeps_addresses(None, Some(0)));
    assert!(keeps_addresses(Some(0), None));
}

#[test]
fn route_replace_matches_ip_commands() {
    let interface = interface(&["10.77.0.5/24"], Some("10.77.0.1"));
    let last = ip_commands(&interface).pop().unwrap();
    assert_eq!(route_replace("eth0", v4("10.77.0.1")), last);
}
