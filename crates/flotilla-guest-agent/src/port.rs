//! The virtio-serial transport: find the port by name, then serve it forever.
//!
//! Linux's virtio_console makes `read()` return 0 at once while no host side is connected, and
//! makes `write()` block until one is. So 0 is not the end: it means "host away", and we look
//! again shortly. Replies still owed to that host are written once the next one connects; its
//! client discards them by id.
//!
//! The decoder is deliberately not reset on "host away": the guest hears of disconnects on a
//! different virtqueue than the data, so the start of a quick reconnect's first frame may already
//! have been read, and a reset would lose it. A partial frame left by the old host is harmless:
//! the decoder sees the new frame's header inside it and reports it as truncated.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use crate::session::Session;
use crate::writer::FrameWriter;
use crate::{log, AgentContext};

/// Where the kernel lists virtio-serial ports and their names.
const PORTS_DIR: &str = "/sys/class/virtio-ports";

/// Poll interval while the port or the host is missing.
const POLL: Duration = Duration::from_millis(20);

/// Returns `/dev/<port>` once a port named `name` exists, polling until then.
pub(crate) fn wait_for(name: &str) -> PathBuf {
    let mut logged = false;
    loop {
        if let Some(path) = find(name).filter(|path| path.exists()) {
            return path;
        }
        if !logged {
            log!("waiting for virtio-serial port {name}");
            logged = true;
        }
        std::thread::sleep(POLL);
    }
}

fn find(name: &str) -> Option<PathBuf> {
    std::fs::read_dir(PORTS_DIR)
        .ok()?
        .flatten()
        .find_map(|entry| {
            let port_name = std::fs::read_to_string(entry.path().join("name")).ok()?;
            (port_name.trim() == name).then(|| Path::new("/dev").join(entry.file_name()))
        })
}

/// Serves the port until reading it fails; returns that error.
pub(crate) fn serve(path: &Path, context: &Arc<AgentContext>) -> io::Error {
    let mut port = match OpenOptions::new().read(true).write(true).open(path) {
        Ok(port) => port,
        Err(error) => return error,
    };
    let writer = match port.try_clone() {
        Ok(out) => FrameWriter::new(out),
        Err(error) => return error,
    };
    context.mark_ready();
    let mut session = Session::new(writer, context.clone());
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match read(&mut port, &mut buf) {
            Ok(0) => std::thread::sleep(POLL),
            Ok(n) => session.receive(buf.get(..n).unwrap_or_default()),
            Err(error) => return error,
        }
    }
}

fn read(port: &mut File, buf: &mut [u8]) -> io::Result<usize> {
    loop {
        match port.read(buf) {
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}
