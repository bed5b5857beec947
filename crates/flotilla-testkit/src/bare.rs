//! A bare QEMU booting Flotilla's guest without Flotilla: the baseline that
//! benchmarks compare against.

use std::path::Path;
use std::process::{Child, Command, Stdio};

/// `qemu-system-x86_64` with the guest's kernel and initramfs, `memory_mib`,
/// one vCPU under TCG, no disk and no NIC, and the guest agent's
/// virtio-serial channel on `agent_socket`. Callers add what they need
/// (`-qmp`, `-incoming`) before spawning.
pub fn bare_qemu_command(
    kernel: &Path,
    initrd: &Path,
    memory_mib: u64,
    cmdline: &str,
    agent_socket: &Path,
) -> Command {
    let _ = std::fs::remove_file(agent_socket);
    let mut cmd = Command::new("qemu-system-x86_64");
    cmd.args(["-M", "microvm,acpi=off", "-accel", "tcg", "-cpu", "max"])
        .args(["-m", &memory_mib.to_string(), "-smp", "1"])
        .args([
            "-nodefaults",
            "-no-user-config",
            "-nographic",
            "-serial",
            "null",
        ])
        .arg("-kernel")
        .arg(kernel)
        .arg("-initrd")
        .arg(initrd)
        .args(["-append", cmdline])
        .args(["-device", "virtio-serial-device"])
        .arg("-chardev")
        .arg(format!(
            "socket,id=agent,path={},server=on,wait=off",
            agent_socket.display()
        ))
        .args([
            "-device",
            "virtserialport,chardev=agent,name=org.flotilla.agent.0",
        ])
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// A spawned bare QEMU, killed and reaped when dropped.
pub struct BareQemu(pub Child);

impl BareQemu {
    pub fn spawn(mut cmd: Command) -> std::io::Result<BareQemu> {
        cmd.spawn().map(BareQemu)
    }

    pub fn pid(&self) -> i32 {
        self.0.id() as i32
    }
}

impl Drop for BareQemu {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}
