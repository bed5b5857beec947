//! Unit tests of argument building and validation.

use std::path::{Path, PathBuf};

use super::*;

/// A temp dir holding a fake kernel, initrd and disk, plus a config using them.
struct Fixture {
    dir: tempfile::TempDir,
    config: QemuConfig,
}

fn fixture() -> Fixture {
    let dir = tempfile::tempdir().expect("tempdir");
    let p = |name: &str| dir.path().join(name);
    for file in ["vmlinux", "initrd.gz", "root.qcow2", "data.raw"] {
        std::fs::write(p(file), b"x").expect("write fixture file");
    }
    let config = QemuConfig {
        name: "vm-1".into(),
        accel: Accel::Tcg,
        vcpus: 2,
        memory_mib: 256,
        kernel: p("vmlinux"),
        initrd: Some(p("initrd.gz")),
        cmdline: "console=ttyS0 quiet".into(),
        drives: vec![
            DriveConfig {
                id: "root".into(),
                path: p("root.qcow2"),
                format: "qcow2".into(),
                read_only: false,
                nbd_backing: None,
            },
            DriveConfig {
                id: "data".into(),
                path: p("data.raw"),
                format: "raw".into(),
                read_only: true,
                nbd_backing: None,
            },
        ],
        nics: vec![NicConfig {
            id: "net0".into(),
            tap: "tap0".into(),
            mac: "52:54:00:AB:cd:01".into(),
        }],
        qmp_socket: p("qmp.sock"),
        agent_socket: Some(p("agent.sock")),
        serial_log: p("serial.log"),
        pidfile: p("qemu.pid"),
        incoming: None,
        start_paused: false,
        mapped_ram: false,
        tls_psk_dir: None,
        memory_file: None,
        huge_pages: false,
    };
    Fixture { dir, config }
}

/// The value following `flag`, for flags that appear once.
fn value_of<'a>(args: &'a [String], flag: &str) -> &'a str {
    let positions: Vec<usize> = args
        .iter()
        .enumerate()
        .filter(|(_, a)| *a == flag)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(positions.len(), 1, "{flag} should appear once in {args:?}");
    &args[positions[0] + 1]
}

fn values_of<'a>(args: &'a [String], flag: &str) -> Vec<&'a str> {
    args.windows(2)
        .filter(|w| w[0] == flag)
        .map(|w| w[1].as_str())
        .collect()
}

fn path_str(dir: &Path, name: &str) -> String {
    dir.join(name).to_string_lossy().into_owned()
}

#[test]
fn full_config_builds_expected_arguments() {
    let f = fixture();
    f.config.validate().expect("valid");
    let args = f.config.to_args();
    let d = f.dir.path();

    assert_eq!(value_of(&args, "-name"), "vm-1");
    assert_eq!(value_of(&args, "-M"), "microvm,acpi=off,memory-backend=mem");
    assert_eq!(
        value_of(&args, "-object"),
        "memory-backend-ram,id=mem,size=256M"
    );
    assert_eq!(value_of(&args, "-accel"), "tcg");
    assert_eq!(value_of(&args, "-cpu"), "max");
    assert_eq!(value_of(&args, "-smp"), "2");
    for flag in ["-nodefaults", "-no-user-config", "-nographic", "-no-reboot"] {
        assert!(args.iter().any(|a| a == flag), "missing {flag}");
    }
    assert_eq!(
        values_of(&args, "-chardev"),
        vec![
            format!(
                "file,id=serial0,path={},append=on",
                path_str(d, "serial.log")
            ),
            format!(
                "socket,id=qmp,path={},server=on,wait=off",
                path_str(d, "qmp.sock")
            ),
            format!(
                "socket,id=agent,path={},server=on,wait=off",
                path_str(d, "agent.sock")
            ),
        ]
    );
    assert_eq!(value_of(&args, "-serial"), "chardev:serial0");
    assert_eq!(value_of(&args, "-mon"), "chardev=qmp,mode=control");
    assert_eq!(value_of(&args, "-pidfile"), path_str(d, "qemu.pid"));
    assert_eq!(value_of(&args, "-kernel"), path_str(d, "vmlinux"));
    assert_eq!(value_of(&args, "-initrd"), path_str(d, "initrd.gz"));
    assert_eq!(value_of(&args, "-append"), "console=ttyS0 quiet");
    assert_eq!(
        values_of(&args, "-device"),
        vec![
            "virtio-blk-device,drive=root,id=root,serial=root",
            "virtio-blk-device,drive=data,id=data,serial=data",
            "virtio-net-device,netdev=net0,mac=52:54:00:ab:cd:01,id=net0",
            "virtio-serial-device",
            "virtserialport,chardev=agent,name=org.flotilla.agent.0",
        ]
    );
    assert_eq!(
        value_of(&args, "-netdev"),
        "tap,id=net0,ifname=tap0,script=no,downscript=no"
    );
    assert!(!args.iter().any(|a| a == "-S" || a == "-incoming"));
}

