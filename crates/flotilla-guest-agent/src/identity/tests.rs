//! Fixtures shared by the identity tests, and the tests of the error type.

use std::fs;
use std::io;
use std::net::Ipv4Addr;

use flotilla_guest_protocol::{ErrorKind, IdentityRequest, InterfaceIdentity};

use super::*;

/// Paths in a temporary directory with interfaces `eth0` and `eth1`.
pub(super) fn sandbox() -> (tempfile::TempDir, Paths) {
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

pub(super) fn request() -> IdentityRequest {
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

pub(super) fn v4(text: &str) -> Ipv4Addr {
    text.parse().unwrap()
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
