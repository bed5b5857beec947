//! `flotilla-guest-agent tick ADDR INTERVAL_US`: sends a UDP datagram (a
//! sequence number) to ADDR every INTERVAL_US microseconds until killed.
//! The guest's own clocks stop while the VM is paused, so a pause is only
//! seen from outside: a receiver on the host measures the largest gap
//! between datagrams (the live-migration benchmark does).

use std::net::{SocketAddr, UdpSocket};
use std::process::ExitCode;
use std::time::{Duration, Instant};

pub(crate) fn run(args: &[String]) -> ExitCode {
    let (Some(addr), Some(interval)) = (args.first(), args.get(1)) else {
        eprintln!("usage: flotilla-guest-agent tick ADDR:PORT INTERVAL_US");
        return ExitCode::from(2);
    };
    let (Ok(addr), Ok(interval)) = (addr.parse::<SocketAddr>(), interval.parse::<u64>()) else {
        eprintln!("tick: expected ADDR:PORT and a number of microseconds");
        return ExitCode::from(2);
    };
    let socket = match UdpSocket::bind("0.0.0.0:0") {
        Ok(s) => s,
        Err(e) => {
            eprintln!("tick: {e}");
            return ExitCode::FAILURE;
        }
    };
    let interval = Duration::from_micros(interval.max(100));
    let mut next = Instant::now();
    for seq in 0u64.. {
        // Unreachable for a moment (a network being moved) is not the end.
        let _ = socket.send_to(&seq.to_be_bytes(), addr);
        next += interval;
        let now = Instant::now();
        if next > now {
            std::thread::sleep(next - now);
        } else {
            next = now;
        }
    }
    ExitCode::SUCCESS
}
