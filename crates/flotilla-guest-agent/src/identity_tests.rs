use flotilla_guest_protocol::InterfaceIdentity;

use super::*;

/// Paths in a temporary directory with interfaces `eth0` and `eth1`.
fn sandbox() -> (tempfile::TempDir, Paths) {
    let dir = tempfile::tempdir().unwrap();
    let paths = Paths {
        etc: dir.path().join("etc"),
        sys_class_net: dir.path().join("net"),
        run: dir.path().join("run"),
    };
    fs::create_dir_all(&paths.etc).unwrap();
    for name in ["lo", "eth0", "eth1"] {
        fs::create_dir_all(paths.sys_class_net.join(name)).unwrap();
    }
    (dir, paths)
}

fn request() -> IdentityRequest {
    IdentityRequest {
        hostname: "web-2".into(),
        machine_id: "0123456789abcdef0123456789abcdef".into(),
        interfaces: vec![InterfaceIdentity {
            name: "eth0".into(),
            mac: "52:54:00:12:34:56".into(),
            addresses: vec!["10.77.0.5/24".into(), "fd00::5/64".into()],
            gateway: Some("10.77.0.1".into()),
        }],
        rng_seed: vec![7; 32],
    }
}

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
fn hosts_text_matches_guest_init() {
    assert_eq!(
        hosts_text("web-2", Some("10.77.0.5".parse().unwrap())),
        "127.0.0.1\tlocalhost\n::1\tlocalhost ip6-localhost ip6-loopback\n10.77.0.5\tweb-2\n"
    );
    assert!(hosts_text("web-2", None).ends_with("\n127.0.1.1\tweb-2\n"));
}

#[test]
fn files_are_replaced() {
    let (_dir, paths) = sandbox();
    fs::write(paths.etc.join("machine-id"), "old\n").unwrap();
    write_files("web-2", &request().machine_id, None, &paths).unwrap();
    let read = |name: &str| fs::read_to_string(paths.etc.join(name)).unwrap();
    assert_eq!(read("hostname"), "web-2\n");
    assert_eq!(read("machine-id"), "0123456789abcdef0123456789abcdef\n");
    assert!(read("hosts").contains("127.0.1.1\tweb-2\n"));
    // Read-only machine id, and no temporary files left behind.
    let mode = fs::metadata(paths.etc.join("machine-id")).unwrap();
    assert!(mode.permissions().readonly());
    write_files("web-3", &request().machine_id, None, &paths).unwrap();
    let mut names: Vec<_> = fs::read_dir(&paths.etc)
        .unwrap()
        .map(|entry| entry.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["hostname", "hosts", "machine-id"]);
    assert_eq!(read("hostname"), "web-3\n");
}

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

#[test]
fn pool_info_carries_the_seed_bytes_in_order() {
    let info = rand_pool_info(&[1, 2, 3, 4, 5]);
    assert_eq!(&info[..2], [40, 5]);
    let bytes: Vec<u8> = info[2..].iter().flat_map(|w| w.to_ne_bytes()).collect();
    assert_eq!(bytes, [1, 2, 3, 4, 5, 0, 0, 0]);
    // _IOW('R', 0x03, int[2]) and _IO('R', 0x07) in the generic encoding.
    let ioc =
        |dir: u32, nr: u32, size: u32| (dir << 30) | (size << 16) | (u32::from(b'R') << 8) | nr;
    assert_eq!(RNDADDENTROPY, ioc(1, 0x03, 8));
    assert_eq!(RNDRESEEDCRNG, ioc(0, 0x07, 0));
}

