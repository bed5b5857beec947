//! The unix-socket transport (`--listen-unix`): one connection after another, for tests on the
//! host. Each connection gets a fresh decoder; replies still owed to a closed connection fail to
//! write and are dropped.

use std::io::{self, Read};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use crate::session::Session;
use crate::writer::FrameWriter;
use crate::{log, AgentContext};

/// Binds `path` (replacing a stale socket) and serves connections forever.
pub(crate) fn serve(path: &Path, context: &Arc<AgentContext>) -> io::Result<()> {
    match std::fs::remove_file(path) {
        Err(error) if error.kind() != io::ErrorKind::NotFound => return Err(error),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    context.mark_ready();
    for connection in listener.incoming() {
        match connection {
            Ok(stream) => {
                if let Err(error) = serve_connection(stream, context) {
                    log!("connection failed: {error}");
                }
            }
            Err(error) => {
                log!("accept failed: {error}");
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
    Ok(())
}

fn serve_connection(mut stream: UnixStream, context: &Arc<AgentContext>) -> io::Result<()> {
    let mut session = Session::new(FrameWriter::new(stream.try_clone()?), context.clone());
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) => return Ok(()),
            Ok(n) => session.receive(buf.get(..n).unwrap_or_default()),
            Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
            Err(error) if error.kind() == io::ErrorKind::ConnectionReset => return Ok(()),
            Err(error) => return Err(error),
        }
    }
}