#[test]
fn blockdev_is_json_and_honours_read_only() {
    let f = fixture();
    let args = f.config.to_args();
    let nodes: Vec<serde_json::Value> = values_of(&args, "-blockdev")
        .into_iter()
        .map(|v| serde_json::from_str(v).expect("blockdev JSON"))
        .collect();
    assert_eq!(nodes.len(), 2);
    assert_eq!(nodes[0]["driver"], "qcow2");
    assert_eq!(nodes[0]["node-name"], "root");
    assert_eq!(nodes[0]["read-only"], false);
    assert_eq!(nodes[0]["file"]["driver"], "file");
    assert_eq!(nodes[1]["driver"], "raw");
    assert_eq!(nodes[1]["read-only"], true);
    assert_eq!(nodes[1]["file"]["read-only"], true);
    assert_eq!(
        nodes[1]["file"]["filename"],
        path_str(f.dir.path(), "data.raw")
    );
}

#[test]
fn kvm_paused_incoming_and_minimal_config() {
    let mut f = fixture();
    f.config.accel = Accel::Kvm;
    f.config.incoming = Some("defer".into());
    f.config.start_paused = true;
    f.config.agent_socket = None;
    f.config.initrd = None;
    f.config.drives.clear();
    f.config.nics.clear();
    f.config.validate().expect("valid");
    let args = f.config.to_args();
    assert_eq!(value_of(&args, "-accel"), "kvm");
    assert_eq!(value_of(&args, "-cpu"), "host");
    assert_eq!(value_of(&args, "-incoming"), "defer");
    assert!(args.iter().any(|a| a == "-S"));
    assert!(values_of(&args, "-device").is_empty());
    assert!(!args.iter().any(|a| a == "-initrd" || a == "-blockdev"));
}

#[test]
fn memory_mapped_from_a_file_is_private_and_read_only() {
    let mut f = fixture();
    f.config.memory_file = Some(MemoryFile {
        path: f.dir.path().join("memory.img"),
        offset: 1 << 20,
    });
    assert_invalid(&f.config, "memory_file", "memory.img");
    std::fs::write(f.dir.path().join("memory.img"), b"x").expect("write");
    f.config.validate().expect("valid");
    assert_eq!(
        value_of(&f.config.to_args(), "-object"),
        format!(
            "memory-backend-file,id=mem,size=256M,mem-path={},offset=1048576,\
             share=off,readonly=on,rom=off",
            path_str(f.dir.path(), "memory.img")
        )
    );
}

#[test]
fn commas_in_option_values_are_doubled() {
    let mut f = fixture();
    let dir = f.dir.path().join("a,b");
    std::fs::create_dir(&dir).expect("mkdir");
    f.config.name = "web,1".into();
    f.config.serial_log = dir.join("serial.log");
    f.config.validate().expect("valid");
    let args = f.config.to_args();
    assert_eq!(value_of(&args, "-name"), "web,,1");
    assert!(values_of(&args, "-chardev")[0].contains("a,,b/serial.log,append=on"));
}

/// Asserts that validation fails on `field` with a message containing `hint`.
fn assert_invalid(config: &QemuConfig, field: &str, hint: &str) {
    match config.validate() {
        Err(QemuError::InvalidConfig { field: f, problem }) => {
            assert_eq!(f, field, "wrong field (problem: {problem})");
            assert!(problem.contains(hint), "{problem:?} lacks {hint:?}");
        }
        other => panic!("expected invalid {field}, got {other:?}"),
    }
}

#[test]
fn rejects_bad_sizes() {
    let mut f = fixture();
    f.config.vcpus = 0;
    assert_invalid(&f.config, "vcpus", "accepted 1..=255");
    f.config.vcpus = 256;
    assert_invalid(&f.config, "vcpus", "accepted 1..=255");
    f.config.vcpus = 1;
    f.config.memory_mib = 15;
    assert_invalid(&f.config, "memory_mib", "at least 16 MiB");
    f.config.memory_mib = 16;
    f.config.validate().expect("16 MiB is enough");
}