#[test]
fn errors_map_to_kinds() {
    assert_eq!(invalid("hostname", "x").kind(), ErrorKind::InvalidRequest);
    assert_eq!(
        IdentityError::ToolMissing("ip").kind(),
        ErrorKind::CommandNotFound
    );
    let denied = io_step("x")(io::Error::from_raw_os_error(libc::EPERM));
    assert_eq!(denied.kind(), ErrorKind::PermissionDenied);
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

fn v4(text: &str) -> Ipv4Addr {
    text.parse().unwrap()
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
fn default_routes_are_found_in_proc_net_route() {
    let header =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n";
    let subnet = "eth0\t00004D0A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
    let default = |metric: u32| {
        format!("eth1\t00000000\t01004D0A\t0003\t0\t0\t{metric}\t00000000\t0\t0\t0\n")
    };
    assert!(!has_default_route(""));
    assert!(!has_default_route(header));
    assert!(!has_default_route(&format!("{header}{subnet}")));
    assert!(has_default_route(&format!(
        "{header}{subnet}{}",
        default(0)
    )));
    assert!(!has_default_route(&format!(
        "{header}{subnet}{}",
        default(100)
    )));
    assert!(has_default_route(&format!("{header}eth0 garbage\n")));
}

#[test]
fn route_replace_matches_ip_commands() {
    let interface = interface(&["10.77.0.5/24"], Some("10.77.0.1"));
    let last = ip_commands(&interface).pop().unwrap();
    assert_eq!(route_replace("eth0", v4("10.77.0.1")), last);
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

/// `sa_data` as bytes.
fn data(address: &libc::sockaddr) -> Vec<u8> {
    address.sa_data.iter().map(|&b| b as u8).collect()
}

#[test]
fn sockaddrs_carry_their_bytes() {
    let inet = inet_address(v4("10.77.0.5"));
    assert_eq!(inet.sa_family, libc::AF_INET as libc::sa_family_t);
    assert_eq!(data(&inet), [0, 0, 10, 77, 0, 5, 0, 0, 0, 0, 0, 0, 0, 0]);
    let hardware = hardware_address([0x52, 0x54, 0, 0x12, 0x34, 0xfe]);
    assert_eq!(hardware.sa_family, 1);
    assert_eq!(
        data(&hardware),
        [0x52, 0x54, 0, 0x12, 0x34, 0xfe, 0, 0, 0, 0, 0, 0, 0, 0]
    );
    // The layout the kernel reads: `sockaddr_in`'s address four bytes in.
    assert_eq!(std::mem::offset_of!(libc::sockaddr_in, sin_addr), 4);
    assert_eq!(std::mem::size_of::<libc::sockaddr_in>(), 16);
}

#[test]
fn ifreqs_name_their_interface() {
    let name = |buffer: [libc::c_char; libc::IFNAMSIZ]| -> Vec<u8> {
        buffer.iter().map(|&b| b as u8).collect()
    };
    assert_eq!(
        name(interface_name("eth0")),
        b"eth0\0\0\0\0\0\0\0\0\0\0\0\0"
    );
    assert_eq!(
        name(interface_name("abcdefghijklmno")),
        b"abcdefghijklmno\0"
    );
    let request = ifreq_flags("eth1", 0x1043);
    assert_eq!(name(request.ifr_name), b"eth1\0\0\0\0\0\0\0\0\0\0\0\0");
    // SAFETY: `ifru_flags` is the field just written.
    assert_eq!(unsafe { request.ifr_ifru.ifru_flags }, 0x1043);
    assert_eq!(std::mem::offset_of!(libc::ifreq, ifr_ifru), libc::IFNAMSIZ);
}

#[test]
fn the_default_route_entry_is_complete_but_for_its_device() {
    let route = default_route(v4("10.77.0.1"));
    for zero in [route.rt_dst, route.rt_genmask] {
        assert_eq!(zero.sa_family, libc::AF_INET as libc::sa_family_t);
        assert_eq!(data(&zero), [0; 14]);
    }
    assert_eq!(
        route.rt_gateway.sa_family,
        libc::AF_INET as libc::sa_family_t
    );
    assert_eq!(data(&route.rt_gateway)[2..6], [10, 77, 0, 1]);
    assert_eq!(route.rt_flags, 0x0003);
    assert_eq!(route.rt_metric, 0);
    assert!(route.rt_dev.is_null());
    // `struct rtentry` as the x86-64 kernel lays it out.
    if cfg!(target_pointer_width = "64") {
        assert_eq!(std::mem::offset_of!(libc::rtentry, rt_flags), 56);
        assert_eq!(std::mem::offset_of!(libc::rtentry, rt_metric), 80);
        assert_eq!(std::mem::offset_of!(libc::rtentry, rt_dev), 88);
        assert_eq!(std::mem::size_of::<libc::rtentry>(), 120);
    }
}

#[test]
fn up_and_down_touch_only_iff_up() {
    let flags: libc::c_short = 0x1043; // UP | BROADCAST | RUNNING | MULTICAST
    assert_eq!(flags & !IFF_UP, 0x1042);
    assert_eq!((flags & !IFF_UP) | IFF_UP, flags);
}
