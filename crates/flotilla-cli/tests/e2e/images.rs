//! Images: a user's own kernel and initramfs registered under a name.

use flotilla_testkit::TestHost;

use crate::{assert_clean, exec};

#[test]
fn a_registered_image_boots_and_is_protected_while_used() {
    let host = TestHost::start().expect("test host");
    let default: serde_json::Value = host.cli_json(&["image", "ls"]);
    let default = &default[0];
    // The user's copy of a kernel and initramfs, without a root disk.
    let own = host.data_path().join("own");
    std::fs::create_dir_all(&own).expect("dir");
    let kernel = own.join("vmlinux");
    let initrd = own.join("initrd");
    std::fs::copy(default["kernel"].as_str().expect("kernel"), &kernel).expect("copy");
    std::fs::copy(default["initrd"].as_str().expect("initrd"), &initrd).expect("copy");

    let img: serde_json::Value = host.cli_json(&[
        "image",
        "register",
        "mine",
        "--kernel",
        kernel.to_str().unwrap_or_default(),
        "--initrd",
        initrd.to_str().unwrap_or_default(),
    ]);
    assert_eq!(img["name"], "mine");
    assert_eq!(img["builtin"], false);
    let again = host.cli(&[
        "image",
        "register",
        "mine",
        "--kernel",
        kernel.to_str().unwrap_or_default(),
    ]);
    assert!(!again.status.success(), "a duplicate name is refused");

    let vm: serde_json::Value = host.cli_json(&["vm", "run", "ownvm", "--image", "mine", "--wait"]);
    assert_eq!(vm["image"], "mine");
    assert!(
        vm["disks"].as_array().is_some_and(|d| d.is_empty()),
        "{vm:#}"
    );
    assert_eq!(exec(&host, "ownvm", &["hostname"]).1.trim(), "ownvm");

    // In use: not removable.
    let (s, b) = host.api("DELETE", "/v1/images/mine", None);
    assert_eq!(s, 409, "{b}");
    host.cli_json::<serde_json::Value>(&["vm", "rm", "--force", "ownvm"]);
    host.cli_json::<serde_json::Value>(&["image", "rm", "mine"]);
    let (s, _) = host.api("GET", "/v1/images/mine", None);
    assert_eq!(s, 404);
    assert_clean(&host);
}