#[test]
fn rejects_missing_files() {
    let mut f = fixture();
    f.config.kernel = PathBuf::from("/nonexistent/vmlinux");
    assert_invalid(&f.config, "kernel", "/nonexistent/vmlinux");
    let mut f = fixture();
    f.config.initrd = Some(f.dir.path().to_path_buf());
    assert_invalid(&f.config, "initrd", "not a regular file");
    let mut f = fixture();
    f.config.drives[1].path = f.dir.path().join("missing.raw");
    assert_invalid(&f.config, "drives[1].path", "missing.raw");
    let mut f = fixture();
    f.config.pidfile = PathBuf::from("/nonexistent/dir/qemu.pid");
    assert_invalid(&f.config, "pidfile", "does not exist");
}

#[test]
fn rejects_bad_macs() {
    for (mac, hint) in [
        ("52:54:00:12:34", "six hex octets"),
        ("52-54-00-12-34-56", "six hex octets"),
        ("52:54:00:12:34:5g", "six hex octets"),
        ("52:54:00:12:34:567", "six hex octets"),
        ("01:00:5e:00:00:01", "multicast"),
    ] {
        let mut f = fixture();
        f.config.nics[0].mac = mac.into();
        assert_invalid(&f.config, "nics[0].mac", hint);
    }
}

#[test]
fn rejects_bad_and_duplicate_ids() {
    let mut f = fixture();
    f.config.drives[1].id = "root".into();
    assert_invalid(&f.config, "drives[1].id", "used twice");
    let mut f = fixture();
    f.config.nics[0].id = "data".into();
    assert_invalid(&f.config, "nics[0].id", "used twice");
    let long = "d".repeat(32);
    for bad in ["", "0disk", "disk,x", "disk x", long.as_str()] {
        let mut f = fixture();
        f.config.drives[0].id = bad.to_string();
        assert_invalid(&f.config, "drives[0].id", "a letter followed by");
    }
}

#[test]
fn rejects_other_bad_values() {
    let mut f = fixture();
    f.config.drives[0].format = "vmdk".into();
    assert_invalid(&f.config, "drives[0].format", "accepted: qcow2, raw");
    let mut f = fixture();
    f.config.nics[0].tap = "a-very-long-tap-name".into();
    assert_invalid(&f.config, "nics[0].tap", "1..=15");
    let mut f = fixture();
    f.config.qmp_socket = f.dir.path().join("s".repeat(120));
    assert_invalid(&f.config, "qmp_socket", "limited to 107 bytes");
    let mut f = fixture();
    f.config.agent_socket = Some(f.config.qmp_socket.clone());
    assert_invalid(&f.config, "agent_socket", "same path");
    let mut f = fixture();
    f.config.incoming = Some(" ".into());
    assert_invalid(&f.config, "incoming", "defer");
    let mut f = fixture();
    f.config.name = String::new();
    assert_invalid(&f.config, "name", "non-empty");
}

#[test]
fn accel_names_parse_and_print() {
    assert_eq!(
        "auto".parse::<AccelChoice>().expect("auto"),
        AccelChoice::Auto
    );
    assert_eq!(
        " KVM ".parse::<AccelChoice>().expect("kvm"),
        AccelChoice::Kvm
    );
    assert_eq!("tcg".parse::<AccelChoice>().expect("tcg"), AccelChoice::Tcg);
    let err = "hvf".parse::<AccelChoice>().expect_err("unknown");
    assert_eq!(
        err.to_string(),
        "unknown accelerator \"hvf\": accepted values are auto, kvm, tcg"
    );
    assert_eq!(Accel::Kvm.to_string(), "kvm");
    assert_eq!(Accel::Tcg.to_string(), "tcg");
    assert_eq!(Accel::Kvm.cpu_model(), "host");
    assert_eq!(Accel::Tcg.cpu_model(), "max");
    assert_eq!(
        serde_json::to_string(&Accel::Tcg).expect("serialize"),
        "\"tcg\""
    );
    assert_eq!(
        serde_json::from_str::<AccelChoice>("\"auto\"").expect("deserialize"),
        AccelChoice::Auto
    );
}

#[test]
fn config_round_trips_through_json() {
    let f = fixture();
    let json = serde_json::to_string(&f.config).expect("serialize");
    let back: QemuConfig = serde_json::from_str(&json).expect("deserialize");
    assert_eq!(back, f.config);
}

#[test]
fn migration_credentials_avoid_chacha() {
    let mut f = fixture();
    f.config.tls_psk_dir = Some(f.dir.path().join("psk"));
    std::fs::create_dir(f.dir.path().join("psk")).expect("mkdir");
    let args = f.config.to_args();
    let creds: Vec<&str> = values_of(&args, "-object")
        .into_iter()
        .filter(|o| o.starts_with("tls-creds-psk"))
        .collect();
    assert_eq!(creds.len(), 2, "{args:?}");
    for c in creds {
        assert!(c.ends_with(",priority=NORMAL:-CHACHA20-POLY1305"), "{c}");
    }
}
