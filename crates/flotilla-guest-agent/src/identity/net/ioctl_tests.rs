use super::*;
use crate::identity::tests::v4;

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
